"""The GPU check's own logic, on the CPU: tools/gpu_check.sh's arguments and its no-GPU path, the benchmark driver's
skip, and the report rendered from a recorded results.json with its step log, kernel rows and test results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "tools" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the path taken without a CUDA device")


def _run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_help_documents_the_command():
    res = _run("--help")
    assert res.returncode == 0
    for text in ("usage: tools/gpu_check.sh [OUT_DIR] [--quick]", "sm_90", "results.json", "report.md",
                 "470 s", "--quick 230 s", "interp_gpu_tiles", "compute-sanitizer"):
        assert text in res.stdout, text


@pytest.mark.parametrize("args, message", [(["--bogus"], "unknown option --bogus"),
                                           (["a", "b"], "one OUT_DIR only")])
def test_bad_arguments_exit_2(args, message, tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr
    assert not any(tmp_path.iterdir())  # nothing created before the arguments are understood


@no_cuda
def test_without_cuda_reports_the_skip(tmp_path):
    out = tmp_path / "report"
    res = _run(str(out), "--quick", PYTHON=sys.executable)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no CUDA device visible" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["machine"]["gpu"] is None
    assert results["steps"] == [{"name": "cuda device", "status": "skipped (no CUDA device)", "seconds": 0,
                                 "log": "-", "rc": 3}]
    report = (out / "report.md").read_text()
    assert "no CUDA device" in report and report.strip() in res.stdout  # printed last


@no_cuda
def test_bench_without_cuda_records_every_section_skipped(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert gpu_bench.main(["bench", "--out", str(out), "--sections", "ceilings,model"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == ["ceilings", "model"]
    assert all(s["status"] == "skipped" and "no CUDA device" in s["reason"] for s in sections.values())


def test_bench_rejects_unknown_sections(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_bench.main(["bench", "--out", str(tmp_path / "r.json"), "--sections", "ops,warp"])
    assert exc.value.code == 2 and "unknown warp" in capsys.readouterr().err


def _recorded_results() -> dict:
    """A results.json as `gpu_bench.py bench` writes it on a GPU (numbers made up), with one failed section."""
    return {
        "schema": 1,
        "machine": {"date": "2026-12-01 10:00 UTC", "gpu": "NVIDIA H200", "sms": 132, "gpu_memory_gib": 139.8,
                    "capability": "9.0", "driver": "580.159.04", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                    "triton": "3.6.0", "python": "3.12.3", "cpus": 16},
        "bench": {
            "ceilings": {"rows": [{"what": "device copy, 1 GiB (read + write)", "ms": 0.5, "value": 4.29,
                                   "unit": "TB/s"}]},
            "ops": {"rows": [{"op": "upsample_add", "shape": "[32, 256, 64, 64] bf16", "ms": 0.03, "bytes": 75497472,
                              "gbs": 2516.6, "copy_gbs": 3900.0, "of_copy": 0.645},
                             {"op": "max_pool2x2 forward", "skipped": "section time spent"}]},
            "blocks": {"rows": [{"what": "residual block", "side": 64, "pass": "forward", "impl": "triton",
                                 "ms": 0.41, "mb": 201.3, "tbs": 0.49, "tflops": 310.2, "vs_eager": 1.8},
                                {"what": "residual block", "side": 8, "pass": "forward", "impl": "compile",
                                 "skipped": "torch.compile time cap spent"}],
                       "compile": [{"what": "residual block", "side": 64, "pass": "forward", "seconds": 21.5}],
                       "autotune": {"conv_forward": {"M=131072,K=256,C_OUT=128,KSIZE=1": {
                           "config": "N128,K64,w8s4", "ms": 0.05, "tflops": 171.8,
                           "others": {"N128,K32,w8s3": 120.0, "N64,K64,w4s5": 150.4}}}}},
            "model": {"rows": [{"backend": "triton", "batch": 32, "train_img_s": 512.25, "train_peak_gib": 11.5,
                                "infer_img_s": 1630.5, "infer_peak_gib": 2.25, "train_first_s": 14.0},
                               {"backend": "fused", "batch": 16, "error": "RuntimeError: boom"}]},
        },
        "sections": {"ceilings": {"status": "ok", "seconds": 3.1}, "ops": {"status": "ok", "seconds": 9.0},
                     "blocks": {"status": "ok", "seconds": 70.2}, "model": {"status": "ok", "seconds": 55.0},
                     "max_batch": {"status": "failed", "seconds": 2.0, "error": "RuntimeError: no memory cap"}},
    }


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
skipped="2" tests="10"><testcase classname="tests.test_upsample_add" name="test_cuda_matches_cpu"/>
<testcase classname="tests.triton.test_gpu" name="test_opcheck_conv_ops"><failure message="x">boom</failure>
</testcase><testcase classname="tests.test_max_pool" name="test_cuda"><error message="y">bad</error></testcase>
</testsuite></testsuites>"""


