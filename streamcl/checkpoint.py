"""Checkpoints: everything a run needs to go on exactly where it stopped, written atomically, read safely.

A checkpoint holds the model (weights, and the module itself when it can be pickled, so grown or
expanded architectures come back), the optimizer (state and groups, by parameter name), every
plugin's and logger's ``state_dict()``, the metrics so far, every random generator, the
experiences trained (without their data), counters, and, when taken inside an experience, the
position there: epoch, next iteration, this epoch's sample order and the joined training data.
Loading needs a strategy built as the one that wrote it (same plugin classes in the same order).

Reading a checkpoint never runs code from it: it is unpickled by ``torch.load(weights_only=True)``,
which builds only tensors, plain Python data and the classes of :func:`allowed_globals` (modules of
``torch.nn``, streamcl and the strategy's own model and plugins, and a few streamcl data classes);
anything else, a function or ``os.system`` for instance, is refused with a :class:`CheckpointError`.
A checkpoint that would hold something else is refused when written, not when resumed.

The file is what ``torch.save`` writes (a zip archive) whose archive comment carries a SHA-256 of
every byte before the digest, so a file with a flipped byte, truncated or padded, is refused
rather than resumed. ``torch.load`` still reads the file as it is.
"""
from __future__ import annotations

import enum
import hashlib
import io
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from streamcl.batch import Batch
from streamcl.errors import StreamclError
from streamcl.memory.budget import Budget
from streamcl.models.heads import grow_heads
from streamcl.scenarios import Experience, TensorData

FORMAT = 2  # 2: SHA-256 in the archive comment, numpy's generator state as a tensor, loaded weights-only

# The archive comment: this tag, then the hex SHA-256 of every byte of the file before the digest.
_TAG = b"streamcl checkpoint sha256 "
_DIGEST = 64  # hex characters
_EOCD = b"PK\x05\x06"  # a zip archive ends with this record (22 bytes), then its comment
_EOCD_SIZE = 22


class CheckpointError(StreamclError):
    """A checkpoint is missing, unreadable, corrupted, unsafe, or was written by a different run."""


@dataclass
class Position:
    """Where inside an experience a checkpoint was taken: training resumes at ``iteration`` of ``epoch``."""

    experience: int
    epoch: int
    iteration: int
    order: torch.Tensor
    data: Dataset | None  # the joined training data, when plugins added to the experience's own

    def check(self, exp: Experience) -> None:
        if exp.index != self.experience:
            raise CheckpointError(f"the checkpoint was taken inside experience {self.experience}; "
                                  f"resume by training that experience, not {exp.index}")


def settings_of(strategy) -> dict:
    """What a strategy was built with and a checkpoint must agree on: the loop's settings (schedule, clipping and
    precision too), the seed (when given), the optimizer (kind, each group's options and parameters), every plugin's arguments and the
    model's parameters (names and shapes), as they were at construction."""
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    groups = [[f"{k}={v!r}" for k, v in sorted(g.items()) if k != "params"] +
              [names.get(id(p), "<outside>") for p in g["params"]] for g in strategy.optimizer.param_groups]
    plain = re.compile(r" at 0x[0-9a-f]+")  # a function's or object's address differs between processes
    return {"epochs": strategy.epochs, "batch_size": strategy.batch_size,
            "loop": plain.sub("", repr((strategy.schedule, strategy.clip_grad_norm, strategy.precision))),
            "seed": strategy.seed if strategy.seed_given else None,
            "optimizer": [type(strategy.optimizer).__name__, *map(str, groups)],
            "plugins": [plain.sub("", repr(p)) for p in strategy.plugins],
            "model": [f"{n} {tuple(p.shape)}" for n, p in strategy.model.named_parameters()]}


def _differences(saved: dict, mine: dict) -> list[str]:
    out = []
    for key in sorted(saved.keys() | mine.keys()):
        a, b = saved.get(key), mine.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            only = [x for x in a if x not in b][:2] + [x for x in b if x not in a][:2]
            out.append(f"{key} ({'; '.join(map(str, only)) or 'order'} ...)" if only else f"{key} (order)")
        else:
            out.append(f"{key} ({a!r} there, {b!r} here)")
    return out


