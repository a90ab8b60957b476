"""Progressive Neural Networks: a new column per task, lateral adaptors from every earlier (frozen) column."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from streamcl import ConfigError, DataError, Plugin, hookimpl
from streamcl.columns import HeadLateral, Lateral, check_forward, check_model, reinitialise
from streamcl.parts import check_first, grown_linear, replace_module
from streamcl.plugins.multi_head import experience_tasks

NAME = "progressive_networks"


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


class ColumnHeads(nn.Module):
    """The columns' output layers, in the place of the model's classifier head (the engine's ``strategy.head``).

    Its input ``f`` are the features of each row's own column (the input of that column's head), so the engine's
    features (``strategy.output.features``) are each row's own column's. Row ``i``, routed to column ``k`` (set for
    one call by :class:`ProgressiveNet` in ``route``, with ``below[j]`` column ``j``'s features of every row), is

        out[i] = heads[k](f_i) + laterals[k - 1](concat_{j < k} below[j]_i)      (eq. 2 at the output layer)

    padded with zeros to ``out_features`` columns (one per class of the stream; the engine grows it). Every column's
    output is computed on every row and the row's own one kept (``torch.where``): a frozen column takes no gradient,
    and the column in training is in every forward's graph, as DDP needs, with zero gradient from other rows.
    ``classes_k`` (a buffer) holds column ``k``'s task's classes, the prediction's candidates for its rows.
    """

    def __init__(self, head: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.heads = nn.ModuleList([head])
        self.laterals = nn.ModuleList()  # laterals[k - 1]: into column k's head (k >= 1)
        self.route: Tensor | None = None
        self.below: list[Tensor] | None = None

    def classes(self, k: int) -> Tensor:
        return getattr(self, f"classes_{k}")

    def set_classes(self, k: int, classes, device) -> None:
        self.register_buffer(f"classes_{k}", torch.tensor(sorted(int(c) for c in classes), dtype=torch.long,
                                                          device=device))

    def grow_to(self, n: int) -> bool:
        if n <= self.out_features:
            return False
        self.out_features = int(n)
        return True

    def allowed(self, index: Tensor) -> Tensor:
        """``(len(index), out_features)``: the classes of each row's column."""
        table = torch.zeros(len(self.heads), self.out_features, dtype=torch.bool, device=index.device)
        for k in range(len(self.heads)):
            if hasattr(self, f"classes_{k}"):
                table[k, self.classes(k).to(index.device)] = True
        return table[index]

    def forward(self, f: Tensor) -> Tensor:
        index, below = self.route, self.below
        if index is None or below is None:  # outside ProgressiveNet's forward: the newest column alone, no laterals
            index = torch.full(f.shape[:1], len(self.heads) - 1, dtype=torch.long, device=f.device)
            below = None
        out = f.new_zeros(f.shape[0], self.out_features)
        for k, head in enumerate(self.heads):
            z = head(f)
            if k and below is not None:
                z = z + self.laterals[k - 1](torch.cat(below[:k], 1) if k > 1 else below[0])
            z = z[:, : self.out_features]
            if z.shape[1] < self.out_features:
                z = torch.cat([z, z.new_zeros(z.shape[0], self.out_features - z.shape[1])], 1)
            out = z if len(self.heads) == 1 else torch.where((index == k)[:, None], z, out)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns={len(self.heads)}"


class ProgressiveNet(nn.Module):
    """Columns ``0..K-1`` of one architecture, the user's chain of modules ``chain`` (paths, the head last).

    ``columns[k]`` is column ``k`` without its head (the head's place holds ``nn.Identity``), ``head.heads[k]`` its
    head, ``laterals[k][i]`` the adaptor into its ``i + 2``-th linear layer and ``head.laterals[k - 1]`` the one into
    its head, each reading the concatenated inputs of that layer in columns ``0..k-1`` (eq. 2):

        h_i^(k) = W_i^(k) h_{i-1}^(k) + b_i^(k) + U_i^(k) relu(V_i^(k) (alpha_i^(k) [h_{i-1}^(0), ..., h_{i-1}^(k-1)]))

    followed by the chain's parameter-free layers (ReLU, ...). ``tasks[k]`` is column ``k``'s task label. A row with
    task label ``t`` goes to the newest column of task ``t``; a task label no column was trained on goes to the newest
    column. Every column runs on every row (column ``k`` needs the activations of ``0..k-1``). Columns before
    ``trainable`` are frozen: no gradients, always in evaluation mode.
    """

    def __init__(self, model: nn.Module, chain: list[str], feature_dim: int, out_features: int):
        super().__init__()
        self.chain, self.head_path = list(chain), chain[-1]
        self.linear = [p for p in chain[:-1] if isinstance(model.get_submodule(p), nn.Linear)]
        head = model.get_submodule(self.head_path)
        replace_module(model, self.head_path, nn.Identity())
        self.columns = nn.ModuleList([model])
        self.laterals = nn.ModuleList([nn.ModuleList()])
        self.head = ColumnHeads(head, feature_dim, max(out_features, int(head.out_features)))
        self.tasks: list[int] = []  # the task label of each column trained (or in training)
        self.trainable = 0

    def get_classifier(self) -> nn.Module:
        return self.head

    def column_parameters(self, k: int) -> int:
        """The parameters column ``k`` adds: its layers, its head and its lateral adaptors."""
        parts = [self.columns[k], self.laterals[k]]
        if isinstance(self.head, ColumnHeads):
            parts += [self.head.heads[k], *([self.head.laterals[k - 1]] if k else [])]
        return _count(*parts)

    def route(self, t: Tensor | None, n: int, device) -> Tensor:
        """The column of each row: the newest column of its task label, else the newest column."""
        last = len(self.columns) - 1
        if t is None or not self.tasks:
            return torch.full((n,), last, dtype=torch.long, device=device)
        t = t.to(device).reshape(-1)
        index = torch.full_like(t, last)
        for k, task in enumerate(self.tasks):  # the newest column of a task wins
            index = torch.where(t == task, k, index)
        return index

    def forward(self, x: Tensor, task_labels: Tensor | None = None) -> Tensor:
        inputs: list[list[Tensor]] = []  # inputs[k]: column k's input to each linear layer after the first, then
        for k, column in enumerate(self.columns):  # to its head
            a, ins, i = x, [], 0
            for path in self.chain[:-1]:
                m = column.get_submodule(path)
                if path in self.linear:
                    if i:
                        ins.append(a)
                        z = m(a)
                        if k:
                            below = [inputs[j][i - 1] for j in range(k)]
                            z = z + self.laterals[k][i - 1](torch.cat(below, 1) if k > 1 else below[0])
                        a = z
                    else:
                        a = m(a)
                    i += 1
                else:
                    a = m(a)
            ins.append(a)
            inputs.append(ins)
        feats = [ins[-1] for ins in inputs]
        index = self.route(task_labels, x.shape[0], x.device)
        if len(feats) == 1:
            f = feats[0]
        else:
            f = feats[-1]
            for k in range(len(feats) - 2, -1, -1):
                f = torch.where((index == k)[:, None], feats[k], f)
        head = self.head
        if not isinstance(head, ColumnHeads):  # a feature extractor (the head replaced by nn.Identity)
            return head(f)
        head.route, head.below = index, feats
        try:
            return head(f)
        finally:
            head.route = head.below = None

    def train(self, mode: bool = True) -> ProgressiveNet:
        super().train(mode)
        for k in range(min(self.trainable, len(self.columns))):
            for m in self.frozen_parts(k):
                m.train(False)
        return self

    def frozen_parts(self, k: int) -> list[nn.Module]:
        parts = [self.columns[k], self.laterals[k]]
        if isinstance(self.head, ColumnHeads):
            parts += [self.head.heads[k], *([self.head.laterals[k - 1]] if k else [])]
        return parts


class ProgressiveNetworks(Plugin):
    """Progressive Neural Networks (Rusu et al. 2016, "Progressive Neural Networks", arXiv:1606.04671, Sec. 2,
    eq. 1-2): a new column per task, joined to every earlier column by lateral adaptors; earlier columns frozen.

    At the first experience ``adapt_model`` wraps the model in a :class:`ProgressiveNet` whose column 0 is the user's
    model itself (its own random initialisation, or whatever the user gave it). At the experience that brings a new
    task label, column ``k`` is added: the user's architecture with every linear layer drawn afresh (random init, as
    the paper's columns; ``nn.Linear``'s uniform distribution drawn from ``strategy.generator``, so runs repeat), with
    a lateral adaptor (:class:`streamcl.columns.Lateral`, the paper's non-linear adapter) into each of its linear
    layers after the first and into its head, from the concatenated inputs of that layer in ALL earlier columns:

        h_i^(k) = relu(W_i^(k) h_{i-1}^(k) + U_i^(k:j) relu(V_i^(k:j) alpha_{i-1}^(<k) h_{i-1}^(<k)))     (eq. 2)

    with ``alpha`` one learned scalar per adaptor (initialised to ``alpha``; the paper draws it from
    {1, 0.1, 0.01}) and ``V`` projecting the ``k * n_{i-1}`` concatenated units to ``adaptor_width`` (default
    ``n_{i-1}``, the paper's dimensionality reduction, which keeps a column's lateral parameters O(k n)). ``V`` has no
    bias and ``U`` none (eq. 2). The earlier columns and their adaptors are frozen (``requires_grad`` off, so the
    optimizer never steps them; evaluation mode: dropout off): bit-identical after later tasks. The parameters of
    the new column take the optimizer groups of column 0's of the same name (the adaptors the group of the nearest
    name), and ``parameters_per_task`` holds what each new column and its adaptors add (logged as
    ``progressive_networks/parameters``).

    Each sample is routed by its task label to its task's column (the newest column of that task label); a task
    label never trained goes to the newest column, and no column is ever made at evaluation (Avalanche's PNN adds
    columns for unseen tasks when evaluated early: not here). The prediction is among the classes of the row's
    column's task: this plugin owns ``task_head`` and ``adapt_logits`` masks every other logit to ``-inf`` in
    training and evaluation (as :class:`~streamcl.plugins.multi_head.MultiHead`), so the runner adds no TaskMask;
    the model's own output (``output.raw``) stays finite. The engine's features are the input of the columns' head
    (:class:`ColumnHeads`): each row's own column's features.

    An experience must bring one task label (an experience whose samples carry several is refused with a
    DataError). A class-incremental stream, whose samples all carry task 0, keeps one column that grows with the
    classes: naive fine-tuning, with the prediction among the classes seen. A task label that comes back after
    another task's column was added gets a new column (its old one stays frozen: later columns read it), trained on
    the returning experience and scoring all the task's classes.

    The model must be a chain of fully connected layers (:func:`streamcl.columns.check_model`): Linear and
    parameter-free layers, then the classifier head, its forward that chain (streamcl's MLP or a plain
    ``nn.Sequential``); others (convolutions, attention) are refused when the Strategy is built, with a ConfigError
    naming the first module that does not fit. It owns ``architecture`` (it replaces the model), ``classifier_head``
    and ``head_rows`` (it replaces the head) and ``task_head``.

    Arguments: ``alpha`` (the adaptors' initial input scale), ``adaptor_width`` (``V``'s width; ``None``: the width
    of the layer the adaptor reads, in one column).

    Measured: SFM-5-TIL 0.990 (seeds 0-2: 0.9900, 0.9905, 0.9901; Avalanche's PNN 0.990), no forgetting; parameters
    per task 269,322 (column 0), 468,492, 599,564, 730,636, 861,708 (2,929,722 after five tasks).
    """

    owns = frozenset({"architecture", "classifier_head", "head_rows", "task_head"})
    requires = frozenset({"head"})

    def __init__(self, alpha: float = 0.1, adaptor_width: int | None = None):
        if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
                or alpha < 0):
            raise ConfigError(f"{NAME} alpha={alpha!r}: the adaptors' initial input scale, a finite number >= 0")
        if adaptor_width is not None and (isinstance(adaptor_width, bool) or not isinstance(adaptor_width, int)
                                          or adaptor_width <= 0):
            raise ConfigError(f"{NAME} adaptor_width={adaptor_width!r}: a positive integer, or none for the width "
                              "of the layer the adaptor reads")
        self.alpha, self.adaptor_width = float(alpha), adaptor_width
        self.chain: list[str] = []
        self.trains: dict[str, list[str]] = {}  # "body", "head": column 0's parameters that took gradients
        self.columns: list[tuple[int, int]] = []  # (task label, parameters added) for each column

    @property
    def parameters_per_task(self) -> dict[int, int]:
        """Task label -> the parameters its column(s) and their adaptors add."""
        out: dict[int, int] = {}
        for task, n in self.columns:
            out[task] = out.get(task, 0) + n
        return out

    @hookimpl
    def setup(self, strategy) -> None:
        self.chain = check_model(strategy.model, strategy.head_path, NAME)
        check_forward(strategy.model, self.chain, NAME)

    # ------------------------------------------------------------------------------ columns
    @hookimpl
    def adapt_model(self, strategy, model: nn.Module, experience) -> nn.Module:
        tasks = experience_tasks(experience)
        if len(tasks) != 1:
            raise DataError(f"{NAME}: {experience!r} holds samples of task labels {[t for t, _ in tasks]}; a "
                            "progressive network trains one column per task: give each experience one task label")
        task, classes = tasks[0]
        if not isinstance(model, ProgressiveNet):
            check_first(strategy, model, NAME, "builds its columns from")
            head = strategy.head
            self.trains = {"body": [n for n, p in model.named_parameters()
                                    if p.requires_grad and not n.startswith(self.chain[-1] + ".")],
                           "head": [n for n, p in head.named_parameters() if p.requires_grad]}
            model = ProgressiveNet(model, self.chain, strategy.feature_dim, head.out_features)
        heads = model.head
        device = next(model.parameters()).device
        n_classes = max([heads.out_features, *(c + 1 for c in classes)])
        heads.grow_to(n_classes)
        new = not model.tasks or model.tasks[-1] != task
        if not model.tasks:
            model.tasks = [task]
        elif new:
            self._add_column(strategy, model, task)
        k = len(model.columns) - 1
        old = heads.classes(k).tolist() if hasattr(heads, f"classes_{k}") else []
        same = [c for j, t in enumerate(model.tasks[:-1]) if t == task for c in heads.classes(j).tolist()]
        heads.set_classes(k, {*old, *same, *classes}, device)
        self._fit_head(model, heads.out_features)
        self._freeze(model)
        if new:
            self.columns.append((task, model.column_parameters(k)))
        return model

    def _add_column(self, strategy, model: ProgressiveNet, task: int) -> None:
        """Column ``k``: column 0's architecture drawn afresh, with adaptors from columns ``0..k-1``."""
        g, k = strategy.generator, len(model.columns)
        heads = model.head
        body, head = copy.deepcopy(model.columns[0]), copy.deepcopy(heads.heads[0])
        reinitialise(body, g)
        reinitialise(head, g)
        for name, part in (("body", body), ("head", head)):
            for n, p in part.named_parameters():
                p.requires_grad_(n in self.trains.get(name, ()))
                p.grad = None
        laterals = nn.ModuleList()
        for path in self.linear_after_first(model):
            n_in = body.get_submodule(path).in_features
            laterals.append(Lateral(k * n_in, self.adaptor_width or n_in, body.get_submodule(path).out_features,
                                    self.alpha, g, scale_input=True, bias=False))
        n_in = heads.in_features
        head_lateral = HeadLateral(k * n_in, self.adaptor_width or n_in, int(head.out_features), self.alpha, g,
                                   scale_input=True, bias=False)
        device = next(model.parameters()).device
        model.columns.append(body.to(device))
        model.laterals.append(laterals.to(device))
        heads.heads.append(head.to(device))
        heads.laterals.append(head_lateral.to(device))
        model.tasks = [*model.tasks, task]

    @staticmethod
    def linear_after_first(model: ProgressiveNet) -> list[str]:
        return model.linear[1:]

    @staticmethod
    def _fit_head(model: ProgressiveNet, n: int) -> None:
        """The column in training covers ``n`` classes (a fixed ``nn.Linear`` head widened, rows kept)."""
        heads, k = model.head, len(model.columns) - 1
        head = heads.heads[k]
        if callable(getattr(head, "grow_to", None)):
            head.grow_to(n)
        elif type(head) is nn.Linear and head.out_features < n:
            heads.heads[k] = grown_linear(head, n)
        if k:
            heads.laterals[k - 1].grow_to(n)

    @staticmethod
    def _freeze(model: ProgressiveNet) -> None:
        """Every column but the newest, with its adaptors: no gradients, evaluation mode."""
        model.trainable = len(model.columns) - 1
        for k in range(model.trainable):
            for m in model.frozen_parts(k):
                for p in m.parameters():
                    p.requires_grad_(False)
                    p.grad = None
        model.train(model.training)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        if isinstance(strategy.model, ProgressiveNet):
            strategy.log(f"{NAME}/parameters", self.columns[-1][1])
            strategy.log(f"{NAME}/columns", len(strategy.model.columns))

    # ------------------------------------------------------------------------------ prediction
    @hookimpl
    def adapt_logits(self, strategy, logits: Tensor, batch) -> Tensor | None:
        model = strategy.model
        if not isinstance(model, ProgressiveNet) or not model.tasks or not isinstance(model.head, ColumnHeads):
            return None
        index = model.route(batch.t, logits.shape[0], logits.device)
        allowed = model.head.allowed(index)[:, : logits.shape[1]]
        if allowed.shape[1] < logits.shape[1]:
            allowed = torch.cat([allowed, allowed.new_zeros(len(allowed), logits.shape[1] - allowed.shape[1])], 1)
        return logits.masked_fill(~allowed, float("-inf"))

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"trains": {k: list(v) for k, v in self.trains.items()}, "columns": [list(c) for c in self.columns]}

    def load_state_dict(self, state: dict) -> None:
        self.trains = {k: list(v) for k, v in state["trains"].items()}
        self.columns = [(int(t), int(n)) for t, n in state["columns"]]
