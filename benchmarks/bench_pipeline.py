"""The data side against the training step it feeds: SyntheticPoses samples drawn per second on one core vs the
demo model's training step in images per second (the demo preset's model, resolution, batch and precision on this
machine), so a reader can see how much of a core the loader needs to keep training fed.

    pytest benchmarks/bench_pipeline.py --benchmark-only --benchmark-columns=min,median

Each row's extra_info carries its rate; the test prints the ratio (loader samples/s per core ÷ training images/s).
"""

import pytest
import torch

from fused_hourglass import HeatmapLoss, StackedHourglass, pose
from fused_hourglass.data import SyntheticPoses
from fused_hourglass.engine.config import from_preset
from fused_hourglass.engine.train import build_optimizer

DEMO = from_preset("demo", device="cpu")  # its CPU precision, whether or not CUDA is here
_rates: dict[str, float] = {}


def test_synthetic_samples_per_core(benchmark):
    benchmark.group = "pipeline: synthetic data vs demo training step"
    ds = SyntheticPoses(10_000, DEMO.res, seed=0)
    count = 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker runs on one core (DataLoader sets one thread per worker)
    index = iter(range(10**9))
    try:
        samples = benchmark(lambda: [ds[next(index) % len(ds)] for _ in range(count)])
    finally:
        torch.set_num_threads(threads)
    assert len(samples) == count and samples[0]["image"].shape == (3, DEMO.res, DEMO.res)
    if not benchmark.disabled:
        _rates["data"] = count / benchmark.stats.stats.median
        benchmark.extra_info["samples_per_s_one_core"] = round(_rates["data"], 1)


def test_demo_training_step(benchmark):
    benchmark.group = "pipeline: synthetic data vs demo training step"
    torch.manual_seed(0)
    model = StackedHourglass(DEMO.nstack, DEMO.inp_dim, 16, backend=DEMO.backend)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, DEMO)  # the training loop's Adam
    batch = torch.utils.data.default_collate([SyntheticPoses(64, DEMO.res)[i] for i in range(DEMO.batch_size)])
    images = batch["image"].contiguous(memory_format=torch.channels_last)
    target = pose.make_heatmaps(batch["joints"] / 4, DEMO.res // 4, sigma=DEMO.sigma)
    loss_fn = HeatmapLoss()

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=DEMO.amp)  # the demo's precision on this machine

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn(model(images).float(), target)
        loss.backward()
        opt.step()
        return loss.detach()

    loss = benchmark(step)
    assert torch.isfinite(loss)
    if not benchmark.disabled:
        _rates["train"] = DEMO.batch_size / benchmark.stats.stats.median
        benchmark.extra_info["images_per_s"] = round(_rates["train"], 1)
        if "data" in _rates:
            ratio = _rates["data"] / _rates["train"]
            benchmark.extra_info["loader_cores_needed"] = round(1 / ratio, 3)
            print(f"\nSyntheticPoses {_rates['data']:.0f} samples/s on one core; demo training step "
                  f"{_rates['train']:.1f} images/s on {torch.get_num_threads()} threads: one loader core draws "
                  f"{ratio:.1f}x what training consumes")


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
