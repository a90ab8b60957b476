"""Preallocated tensor storage for replay: its size is the budget, never the stream."""
from __future__ import annotations

import torch
from torch import Tensor

from streamcl.batch import Batch, to_device
from streamcl.errors import ConfigError


class Codec:
    """How inputs are stored: as they are (``None``), or compressed.

    ``"uint8"`` quantises each sample to 8 bits between its own minimum and maximum (one byte per
    value plus two floats per sample); ``downsample`` > 1 also average-pools images of
    ``image_shape`` by that factor and restores the size by repetition when read.
    """

    def __init__(self, compress: str | None = None, downsample: int = 1, image_shape: tuple | None = None):
        if compress not in (None, "uint8"):
            raise ConfigError(f"compress={compress!r}: use None or 'uint8'")
        if downsample < 1 or (downsample > 1 and not image_shape):
            raise ConfigError("downsample takes a whole factor >= 1, and image_shape=(C, H, W) to pool over")
        self.compress, self.downsample, self.image_shape = compress, downsample, tuple(image_shape or ())

    def stored_shape(self, shape: tuple) -> tuple:
        if self.downsample == 1:
            return shape
        c, h, w = self.image_shape
        return (c, h // self.downsample, w // self.downsample)

    def bytes_per_sample(self, shape: tuple, dtype: torch.dtype) -> int:
        """Bytes one stored sample takes: inputs, their scale if quantised, and the two labels (int64)."""
        n = int(torch.Size(self.stored_shape(shape)).numel())
        per_value = 1 if self.compress == "uint8" else torch.empty(0, dtype=dtype).element_size()
        return n * per_value + (8 if self.compress == "uint8" else 0) + 16

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.downsample > 1:
            img = x.reshape(x.shape[0], *self.image_shape)
            x = torch.nn.functional.avg_pool2d(img, self.downsample)
        if self.compress != "uint8":
            return x, None
        flat = x.reshape(x.shape[0], -1)
        low, high = flat.min(1).values, flat.max(1).values
        scale = torch.stack([low, (high - low).clamp_min(1e-12) / 255], 1)
        q = ((flat - low[:, None]) / scale[:, 1:]).round_().clamp_(0, 255).to(torch.uint8)
        return q.reshape(x.shape), scale

    def decode(self, q: Tensor, scale: Tensor | None, shape: tuple, dtype: torch.dtype) -> Tensor:
        x = q
        if scale is not None:
            flat = q.reshape(q.shape[0], -1).to(dtype)
            x = (flat * scale[:, 1:] + scale[:, :1]).reshape(q.shape)
        if self.downsample > 1:
            x = x.repeat_interleave(self.downsample, -2).repeat_interleave(self.downsample, -1)
        return x.reshape(x.shape[0], *shape)


class Memory:
    """At most ``capacity`` samples: inputs ``x``, labels ``y``, task labels ``t`` and named extras.

    Storage is allocated once, at the first write, with the shape of what is written; every write
    and read is an index operation on those tensors (O(1) per sample). Slots ``0 .. size - 1`` hold
    samples. ``extras`` names per-sample tensors stored beside them (logits for dark replay,
    activations for latent replay).
    """

    def __init__(self, capacity: int, codec: Codec | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError(f"memory capacity {capacity!r}: it must be a positive whole number of samples")
        self.capacity, self.codec = capacity, codec or Codec()
        self.size = 0
        self.x: Tensor | None = None
        self.scale: Tensor | None = None
        self.y = self.t = torch.empty(0, dtype=torch.long)
        self.extras: dict[str, Tensor] = {}
        self.shape: tuple = ()
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.size

    def _allocate(self, x: Tensor, extras: dict[str, Tensor]) -> None:
        self.shape, self.dtype = tuple(x.shape[1:]), x.dtype
        q, scale = self.codec.encode(x[:1])
        dev, n = x.device, self.capacity
        self.x = torch.empty((n, *q.shape[1:]), dtype=q.dtype, device=dev)
        self.scale = None if scale is None else torch.empty((n, 2), dtype=scale.dtype, device=dev)
        self.y = torch.empty(n, dtype=torch.long, device=dev)
        self.t = torch.empty(n, dtype=torch.long, device=dev)
        self.extras = {k: torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=dev) for k, v in extras.items()}

    def write(self, slots: Tensor, x: Tensor, y: Tensor, t: Tensor, **extras: Tensor) -> None:
        """Store the samples in ``slots`` (indices below ``capacity``); slots past ``size`` extend it."""
        if len(slots) == 0:
            return
        if self.x is None:
            self._allocate(x, extras)
        q, scale = self.codec.encode(x)
        self.x[slots] = q.to(self.x.device)
        if scale is not None:
            self.scale[slots] = scale.to(self.x.device)
        self.y[slots], self.t[slots] = y.to(self.y.device), t.to(self.t.device)
        for k, v in extras.items():
            self.extras[k][slots] = v.to(self.x.device)
        self.size = max(self.size, int(slots.max()) + 1)

    def append(self, x: Tensor, y: Tensor, t: Tensor, **extras: Tensor) -> None:
        free = self.capacity - self.size
        if len(y) > free:
            raise ConfigError(f"{len(y)} samples do not fit the {free} free slots of the memory")
        self.write(torch.arange(self.size, self.size + len(y)), x, y, t, **extras)

    def keep(self, slots: Tensor) -> None:
        """Keep only the samples in ``slots``, in that order, at the front of the storage."""
        slots = slots.to(self.y.device)
        for name in ("x", "scale", "y", "t"):
            value = getattr(self, name)
            if value is not None and len(value):
                value[: len(slots)] = value[slots].clone()
        for v in self.extras.values():
            v[: len(slots)] = v[slots].clone()
        self.size = len(slots)

    def inputs(self, slots: Tensor | slice | None = None) -> Tensor:
        """The (decoded) inputs at ``slots`` (all stored samples by default)."""
        slots = slice(0, self.size) if slots is None else slots
        if self.x is None:  # nothing written yet
            return torch.empty((0, *self.shape), dtype=self.dtype)
        scale = None if self.scale is None else self.scale[slots]
        return self.codec.decode(self.x[slots], scale, self.shape, self.dtype)

    def batch(self, slots: Tensor | slice | None = None) -> Batch:
        slots = slice(0, self.size) if slots is None else slots
        return Batch(self.inputs(slots), self.y[slots], self.t[slots])

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """``n`` slots drawn uniformly with replacement (from ``generator``) and their samples."""
        slots = to_device(torch.randint(self.size, (n,), generator=generator), self.y.device)
        return slots, self.batch(slots)

    @property
    def labels(self) -> Tensor:
        return self.y[: self.size]

    def state_dict(self) -> dict:
        return {"size": self.size, "x": self.x, "scale": self.scale, "y": self.y, "t": self.t,
                "extras": dict(self.extras), "shape": self.shape, "dtype": self.dtype}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, dict(v) if k == "extras" else v)
