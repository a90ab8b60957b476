"""Every hook a streamcl plugin may implement.

Three kinds:

* **events** notify and return nothing; they may change the state they are handed
  (``strategy.model``, ``strategy.batch``, gradients, plugin state);
* **contributions** return a piece or ``None``; the engine combines the pieces;
* **transforms** receive the previous plugin's result and return the next one, chained in
  the order the user listed the plugins.

Implementations are marked with :data:`streamcl.hookimpl` (without ``tryfirst``, ``trylast`` or
wrappers: the user's list fixes the order); every hook is called with keyword arguments, so an
implementation may take any subset of a hook's parameters.
Hooks run in the user's plugin order; engine-owned plugins (metrics, loggers) run after them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from streamcl.batch import Batch, Output
    from streamcl.scenarios import Experience
    from streamcl.strategy import Strategy

hookspec = pluggy.HookspecMarker("streamcl")


# ----------------------------------------------------------------------------- events: set-up and logs
@hookspec
def setup(strategy: Strategy) -> None:
    """Once, when the Strategy is built and the model's parts are found (``strategy.head_path``): refuse a
    model or a plugin list the technique cannot use by raising a ``streamcl.ConfigError`` that names what is
    missing. Plugins that declare ``requires = {"head"}`` are checked before this."""


@hookspec
def log_value(strategy: Strategy, name: str, value: float, step: int, axis: str) -> None:
    """A scalar of the run's one event stream, sent with ``strategy.log(name, value)`` by the engine (loss terms,
    accuracies) or a plugin; loggers write it. ``step`` counts along ``axis``: ``"step"`` (training
    iterations), ``"experience"`` (experiences trained, minus one) or a private loop's epochs; each name has one
    value per step."""


@hookspec
def log_image(strategy: Strategy, name: str, image: Tensor, step: int, axis: str) -> None:
    """An image (``C x H x W``, values in [0, 1]) sent with ``strategy.log_image(name, image)`` (the accuracy
    matrix, a generator's samples); loggers that take images write it."""


@hookspec
def set_correction(strategy: Strategy, active: bool) -> None:
    """Switch the plugin's bias correction off (``active=False``) or back on; ``strategy.uncorrected()``
    calls it around an evaluation of the uncorrected model (WA, BiC, DER's classifier stage)."""


# ----------------------------------------------------------------------------- events: training
@hookspec
def before_training(strategy: Strategy) -> None:
    """Start of ``Strategy.train``, before the first of its experiences."""


@hookspec
def after_training(strategy: Strategy) -> None:
    """End of ``Strategy.train``, after the last of its experiences."""


@hookspec
def before_training_exp(strategy: Strategy) -> None:
    """Before the first epoch on ``strategy.experience``; the model is adapted, the data joined
    (``strategy.train_dataset``)."""


@hookspec
def after_training_exp(strategy: Strategy) -> None:
    """After the last epoch on ``strategy.experience``: update memories, teachers, importances."""


@hookspec
def before_training_epoch(strategy: Strategy) -> None:
    """Start of epoch ``strategy.epoch``."""


@hookspec
def after_training_epoch(strategy: Strategy) -> None:
    """End of epoch ``strategy.epoch``."""


@hookspec
def before_training_iteration(strategy: Strategy) -> None:
    """A minibatch ``strategy.batch`` was drawn (a plugin may replace it); replay is joined after."""


@hookspec
def after_training_iteration(strategy: Strategy) -> None:
    """The step is done; ``strategy.loss`` and ``strategy.loss_terms`` hold this iteration's losses."""


@hookspec
def before_forward(strategy: Strategy) -> None:
    """Before the training forward pass on ``strategy.batch`` (replay already joined after the first
    ``strategy.n_current`` samples)."""


@hookspec
def after_forward(strategy: Strategy) -> None:
    """After the training forward pass; ``strategy.output`` holds logits and features."""


@hookspec
def before_backward(strategy: Strategy) -> None:
    """``strategy.loss`` is the combined loss; gradients were cleared (``.grad`` is ``None``)."""


@hookspec
def after_backward(strategy: Strategy) -> None:
    """Gradients are in ``.grad``; plugins may edit them in list order (GEM/A-GEM projection)."""


@hookspec
def before_update(strategy: Strategy) -> None:
    """Just before ``optimizer.step()``; last chance to edit gradients."""


@hookspec
def after_update(strategy: Strategy) -> None:
    """Just after ``optimizer.step()``: track parameter change (SI), clip weights (WA)."""


# ----------------------------------------------------------------------------- events: evaluation
@hookspec
def before_eval(strategy: Strategy) -> None:
    """Start of ``Strategy.eval``; the model is in eval mode."""


@hookspec
def after_eval(strategy: Strategy) -> None:
    """End of ``Strategy.eval``; ``strategy.eval_results`` holds per-experience counts."""


@hookspec
def before_eval_exp(strategy: Strategy) -> None:
    """Before evaluating ``strategy.experience`` (a test experience)."""


@hookspec
def after_eval_exp(strategy: Strategy) -> None:
    """After evaluating ``strategy.experience``; its counts are in ``strategy.eval_results``."""


@hookspec
def before_eval_forward(strategy: Strategy) -> None:
    """Before the evaluation forward pass on ``strategy.batch`` (a plugin may replace it)."""


@hookspec
def after_eval_forward(strategy: Strategy) -> None:
    """After the evaluation forward pass and logit transforms; ``strategy.output`` is final."""


# ----------------------------------------------------------------------------- contributions
@hookspec
def loss_terms(strategy: Strategy, batch: Batch, output: Output) -> Mapping[str, Tensor] | None:
    """Extra loss terms for this minibatch, by name (``{"lwf": t}``).

    The loss is the task loss plus the sum of all terms; each term is logged as ``loss/<name>``.
    Two plugins returning the same name is an error. No plugin sees or edits another's terms.
    """


@hookspec
def replay_batch(strategy: Strategy, batch: Batch) -> Batch | None:
    """Extra samples concatenated to the minibatch ``batch`` before the forward pass."""


@hookspec
def train_data(strategy: Strategy, experience: Experience) -> Dataset | None:
    """Data joined to ``experience`` for this experience's training (exemplars, past data)."""


@hookspec
def held_out(strategy: Strategy, batch: Batch) -> Tensor | None:
    """A boolean mask over the rows of the training minibatch ``batch`` (replay joined): ``True`` rows are
    kept out of training (a validation split, BiC's held-out set). If every row of the experience's own
    part would be held out, that part is kept whole (a minibatch is never empty)."""


@hookspec
def param_groups(strategy: Strategy, model: nn.Module) -> list[dict] | None:
    """Optimizer parameter groups (``{"params": [...], "lr": ...}``) for some of ``model``'s parameters.

    Parameters no group claims keep the optimizer's defaults. A parameter that two plugins' groups name trains
    with the later plugin's (plugin order)."""


@hookspec
def results(strategy: Strategy) -> Mapping[str, object] | None:
    """Entries this plugin adds to the run's results (``results.json``): plain JSON values under names of its
    own (a metric plugin's ``confusion_matrix``, ``forward_transfer``)."""


# ----------------------------------------------------------------------------- transforms
@hookspec
def adapt_model(strategy: Strategy, model: nn.Module, experience: Experience) -> nn.Module:
    """Return the model to train on ``experience`` (grown, expanded or ``model`` itself).

    Chained in plugin order before ``before_training_exp``; the optimizer follows new parameters.
    """


@hookspec
def adapt_logits(strategy: Strategy, logits: Tensor, features: Tensor | None, batch: Batch) -> Tensor:
    """Return the logits to use for prediction (bias correction, nearest-mean, normalisation).

    Chained in plugin order on every forward pass, training and evaluation.
    """


@hookspec
def task_loss(strategy: Strategy, loss: Tensor | None, output: Output, batch: Batch) -> Tensor | None:
    """Return the task loss of the training minibatch (ER-ACE's asymmetric cross-entropy), or ``None`` to keep
    ``loss``, the previous plugin's (``None`` before the first). If the chain ends with ``None`` the engine
    applies ``strategy.criterion`` (plain cross-entropy unless the user gave another) to the logits and labels;
    ``strategy.criterion`` itself never changes, so plugins that need the plain loss (GEM's memory gradients)
    call it."""


EVENTS = tuple(name for name in dir() if name.startswith(("before_", "after_"))) + ("setup", "log_value", "log_image",
                                                                                        "set_correction")
CONTRIBUTIONS = ("loss_terms", "replay_batch", "train_data", "held_out", "param_groups", "results")
TRANSFORMS = ("adapt_model", "adapt_logits", "task_loss")
