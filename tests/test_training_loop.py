"""The loop's options: schedules restarted per experience, gradient clipping, mixed precision, channels_last,
torch.compile, a validation split, the DataLoader path with workers, uint8 images, the GPU's lagged
non-finite check; each honoured by the private training loops (``Strategy.fit``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from streamcl import Strategy, config, hookimpl, runner, schedule
from streamcl.batch import Batch
from streamcl.errors import ConfigError, TrainingError
from streamcl.models import SmallCNN
from streamcl.models.inputs import Standardize
from streamcl.scenarios import class_incremental, hold_out
from tests.conftest import ItemDataset, image_benchmark, image_blobs, mlp
from tests.reliability import Crash, crash_at_step, numbers, tiny_benchmark, tiny_config


class Probe:
    """Records every step's learning rates (before the update) and gradient norm (after it)."""

    def __init__(self):
        self.lrs, self.norms, self.dtypes = [], [], []

    @hookimpl
    def before_update(self, strategy):
        self.lrs.append([g["lr"] for g in strategy.optimizer.param_groups])

    @hookimpl
    def after_update(self, strategy):
        grads = [p.grad for p in strategy.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    @hookimpl
    def after_forward(self, strategy):
        self.dtypes.append(strategy.output.logits.dtype)


def test_schedules_by_hand():
    cos = schedule.Cosine()
    assert [cos(s, 4) for s in range(4)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                           (1 + math.cos(3 * math.pi / 4)) / 2])
    warm = schedule.Cosine(warmup=2)
    assert [warm(s, 6) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    steps = schedule.MultiStep((0.5, 0.75), gamma=0.1)
    assert [steps(s, 8) for s in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert schedule.Constant(warmup=1)(0, 10) == 0.5 and schedule.Constant(warmup=1)(1, 10) == 1.0
    with pytest.raises(ConfigError, match="fractions of the experience"):
        schedule.MultiStep((3, 5))


def test_cosine_restarts_every_experience_and_keeps_group_ratios():
    torch.manual_seed(0)
    model = mlp(4)
    head = list(model.parameters())[-2:]
    body = list(model.parameters())[:-2]
    opt = torch.optim.SGD([{"params": body, "lr": 0.1}, {"params": head, "lr": 0.01}], lr=0.1)
    probe = Probe()
    strategy = Strategy(model, opt, plugins=[probe], epochs=2, batch_size=8, seed=0, schedule=schedule.Cosine())
    bench = image_benchmark()
    for exp in bench.train_stream:
        strategy.train(exp)
    per_exp = strategy.steps_per_epoch * 2
    assert per_exp == 4 and len(probe.lrs) == 8
    expected = [0.5 * (1 + math.cos(math.pi * s / per_exp)) for s in range(per_exp)] * 2
    assert [lr[0] for lr in probe.lrs] == pytest.approx([0.1 * f for f in expected])
    assert [lr[1] for lr in probe.lrs] == pytest.approx([0.01 * f for f in expected])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]  # the base rates between experiences
    assert all("base_lr" not in g for g in opt.param_groups)


def test_clipping_and_fit_honour_the_loop_options():
    torch.manual_seed(0)
    model = mlp(4)
    probe = Probe()
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.5), plugins=[probe], epochs=1,
                        batch_size=8, seed=0, clip_grad_norm=0.01, schedule=schedule.Cosine())
    strategy.train(image_benchmark().train_stream[0])
    assert max(probe.norms) <= 0.01 + 1e-6
    data = Batch(image_blobs().x, image_blobs().y, torch.zeros(32, dtype=torch.long))
    seen = []
    real_step = torch.optim.SGD.step

    def spy(opt, *a, **k):
        seen.append((opt.param_groups[0]["lr"], float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])))))
        return real_step(opt, *a, **k)

    torch.optim.SGD.step = spy
    try:
        strategy.fit(data, lambda b: nn.functional.cross_entropy(strategy.forward(b).logits, b.y),
                     model.parameters(), epochs=2, name="probe", batch_size=16)
    finally:
        torch.optim.SGD.step = real_step
    assert [lr for lr, _ in seen] == pytest.approx([0.5 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert max(n for _, n in seen) <= 0.01 + 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(tmp_path, monkeypatch, precision):
    def cfg():
        c = tiny_config({})
        c["train"]["precision"] = precision
        return c

    whole = runner.run(cfg(), benchmark=tiny_benchmark())
    assert all(math.isfinite(a) for row in whole["accuracy_matrix"] for a in row)
    assert whole["final_accuracy"] > 0.5  # it learns (chance: 1/6)
    with monkeypatch.context() as m:
        crash_at_step(m, 8)
        with pytest.raises(Crash):
            runner.run(cfg(), tmp_path, benchmark=tiny_benchmark())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert (state["scaler"] is not None) == (precision == "fp16")
    resumed = runner.run(cfg(), tmp_path, resume=True, benchmark=tiny_benchmark())
    assert numbers(resumed) == numbers(whole)


def test_autocast_runs_the_forward_in_bf16():
    torch.manual_seed(0)
    model = mlp(4)
    probe = Probe()
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[probe], batch_size=8,
                        precision="bf16")
    strategy.train(image_benchmark().train_stream[0])
    assert set(probe.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_channels_last_and_compile():
    torch.manual_seed(0)
    model = SmallCNN(1, 4)
    features = []

    class Features:
        @hookimpl
        def after_forward(self, strategy):
            features.append(strategy.output.features is not None)

    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Features()], batch_size=8,
                        channels_last=True, compile="eager")
    strategy.train(image_benchmark().train_stream[0])
    conv = strategy.model.backbone[1].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert features and all(features)  # the head's input is still captured under torch.compile
    assert strategy._net is not strategy.model