def test_report_from_recorded_results(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(_recorded_results()))
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\tok\t95\tbuild.log\t0\ntests\tfailed\t80\ttests.log\t1\n"
                     "sanitizer\tskipped (compute-sanitizer not found)\t0\t-\t\n")
    kernel = {"kind": "triton", "kernel": "conv_forward_k3", "config": "N128,K32,w8s3", "dtype": "bf16", "arch": 90,
              "target": "sm_90a", "regs": 186, "spills": 0, "smem": 33280, "wgmma": True, "gemm": True,
              "error": None, "seconds": 2.0}
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps([kernel, {**kernel, "kernel": "conv_dgrad_k3", "spills": 8, "wgmma": False}]))
    junit = tmp_path / "tests.xml"
    junit.write_text(JUNIT)

    assert gpu_bench.main(["report", str(tmp_path), "--steps", str(steps), "--kernels", str(kernels),
                           "--junit", str(junit)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report in capsys.readouterr().out
    assert report.startswith("# GPU check report\n\n2026-12-01 10:00 UTC on NVIDIA H200 (132 SMs, 139.8 GiB, sm_9.0)"
                             "; driver 580.159.04, torch 2.11.0+cu130 (CUDA 13.0), triton 3.6.0")
    lines = report.splitlines()
    assert "| tests | failed | 80 | tests.log |" in lines
    assert "| sanitizer | skipped (compute-sanitizer not found) | 0 | - |" in lines
    assert "6 passed, 2 failed, 2 skipped of 10." in lines
    assert "- FAILED tests.triton.test_gpu::test_opcheck_conv_ops" in lines
    assert "- FAILED tests.test_max_pool::test_cuda" in lines
    assert "2 kernel rows, 1 with problems; wgmma in 1 of 2 sm_90 GEMM rows." in lines
    assert "| triton | conv_dgrad_k3 | N128,K32,w8s3 | bf16 | sm_90a | 186 | 8 | 32.50 | no | SPILLS |" in lines
    assert "| device copy, 1 GiB (read + write) | 0.50 | 4.3 TB/s |" in lines
    assert "| upsample_add | [32, 256, 64, 64] bf16 | 0.03 | 75.50 | 2,516.60 | 3,900.00 | 0.65 |" in lines
    assert "| max_pool2x2 forward | - | - | - | - | - | section time spent |" in lines
    assert "| residual block | 64 | forward | triton | 0.41 | 201.30 | 0.49 | 310.20 | 1.80 |" in lines
    assert "| residual block | 8 | forward | compile | torch.compile time cap spent | - | - | - | - |" in lines
    assert "| residual block | 64 | forward | 21.50 |" in lines
    assert ("| conv_forward | M=131072,K=256,C_OUT=128,KSIZE=1 | N128,K64,w8s4 | 0.05 | 171.80 | "
            "N64,K64,w4s5 150, N128,K32,w8s3 120 |") in lines
    assert "| triton | 32 | 512.25 | 11.50 | 1,630.50 | 2.25 | 14.00 |  |" in lines
    assert "| fused | 16 | - | - | - | - | - | RuntimeError: boom |" in lines
    assert "| max_batch | failed | 2.00 | RuntimeError: no memory cap |" in lines
    assert "Largest training batch" not in report  # the failed section has no table
    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged["tests"]["passed"] == 6 and merged["kernels"][1]["spills"] == 8
    assert [s["status"] for s in merged["steps"]] == ["ok", "failed", "skipped (compute-sanitizer not found)"]
    assert merged["steps"][2]["rc"] is None and merged["bench"] == _recorded_results()["bench"]


def test_report_of_a_quick_run_without_results(tmp_path, capsys):
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\ttimeout\t300\tbuild.log\t124\n")
    assert gpu_bench.main(["report", str(tmp_path), "--steps", str(steps), "--quick"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "quick run (build and tests only)" in report and "| build | timeout | 300 | build.log |" in report
    assert "## Ceilings" not in report and "## Benchmark sections" not in report
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["torch"] == torch.__version__
