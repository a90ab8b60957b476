"""Build the PT-SFM-5 backbone (docs/protocols.md) once and cache it where ``[model] checkpoint = "pt-sfm-5"`` finds it.

Supervised pre-training of timm's VisionTransformer (image 28, patch 4, width 64, depth 4, 4 heads) on
Fashion-MNIST training images 0 .. 29,999: AdamW lr 1e-3, weight decay 0.05, batch 128, 10 epochs, cosine
schedule per step, seed 0. The head is dropped from the saved weights. Same machine and thread count, same
bytes. ``--epochs`` and ``--images`` build smaller backbones (tests); ``--out`` writes elsewhere.

    python benchmarks/pretrain.py            # ~10 minutes on 2 CPU cores; skipped if already cached
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from streamcl.datasets import fashion_mnist
from streamcl.models.backbones import PT_SFM_5, PT_SFM_5_ARGS, checkpoint_file, timm_model


def pretrain(out: str | Path, *, epochs: int = 10, images: int = 30000, seed: int = 0, lr: float = 1e-3,
             weight_decay: float = 0.05, batch_size: int = 128, root: str | None = None, verbose: bool = True,
             test_images: int | None = None) -> dict:
    """Train the backbone on training images ``0 .. images-1``, write its weights (head dropped) to ``out``
    (and ``out``.json: the settings and the upstream accuracy on the first ``test_images`` test images, default
    all); return that summary."""
    train, test = fashion_mnist(root)
    test_x, test_y = test.x[:test_images], test.y[:test_images]
    x, y = train.x[:images], train.y[:images]
    torch.manual_seed(seed)
    model = timm_model("vit_tiny_patch16_224", 10, tuple(x.shape[1:]), args=PT_SFM_5_ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=order).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(test_x.split(1000), test_y.split(1000)))
    vit = model.model if hasattr(model, "model") else model
    weights = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(weights, tmp)
    os.replace(tmp, out)  # a killed build leaves no half-written backbone behind
    summary = {"architecture": {"timm": "vit_tiny_patch16_224", **PT_SFM_5_ARGS}, "images": [0, images],
               "epochs": epochs, "seed": seed, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
               "upstream_test_accuracy": correct / len(test_y), "seconds": round(time.perf_counter() - start, 1),
               "threads": torch.get_num_threads()}
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"weights file (default: {checkpoint_file(PT_SFM_5)})")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=30000)
    parser.add_argument("--force", action="store_true", help="build again even if the file exists")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else checkpoint_file(PT_SFM_5)
    if out.exists() and not args.force:
        print(f"{out} exists (use --force to build it again)")
        return 0
    summary = pretrain(out, epochs=args.epochs, images=args.images)
    print(f"wrote {out}: upstream test accuracy {summary['upstream_test_accuracy']:.4f} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
