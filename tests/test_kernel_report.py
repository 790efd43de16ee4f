"""The ahead-of-time kernel report (`python -m fused_hourglass info --kernels`): its parsers on recorded tool output,
its pass/fail rule, and one configuration of every Triton kernel compiled for sm_90, so a kernel that no longer
compiles (or spills, or overflows shared memory) shows in a local test run and not only in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fused_hourglass import kernel_report as kr

# `nvcc -cubin -arch=sm_90 -Xptxas -v` (CUDA 13.0) on a small kernel with a 256-byte shared array, and a second
# entry as a spilling kernel reports itself.
PTXAS_LOG = """\
ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_90'
ptxas info    : Function properties for _Z1kPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 1 barriers, 256 bytes smem
ptxas info    : Compile time = 20.091 ms
ptxas info    : Compiling entry function '_Z6spillyPf' for 'sm_80'
ptxas info    : Function properties for _Z6spillyPf
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""

# `cuobjdump --dump-resource-usage` of the same cubin (SHARED counts the 1 KiB sm_90 reserves per block).
RESOURCE_USAGE = """\

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z1kPfi:
  REG:8 STACK:0 SHARED:1280 LOCAL:0 CONSTANT[0]:540 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_ptxas_log():
    rows = kr.parse_ptxas_log(PTXAS_LOG)
    assert [(r["kernel"], r["arch"], r["registers"], r["smem"]) for r in rows] == [
        ("_Z1kPfi", "90", 8, 256), ("_Z6spillyPf", "80", 255, 0)]
    assert (rows[1]["stack"], rows[1]["spill_stores"], rows[1]["spill_loads"]) == (48, 40, 36)


def test_parse_resource_usage():
    assert kr.parse_resource_usage(RESOURCE_USAGE) == [
        {"kernel": "_Z1kPfi", "arch": "90", "registers": 8, "stack": 0, "smem": 1280, "local": 0}]


def test_cuda_rows_from_build_log(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG)
    rows, source = kr.cuda_rows(str(log))
    assert str(log) in source
    by_arch = {r["arch"]: r for r in rows}
    assert by_arch[90]["spills"] == 0 and kr.problems(by_arch[90]) == []
    assert by_arch[80]["spills"] == 76 and kr.problems(by_arch[80]) == ["SPILLS"]
    table = kr.format_table(rows)
    assert "SPILLS" in table and table.count("\n") == 3  # header, rule, two rows


def test_problems_and_table():
    base = {"kind": "triton", "kernel": "conv_forward_k3", "config": "N128,K32,w8s3", "dtype": "bf16", "arch": 90,
            "target": "sm_90a", "regs": 186, "spills": 0, "smem": 33280, "wgmma": True, "gemm": True, "error": None,
            "seconds": 1.0}
    assert kr.problems(base) == []
    assert kr.problems({**base, "smem": 228 * 1024}) == ["SHARED > 227 KiB"]
    assert kr.problems({**base, "arch": 80, "smem": 164 * 1024}) == ["SHARED > 163 KiB"]
    assert kr.problems({**base, "error": "CompilationError: boom"}) == ["CompilationError: boom"]
    line = kr.format_table([base, {**base, "arch": 80, "target": "sm_80", "wgmma": False}]).splitlines()
    assert line[2].split()[-2:] == ["yes", "ok"] and line[3].split()[-2:] == ["-", "ok"]  # wgmma on sm_90 only


def test_short_kernel_names():
    assert kr._short("void (anonymous namespace)::bn_relu_apply_kernel<float>(float const*, long)") == \
        "bn_relu_apply_kernel<float>"
    assert kr._short("fused_hourglass::cuda::upsample_add_kernel<c10::Half>(int)") == \
        "upsample_add_kernel<c10::Half>"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed")
def test_one_config_per_triton_kernel_compiles_for_sm90(tmp_path):
    if kr.find_tool("ptxas") is None:
        pytest.skip("ptxas not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH or triton's own)")
    out = tmp_path / "rows.json"
    # A child process: this one may run the kernels under the interpreter, which cannot compile them.
    res = subprocess.run([sys.executable, "-m", "fused_hourglass.kernel_report", "--one-config", "--arch", "90",
                          "--dtype", "bf16", "--triton-only", "--jobs", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())
    labels = {r["kernel"] for r in rows}
    assert labels == {f"conv_{op}_k{k}" for op in ("forward", "dgrad", "wgrad") for k in (1, 3)} | {
        "channel_stats", "bn_backward_apply", "sum_pool2x2"} and len(rows) == len(labels)
    for r in rows:
        assert r["error"] is None and r["spills"] == 0 and 0 < r["regs"] <= 255, r
        assert r["smem"] <= kr.SMEM_LIMIT[90], r
        if r["gemm"]:
            assert r["wgmma"], f"{r['kernel']} {r['config']}: bf16 on sm_90 should use wgmma"
    assert "0 with problems" in res.stdout


def test_info_kernels_flag_runs_the_report(monkeypatch):
    from fused_hourglass import cli

    calls = []
    monkeypatch.setattr(kr, "main", lambda argv: calls.append(argv) or 7)
    assert cli.main(["info", "--kernels"]) == 7 and calls == [[]]
    assert cli.build_parser().parse_args(["info"]).kernels is False
