"""Run configuration in TOML (the shape of docs/protocols.md): load, override, validate.

Every problem raises :class:`ConfigError` naming the bad key and what is allowed. Defaults are
the SFM-5 protocol, so a config may hold only what differs from it.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

from streamcl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_INT, _NUM, _STR, _BOOL, _INTS, _NUMS = (int,), (int, float), (str,), (bool,), "list[int]", "list[number]"
_TABLE, _PATH_OR_BOOL = (dict,), (bool, str)
_INT_OR_INTS = "int or list[int]"
_STRS = "list[str]"

# section -> key -> (accepted types, default); None as default means "absent unless given".
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "benchmark": {
        "name": (_STR, "split-fmnist"), "scenario": (_STR, "class"), "n_experiences": (_INT, 5),
        "class_order": (_INTS, None), "classes_per_exp": (_INT_OR_INTS, None), "first_exp_classes": (_INT, None),
        "class_seed": (_INT, None), "root": (_STR, None),
        "task_labels": (_BOOL, False), "train_range": (_INTS, None), "args": (_TABLE, None),
        "online": (_TABLE, None),
    },
    "model": {"name": (_STR, "mlp"), "hidden": (_INTS, [256, 256]), "growing": (_BOOL, False),
              "pretrained": (_PATH_OR_BOOL, False), "checkpoint": (_STR, None), "args": (_TABLE, None)},
    "train": {
        "optimizer": (_STR, "sgd"), "lr": (_NUM, 0.01), "momentum": (_NUM, 0.9), "weight_decay": (_NUM, 0.0),
        "batch_size": (_INT, 128), "eval_batch_size": (_INT, 512), "epochs": (_INT, 2), "device": (_STR, "cpu"),
        "checkpoint_every": (_INT, 0), "augment": (_STR, None), "crop_padding": (_INT, None),
        "schedule": (_STR, None), "warmup": (_INT, None), "milestones": (_NUMS, None), "gamma": (_NUM, None),
        "clip_grad_norm": (_NUM, None), "precision": (_STR, None), "channels_last": (_BOOL, None),
        "compile": (_PATH_OR_BOOL, None), "validation": (_NUM, None),
        "num_workers": (_INT, None), "pin_memory": (_BOOL, None), "persistent_workers": (_BOOL, None),
    },
    "log": {"tensorboard": (_BOOL, True), "console": (_BOOL, True), "csv": (_BOOL, True), "metrics": (_STRS, None),
            "wandb": (_BOOL, False), "wandb_project": (_STR, None), "wandb_mode": (_STR, None)},
}
# "section.key" (a top-level key: its name) -> what it does, one sentence; docs/config.md's tables are generated
# from SCHEMA, TOP, CHOICES and these (python -m streamcl.docs), and tests/test_docs.py wants one for every key.
HELP: dict[str, str] = {
    "seed": "Seeds Python's random, NumPy and PyTorch before the model is built, and the strategy's generator "
            "(the order of the data); 0 to 2**63-1.",
    "benchmark.name": "`\"split-fmnist\"`, `\"permuted-fmnist\"`, or a benchmark registered under "
                      "`streamcl.benchmarks` (`streamcl benchmarks`).",
    "benchmark.scenario": "Class-, task- or domain-incremental; must suit `name` (the pairs are below).",
    "benchmark.n_experiences": "The number of experiences in the stream; at most 10 for split-fmnist, the number "
                               "of test images for permuted-fmnist.",
    "benchmark.class_order": "The order in which the classes arrive, a permutation of the labels (split streams).",
    "benchmark.classes_per_exp": "Classes per experience, a divisor of the classes to split, or the size of each "
                                 "experience as a list; absent: the classes divided evenly.",
    "benchmark.first_exp_classes": "The number of classes in experience 0, the rest divided among the others "
                                   "(B50-Inc10).",
    "benchmark.class_seed": "Without `class_order`, the seed of the drawn class order.",
    "benchmark.root": "The first folder searched for the dataset's files.",
    "benchmark.task_labels": "Experience k carries task label k at train and test time; of the two built-in "
                             "streams only permuted-fmnist takes it (PFM-5-TL).",
    "benchmark.train_range": "`[first, end]`, 0 <= first < end: only training images first .. end-1 (dataset "
                             "order) make the stream.",
    "benchmark.args": "Keyword arguments of a registered benchmark's function, checked by name.",
    "benchmark.online": "The online setting (`streamcl.scenarios.online`): `{}` for a single pass over the stream as "
                        "it is, `blurry` (fraction of each experience moved to the others), `boundaries = false` "
                        "(experiences of `chunk` samples in stream order); the order drawn from the run's seed.",
    "model.name": "A model registered under `streamcl.models` (`streamcl models`), or `\"timm:<model name>\"`.",
    "model.hidden": "The MLP's hidden layer widths, each at least 1 (other models ignore it).",
    "model.growing": "The output layer starts empty and grows before each experience to the classes seen so far.",
    "model.pretrained": "timm models only: `true` downloads timm's weights, a string is a weights file.",
    "model.checkpoint": "A backbone's weights file (`torch.save(model.state_dict())`) loaded but for the head, or "
                        "`\"pt-sfm-5\"`.",
    "model.args": "The model's own keyword arguments (for timm, those of `timm.create_model`), checked by name.",
    "train.optimizer": "The optimizer of every parameter.",
    "train.lr": "The learning rate, above 0 and at most 100.",
    "train.momentum": "SGD's momentum, from 0 to below 1 (`\"sgd\"` only).",
    "train.weight_decay": "L2 weight decay, from 0 to 1.",
    "train.batch_size": "Training minibatch size (new samples; replayed ones are added to it).",
    "train.eval_batch_size": "Evaluation minibatch size.",
    "train.epochs": "Epochs per experience.",
    "train.device": "A torch device this machine has: `\"cpu\"`, `\"cuda\"`, `\"cuda:1\"`, `\"mps\"`.",
    "train.checkpoint_every": "Also write `OUT/checkpoints/last.pt` every this many training steps (0: after each "
                              "experience only).",
    "train.augment": "`\"crop_flip\"`: every training image, new and replayed, randomly cropped after zero padding "
                     "and flipped (`streamcl.augment.CropFlip`); memories keep the clean images.",
    "train.crop_padding": "`\"crop_flip\"`'s zero padding in pixels before the crop (2 when absent; 4 in the CIFAR "
                          "recipe).",
    "train.schedule": "The learning rate of every group times a factor restarted at every experience "
                      "(`streamcl.schedule`); absent: the optimizer's rate throughout.",
    "train.warmup": "Steps of linear warm-up at the start of every experience (with or without `schedule`).",
    "train.milestones": "`\"multistep\"` only: fractions of the experience's steps where the rate is multiplied by "
                        "`gamma` (`[0.5, 0.75]` when absent).",
    "train.gamma": "`\"multistep\"` only: the factor at each milestone (0.1 when absent).",
    "train.clip_grad_norm": "Above 0: the gradients' total 2-norm is clipped to it before each update.",
    "train.precision": "The forward and the losses under autocast (`\"fp16\"` with a checkpointed gradient "
                       "scaler); absent: float32.",
    "train.channels_last": "Images and convolution weights in NHWC memory order.",
    "train.compile": "`true`: `torch.compile` the training forward; a string names the backend.",
    "train.validation": "In (0, 1): that fraction of each experience held out (seeded), the seen ones evaluated "
                        "after every epoch (`periodic`).",
    "train.num_workers": "DataLoader worker processes for datasets that are not tensors in memory (0 when absent).",
    "train.pin_memory": "Page-locked host batches, copied to the GPU asynchronously.",
    "train.persistent_workers": "DataLoader workers kept for all epochs of an experience.",
    "log.tensorboard": "A TensorBoard run in `OUT/tensorboard/`: loss terms, accuracies, the accuracy matrix, "
                       "hyper-parameters.",
    "log.console": "Progress and one accuracy line per evaluation on stderr (`streamcl run --quiet` turns it off).",
    "log.csv": "`OUT/scalars.csv`: every logged scalar as rows `name, axis, step, value`.",
    "log.metrics": "Metric plugins added to the run, by name (e.g. `[\"train_accuracy\", \"confusion_matrix\"]`).",
    "log.wandb": "A Weights & Biases run (`pip install 'streamcl[wandb]'`).",
    "log.wandb_project": "The Weights & Biases project (`\"streamcl\"` when absent).",
    "log.wandb_mode": "`\"offline\"` (when absent) writes under `OUT/wandb/` for a later `wandb sync`; `\"online\"` "
                      "streams to the server.",
}
TOP = {"seed": (_INT, 0)}
LISTS = ("plugins",)
TABLES = ("method",)
CHOICES = {
    ("benchmark", "scenario"): ("class", "task", "domain"),
    ("train", "optimizer"): ("sgd", "adam"),
    ("train", "augment"): ("crop_flip",),
    ("train", "schedule"): ("cosine", "multistep", "constant"),
    ("train", "precision"): ("bf16", "fp16"),
    ("train", "device"): None,  # any torch device string
    ("log", "wandb_mode"): ("offline", "online"),
}
POSITIVE = ("batch_size", "epochs", "n_experiences", "classes_per_exp", "first_exp_classes")
INT_MAX = 2**63 - 1  # the largest TOML integer, and the largest seed torch takes
MAX_LR, MAX_WEIGHT_DECAY = 100.0, 1.0  # beyond these a run diverges at once: a typo, not a setting
# the SFM-5 / PFM-5 names, built by the runner as always; every other benchmark.name is a registered benchmark
# (entry points ``streamcl.benchmarks``), whose scenarios are its function's ``scenarios`` (:func:`scenarios_of`)
SCENARIOS = {"split-fmnist": ("class", "task"), "permuted-fmnist": ("domain",)}
# [benchmark] keys passed to a registered benchmark's function when given (with benchmark.args)
BENCHMARK_KEYS = ("root", "n_experiences", "scenario", "class_order", "class_seed", "classes_per_exp",
                  "first_exp_classes", "task_labels", "train_range")
# the config part that selects each protocol of docs/protocols.md (the defaults are SFM-5)
PROTOCOLS = {
    "SFM-5": {},
    "SFM-5-TIL": {"benchmark": {"scenario": "task"}},
    "PFM-5": {"benchmark": {"name": "permuted-fmnist", "scenario": "domain"}},
    # PFM-5 with experience k given task label k at train and test time (methods that need the task label)
    "PFM-5-TL": {"benchmark": {"name": "permuted-fmnist", "scenario": "domain", "task_labels": True}},
    # SFM-5 with the small CNN, crop-and-flip augmentation on the device and a cosine schedule per experience
    "SFM-5-CNN": {"model": {"name": "cnn"}, "train": {"augment": "crop_flip", "schedule": "cosine"}},
    # SFM-5 online: every training image once (one epoch), minibatches of 10, the experiences' boundaries kept
    "OSFM-5": {"benchmark": {"online": {}}, "train": {"epochs": 1, "batch_size": 10}},
    # SFM-5 on training images 30,000-59,999, from the vision transformer pre-trained on images 0-29,999
    "PT-SFM-5": {"benchmark": {"train_range": [30000, 60000]},
                 "model": {"name": "timm:vit_tiny_patch16_224", "checkpoint": "pt-sfm-5",
                           "args": {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4,
                                    "num_heads": 4, "mlp_ratio": 4.0}}},
}


def defaults() -> dict[str, Any]:
    cfg: dict[str, Any] = {k: d for k, (_, d) in TOP.items()}
    for section, keys in SCHEMA.items():
        cfg[section] = {k: copy.deepcopy(d) for k, (_, d) in keys.items() if d is not None}
    cfg["plugins"] = []
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a TOML file, apply ``key=value`` overrides, validate, and fill in defaults."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read as text: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return parse(raw, overrides)


def parse(raw: Any, overrides: list[str] = ()) -> dict[str, Any]:
    """Validate a config dictionary (as TOML gives it) with overrides; return it with defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a table of sections, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    cfg = defaults()
    allowed_top = [*TOP, *SCHEMA, *LISTS, *TABLES]
    for key, value in raw.items():
        if key in TOP:
            cfg[key] = _check(key, value, TOP[key][0])
        elif key in SCHEMA:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
            for sub, v in value.items():
                if sub not in SCHEMA[key]:
                    raise ConfigError(f"unknown key '{key}.{sub}'; [{key}] takes: {', '.join(SCHEMA[key])}")
                cfg[key][sub] = _check(f"{key}.{sub}", v, SCHEMA[key][sub][0], CHOICES.get((key, sub)))
        elif key == "plugins":
            cfg["plugins"] = [_named_table(f"plugins[{i}]", p) for i, p in enumerate(_as_list(key, value))]
        elif key == "method":
            cfg["method"] = _named_table("method", value)
        else:
            raise ConfigError(f"unknown key '{key}'; a config takes: {', '.join(allowed_top)}")
    _check_train(cfg["train"])
    if any(h < 1 for h in cfg["model"]["hidden"]):
        raise ConfigError(f"'model.hidden' = {cfg['model']['hidden']!r}: every layer needs at least one unit")
    _check_device(cfg["train"]["device"])
    _check_model(cfg["model"])
    bench = cfg["benchmark"]
    given = raw.get("benchmark") if isinstance(raw.get("benchmark"), dict) else {}
    if bench["name"] in SCENARIOS:
        _check_fmnist_benchmark(bench)
    else:
        _check_registered_benchmark(bench, given)
    if bench.get("online") is not None:
        _check_online(bench["online"])
    span = bench.get("train_range")
    if span is not None and not (len(span) == 2 and 0 <= span[0] < span[1]):
        raise ConfigError(f"'benchmark.train_range' = {span!r} must be [first, end] training images, 0 <= first < end")
    return cfg


