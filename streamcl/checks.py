"""Refusing bad input before it costs anything: each check raises an error that says what to do."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from streamcl.errors import DataError, TrainingError
from streamcl.batch import non_finite_inputs
from streamcl.scenarios import Experience, TensorData, targets_of
from streamcl.scenarios.data import seeded

GROWING_HEAD = ("give the model as many outputs as the stream has classes, or a head that grows with the "
                "classes seen: MLP(..., growing=True) or streamcl.models.IncrementalLinear")


def check_experience(exp: Experience) -> None:
    """An experience must hold samples, every label must lie in ``0 .. n_classes - 1`` and among the
    experience's ``classes``, and tensor inputs must be finite (other datasets: checked batch by batch)."""
    if len(exp) == 0:
        raise DataError(f"{exp!r} is empty: a stream's experiences must hold at least one sample")
    data = exp.dataset
    if isinstance(data, TensorData) and not _finite(data.x):
        raise DataError(f"{exp!r}: {non_finite_inputs()}")
    if not (isinstance(data, TensorData) or hasattr(data, "targets")):
        return  # labels are checked batch by batch by the loss instead of reading the whole dataset here
    y = data.y if isinstance(data, TensorData) else targets_of(data)
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= exp.n_classes:
        bad = low if low < 0 else high
        raise DataError(f"{exp!r} holds label {bad}, outside the stream's classes 0..{exp.n_classes - 1}; "
                        "fix the labels or build the stream with the right number of classes")
    stray = sorted(set(torch.unique(y).tolist()) - {int(c) for c in exp.classes})
    if stray:
        raise DataError(f"{exp!r} holds label(s) {stray[:5]}, which are not among its classes {list(exp.classes)}; "
                        "build the stream from the labels the dataset yields (its target_transform included)")


def _finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite; a finite sum settles it in one pass (NaN and infinities make the
    sum non-finite), an overflowing one falls back to the elementwise check."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_repeatable(strategy, exp: Experience) -> None:
    """Refuse a dataset that gives another input each time a sample is read (random transforms inside it)
    when a plugin keeps samples: the memory would hold one augmented view of each, replayed forever."""
    keeper = strategy.owner("memory") or next((p for p in strategy.plugins if hasattr(p, "memory")), None)
    if keeper is None or isinstance(exp.dataset, TensorData):
        return
    views = []
    for seed in (1, 2):
        with seeded(seed):
            views.append(torch.as_tensor(exp.dataset[0][0]))
    if not torch.equal(*views):
        raise DataError(f"the dataset of {exp!r} gives a different input each time a sample is read (random "
                        f"transforms inside it), and {keeper!r} keeps samples: it would store one augmented view of "
                        "each and replay it forever. Keep the dataset's transforms deterministic and pass the random "
                        "ones as Strategy(..., augment=...): they apply to every training input, replayed ones too")


def _first_samples(data: Dataset, device: torch.device, n: int = 2):
    if isinstance(data, TensorData):
        return data.x[:n].to(device), data.t[:n].to(device)
    samples = [data[i] for i in range(min(n, len(data)))]
    x = torch.stack([torch.as_tensor(s[0]) for s in samples]).to(device)
    t = torch.as_tensor([int(s[2]) if len(s) > 2 else 0 for s in samples], device=device)
    return x, t


@torch.no_grad()
def check_model_fits(strategy, data: Dataset, exp: Experience | None) -> None:
    """A dry forward pass on two samples: inputs must fit the model and, when ``exp`` is given
    (training), its outputs must cover every label of ``data``. The first time, the head found for the
    model must give the model's output (else it is not the classifier head)."""
    model = strategy.model
    x, t = _first_samples(data, strategy.device)
    was_training = model.training
    model.eval()
    head = strategy._head
    seen: list = []
    hook = head.register_forward_hook(lambda m, a, out: seen.append(out)) if head is not None else None
    try:
        out = model(x, task_labels=t) if strategy._takes_task else model(x)
    except (RuntimeError, ValueError, IndexError) as err:
        raise DataError(f"inputs of shape {tuple(x.shape[1:])} do not fit {type(model).__name__}: {err}") from None
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    logits = out[0] if isinstance(out, tuple) else out
    if head is not None and not strategy._head_checked:
        if not seen or not isinstance(seen[-1], torch.Tensor) or seen[-1].shape != logits.shape \
                or not torch.equal(seen[-1], logits):
            if any("head" in getattr(p, "requires", ()) for p in strategy.plugins):
                raise DataError(f"the module at {strategy.head_path!r} ({type(head).__name__}) was taken for the "
                                f"classifier head of {type(model).__name__}, but its output is not the model's; "
                                "name the layer that gives the logits with Strategy(..., head='path.to.layer')")
        else:
            strategy._head_checked = True
    if exp is None:
        return
    y = data.y if isinstance(data, TensorData) else targets_of(data)
    high = int(y.max())
    if logits.ndim != 2 or logits.shape[1] <= high:
        raise DataError(f"the model gives {logits.shape[1] if logits.ndim == 2 else tuple(logits.shape)} outputs "
                        f"per sample, but {exp!r} holds label {high} (the stream has {exp.n_classes} classes); "
                        f"{GROWING_HEAD}")


def non_finite_error(strategy, bad: list[str] | None = None, where: str | None = None,
                     updated: bool = False) -> TrainingError:
    """The error for a non-finite loss: which terms, where in the stream, and what is still safe. ``bad``
    and ``where`` describe an earlier step (the GPU's lagged check, whose update was already applied)."""
    if bad is None:
        bad = [name for name, v in strategy.loss_terms.items() if not torch.isfinite(v.detach()).all()]
    where = where or step_position(strategy)
    if strategy.checkpoint_dir is None:
        saved = "no checkpoint_dir was set"
    elif strategy.checkpoint_path.exists():
        saved = f"the last checkpoint ({strategy.checkpoint_path}) was written before this step and is intact"
    else:
        saved = f"no checkpoint had been written yet (the first goes to {strategy.checkpoint_path})"
    done = "its update was applied (the check runs one step behind on a GPU)" if updated else "nothing was updated"
    return TrainingError(f"non-finite loss term(s) {', '.join(map(repr, bad or ['total']))} at {where}; {done}; "
                         f"{saved}. Lower the learning rate or the term's weight.")


def step_position(strategy) -> str:
    return (f"experience {strategy.experience.index}, epoch {strategy.epoch}, iteration {strategy.iteration} "
            f"(step {strategy.global_step})")
