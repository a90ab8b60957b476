"""torch.distributed for streamcl: process-group set-up under ``torchrun`` and the helpers plugins use.

Every helper also works in a single process (world size 1), where it does nothing or returns its
input, so a plugin written with them runs unchanged either way. See docs/distributed.md for the
contract a plugin meets to be distributed-safe.
"""
from __future__ import annotations

import atexit
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or anything setting ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: torch.device | str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes (once) and return this rank's device.

    The backend is NCCL when the device is a GPU, else gloo. ``device`` "cuda" becomes
    ``cuda:LOCAL_RANK``. Outside ``torchrun`` nothing happens and ``device`` (or the CPU) is returned.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None and launched():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)  # tear the group down before the interpreter does, or backends may abort
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """Sum (or "mean", "max", "min") ``tensor`` over ranks, in place; returns it."""
    if active():
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, ops[op])
        if op == "mean":
            tensor /= world_size()
    return tensor


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank: tensors in place (and returned), other objects pickled."""
    if not active():
        return value
    if isinstance(value, Tensor):
        dist.broadcast(value, src)
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0, in rank order (sizes may differ)."""
    if not active():
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def shard(index: Tensor) -> Tensor:
    """This rank's contiguous share of ``index`` (the same on every rank before the call).

    Shares differ in size by at most one; when there are fewer entries than ranks they are
    repeated so that every rank gets at least one and all ranks take the same number of steps.
    """
    world = world_size()
    if world == 1:
        return index
    if 0 < len(index) < world:
        index = index.repeat(math.ceil(world / len(index)))[:world]
    return index.tensor_split(world)[rank()]


def wrap(model: torch.nn.Module, device: torch.device, **options) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when a process group runs, else ``model`` itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device if ids else None, **options)
