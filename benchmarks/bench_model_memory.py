"""The fused backend's memory policies (`StackedHourglass(recompute=...)`) against the eager reference and
`torch.utils.checkpoint` of each reference Residual: saved-activation bytes and training-step time.

    pytest benchmarks/bench_model_memory.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median
    python benchmarks/bench_model_memory.py [--rounds 7] [--png docs/memory_policy.png]

Saved bytes are deterministic and counted once per row, at the paper's (8, 256, 16) at 256 px on one image
(every saved tensor through torch.autograd.graph.saved_tensors_hooks, storages counted once, parameters left out);
they go to each row's extra_info ("saved_mib_per_image", "saved_ratio_to_eager"). Step time is measured at the
smaller (2, 128, 16), 128 px, batch 4 (one 8-stack 256 px step takes many seconds on a 2-core CPU): under
pytest-benchmark one row at a time, and as a script in interleaved rounds (every row once per round, medians),
which is what to read on a shared machine. The script prints the table and draws saved MiB against step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fused_hourglass import HeatmapLoss, StackedHourglass, model_bench, reference

BYTES_CONFIG = {"nstack": 8, "inp_dim": 256, "oup_dim": 16}
BYTES_SIDE = 256
TIME_CONFIG = {"nstack": 2, "inp_dim": 128, "oup_dim": 16}
TIME_BATCH, TIME_SIDE = 4, 128
ROWS = ("eager", "checkpoint", "none", "conv1", "block")


class _CheckpointedResidual(reference.Residual):
    """A reference Residual run under torch.utils.checkpoint (non-reentrant): it keeps its input and recomputes the
    block in backward. The recompute runs the BatchNorms' forward again, so their running statistics are updated
    twice per step: the row is a memory and time yardstick, not a training recipe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(super().forward, x, use_reentrant=False)


class _CheckpointedHourglass(reference.Hourglass):
    residual_cls = _CheckpointedResidual


class CheckpointedReference(reference.StackedHourglass):
    """The reference network with every Residual under torch.utils.checkpoint (the "block" granularity)."""

    residual_cls = _CheckpointedResidual
    hourglass_cls = _CheckpointedHourglass


def build(row: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = reference.StackedHourglass(**config)
    if row == "eager":
        return ref
    model = CheckpointedReference(**config) if row == "checkpoint" else StackedHourglass(**config, backend="fused",
                                                                                           recompute=row)
    model.load_state_dict(ref.state_dict())
    return model


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages a training forward saves for backward, parameters left out."""
    model.train()
    return model_bench.saved_bytes(model, x)


_saved_cache: dict[str, int] = {}


def saved_mib_per_image(row: str) -> float:
    if row not in _saved_cache:
        x = torch.randn(1, 3, BYTES_SIDE, BYTES_SIDE, generator=torch.Generator().manual_seed(0))
        _saved_cache[row] = saved_bytes(build(row, BYTES_CONFIG), x)
    return _saved_cache[row] / 2**20


def train_step(model: torch.nn.Module):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TIME_BATCH, 3, TIME_SIDE, TIME_SIDE, generator=g)
    target = torch.rand(TIME_BATCH, TIME_CONFIG["oup_dim"], TIME_SIDE // 4, TIME_SIDE // 4, generator=g)
    loss_fn = HeatmapLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", ROWS)
def test_train_step_memory_policy(benchmark, impl):
    benchmark.group = "model training step, memory policies"
    if not benchmark.disabled:
        benchmark.extra_info["saved_mib_per_image"] = round(saved_mib_per_image(impl), 1)
        benchmark.extra_info["saved_ratio_to_eager"] = round(saved_mib_per_image(impl) / saved_mib_per_image("eager"),
                                                             3)
    loss = benchmark(train_step(build(impl, TIME_CONFIG)))
    assert torch.isfinite(loss)


def interleaved(rounds: int) -> dict[str, list[float]]:
    """Step times of every row, one step of each row per round (after one warm-up step each)."""
    steps = {row: train_step(build(row, TIME_CONFIG)) for row in ROWS}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(rounds):
        for row, step in steps.items():
            start = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--png", default=None, help="draw saved MiB per image against step time here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = {row: saved_mib_per_image(row) for row in ROWS}
    times = interleaved(args.rounds)
    median = {row: statistics.median(t) for row, t in times.items()}
    best = {row: min(t) for row, t in times.items()}
    print(f"saved at {tuple(BYTES_CONFIG.values())}, {BYTES_SIDE} px; step at {tuple(TIME_CONFIG.values())}, "
          f"{TIME_SIDE} px, batch {TIME_BATCH}, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'row':<12}{'saved MiB/image':>16}{'x eager':>9}{'median ms':>11}{'x eager':>9}{'x none':>8}"
          f"{'min ms':>9}{'x eager':>9}{'x none':>8}")
    for row in ROWS:
        print(f"{row:<12}{saved[row]:>16.1f}{saved[row] / saved['eager']:>9.3f}{median[row] * 1e3:>11.1f}"
              f"{median[row] / median['eager']:>9.3f}{median[row] / median['none']:>8.3f}{best[row] * 1e3:>9.1f}"
              f"{best[row] / best['eager']:>9.3f}{best[row] / best['none']:>8.3f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = {"eager": "reference (eager)", "checkpoint": "reference +\ncheckpoint per Residual",
                  "none": 'fused "none"', "conv1": 'fused "conv1"', "block": 'fused "block"'}
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row in ROWS:
            ax.scatter(best[row] * 1e3, saved[row], s=40)
            ax.annotate(labels[row], (best[row] * 1e3, saved[row]), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
        ax.set_xlabel(f"training step, ms ({tuple(TIME_CONFIG.values())}, {TIME_SIDE} px, batch {TIME_BATCH}; "
                      f"min of {args.rounds} interleaved rounds)")
        ax.set_ylabel(f"saved activations, MiB per image\n({tuple(BYTES_CONFIG.values())}, {BYTES_SIDE} px)")
        ax.set_ylim(0, max(saved.values()) * 1.1)
        ax.set_xlim(min(best.values()) * 1e3 * 0.9, max(best.values()) * 1e3 * 1.3)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