def test_bad_loop_options_are_refused():
    model = mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, match in (({"precision": "fp8"}, "precision"), ({"clip_grad_norm": 0}, "clip_grad_norm"),
                          ({"schedule": "cosine"}, "schedule must map"), ({"num_workers": -1}, "num_workers")):
        with pytest.raises(ConfigError, match=match):
            Strategy(model, opt, **kwargs)
    for train, match in (({"validation": 1.5}, "validation"), ({"milestones": [0.5]}, "multistep"),
                         ({"schedule": "step"}, "schedule"), ({"precision": "int8"}, "precision")):
        with pytest.raises(ConfigError, match=match):
            config.parse({"train": train})


def test_validation_split_is_held_out_and_evaluated_every_epoch():
    exp = tiny_benchmark().train_stream[0]
    train, val = hold_out(exp, 0.25, seed=3)
    assert len(train) == 30 and len(val) == 10 and val.origin == "validation" and val.classes == exp.classes
    assert not set(train.dataset.x[:, 0].tolist()) & set(val.dataset.x[:, 0].tolist())
    cfg = tiny_config({})
    cfg["train"]["validation"] = 0.25
    results = runner.run(cfg, benchmark=tiny_benchmark())
    periodic = results["periodic"]
    assert len(periodic) == 6  # 3 experiences x 2 epochs
    assert [len(p["accuracy"]) for p in periodic] == [1, 1, 2, 2, 3, 3]  # the experiences seen so far


def test_dataloader_with_workers_gives_the_tensor_paths_numbers():
    """The same samples, in the same order, augmented the same way on the device: read as tensors or through a
    DataLoader with two worker processes, the accuracy matrix is the same, bit for bit."""
    def run(wrap, **options):
        bench = class_incremental(wrap(image_blobs(16, 4)), wrap(image_blobs(4, 4, seed=1)), 2)
        torch.manual_seed(0)
        model = SmallCNN(1, 4)
        strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=2,
                            batch_size=8, seed=0, augment=__import__("streamcl.augment").augment.CropFlip(), **options)
        for exp in bench.train_stream:
            strategy.train(exp)
            strategy.eval(bench.test_stream)
        return strategy.metrics.summary()["accuracy_matrix"]

    tensors = run(lambda d: d)
    loaded = run(ItemDataset, num_workers=2, persistent_workers=True)
    assert loaded == tensors


