"""Run under ``torchrun``: every built-in plugin and recipe for two experiences of a tiny stream.

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT

Rank 0 writes OUT/<unit>.json with the run's numbers and OUT/world.json with the world size. A
crash-and-resume of one unit is also run under the process group (``OUT/resume.json``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from streamcl import distributed as dist  # noqa: E402
from tests.reliability import UNITS, Crash, numbers, tiny_run  # noqa: E402


def crash_then_resume(out: Path) -> dict:
    """Crash every rank at its 5th update (after the checkpoint at step 3), then resume: the numbers."""
    import torch

    original, calls = torch.optim.SGD.step, [0]

    def step_or_crash(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise Crash("crash")
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = step_or_crash
    try:
        tiny_run({"plugins": [{"name": "cumulative"}]}, out, n_experiences=2)
    except Crash:
        pass
    finally:
        torch.optim.SGD.step = original
    dist.barrier()
    return numbers(tiny_run({"plugins": [{"name": "cumulative"}]}, out, resume=True, n_experiences=2))


def helpers() -> dict:
    """What the helpers give under the process group, gathered to rank 0."""
    import torch

    r = dist.rank()
    mine = dist.shard(torch.arange(7))
    gathered = dist.all_gather(torch.full((r + 1, 2), float(r)))  # ranks send 1 and 2 rows
    told = dist.broadcast({"from": r})
    summed = dist.all_reduce(torch.tensor([r + 1.0])).item()
    shares = dist.all_gather(mine)
    few = dist.all_gather(dist.shard(torch.arange(1)))  # fewer entries than ranks: every rank gets one
    return {"shares": shares.tolist(), "gathered": gathered.tolist(), "told": told, "summed": summed,
            "few": few.tolist(), "main": dist.is_main()}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init("cpu")
    assert dist.active(), "run this under torchrun with more than one process"
    checks = helpers()
    results = {label: numbers(tiny_run(part, n_experiences=2)) for label, part in UNITS}
    resumed = crash_then_resume(out / "resume-run")
    if dist.is_main():
        for label, res in results.items():
            (out / f"{label.replace(':', '_')}.json").write_text(json.dumps(res))
        (out / "resume.json").write_text(json.dumps(resumed))
        (out / "helpers.json").write_text(json.dumps(checks))
        (out / "world.json").write_text(json.dumps({"world_size": dist.world_size()}))
    torch.distributed.barrier()  # leave together: a rank tearing its group down while another still works may abort


if __name__ == "__main__":
    main()
