"""Benchmark helpers: cold-cache timing, and a closing table of each row's min time as a ratio to its group's copy.

Cold cache: before every timed call, a buffer of twice the last-level cache is read and written, so the call starts
with its tensors in DRAM, as an activation of a real network does when its layer runs again in backward. Warm rows
call the same function back to back; at hourglass sizes the copy yardstick then runs largely from the last-level
cache (a 16 MiB clone's source and destination together just fit a 32 MiB L3), while a fused training step's
tensors, four times larger, cannot, so only rows of the same cache state are comparable.

Ratios: every group with a yardstick row (`impl` "clone" or "copy") gets a line in the terminal summary giving each
row's min time divided by the yardstick's min time. Ratios are what compare across machines and runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

YARDSTICKS = ("clone", "copy")
_results: list[tuple[str, str, float, bool]] = []  # (group, row, min seconds, is the yardstick)
_evict_buffer: torch.Tensor | None = None


def _last_level_cache_bytes() -> int:
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return size
    return 32 << 20


def evict_caches() -> None:
    """Read and write a buffer of twice the last-level cache (at least 64 MiB), pushing earlier data to DRAM."""
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = torch.zeros(max(2 * _last_level_cache_bytes(), 64 << 20) // 4)
    _evict_buffer.add_(1.0)


def run_benchmark(benchmark, fn: Callable, cache: str, target_seconds: float = 1.0):
    """Time fn() with pytest-benchmark; cache "warm" calls it back to back, "cold" evicts the caches before each
    call (outside the timed region), with enough rounds for about target_seconds of calls."""
    if cache == "warm":
        return benchmark(fn)
    if cache != "cold":
        raise ValueError(f"cache must be 'warm' or 'cold', got {cache!r}")
    evict_caches()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    rounds = max(10, min(200, int(target_seconds / max(once, 1e-6))))
    return benchmark.pedantic(fn, setup=evict_caches, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.fixture
def timed(benchmark):
    """timed(fn, cache): run_benchmark bound to this test's benchmark fixture."""
    return lambda fn, cache: run_benchmark(benchmark, fn, cache)


@pytest.fixture(autouse=True)
def _record_for_ratios(request):
    yield
    bench = request.node.funcargs.get("benchmark")
    if bench is None or bench.disabled or bench.stats is None or not bench.group:
        return
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    impl = params.get("impl", request.node.name)
    _results.append((bench.group, str(impl), bench.stats.stats.min, impl in YARDSTICKS))


def pytest_terminal_summary(terminalreporter):
    groups: dict[str, list[tuple[str, float, bool]]] = {}
    for group, row, seconds, is_yardstick in _results:
        groups.setdefault(group, []).append((row, seconds, is_yardstick))
    lines = []
    for group, rows in groups.items():
        base = [seconds for _, seconds, is_yardstick in rows if is_yardstick]
        if not base or len(rows) < 2:
            continue
        cells = ", ".join(f"{row} {seconds / base[0]:.2f}x" for row, seconds, is_yardstick in rows if not is_yardstick)
        lines.append(f"{group}: {cells}  (copy min {base[0] * 1e6:.0f} us)")
    if lines:
        terminalreporter.write_sep("-", "min time / min time of the group's copy")
        for line in lines:
            terminalreporter.write_line(line)