def test_workers_draw_a_datasets_random_transform_as_one_process_does():
    from tests.conftest import jitter

    def batches(workers):
        data = ItemDataset(image_blobs(8, 2), transform=jitter)
        model = mlp(2)
        strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=0, num_workers=workers)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
        return [b.x for b in strategy.batches(data, 4, order, seed=(0, 0))]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2)))


def test_uint8_images_are_standardised_by_the_model():
    model = Standardize(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), [0.5, 0.25, 0.0], [0.5, 0.5, 1.0])
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    seen = []
    model.model.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(x)
    expected = torch.tensor([(0 - 0.5) / 0.5, (1 - 0.25) / 0.5, 0.2]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(seen[0], expected)
    model(expected.clone())
    assert torch.equal(seen[1], expected)  # float inputs pass as they are
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert strategy.head_path == "model.1"


def test_lagged_non_finite_check_stops_before_a_checkpoint_is_written(tmp_path):
    torch.manual_seed(0)
    model = mlp(4)

    class Poison:
        @hookimpl
        def loss_terms(self, strategy, batch, output):
            return {"poison": torch.tensor(float("nan")) if strategy.global_step == 1 else torch.tensor(0.0)}

    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Poison()], batch_size=8,
                        checkpoint_dir=tmp_path, checkpoint_every=2)
    strategy._lagged = True  # as on one GPU: the check runs one step behind
    with pytest.raises(TrainingError, match=r"'poison'.*iteration 1 \(step 1\); its update was applied"):
        strategy.train(image_benchmark().train_stream[0])
    assert not (tmp_path / "last.pt").exists()  # the check settles before the step-2 checkpoint is written


def test_dataloader_path_with_augmentation_and_schedule_resumes_inside_an_experience(tmp_path, monkeypatch):
    def run(out=None, resume=False):
        cfg = tiny_config({})
        cfg["train"].update(augment="crop_flip", schedule="cosine", num_workers=2, batch_size=8)
        bench = class_incremental(ItemDataset(image_blobs(12, 4)), ItemDataset(image_blobs(4, 4, seed=1)), 2)
        torch.manual_seed(0)
        return runner.run(cfg, out, resume=resume, benchmark=bench, model=SmallCNN(1, 4))

    whole = run()
    with monkeypatch.context() as m:
        crash_at_step(m, 5)  # experience 0 has 2 epochs of 3 steps; its checkpoint at step 3
        with pytest.raises(Crash):
            run(tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert numbers(run(tmp_path, resume=True)) == numbers(whole)


def test_crop_padding_is_the_croppings_padding():
    cfg = config.parse({"train": {"augment": "crop_flip", "crop_padding": 4}})
    from streamcl import augment
    assert augment.build(cfg["train"]["augment"], (3, 32, 32), cfg["train"]["crop_padding"]).padding == 4
    assert augment.build("crop_flip", (784,)).padding == 2
    with pytest.raises(ConfigError, match="crop_padding"):
        config.parse({"train": {"crop_padding": 4}})


def test_the_non_finite_error_says_whether_a_checkpoint_exists(tmp_path):
    class Poison:
        @hookimpl
        def loss_terms(self, strategy, batch, output):
            return {"poison": torch.tensor(float("nan") if strategy.global_step == 3 else 0.0)}

    def train(folder, batch_size, experiences):
        torch.manual_seed(0)
        model = mlp(4)
        strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Poison()],
                            batch_size=batch_size, checkpoint_dir=folder)
        for exp in image_benchmark().train_stream[:experiences]:
            strategy.train(exp)

    with pytest.raises(TrainingError, match="was written before this step and is intact"):
        train(tmp_path / "a", 8, 2)  # step 3 is in experience 1: experience 0's checkpoint exists
    with pytest.raises(TrainingError, match="no checkpoint had been written yet"):
        train(tmp_path / "b", 2, 1)  # step 3 of 8 in the first experience