def _check_online(table: dict) -> None:
    from streamcl.errors import DataError
    from streamcl.registry import check_arguments
    from streamcl.scenarios import online
    from streamcl.scenarios.builders import check_online

    check_arguments(online, table, "benchmark.online", fixed=("benchmark", "seed"))
    for key, kinds in (("blurry", _NUM), ("boundaries", _BOOL), ("chunk", _INT)):
        if key in table:
            table[key] = _check(f"benchmark.online.{key}", table[key], kinds, None)
    try:
        check_online(**table)
    except DataError as err:
        raise ConfigError(f"benchmark.online: {err}") from None


def _check_fmnist_benchmark(bench: dict) -> None:
    if bench["scenario"] not in SCENARIOS[bench["name"]]:
        raise ConfigError(f"benchmark.scenario = '{bench['scenario']}' does not fit benchmark.name = "
                          f"'{bench['name']}'; it takes: {', '.join(SCENARIOS[bench['name']])}")
    if bench.get("task_labels") and bench["name"] != "permuted-fmnist":
        raise ConfigError("benchmark.task_labels = true gives the permuted stream's experiences task labels; "
                          f"for {bench['name']} use benchmark.scenario = 'task'")
    if bench.get("args"):
        raise ConfigError(f"'benchmark.args' are arguments of a registered benchmark's function; "
                          f"{bench['name']} takes none (its registered twin {bench['name'].replace('-', '_')} does)")