def _plugin_id(p: object) -> str:
    return f"{type(p).__module__}.{type(p).__qualname__}"


def _states(objects) -> list:
    return [p.state_dict() if callable(getattr(p, "state_dict", None)) else None for p in objects]


# ----------------------------------------------------------------------------------- random state
def _rng_state(strategy) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy's tuple, stored as plain data
    state = {"generator": strategy.generator.get_state(), "torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(strategy, state: dict) -> None:
    strategy.generator.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------- writing
def state_of(strategy, position: bool = False) -> dict:
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    names.update({id(p): f"<outside {i}.{k}>" for i, ps in enumerate(strategy.param_groups.outside)
                  for k, p in enumerate(ps)})
    exp = strategy.experience
    return {
        "format": FORMAT,
        "meta": strategy.checkpoint_meta,
        "settings": strategy.settings,
        "plugins": [_plugin_id(p) for p in strategy.plugins],
        "model": strategy.model.state_dict(),
        "module": strategy.model,
        "frozen": [n for n, p in strategy.model.named_parameters() if not p.requires_grad],
        "optimizer": strategy.optimizer.state_dict(),
        "optimizer_params": [[names[id(p)] for p in g["params"]] for g in strategy.optimizer.param_groups],
        "plugin_states": _states(strategy.plugins),
        "logger_states": _states(strategy.loggers),
        "metrics": strategy.metrics.state_dict(),
        "rng": _rng_state(strategy),
        "scaler": None if strategy.scaler is None else strategy.scaler.state_dict(),  # fp16's loss scale
        "trained": [{k: getattr(e, k) for k in ("index", "classes", "n_classes", "task", "origin", "covers")}
                    for e in strategy.trained],
        "counters": {"global_step": strategy.global_step, "train_seconds": strategy.train_seconds,
                     "eval_seconds": strategy.eval_seconds, "seed": strategy.seed},
        "fit_epochs": dict(strategy.fit_epochs),
        "position": None if not position else {
            "experience": exp.index, "epoch": strategy.epoch, "iteration": strategy.iteration + 1,
            "order": strategy.order, "data": _cpu(strategy.train_dataset) if strategy._joined_data else None},
    }


def _cpu(data):
    return data.to("cpu") if hasattr(data, "to") else data


def save(strategy, path: Path, position: bool = False) -> Path:
    """Write the checkpoint to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A checkpoint that :func:`load` would refuse (state holding a function or an unknown class) is
    refused here, before anything is written; a model module that holds such a thing, or cannot
    be pickled at all, is left out (weights only), as :func:`load` needs it only when a plugin
    changed the architecture.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, so no checkpoint can be written there; move it away")
    state = state_of(strategy, position)
    allowed = allowed_globals(strategy)
    try:
        payload = _serialize(state)
        unsafe = _unsafe_globals(payload, allowed)
    except (pickle.PicklingError, AttributeError, TypeError):  # a model class that cannot be pickled
        payload = None
    if payload is None or unsafe:
        state["module"] = None  # weights only
        payload = _serialize(state)
        unsafe = _unsafe_globals(payload, allowed)
    if unsafe:
        raise CheckpointError(f"cannot write a checkpoint: {_holder(strategy, state, allowed)} holds "
                              f"{', '.join(sorted(unsafe))}, which a checkpoint may not hold (reading it back "
                              "could run code); a state_dict() should return tensors, numbers, strings, "
                              "lists, tuples and dicts")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(signed(payload))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _serialize(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def signed(payload: bytes) -> bytes:
    """``torch.save``'s bytes with the SHA-256 archive comment that :func:`verified` checks."""
    if payload[-_EOCD_SIZE:-_EOCD_SIZE + 4] != _EOCD or payload[-2:] != b"\0\0":
        raise CheckpointError("torch.save wrote an archive this version of streamcl cannot sign")
    comment = len(_TAG) + _DIGEST
    head = payload[:-2] + comment.to_bytes(2, "little") + _TAG
    return head + hashlib.sha256(head).hexdigest().encode()


_TMP = re.compile(r"\..+\.(\d+)\.tmp")  # the temporary files save() writes: .<name>.<pid>.tmp


def remove_leftovers(folder: str | Path | None) -> list[Path]:
    """Delete the temporary files that :func:`save` left in ``folder`` when its process died mid-write, and
    return them. Those of a process still running are kept; no other file is touched."""
    if folder is None or not Path(folder).is_dir():
        return []
    gone = []
    for path in Path(folder).iterdir():
        match = _TMP.fullmatch(path.name)
        if match and path.is_file() and not _running(int(match.group(1))):
            try:
                path.unlink()
            except OSError:  # gone already, or not ours to delete
                continue
            gone.append(path)
    return gone


def _running(pid: int) -> bool:
    """Whether another process with this id runs (this one writes no checkpoint while it starts)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unsafe_globals(payload: bytes, allowed: list) -> list[str]:
    with _allowing(allowed):
        return torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(payload))


def _holder(strategy, state: dict, allowed: list) -> str:
    """Which part of ``state`` holds what cannot be read back: a plugin or logger by name, else the key."""
    for kind, objects, states in (("plugin", strategy.plugins, state["plugin_states"]),
                                  ("logger", strategy.loggers, state["logger_states"])):
        for obj, s in zip(objects, states):
            if s is not None and _unsafe_globals(_serialize(s), allowed):
                return f"the state_dict() of {kind} {_plugin_id(obj)}"
    for key, value in state.items():
        if _unsafe_globals(_serialize(value), allowed):
            return f"the checkpoint's {key!r}"
    return "the checkpoint"


# ------------------------------------------------------------------------------- what may be read
def allowed_globals(strategy) -> list[type]:
    """The classes a checkpoint of ``strategy`` may hold beyond tensors and plain data.

    ``nn.Module`` classes defined in ``torch.nn`` or in streamcl (its plugins included) or in the
    module of one of the strategy's plugins; every class of the modules in ``strategy.model`` now
    (the user's own model) and the enum classes of values they hold; and the data classes that
    plugin states and the position inside an experience hold (:class:`~streamcl.scenarios.TensorData`,
    :class:`~streamcl.batch.Batch`, :class:`~streamcl.memory.budget.Budget`). The weights-only
    unpickler builds these with ``cls.__new__`` and ``__setstate__`` (or, for an enum, a lookup
    of its value) from data it has itself unpickled. Classes only: apart from torch's own
    tensor-rebuilding functions no function is allowed, so none can be called.
    """
    plugin_modules = {type(p).__module__ for p in strategy.plugins}
    found = {TensorData, Batch, Budget}
    for module in strategy.model.modules():  # the user's model: its classes and the enums it holds (timm's Format)
        found.add(type(module))
        found.update(type(v) for v in vars(module).values() if isinstance(v, enum.Enum))
    stack = [nn.Module]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            where = cls.__module__
            if "<locals>" not in cls.__qualname__ and (where.startswith(("torch.nn.modules.", "streamcl."))
                                                       or where in plugin_modules):
                found.add(cls)
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


class _allowing:
    """``torch.serialization.safe_globals`` for this read only, leaving globals the user allowed in place."""

    def __init__(self, allowed: list):
        present = set(torch.serialization.get_safe_globals())
        self.context = torch.serialization.safe_globals([g for g in allowed if g not in present])

    def __enter__(self):
        self.context.__enter__()

    def __exit__(self, *exc):
        self.context.__exit__(*exc)


# ---------------------------------------------------------------------------------------- reading
def verified(data: bytes, path: Path) -> bytes:
    """``data`` if it ends with a streamcl checksum that matches it, else a :class:`CheckpointError`."""
    if not data:
        raise CheckpointError(f"{path} is not a readable streamcl checkpoint: the file is empty")
    tail = data[-(len(_TAG) + _DIGEST):-_DIGEST]
    eocd = len(data) - (_EOCD_SIZE + len(_TAG) + _DIGEST)
    if tail != _TAG or eocd < 0 or data[eocd:eocd + 4] != _EOCD:
        raise CheckpointError(f"{path} is not a readable streamcl checkpoint: it does not end with a streamcl "
                              "checksum (a truncated file, a file of another program, or a checkpoint of a "
                              f"streamcl older than checkpoint format {FORMAT})")
    if hashlib.sha256(data[:-_DIGEST]).hexdigest().encode() != data[-_DIGEST:]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 checksum does not match its contents (a "
                              "flipped or overwritten byte); it was not loaded. Resume from another copy or "
                              "start the run again")
    return data


def read(path: Path, allowed: list, map_location=None) -> dict:
    """The verified, weights-only unpickled contents of ``path`` (no run restored)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror or err}") from None
    verified(data, path)
    try:
        with _allowing(allowed):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        reason = found.group(1) if found else str(err).splitlines()[0]
        raise CheckpointError(f"{path} was refused as unsafe: it holds something a streamcl checkpoint never "
                              f"holds, and reading it could run code, so it was not loaded ({reason})") from None
    except Exception as err:  # a well-signed file that torch cannot read
        raise CheckpointError(f"{path} is not a readable streamcl checkpoint: {type(err).__name__}: {err}") from None


_SHAPE = {"format": int, "meta": dict, "settings": dict, "plugins": list, "model": dict,
          "module": (nn.Module, type(None)), "frozen": list, "optimizer": dict, "optimizer_params": list,
          "plugin_states": list, "logger_states": list, "metrics": dict, "rng": dict, "trained": list,
          "counters": dict, "position": (dict, type(None))}
_COUNTERS = ("global_step", "train_seconds", "eval_seconds", "seed")
_POSITION = ("experience", "epoch", "iteration", "order", "data")
_TRAINED = ("index", "classes", "n_classes", "task", "origin", "covers")


def _check_shape(state, path: Path) -> None:
    """Every key a checkpoint has, of the type it has, or a :class:`CheckpointError` naming the first that is not."""
    def bad(what: str):
        raise CheckpointError(f"{path} is not a valid streamcl checkpoint: {what}")

    if not isinstance(state, dict):
        bad(f"it holds a {type(state).__name__}, not a dict")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a streamcl checkpoint of format {FORMAT} "
                              f"(its format: {state.get('format')!r})")
    for key, kind in _SHAPE.items():
        if key not in state:
            bad(f"it has no {key!r}")
        if not isinstance(state[key], kind):
            bad(f"its {key!r} is a {type(state[key]).__name__}")
    if len(state["plugin_states"]) != len(state["plugins"]):
        bad(f"its 'plugin_states' has {len(state['plugin_states'])} entries for {len(state['plugins'])} plugins")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        bad("its 'model' holds something other than tensors")
    if not all(isinstance(n, str) for n in state["frozen"]):
        bad("its 'frozen' holds something other than parameter names")
    if not (isinstance(state["optimizer"].get("state"), dict) and isinstance(state["optimizer"].get("param_groups"), list)
            and all(isinstance(g, dict) for g in state["optimizer"]["param_groups"])):
        bad("its 'optimizer' is not an optimizer's state_dict()")
    if len(state["optimizer_params"]) != len(state["optimizer"]["param_groups"]) or not all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in state["optimizer_params"]):
        bad("its 'optimizer_params' are not one list of parameter names per optimizer group")
    if not all(isinstance(e, dict) and set(e) == set(_TRAINED) for e in state["trained"]):
        bad(f"its 'trained' are not experiences ({', '.join(_TRAINED)})")
    if set(state["counters"]) != set(_COUNTERS) or not all(
            isinstance(v, (int, float)) for v in state["counters"].values()):
        bad(f"its 'counters' are not {', '.join(_COUNTERS)}")
    fit_epochs = state.get("fit_epochs", {})
    if not isinstance(fit_epochs, dict) or not all(isinstance(k, str) and type(v) is int for k, v in fit_epochs.items()):
        bad("its 'fit_epochs' are not private loops' names and epoch counts")
    if not isinstance(state.get("scaler"), (dict, type(None))):
        bad("its 'scaler' is not a gradient scaler's state_dict()")
    pos = state["position"]
    if pos is not None and (set(pos) != set(_POSITION) or not isinstance(pos["order"], torch.Tensor)
                            or not all(isinstance(pos[k], int) for k in ("experience", "epoch", "iteration"))):
        bad(f"its 'position' is not {', '.join(_POSITION)}")
    rng = state["rng"]
    numpy_rng = rng.get("numpy")
    if not (isinstance(rng.get("generator"), torch.Tensor) and isinstance(rng.get("torch"), torch.Tensor)
            and isinstance(numpy_rng, dict) and isinstance(numpy_rng.get("keys"), torch.Tensor)
            and isinstance(rng.get("python"), tuple)):
        bad("its 'rng' is not the state of every random generator")


