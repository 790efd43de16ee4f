"""Benchmark cases shared by `benchmarks/` (pytest-benchmark) and `python -m fused_hourglass bench`.

A case is one op at one shape and layout, with its implementations side by side: the fused op, eager
PyTorch, `torch.compile` of the eager code, and a plain copy of the same bytes, the yardstick of a
memory-bound op. Ratios to the copy are what to read: absolute times depend on the machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ops
from .reference import ops as reference

LAYOUTS = ("nchw", "channels_last")
HOURGLASS_SIDES = (8, 16, 32, 64)

SYSFS_CPU0_CACHE = "/sys/devices/system/cpu/cpu0/cache"


_SYSFS_NUMBER = re.compile(r"([0-9]+)([KMG]?)")


def _read_sysfs_text(path: str) -> str | None:
    """The first line of a small sysfs file without surrounding blanks; None when it cannot be opened."""
    try:
        with open(path, errors="replace") as f:
            return f.readline(63).strip(" \t\n")
    except OSError:
        return None


def _parse_sysfs_number(text: str, suffix: bool) -> int:
    """Decimal digits, optionally followed by K, M or G when `suffix` ("32768K"); 0 for anything else (and for
    more than 2**32 before the suffix)."""
    match = _SYSFS_NUMBER.fullmatch(text)
    if match is None or (match.group(2) and not suffix) or int(match.group(1)) > 1 << 32:
        return 0
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def sysfs_cache_bytes(cache_dir: str) -> int:
    """The size of the highest cache level in a sysfs cache directory (/sys/devices/system/cpu/cpuN/cache):
    entries index0, index1, ... up to the first without a `level` file; the last entry of the highest level
    wins; entries whose level or size do not parse are skipped. 0 when none does. The CPU kernels read the same
    way (csrc/ops/cpu/cpu_utils.h)."""
    best, best_level = 0, 0
    index = 0
    while True:
        entry = os.path.join(cache_dir, f"index{index}")
        index += 1
        level_text = _read_sysfs_text(os.path.join(entry, "level"))
        if level_text is None:
            return best
        size_text = _read_sysfs_text(os.path.join(entry, "size"))
        if size_text is None:
            continue
        level, size = _parse_sysfs_number(level_text, False), _parse_sysfs_number(size_text, True)
        if level > 0 and size > 0 and level >= best_level:
            best, best_level = size, level


def last_level_cache_bytes(cache_dir: str = SYSFS_CPU0_CACHE) -> int:
    """The size of CPU 0's highest cache level, as the CPU kernels find it for their streaming-store rule
    (csrc/ops/cpu/cpu_utils.h): Linux's sysfs first (glibc's sysconf derives the L3 from CPUID, which virtual
    machines can misreport: 320 MiB for a 32 MiB L3 on one 2-vCPU EPYC guest), else sysconf, else 32 MiB."""
    best = sysfs_cache_bytes(cache_dir)
    if best > 0:
        return best
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = -1
    return size if size > 0 else 32 << 20


def keep_freed_memory_in_heap() -> str:
    """Keep freed memory in glibc's heap for the rest of the process (mallopt: mmap and trim thresholds of 1 GiB),
    and return what was done, for the benchmark's header. With glibc's defaults, freed multi-megabyte activations
    go back to the kernel and are faulted in again by the next step, in some rounds and some processes and not
    others (a fused eval forward measured 22 ms in one process and 29 ms in the next); timed runs set this once so
    that every row runs alike. FH_BENCH_GLIBC_DEFAULTS=1 keeps the defaults."""
    if os.environ.get("FH_BENCH_GLIBC_DEFAULTS") == "1":
        return "glibc malloc defaults (FH_BENCH_GLIBC_DEFAULTS=1)"
    if not sys.platform.startswith("linux"):
        return "the platform allocator's defaults"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return "malloc defaults (libc not found)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    for mmap_threshold in (1 << 30, 32 << 20):  # older glibc caps the mmap threshold at 32 MiB
        if libc.mallopt(m_mmap_threshold, mmap_threshold) == 1:
            if libc.mallopt(m_trim_threshold, 1 << 30) == 1:
                return f"glibc malloc: mmap threshold {mmap_threshold >> 20} MiB, trim threshold 1024 MiB"
            break
    return "malloc defaults (mallopt failed)"


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@dataclass
class Case:
    """One op at one shape: `impls` maps a name to a function of `inputs()`; `copy` is the memory yardstick."""

    op: str
    label: str
    inputs: Callable[[], tuple]
    impls: dict[str, Callable]
    bytes_moved: int
    reference_impl: str = "eager"
    extra: dict = field(default_factory=dict)


_compiled: dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """torch.compile of `fn`, built once per name so every case of an op shares the compiled function."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def upsample_add_cases(n: int = 4, c: int = 256, sides=HOURGLASS_SIDES, layouts=LAYOUTS,
                       dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[Case]:
    cases = []
    for side in sides:
        for layout in layouts:
            def inputs(side=side, layout=layout):
                g = torch.Generator().manual_seed(0)
                low = torch.randn(n, c, side // 2, side // 2, generator=g, dtype=dtype)
                skip = torch.randn(n, c, side, side, generator=g, dtype=dtype)
                return to_layout(low, layout).to(device), to_layout(skip, layout).to(device)

            itemsize = torch.empty((), dtype=dtype).element_size()
            out_bytes = n * c * side * side * itemsize
            cases.append(Case(
                op="upsample_add", label=f"N={n} C={c} skip {side}px {layout}", inputs=inputs,
                impls={
                    "fused": ops.upsample_add,
                    "eager": reference.upsample_add,
                    "compile": compiled("upsample_add", reference.upsample_add),
                    "copy": lambda low, skip: skip.clone(),
                },
                # read skip + read low (a quarter of skip) + write out
                bytes_moved=int(out_bytes * 2.25),
            ))
    return cases


def time_call(fn: Callable, args: tuple, min_seconds: float = 0.3, max_repeats: int = 200) -> float:
    """Fastest of repeated calls (the least disturbed by other load), after one warm-up call; repeats until
    `min_seconds` have passed."""
    sync = torch.cuda.synchronize if any(getattr(a, "is_cuda", False) for a in args) else (lambda: None)
    fn(*args)
    sync()
    samples = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_seconds and len(samples) < max_repeats):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def run_cases(cases: list[Case], min_seconds: float = 0.3, out=print) -> list[dict]:
    """Time every implementation of every case; print a table of times and ratios to the copy."""
    rows = []
    for case in cases:
        args = case.inputs()
        times = {name: time_call(fn, args, min_seconds) for name, fn in case.impls.items()}
        base = times.get("copy")
        row = {"op": case.op, "case": case.label, "times_ms": {k: v * 1e3 for k, v in times.items()},
               "bytes_moved": case.bytes_moved}
        if "fused" in times:
            row["fused_GBps"] = case.bytes_moved / times["fused"] / 1e9
        rows.append(row)
        cells = "  ".join(f"{name} {t * 1e3:8.3f} ms" + (f" ({t / base:5.2f}× copy)" if base else "")
                          for name, t in times.items())
        extra = f"  fused {row['fused_GBps']:.1f} GB/s" if "fused_GBps" in row else ""
        out(f"{case.op:<14} {case.label:<34} {cells}{extra}")
    return rows
