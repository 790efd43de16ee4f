"""The last-level cache size behind the CPU kernels' streaming-store rule (csrc/ops/cpu/cpu_utils.h), as read
by fused_hourglass.benchmarking (which the benchmarks' cache eviction uses) and by the compiled kernels."""

import os

import pytest
import torch

from fused_hourglass import benchmarking
from fused_hourglass.benchmarking import last_level_cache_bytes

from .conftest import requires_extension


def make_cache_dir(root, entries):
    """A fake sysfs cpu0/cache directory: entries maps 'indexN' to (level, size text), None for a missing file."""
    for name, (level, size) in entries.items():
        d = root / name
        d.mkdir()
        if level is not None:
            (d / "level").write_text(f"{level}\n")
        if size is not None:
            (d / "size").write_text(f"{size}\n")
    return str(root)


@pytest.mark.parametrize(("text", "expected"), [("32768K", 32 << 20), ("1M", 1 << 20), ("2G", 2 << 30),
                                                ("512", 512), ("48K\n", 48 << 10), ("", 0), ("K", 0),
                                                ("abc", 0)])
def test_parse_cache_size(text, expected):
    assert benchmarking._parse_cache_size(text) == expected


def test_highest_level_wins_whatever_the_index_order(tmp_path):
    cache_dir = make_cache_dir(tmp_path, {
        "index0": (1, "32K"), "index1": (1, "32K"), "index2": (3, "32768K"), "index10": (2, "1024K"),
        "index3": (2, "2048K"), "power": (None, None)})
    assert last_level_cache_bytes(cache_dir) == 32 << 20


def test_unreadable_entries_are_skipped(tmp_path):
    cache_dir = make_cache_dir(tmp_path, {
        "index0": (2, "1024K"), "index1": (3, None), "index2": (None, "64M"), "index3": ("x", "16M")})
    assert last_level_cache_bytes(cache_dir) == 1 << 20


@pytest.mark.parametrize(("sysconf", "expected"), [(12 << 20, 12 << 20), (-1, 32 << 20), (ValueError, 32 << 20)])
def test_without_sysfs_falls_back_to_sysconf_then_32_mib(tmp_path, monkeypatch, sysconf, expected):
    def fake_sysconf(name):
        assert name == "SC_LEVEL3_CACHE_SIZE"
        if sysconf is ValueError:
            raise ValueError(name)
        return sysconf

    monkeypatch.setattr(os, "sysconf", fake_sysconf)
    assert last_level_cache_bytes(str(tmp_path / "missing")) == expected
    assert last_level_cache_bytes(make_cache_dir(tmp_path, {"index0": (1, None)})) == expected


@requires_extension
def test_compiled_kernels_find_the_same_size():
    """The C++ reader (cpu_utils.h) and the Python one agree on this machine."""
    assert torch.ops.fused_hourglass._cpu_last_level_cache_bytes() == last_level_cache_bytes()
