"""The plugin contract: the ``hookimpl`` marker, an optional base class, and how a list is registered."""
from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import pluggy
import torch
from torch import nn
from torch.utils.data import Dataset

from streamcl import hookspecs
from streamcl.batch import Batch
from streamcl.errors import PluginError

PROJECT = "streamcl"
hookimpl = pluggy.HookimplMarker(PROJECT)
HOOKS = frozenset(hookspecs.EVENTS + hookspecs.CONTRIBUTIONS + hookspecs.TRANSFORMS)
_ENGINE = (os.path.dirname(pluggy.__file__), os.path.dirname(__file__))  # not a plugin's own code, except:


def _engine(filename: str) -> bool:
    import streamcl.plugins as builtin
    return filename.startswith(_ENGINE) and not filename.startswith(tuple(builtin.__path__))


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn``, attributed to the line of the plugin's own code that led here, not to pluggy's hook
    caller or a shared streamcl module (so ``python -W`` filters and the printed location name the plugin)."""
    frame = sys._getframe(1)
    while frame is not None and _engine(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:  # pragma: no cover - called from the engine alone
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


def init_signature(factory) -> inspect.Signature:
    """What calling ``factory`` takes; for a class, its ``__init__`` without ``self`` (none if it has none)."""
    if not isinstance(factory, type):
        return inspect.signature(factory)
    if factory.__init__ is object.__init__:
        return inspect.Signature()
    params = list(inspect.signature(factory.__init__).parameters.values())
    return inspect.Signature(params[1:])


class Plugin:
    """Optional base class for plugins.

    Gives a readable ``repr`` built from the constructor's arguments, an empty ``owns``, and a
    ``state_dict``/``load_state_dict`` pair to override when the plugin holds state. Any object
    with ``@hookimpl`` methods is a plugin; subclassing is a convenience.

    ``owns`` names the exclusive roles the plugin takes (``{"classifier"}``): two plugins of one
    strategy that own the same role are refused at construction. ``needs`` names roles another
    plugin of the list must own (``{"memory"}``), or the list is refused. ``requires`` names parts of the
    model the plugin uses: ``{"head"}`` (a linear classifier head, and the features it reads), refused at
    construction when the engine finds none.
    """

    owns: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    _init_args: tuple[tuple, dict]

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._init_args = (args, kwargs)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this plugin exactly; empty for a stateless plugin."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def hparams(self) -> dict[str, Any]:
        """The constructor's arguments, by name (for logs and results)."""
        args, kwargs = getattr(self, "_init_args", ((), {}))
        try:
            return dict(init_signature(type(self)).bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return {**{str(i): a for i, a in enumerate(args)}, **kwargs}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({inner})"


def plugin_name(plugin: object) -> str:
    """A plugin's short name: its ``name`` attribute, else its class name in snake case."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str):
        return name
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(plugin).__name__).lower()


def check_roles(plugins: Sequence[object]) -> None:
    """Refuse two plugins that own one exclusive role (naming both and the role), and a plugin that
    ``needs`` a role no plugin of the list owns."""
    owner: dict[str, object] = {}
    for plugin in plugins:
        for role in sorted(getattr(plugin, "owns", ())):
            if role in owner:
                raise PluginError(f"{owner[role]!r} and {plugin!r} both own the role '{role}'; "
                                  f"a strategy takes one plugin per role: drop one of them")
            owner[role] = plugin
    for plugin in plugins:
        missing = sorted(set(getattr(plugin, "needs", ())) - set(owner))
        if missing:
            raise PluginError(f"{plugin!r} needs a plugin that owns the role '{missing[0]}' (for 'memory': Replay, "
                              f"for example) and none in the list does")


ORDER_OPTIONS = ("tryfirst", "trylast", "wrapper", "hookwrapper")


def _check_impls(plugin: object) -> None:
    """Refuse hook-named methods without ``@hookimpl``, and ordering options that defeat the list order."""
    unmarked = _unmarked_hooks(plugin)
    if unmarked:
        raise PluginError(f"{plugin!r} defines {', '.join(unmarked)} without @streamcl.hookimpl, "
                          "so it would never be called; mark the method(s)")
    for name in dir(type(plugin)):
        opts = getattr(getattr(type(plugin), name, None), PROJECT + "_impl", None)
        bad = [o for o in ORDER_OPTIONS if opts and opts.get(o)]
        if bad:
            raise PluginError(f"{plugin!r}.{name} uses @hookimpl({bad[0]}=True); streamcl runs plugins in the "
                              "order of the user's list, so reorder the list instead")


def _unmarked_hooks(plugin: object) -> list[str]:
    """Methods named exactly like a hook but not marked with ``@hookimpl`` (they would never run)."""
    out = []
    for name in HOOKS:
        attr = getattr(type(plugin), name, None)
        if callable(attr) and not hasattr(attr, PROJECT + "_impl"):
            out.append(name)
    return sorted(out)


def make_manager(plugins: Sequence[object], engine_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """A PluginManager whose hooks call ``plugins`` in list order, then ``engine_plugins``.

    pluggy calls the most recently registered implementation first, so engine plugins are
    registered first and user plugins in reverse. Hooks that do not exist are rejected.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    ordered = [*engine_plugins][::-1] + [*plugins][::-1]
    for i, plugin in enumerate(ordered):
        _check_impls(plugin)
        try:
            pm.register(plugin, name=f"{len(ordered) - i}:{type(plugin).__name__}")
        except ValueError as err:
            raise PluginError(f"{plugin!r} is listed twice: {err}") from None
        except pluggy.PluginValidationError as err:  # pluggy names the plugin by its registration key: say it plainly
            why = re.sub(r"^Plugin '[^']*' for hook ", "hook ", str(err)).replace("\n", "; ")
            raise PluginError(f"plugin {plugin_name(plugin)} ({type(plugin).__name__}): {why}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        unknown = re.search(r"hook '?(\w+)'?", str(err))
        hook = unknown.group(1) if unknown else "?"
        raise PluginError(f"{err.plugin!r} implements '{hook}', which is not a streamcl hook; "
                          f"known hooks: {', '.join(sorted(HOOKS))}") from None
    return pm


TRANSFORMED = {"adapt_model": "model", "adapt_logits": "logits", "task_loss": "loss"}


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Batch):
        return f"a Batch whose x has shape {tuple(getattr(value.x, 'shape', ()))}"
    return f"a {type(value).__name__}"


def _refuse(name: str, plugin: object, value, expected: str) -> PluginError:
    return PluginError(f"{type(plugin).__name__}.{name} returned {_what(value)}; {expected}")


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()


def check_transform(name: str, plugin: object, value, previous):
    """``value``, what ``plugin``'s transform hook ``name`` returned for ``previous``; :class:`PluginError` naming
    the plugin and the hook if it is not a module (``adapt_model``), logits of ``previous``'s shape
    (``adapt_logits``) or a one-element float tensor (``task_loss``)."""
    if name == "adapt_model" and not isinstance(value, nn.Module):
        raise _refuse(name, plugin, value, "it must return the nn.Module to train (or None to keep the model)")
    if name == "adapt_logits" and not (isinstance(value, torch.Tensor) and value.shape == previous.shape):
        raise _refuse(name, plugin, value, f"it must return logits of the shape it received, "
                      f"{tuple(previous.shape)} (or None to keep them)")
    if name == "task_loss" and not _is_scalar(value):
        raise _refuse(name, plugin, value, "it must return the loss as a one-element float tensor (or None)")
    return value


def check_contribution(name: str, plugin: object, value, batch: Batch | None = None):
    """``value``, what ``plugin``'s contribution hook ``name`` returned (not ``None``); :class:`PluginError` naming
    the plugin and the hook if it is not what the hook combines (``batch``: the training batch it was given)."""
    if name == "loss_terms":
        bad = not isinstance(value, Mapping) or not all(isinstance(k, str) and _is_scalar(v) for k, v in value.items())
        if bad:
            shown = _what(value) if not isinstance(value, Mapping) else \
                ", ".join(f"{k!r}: {_what(v)}" for k, v in value.items())
            raise PluginError(f"{type(plugin).__name__}.loss_terms returned {shown}; it must return a mapping of "
                              "term name to a one-element float tensor, e.g. {'lwf': loss} (or None)")
    elif name == "replay_batch":
        if not isinstance(value, Batch) or not all(isinstance(v, torch.Tensor) for v in value):
            raise _refuse(name, plugin, value, "it must return a streamcl.Batch(x, y, t) of tensors (or None)")
        if not len(value.x) == len(value.y) == len(value.t):
            raise _refuse(name, plugin, value, f"its x, y and t must have one length ({len(value.x)}, "
                          f"{len(value.y)}, {len(value.t)} given)")
        if batch is not None and (value.x.shape[1:] != batch.x.shape[1:] or value.x.device != batch.x.device):
            raise _refuse(name, plugin, value, f"its samples must have the training batch's shape "
                          f"{tuple(batch.x.shape[1:])} and device ({batch.x.device}), not "
                          f"{tuple(value.x.shape[1:])} on {value.x.device}")
    elif name == "train_data" and not isinstance(value, Dataset):
        raise _refuse(name, plugin, value, "it must return a torch Dataset, e.g. streamcl.TensorData(x, y) (or None)")
    elif name == "held_out" and not (isinstance(value, torch.Tensor) and batch is not None
                                     and tuple(value.shape) == (len(batch),)):
        rows = "" if batch is None else f" ({len(batch)})"
        raise _refuse(name, plugin, value, f"it must return a boolean tensor with one entry per row of the batch{rows}")
    elif name == "param_groups" and not (isinstance(value, (list, tuple))
                                         and all(isinstance(g, dict) and "params" in g for g in value)):
        raise _refuse(name, plugin, value, "it must return a list of dicts with 'params', e.g. [{'params': ps, "
                      "'lr': 0.1}] (or None)")
    elif name == "results" and not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        raise _refuse(name, plugin, value, "it must return a mapping of entry name to a JSON value (or None)")
    return value


def _impls(pm: pluggy.PluginManager, name: str):
    return reversed(getattr(pm.hook, name).get_hookimpls())  # plugin order (pluggy calls the last registered first)


def contributions(pm: pluggy.PluginManager, name: str, **kwargs) -> list:
    """The contribution hook ``name``'s pieces that are not ``None``, in plugin order, each checked by
    :func:`check_contribution`."""
    out = []
    for impl in _impls(pm, name):
        value = impl.function(*[kwargs[a] for a in impl.argnames])
        if value is not None:
            out.append(check_contribution(name, impl.plugin, value, kwargs.get("batch")))
    return out


def call_chain(pm: pluggy.PluginManager, name: str, value, **kwargs):
    """Fold the transform hook ``name`` over its implementations in plugin order.

    ``value`` is passed under the hook's transformed argument (``model``, ``logits`` or ``loss``)
    and replaced by each implementation's return value (``None`` keeps it), checked by :func:`check_transform`.
    """
    key = TRANSFORMED[name]
    for impl in _impls(pm, name):
        kwargs[key] = value
        out = impl.function(*[kwargs[a] for a in impl.argnames])
        if out is not None:
            value = check_transform(name, impl.plugin, out, value)
    return value
