"""The last-level cache size behind the CPU kernels' streaming-store rule (csrc/ops/cpu/cpu_utils.h), as read by
the compiled kernels and by fused_hourglass.benchmarking (which the benchmarks' cache eviction uses): both
readers run on the same made-up sysfs trees."""

import os

import pytest
import torch

from fused_hourglass.benchmarking import last_level_cache_bytes, sysfs_cache_bytes

from .conftest import requires_extension


def make_cache_dir(root, entries):
    """A made-up sysfs cpuN/cache directory: entries maps 'indexN' to (level text, size text), None for a file
    that is not there."""
    for name, (level, size) in entries.items():
        d = root / name
        d.mkdir()
        if level is not None:
            (d / "level").write_text(level)
        if size is not None:
            (d / "size").write_text(size)
    return str(root)


L1 = {"index0": ("1\n", "32K\n"), "index1": ("1\n", "32K\n")}
TREES = {
    "this-vm": ({**L1, "index2": ("2\n", "1024K\n"), "index3": ("3\n", "32768K\n")}, 32 << 20),
    "highest-level-wins-in-any-order": ({"index0": ("3\n", "16M\n"), "index1": ("2\n", "2048K\n")}, 16 << 20),
    "last-of-the-highest-level": ({"index0": ("2\n", "1M\n"), "index1": ("2\n", "2M\n")}, 2 << 20),
    "units": ({"index0": ("1\n", "512\n"), "index1": ("2\n", "1G\n")}, 1 << 30),
    "blanks-around": ({"index0": ("  3 \n", "\t8M \n")}, 8 << 20),
    "stops-at-the-first-gap": ({"index0": ("2\n", "1M\n"), "index2": ("3\n", "64M\n")}, 1 << 20),
    "entry-without-size-skipped": ({"index0": ("2\n", "1M\n"), "index1": ("3\n", None), "index2": ("1\n", "32K\n")},
                                   1 << 20),
    "malformed-skipped": ({"index0": ("2\n", "1M\n"), "index1": ("3x\n", "64M\n"), "index2": ("3.5\n", "64M\n"),
                           "index3": ("+3\n", "64M\n"), "index4": ("3\n", "+64M\n"), "index5": ("3\n", "64 M\n"),
                           "index6": ("3\n", "64MB\n"), "index7": ("3\n", "64k\n"), "index8": ("3K\n", "64M\n"),
                           "index9": ("0\n", "64M\n"), "index10": ("3\n", "0K\n"), "index11": ("3\n", "\n")},
                          1 << 20),
    "too-large-skipped": ({"index0": ("2\n", "1M\n"), "index1": ("3\n", "99999999999999999999G\n")}, 1 << 20),
    "nothing-readable": ({"index0": ("x\n", "1M\n")}, 0),
    "empty": ({}, 0),
}


@pytest.mark.parametrize("name", list(TREES))
def test_python_reader(tmp_path, name):
    entries, expected = TREES[name]
    assert sysfs_cache_bytes(make_cache_dir(tmp_path, entries)) == expected


@requires_extension
@pytest.mark.parametrize("name", list(TREES))
def test_compiled_reader_reads_the_same(tmp_path, name):
    entries, expected = TREES[name]
    assert torch.ops.fused_hourglass._cpu_last_level_cache_bytes(make_cache_dir(tmp_path, entries)) == expected


@pytest.mark.parametrize(("sysconf", "expected"), [(12 << 20, 12 << 20), (-1, 32 << 20), (ValueError, 32 << 20)])
def test_without_sysfs_falls_back_to_sysconf_then_32_mib(tmp_path, monkeypatch, sysconf, expected):
    def fake_sysconf(name):
        assert name == "SC_LEVEL3_CACHE_SIZE"
        if sysconf is ValueError:
            raise ValueError(name)
        return sysconf

    monkeypatch.setattr(os, "sysconf", fake_sysconf)
    assert last_level_cache_bytes(str(tmp_path / "missing")) == expected
    assert last_level_cache_bytes(make_cache_dir(tmp_path, {"index0": ("1\n", None)})) == expected


@requires_extension
def test_compiled_kernels_find_the_same_size_here():
    """What the kernels use on this machine is what the benchmarks' cache eviction is sized by."""
    assert torch.ops.fused_hourglass._cpu_last_level_cache_bytes() == last_level_cache_bytes()


@requires_extension
@pytest.mark.parametrize("make", [lambda: torch.randn(3, 5, 7, 9), lambda: torch.randn(4, 6, 8)[:, ::2, 1:],
                                  lambda: torch.empty(0), lambda: torch.arange(10, dtype=torch.int64)],
                         ids=["contiguous", "strided-view", "empty", "int64"])
def test_flushing_cache_lines_leaves_the_values(make):
    """The benchmarks' "dram" rows flush their inputs from the caches; the data must come back unchanged."""
    t = make()
    before = t.clone()
    torch.ops.fused_hourglass._cpu_flush_cache_lines(t)
    assert torch.equal(t, before)


@requires_extension
def test_flushing_needs_a_cpu_tensor():
    with pytest.raises(ValueError, match="t must be a CPU tensor, got one on meta"):
        torch.ops.fused_hourglass._cpu_flush_cache_lines(torch.empty(4, device="meta"))
