"""Averaged GEM: the update may not increase the loss on a random sample of the episodic memory."""
from __future__ import annotations

import torch
from torch import Tensor

from streamcl import Batch, hookimpl
from streamcl.plugins.gem import (EpisodicMemory, check_count, current_gradient, memory_gradient, trainable_params,
                                  write_gradient)


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's projection (Chaudhry et al. 2019, eq. 11): ``g - (g^T g_ref / g_ref^T g_ref) g_ref`` when
    ``g^T g_ref < 0``, else ``g``. A reference gradient of zero norm never projects. The result of a
    projection is orthogonal to ``g_ref``. Dot products in float64; returned in ``g``'s dtype."""
    if g.shape != g_ref.shape or g.dim() != 1:
        raise ValueError(f"agem_project: g and g_ref must be vectors of one length; got {tuple(g.shape)} and "
                         f"{tuple(g_ref.shape)}")
    g64, r64 = g.double(), g_ref.double()
    dot, norm2 = g64 @ r64, r64 @ r64
    if not dot < 0 or not norm2 > 0:
        return g
    return (g64 - (dot / norm2) * r64).to(g.dtype)


class AGEM(EpisodicMemory):
    """Averaged Gradient Episodic Memory (A-GEM; Chaudhry et al. 2019, "Efficient Lifelong Learning with
    A-GEM", eq. 10-11).

    After each experience, ``per_experience`` random samples of it join the episodic memory. At every
    step, after backward, ``sample_size`` samples are drawn uniformly without replacement from the whole
    memory (``strategy.generator``; all of it when it holds fewer) and their mean loss's gradient is the
    reference ``g_ref`` (the plain ``strategy.criterion`` on the logits after ``adapt_logits``). If
    ``g^T g_ref < 0``, the gradient ``g`` (the ``.grad`` of the trainable parameters) is replaced by
    ``g - (g^T g_ref / g_ref^T g_ref) g_ref`` (eq. 11), see :func:`agem_project`.

    Defaults are the authors' MNIST settings: 25 samples per class, i.e. 250 per 10-class task
    (``per_experience``), and a reference sample of 256 (``EPS_MEM_BATCH_SIZE``; ``sample_size``). ``memory``: a
    total over the stream instead (see :class:`~streamcl.plugins.gem.EpisodicMemory`), so the memory is bounded
    on a long stream.
    Every rank draws the same sample from the same memory and, under torchrun, holds the same
    all-reduced ``.grad``, so every rank makes the same projection.
    """

    def __init__(self, per_experience: int | None = None, sample_size: int = 256, memory: int | None = None):
        super().__init__(250 if per_experience is None and memory is None else per_experience, memory)
        self.sample_size = check_count("sample_size", sample_size, "memory samples behind the reference gradient")
        self._pool: Batch | None = None  # every memory joined, rebuilt when one is added

    @hookimpl
    def after_training_exp(self, strategy) -> None:
        super().after_training_exp(strategy)
        self._pool = None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pool = None

    def _sample(self, strategy) -> Batch:
        memories = self._on_device(strategy.device)
        if self._pool is None or self._pool.y.device != memories[0].y.device:
            self._pool = memories[0].cat(*memories[1:])
        pick = torch.randperm(len(self._pool), generator=strategy.generator)[: self.sample_size]
        return self._pool.select(pick.to(self._pool.y.device))

    @hookimpl
    def after_backward(self, strategy) -> None:
        if not self.memories:
            return
        params = trainable_params(strategy.model)
        g_ref = memory_gradient(strategy, self._sample(strategy), params)
        g = current_gradient(params)
        projected = agem_project(g, g_ref)
        if projected is not g:
            write_gradient(params, projected)
