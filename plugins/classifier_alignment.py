"""SLCA's classifier alignment: the head re-trained on features drawn from every seen class's Gaussian."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from streamcl import Plugin, hookimpl
from streamcl.batch import Batch
from streamcl.errors import ConfigError, PluginError
from streamcl.scenarios.data import targets_of


def class_statistics(features: Tensor, labels: Tensor, covariance: str | int = "full") -> dict[int, tuple[Tensor, Tensor]]:
    """Per class ``c``: the mean ``mu_c`` and the unbiased covariance ``Sigma_c`` of its rows of ``features``
    (float64). ``covariance="diagonal"`` keeps the variances only (shape (D,)); an int ``k`` keeps probabilistic PCA's
    ``Sigma ~ W W^T + sigma^2 I`` (Tipping & Bishop 1999, eq. 7-8: ``sigma^2`` the mean of the other eigenvalues,
    ``W``'s columns ``sqrt(lambda_i - sigma^2) u_i`` for the top ``k``) as ``(k + 1, D + 1)`` rows
    ``[W^T, 0]`` and ``[0.., sigma]``; a class of one sample has zero spread."""
    out = {}
    for c in torch.unique(labels).tolist():
        f = features[labels == c].double()
        mu = f.mean(0)
        centred = f - mu
        cov = centred.T @ centred / max(1, len(f) - 1)
        if covariance == "diagonal":
            cov = cov.diagonal().clone()
        elif isinstance(covariance, int):
            values, vectors = torch.linalg.eigh(cov)  # ascending
            values = values.clamp_min(0)
            k = min(covariance, len(values))
            rest = values[:-k].mean() if k < len(values) else values.new_zeros(())
            top = (vectors[:, -k:] * (values[-k:] - rest).clamp_min(0).sqrt()).T
            cov = torch.cat([F.pad(top, (0, 1)), F.pad(rest.sqrt().reshape(1, 1), (len(mu), 0))])
        out[int(c)] = (mu, cov)
    return out


def sample_features(mu: Tensor, cov: Tensor, n: int, generator: torch.Generator, eps: float = 1e-4) -> Tensor:
    """``n`` draws from N(mu, Sigma + eps I), ``Sigma`` as :func:`class_statistics` keeps it."""
    z = torch.randn(n, len(mu), generator=generator, dtype=torch.float64, device=generator.device).to(mu.device)
    if cov.dim() == 1:
        return mu + z * (cov + eps).sqrt()
    if cov.shape[0] == cov.shape[1]:
        chol = torch.linalg.cholesky(cov + eps * torch.eye(len(mu), dtype=cov.dtype, device=cov.device))
        return mu + z @ chol.T
    top, sigma = cov[:-1, :-1], cov[-1, -1]
    w = torch.randn(n, len(top), generator=generator, dtype=torch.float64, device=generator.device).to(mu.device)
    return mu + w @ top + z * (sigma ** 2 + eps).sqrt()


def logit_norm(logits: Tensor, temperature: float) -> Tensor:
    """Logit normalisation (Wei et al. 2022, "Mitigating Neural Network Overconfidence with Logit
    Normalization", ICML, eq. 6): ``logits / (temperature * ||logits||_2)`` row by row."""
    return logits / (temperature * (logits.norm(dim=1, keepdim=True) + 1e-7))


class ClassifierAlignment(Plugin):
    """Classifier alignment (Zhang et al. 2023, "SLCA: Slow Learner with Classifier Alignment for Continual
    Learning on a Pre-trained Model", ICCV, Sec. 4.2, Alg. 1).

    After each experience the features (``strategy.embed``: the head's input, on any model) of each class
    not seen before give its mean and covariance, kept from then on (``covariance``: ``"full"``, ``"diagonal"``
    or an int rank ``k`` for wide features; :attr:`nbytes` is their memory, logged as
    ``alignment/statistics_bytes``). Then, from the second experience on, the classifier head is re-trained
    alone for ``epochs`` epochs, each on ``samples`` fresh draws per seen class from N(mu_c, Sigma_c + 1e-4 I),
    in minibatches of ``samples``, with the cross-entropy of the normalised logits of the seen classes
    (:func:`logit_norm`, ``temperature`` 0.1) at learning rate ``lr`` (the optimizer of the strategy's kind, its
    momentum) annealed by a cosine over the epochs (the authors' code: 5 epochs, 256 per class, lr 0.01, momentum
    0.9, weight decay 5e-4). Composes with any plugin that trains the model (replay, LwF, a slow learner); owns
    ``head_rows``, so not beside a plugin that sets the head's rows itself (WA, DER, a head per task).

    ``refresh=True`` (not in the paper): beside a replay memory, each class's Gaussian is centred on its stored
    samples' features as they are now, so that a fast-trained representation does not leave the statistics behind.
    """

    owns = frozenset({"head_rows"})  # it re-trains the head's rows: not beside another plugin that sets them
    requires = frozenset({"head"})

    def __init__(self, epochs: int = 5, samples: int = 256, lr: float = 0.01, temperature: float | None = 0.1,
                 covariance: str | int = "full", weight_decay: float = 5e-4, refresh: bool = False):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"ClassifierAlignment(epochs={epochs!r}): give a whole number >= 1")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ConfigError(f"ClassifierAlignment(samples={samples!r}): give a whole number >= 2 per class")
        for name, v in (("lr", lr), ("temperature", temperature), ("weight_decay", weight_decay)):
            if v is None and name == "temperature":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                    (v == 0 and name != "weight_decay"):
                raise ConfigError(f"ClassifierAlignment({name}={v!r}): give a finite number > 0"
                                  + (" (or None: no logit normalisation)" if name == "temperature" else ""))
        if not (covariance in ("full", "diagonal") or (isinstance(covariance, int) and not isinstance(covariance, bool)
                                                       and covariance >= 1)):
            raise ConfigError(f"ClassifierAlignment(covariance={covariance!r}): 'full', 'diagonal' or a rank >= 1")
        self.epochs, self.samples, self.lr, self.temperature = epochs, samples, float(lr), temperature
        self.covariance, self.weight_decay, self.refresh = covariance, float(weight_decay), bool(refresh)
        self.stats: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def nbytes(self) -> int:
        """The memory the class statistics take."""
        return sum(t.numel() * t.element_size() for pair in self.stats.values() for t in pair)

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        data = strategy.experience.dataset
        labels = targets_of(data).cpu()
        new = sorted({int(c) for c in strategy.experience.classes} - set(self.stats))
        if new:
            keep = torch.isin(labels, torch.tensor(new))
            feats = strategy.embed(data).cpu()
            self.stats.update(class_statistics(feats[keep], labels[keep], self.covariance))
        strategy.log("alignment/statistics_bytes", float(self.nbytes))
        if len(strategy.trained) >= 2:  # the experience just trained is counted
            self.align(strategy)

    def align(self, strategy) -> None:
        """Re-train the head on features drawn from every class's Gaussian (the method's second stage)."""
        head, classes = strategy.head, sorted(self.stats)
        widths = {len(mu) for mu, _ in self.stats.values()}
        if widths != {strategy.feature_dim}:
            raise PluginError(f"ClassifierAlignment keeps statistics of {sorted(widths)}-wide features, and the model's "
                              f"features are now {strategy.feature_dim} wide: a plugin changed them; alignment needs "
                              "features of one width throughout")
        columns = torch.tensor(classes, device=strategy.device)
        dtype = next(head.parameters()).dtype

        def loss(part: Batch) -> Tensor:
            logits = head(part.x)[:, columns]
            if self.temperature is not None:
                logits = logit_norm(logits, self.temperature)
            return F.cross_entropy(logits, part.y)

        means = self.refreshed_means(strategy) if self.refresh else {}
        for epoch in range(self.epochs):
            x = torch.cat([sample_features(means.get(c, mu), cov, self.samples, strategy.generator) for c, (mu, cov) in
                           ((c, self.stats[c]) for c in classes)]).to(strategy.device, dtype)
            y = torch.arange(len(classes), device=strategy.device).repeat_interleave(self.samples)
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
            strategy.fit(Batch(x, y, torch.zeros_like(y)), loss, head.parameters(), epochs=1, name="alignment",
                         batch_size=self.samples, scheduled=False, lr=lr, weight_decay=self.weight_decay)

    def refreshed_means(self, strategy) -> dict[int, Tensor]:
        """The mean features now of each class with at least two samples in the replay memory (``strategy.memory``),
        which stand in for the means stored after the class's experience when the representation has moved."""
        memory = strategy.memory
        if memory is None or len(memory) == 0:
            return {}
        stored = memory.batch()
        feats, labels = strategy.embed(stored).cpu().double(), stored.y.cpu()
        return {c: feats[labels == c].mean(0) for c in self.stats if int((labels == c).sum()) >= 2}

    def state_dict(self) -> dict:
        return {"classes": list(self.stats), "means": [m for m, _ in self.stats.values()],
                "covariances": [c for _, c in self.stats.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {int(c): (m, v) for c, m, v in zip(state["classes"], state["means"], state["covariances"])}