def load(strategy, path: Path, check_meta=None) -> dict:
    """Restore ``path`` into ``strategy``, built as the one that wrote it (else refused, naming what differs);
    returns the checkpoint's ``meta``. ``check_meta(meta)`` runs first and may refuse it (the runner's config)."""
    path = Path(path)
    state = read(path, allowed_globals(strategy), map_location=strategy.device)
    _check_shape(state, path)
    mine = [_plugin_id(p) for p in strategy.plugins]
    if state["plugins"] != mine:
        raise CheckpointError(f"{path} was written with plugins {state['plugins']}; this strategy has {mine}")
    if check_meta is not None:
        check_meta(state["meta"])
    differ = _differences(state["settings"], strategy.settings)
    if differ:
        raise CheckpointError(f"{path} was written by a strategy built differently: {', '.join(differ)} differ. "
                              "A checkpoint restores only into a strategy built as the one that wrote it (same "
                              "model, optimizer, plugins and settings); build that one, or start a new run")
    try:
        _restore(strategy, state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit this strategy ({type(err).__name__}: {err}); it was written "
                              "by another run or another version of a plugin") from None
    return state["meta"]


def _restore(strategy, state: dict) -> None:
    _restore_model(strategy, state)
    _restore_optimizer(strategy, state)
    for objects, states in ((strategy.plugins, state["plugin_states"]), (strategy.loggers, state["logger_states"])):
        for obj, s in zip(objects, states):
            if s is not None:
                obj.load_state_dict(s)
    strategy.metrics.load_state_dict(state["metrics"])
    if state.get("scaler") and strategy.scaler is not None:
        strategy.scaler.load_state_dict(state["scaler"])
    strategy.trained = [Experience(dataset=None, **e) for e in state["trained"]]
    for key in _COUNTERS:
        setattr(strategy, key, state["counters"][key])
    strategy.fit_epochs = dict(state.get("fit_epochs", {}))
    pos = state["position"]
    if pos is not None:
        strategy._resume_at = Position(**pos)
        strategy.order = pos["order"]
        strategy._joined_data = pos["data"] is not None
        strategy.train_dataset = strategy._on_device(pos["data"]) if pos["data"] is not None else None
    _set_rng_state(strategy, state["rng"])


