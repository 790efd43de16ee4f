"""Benchmark helpers: cold-cache timing, and a closing table of each row's min time as a ratio to its group's copy.

Cache states. Warm rows call the same function back to back; at hourglass sizes the copy yardstick then runs
largely from the last-level cache (a 16 MiB clone's source and destination together just fit a 32 MiB L3), while a
fused training step's four tensors (twice those bytes) cannot, so only rows of the same cache state are comparable.
Cold rows read and write a buffer of twice the last-level cache before every timed call: everything starts in
DRAM, the code and the interpreter's and autograd's own data included, and the caches are full of dirty lines.
Dram rows flush only the call's input tensors from the caches (clflush, through the extension): the tensors start
in DRAM, as a layer's saved activations do when backward reaches them, while code and interpreter state stay
cached, as they do in a network that runs them all the time. Memory the allocator hands back may still be cached
in both, as it is in a network.

Ratios: every group with a yardstick row (`impl` "clone" or "copy") gets a line in the terminal summary giving each
row's min time divided by the yardstick's min time. Ratios are what compare across machines and runs. The memory
system of a shared machine drifts between rows (a cold 16 MiB copy has measured anywhere from 580 to 900 µs in
one session). So cold and dram rows also time, in every round and prepared the same way, a copy of the same bytes
into a tensor allocated once (no allocator in the way), and report the ratio of the two medians ("paired").

Allocator: glibc returns freed multi-megabyte blocks to the kernel and faults their pages in again on the next
allocation, in some rounds and not others, which moved a 16 MiB clone between 1x and 6.6x a copy into a ready
tensor within one run. So when the first timed benchmark starts, the process keeps freed memory in glibc's heap
(mallopt: mmap and trim thresholds of 1 GiB), as the README suggests for training; every timed row runs under
the same setting, and runs with benchmarks disabled (the test suite) never change it. FH_BENCH_GLIBC_DEFAULTS=1
keeps glibc's defaults. The terminal summary says which applied.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

from fused_hourglass import _ext
from fused_hourglass.benchmarking import keep_freed_memory_in_heap, last_level_cache_bytes

YARDSTICKS = ("clone", "copy")
# (group, row, min seconds, is the yardstick, median ratio to the paired yardstick or None)
_results: list[tuple[str, str, float, bool, float | None]] = []
_evict_buffer: torch.Tensor | None = None


_allocator: str | None = None  # what keep_freed_memory_in_heap did, once it has run


@pytest.fixture(autouse=True)
def _allocator_for_timing(request):
    global _allocator
    if _allocator is None and "benchmark" in request.fixturenames and not request.getfixturevalue("benchmark").disabled:
        _allocator = keep_freed_memory_in_heap()


def evict_caches() -> None:
    """Read and write a buffer of twice the last-level cache (at least 64 MiB), pushing earlier data to DRAM."""
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = torch.zeros(max(2 * last_level_cache_bytes(), 64 << 20) // 4)
    _evict_buffer.add_(1.0)


def flush_tensors(tensors) -> None:
    """Write back and evict every cache line of the tensors' storage (the "dram" rows): their next access comes
    from DRAM while code and interpreter state stay cached."""
    for t in tensors:
        if t is not None:
            torch.ops.fused_hourglass._cpu_flush_cache_lines(t)


def _can_flush() -> str | None:
    """None when flush_tensors works here, else why not (the dram rows are then skipped)."""
    if not _ext.HAS_EXTENSION:
        return f"dram rows need the compiled extension: {_ext.EXTENSION_ERROR}"
    try:
        flush_tensors([torch.zeros(16)])
    except (NotImplementedError, RuntimeError) as e:
        return f"dram rows need clflush: {e}"
    return None


CACHES = ("warm", "cold", "dram")


def run_benchmark(benchmark, fn: Callable, cache: str, yardstick: Callable | None = None, tensors=(),
                  target_seconds: float = 1.0):
    """Time fn() with pytest-benchmark. cache "warm" calls it back to back; "cold" evicts the caches before each
    call, "dram" flushes `tensors` (fn's inputs) from them (both outside the timed region), with enough rounds
    for about target_seconds of timed calls. With a yardstick (cold and dram), every round also times one
    yardstick call prepared the same way (its `tensors` attribute flushed for dram), and extra_info gets the
    ratio of fn's median to the yardstick's ("ratio_to_paired_copy")."""
    if cache == "warm":
        return benchmark(fn)
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if benchmark.disabled:  # smoke run: one call, nothing timed
        return benchmark.pedantic(fn)
    if cache == "dram" and (why := _can_flush()) is not None:
        pytest.skip(why)

    def prepare(ts):
        if cache == "cold":
            evict_caches()
        else:
            flush_tensors(ts)

    prepare(tensors)
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    rounds = max(10, min(200, int(target_seconds / max(once, 1e-6))))
    yardstick_times: list[float] = []

    def setup():
        if yardstick is not None:
            prepare(getattr(yardstick, "tensors", ()))
            t0 = time.perf_counter()
            yardstick()
            yardstick_times.append(time.perf_counter() - t0)
        prepare(tensors)

    result = benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    if len(yardstick_times) > 1:
        # pytest-benchmark runs setup before the warm-up round as well: its yardstick time is left out.
        ratio = benchmark.stats.stats.median / statistics.median(yardstick_times[1:])
        benchmark.extra_info["ratio_to_paired_copy"] = round(ratio, 3)
    return result


@pytest.fixture
def timed(benchmark):
    """timed(fn, cache, yardstick=None, tensors=()): run_benchmark bound to this test's benchmark fixture."""
    return lambda fn, cache, yardstick=None, tensors=(): run_benchmark(benchmark, fn, cache, yardstick, tensors)


@pytest.fixture(autouse=True)
def _record_for_ratios(request):
    yield
    bench = request.node.funcargs.get("benchmark")
    if bench is None or bench.disabled or bench.stats is None or not bench.group:
        return
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    impl = params.get("impl", request.node.name)
    _results.append((bench.group, str(impl), bench.stats.stats.min, impl in YARDSTICKS,
                     bench.extra_info.get("ratio_to_paired_copy")))


def pytest_terminal_summary(terminalreporter):
    groups: dict[str, list[tuple[str, float, bool, float | None]]] = {}
    for group, row, seconds, is_yardstick, paired in _results:
        groups.setdefault(group, []).append((row, seconds, is_yardstick, paired))
    lines = []
    for group, rows in groups.items():
        base = [(seconds, paired) for _, seconds, is_yardstick, paired in rows if is_yardstick]
        if not base or len(rows) < 2:
            continue
        cells = ", ".join(f"{row} {seconds / base[0][0]:.2f}x" + (f" (paired {paired:.2f}x)" if paired else "")
                          for row, seconds, is_yardstick, paired in rows if not is_yardstick)
        # The clone row's own paired ratio: clone (which allocates its output) over a copy into a ready tensor.
        own = f", clone / paired copy {base[0][1]:.2f}x" if base[0][1] else ""
        lines.append(f"{group}: {cells}  (yardstick min {base[0][0] * 1e6:.0f} us{own})")
    if lines:
        terminalreporter.write_sep("-", "min time / min time of the group's yardstick (a copy or clone of the input)")
        if _allocator is not None:
            terminalreporter.write_line(f"allocator: {_allocator}")
        for line in lines:
            terminalreporter.write_line(line)