def scenarios_of(builder) -> tuple[str, ...]:
    """The scenarios a benchmark function takes: its ``scenarios`` attribute; without one, all three if it takes
    a ``scenario`` argument, else "class"."""
    import inspect

    found = getattr(builder, "scenarios", None)
    if found:
        return tuple(found)
    return ("class", "task", "domain") if "scenario" in inspect.signature(builder).parameters else ("class",)


def benchmark_arguments(bench: dict, builder) -> dict[str, Any]:
    """The keyword arguments of a registered benchmark's function: the [benchmark] keys given (``scenario``
    only to a function that takes it), then ``benchmark.args``."""
    import inspect

    takes = inspect.signature(builder).parameters
    out = {k: bench[k] for k in BENCHMARK_KEYS if k in bench and (k != "scenario" or "scenario" in takes)}
    return {**out, **(bench.get("args") or {})}


def _check_registered_benchmark(bench: dict, given: dict) -> None:
    """A registered benchmark: its name, its scenario, and every argument it is given, checked by name. Keys the
    config did not give take the function's own defaults (the literature's splits), not SFM-5's."""
    import inspect

    from streamcl.registry import available_benchmarks, check_arguments

    known = available_benchmarks()
    name = bench["name"]
    if name not in known:
        raise ConfigError(f"'benchmark.name' = {name!r} is not one of: {', '.join([*SCENARIOS, *known])}")
    try:
        builder = known[name].load()
    except Exception as err:  # a third party's broken module: name it
        raise ConfigError(f"benchmark '{name}' ({known[name].target}) cannot be loaded: {err}") from None
    for key in ("n_experiences", "task_labels"):
        if key not in given:
            bench.pop(key, None)
    allowed = scenarios_of(builder)
    if "scenario" not in given:
        default = inspect.signature(builder).parameters.get("scenario")
        bench["scenario"] = default.default if default is not None and default.default in allowed else allowed[0]
    if bench["scenario"] not in allowed:
        raise ConfigError(f"benchmark.scenario = '{bench['scenario']}' does not fit benchmark.name = '{name}'; "
                          f"it takes: {', '.join(allowed)}")
    twice = sorted(set(bench.get("args") or {}) & {*BENCHMARK_KEYS, "name"})
    if twice:
        raise ConfigError(f"'benchmark.args' holds {', '.join(twice)}: give {'them' if len(twice) > 1 else 'it'} "
                          f"in [benchmark] itself (benchmark.{twice[0]})")
    check_arguments(builder, benchmark_arguments(bench, builder), f"benchmark '{name}'")