def _restore_model(strategy, state: dict) -> None:
    """Weights into the strategy's own model when the shapes agree (heads grown first), else the saved module."""
    model = strategy.model
    n_seen = max((c for e in state["trained"] for c in e["classes"]), default=-1) + 1
    grow_heads(model, n_seen)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        if state["module"] is None:
            raise CheckpointError(f"the checkpoint's weights do not fit this model and its module could not be "
                                  f"saved: {err}") from None
        strategy.model = state["module"].to(strategy.device)
    frozen = set(state["frozen"])
    for name, param in strategy.model.named_parameters():  # plugins freeze in hooks a resume may not re-run
        param.requires_grad_(name not in frozen)
    strategy._inspect_model()


def _restore_optimizer(strategy, state: dict) -> None:
    opt = strategy.optimizer
    params = dict(strategy.model.named_parameters())
    params.update({f"<outside {i}.{k}>": p for i, ps in enumerate(strategy.param_groups.outside)
                   for k, p in enumerate(ps)})
    saved = state["optimizer"]
    opt.param_groups.clear()
    opt.state.clear()
    for group, names in zip(saved["param_groups"], state["optimizer_params"]):
        opt.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                             "params": [params[n] for n in names]})
    opt.load_state_dict(saved)
    strategy.param_groups.group_of(strategy.model, opt)