def _check_model(m: dict) -> None:
    """``model.name`` registered (``streamcl.models``) or ``timm:<name>``; ``model.args`` ones the model takes."""
    from streamcl.models import zoo

    name, timm = m["name"], m["name"].startswith("timm:") and len(m["name"]) > 5
    if not timm and name not in zoo.names():
        raise ConfigError(f"'model.name' = {name!r} is not one of: {', '.join(zoo.names())}")
    if not timm and m["pretrained"] is not False:
        raise ConfigError("'model.pretrained' weights are for timm models (model.name = 'timm:<name>')")
    if name == "mlp" and "hidden" in (m.get("args") or {}):
        raise ConfigError("the MLP's layer widths are 'model.hidden', not 'model.args.hidden'")
    zoo.check_args(name, m.get("args") or {}, "'model.args': model")


def _check_train(t: dict) -> None:
    """Learning rate, momentum and weight decay within the ranges docs/config.md gives (sign and finiteness
    are checked with the types)."""
    if not 0 < t["lr"] <= MAX_LR:
        raise ConfigError(f"'train.lr' must be above 0 and at most {MAX_LR:g} (a larger rate diverges at once), "
                          f"got {t['lr']!r}")
    if not t["momentum"] < 1:
        raise ConfigError(f"'train.momentum' must be below 1 (from 1 on, SGD's steps grow without end), "
                          f"got {t['momentum']!r}")
    if not t["weight_decay"] <= MAX_WEIGHT_DECAY:
        raise ConfigError(f"'train.weight_decay' must be at most {MAX_WEIGHT_DECAY:g}, got {t['weight_decay']!r}")
    if t.get("validation") is not None and not 0 < t["validation"] < 1:
        raise ConfigError(f"'train.validation' is the fraction of each experience held out, in (0, 1); "
                          f"got {t['validation']!r}")
    if t.get("milestones") is not None and t.get("schedule") != "multistep":
        raise ConfigError("'train.milestones' are for train.schedule = 'multistep'")
    if t.get("gamma") is not None and t.get("schedule") != "multistep":
        raise ConfigError("'train.gamma' is for train.schedule = 'multistep'")
    if t.get("crop_padding") is not None and t.get("augment") != "crop_flip":
        raise ConfigError("'train.crop_padding' is the padding of train.augment = 'crop_flip'")
    if t.get("clip_grad_norm") is not None and t["clip_grad_norm"] <= 0:
        raise ConfigError(f"'train.clip_grad_norm' must be above 0, got {t['clip_grad_norm']!r}")


def _check_device(name: str) -> None:
    """A device this machine has and can train on: CUDA by its count, others by allocating one tensor there."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"train.device = {name!r} is not a torch device: {err}") from None
    if device.type == "meta":
        raise ConfigError(f"train.device = {name!r} holds shapes but no data, so nothing can be trained on it; "
                          "use 'cpu' or a GPU")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"train.device = {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          "use 'cpu' or an existing GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device = {name!r}, but this machine or PyTorch build has no MPS (Apple GPU) "
                          "device; use 'cpu' or a device it has")
    if device.type not in ("cpu", "cuda"):
        try:
            torch.empty(1, device=device)
        except Exception as err:  # each backend fails its own way: RuntimeError, NotImplementedError, ...
            why = str(err).split(". ")[0].splitlines()[0][:160] if str(err) else type(err).__name__
            raise ConfigError(f"train.device = {name!r} cannot be used on this machine ({why}); "
                              "use 'cpu' or a device it has") from None


def _check(key: str, value: Any, types, choices=None) -> Any:
    if types == _INTS:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"'{key}' must be a list of integers, got {value!r}")
        return value
    if types == _NUMS:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
            raise ConfigError(f"'{key}' must be a list of numbers, got {value!r}")
        return value
    if types == _STRS:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"'{key}' must be a list of names, got {value!r}")
        return value
    if types == _INT_OR_INTS:
        if isinstance(value, list):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= INT_MAX
                                    for v in value):
                raise ConfigError(f"'{key}' must be a positive integer or a list of them, got {value!r}")
            return value
        types = _INT
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"'{key}' must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"'{key}' must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
    if key.endswith(POSITIVE) and value <= 0:
        raise ConfigError(f"'{key}' must be positive, got {value!r}")
    if types in (_INT, _NUM) and value < 0:
        raise ConfigError(f"'{key}' must not be negative, got {value!r}")
    if types == _INT and value > INT_MAX:
        raise ConfigError(f"'{key}' must be at most 2**63-1 ({INT_MAX}), got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"'{key}' = {value!r} is not one of: {', '.join(choices)}")
    return value


def _as_list(key: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"'{key}' must be a list of tables ([[{key}]]), got {value!r}")
    return value


def _named_table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"'{key}' must be a table with a string 'name' (and the plugin's arguments), got {value!r}")
    return dict(value)


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` (``--set``); the value is read as TOML, else taken as a string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set takes key=value (e.g. train.epochs=1), got '{item}'")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {key.strip()}: a dotted key has a name between every two dots (e.g. train.epochs)")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[:i + 1]))
        elif isinstance(node, dict):
            node = node.setdefault(part, [] if part in LISTS else {})
        else:
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        index = _index(node, last, key)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {key}: '{'.'.join(parts[:-1])}' is a value, not a table")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {key}: '{part}' is not an index of a list of {len(node)}")
    return int(part)


def _list_item(node: list, part: str, key: str) -> Any:
    return node[_index(node, part, key)]
