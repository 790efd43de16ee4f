"""GPU benchmarks and the report of `tools/gpu_check.sh`.

    python tools/gpu_bench.py bench --out OUT/results.json [--sections ceilings,ops,blocks,model,max_batch]
                                    [--budget-s 200]
    python tools/gpu_bench.py report OUT [--steps STEPS.tsv] [--kernels KERNELS.json] [--junit TESTS.xml]

`bench` measures, on the CUDA device, in sections that each record their own status (a failing section is written
down and the next one runs; results.json is rewritten after every section, so a run cut short keeps what it had):
- ceilings: a device-to-device copy (bytes read + written) and an 8192³ bf16 matrix product;
- ops: each CUDA op of the extension, its minimum bytes (inputs once, outputs once) over its time, against a copy
  of the same bytes;
- blocks: the fused Triton residual block (N = 32, C = 256; sides 64-8) and one hourglass level, forward and
  forward+backward, against eager cuDNN (channels_last, bf16 autocast) and torch.compile of the reference (its
  compilation timed apart, and capped), with bytes moved (`fused_hourglass.triton.bytes_moved`), TB/s, TFLOP/s
  and the configuration autotuning chose per shape;
- model: StackedHourglass(8, 256, 16) at 256 px, batch 32 and 16, bf16 autocast, channels_last: training step
  (forward + backward) and inference images/s and peak allocated memory, per backend;
- max_batch: the largest training batch that fits in 16 GiB, reference against triton.
Times are the median of per-call CUDA-event times after warm-up. Without a CUDA device every section is recorded
as skipped, with the reason, and the command says so and exits 0.

`report` writes OUT/report.md (machine, driver, torch and triton versions, every table) from OUT/results.json
plus the check's step log, kernel report and test results, merges those into results.json, and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("ceilings", "ops", "blocks", "model", "max_batch")
# Seconds each section may start new measurements for (scaled to --budget-s), and torch.compile's share of blocks.
SECTION_SHARE = {"ceilings": 0.07, "ops": 0.1, "blocks": 0.38, "model": 0.3, "max_batch": 0.15}
COMPILE_SHARE = 0.6
GiB = 2**30
N, C = 32, 256


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def time_ms(fn, warmup: int = 2, iters: int = 20, max_seconds: float = 3.0) -> float:
    """Median of per-call CUDA-event times of fn() in ms, after `warmup` untimed calls; stops early (after at least
    three calls) once max_seconds have passed."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, stop = [], time.perf_counter() + max_seconds
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= 3 and time.perf_counter() > stop:
            break
    return statistics.median(times)


class Context:
    """Deadlines and the measured ceilings shared by the sections."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.deadline = float("inf")
        self.ceilings: dict = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def machine_info() -> dict:
    """What ran: GPU, driver, CUDA, torch, triton, python, CPUs (no CUDA device: says so)."""
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / GiB, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            info["driver"], info["max_sm_clock"], info["power_limit"] = (
                v.strip() for v in (smi.stdout.splitlines()[0].split(",") + ["", "", ""])[:3])
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["driver"] = f"unknown (nvidia-smi: {type(exc).__name__})"
    return info


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


def _copy_ms(nbytes: int) -> float:
    """Time of a device copy whose bytes read + written equal nbytes."""
    import torch

    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def section_ceilings(ctx: Context) -> dict:
    import torch

    copy_ms = _copy_ms(2 * GiB)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: a @ b, iters=20)
    ctx.ceilings = {"copy_tbs": 2 * GiB / copy_ms / 1e9, "bf16_tflops": 2 * 8192**3 / gemm_ms / 1e9}
    return {"rows": [{"what": "device copy, 1 GiB (read + write)", "ms": copy_ms, "value": ctx.ceilings["copy_tbs"],
                      "unit": "TB/s"},
                     {"what": "bf16 matmul 8192³ (random data)", "ms": gemm_ms, "value": ctx.ceilings["bf16_tflops"],
                      "unit": "TFLOP/s"}]}


def section_ops(ctx: Context) -> dict:
    import torch

    from fused_hourglass import _ext, ops

    if not _ext.has_kernel("upsample_add", "cuda"):
        raise RuntimeError(f"the extension has no CUDA kernels ({_ext.EXTENSION_ERROR or 'built without CUDA'})")
    dt = torch.bfloat16
    side = 64
    x = torch.randn(N, C, side, side, device="cuda", dtype=dt)
    act = x.numel() * x.element_size()
    low = torch.randn(N, C, side // 2, side // 2, device="cuda", dtype=dt)
    gamma, beta = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    rmean, rvar = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    xg = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def bn_train_step():
        out = ops.bn_relu(xg, gamma, beta, rmean, rvar, True)
        (gx,) = torch.autograd.grad(out, xg, grad)
        return gx

    def pool_step():
        out = ops.max_pool2x2(xg)
        (gx,) = torch.autograd.grad(out, xg, grad[:, :, ::2, ::2].contiguous())
        return gx

    cases = [  # (op, minimum bytes: inputs once + outputs once, fn)
        ("upsample_add", act // 4 + 2 * act, lambda: ops.upsample_add(low, x)),
        ("sum_pool2x2", act + act // 4, lambda: ops.sum_pool2x2(x)),
        ("bn_relu training forward", 2 * act, lambda: ops.bn_relu(x, gamma, beta, rmean, rvar, True)),
        ("bn_relu eval forward", 2 * act, lambda: ops.bn_relu(x, gamma, beta, rmean, rvar, False)),
        ("bn_relu training forward+backward", 5 * act, bn_train_step),
        ("max_pool2x2 forward", act + act // 4, lambda: ops.max_pool2x2(x)),
        ("max_pool2x2 forward+backward", act + act // 4 + act // 4 + 2 * act, pool_step),
    ]
    rows = []
    for name, nbytes, fn in cases:
        if ctx.left() < 0:
            rows.append({"op": name, "skipped": "section time spent"})
            continue
        ms = time_ms(fn)
        copy = _copy_ms(nbytes)
        rows.append({"op": name, "shape": f"[{N}, {C}, {side}, {side}] bf16", "ms": ms, "bytes": nbytes,
                     "gbs": nbytes / ms / 1e6, "copy_gbs": nbytes / copy / 1e6, "of_copy": copy / ms})
    return {"rows": rows}


@contextlib.contextmanager
def _recording_autotuning(timings: dict):
    """While active, each bf16 conv autotuner of the device's configuration set records, for every new shape it
    tunes, each configuration's benchmark time: timings[kernel][autotuner key] = {configuration: ms}."""
    import torch

    from fused_hourglass.triton import conv_kernels as ck

    arch = ck.device_config_set(torch.device("cuda"))
    tuners = {name: by_set[arch][torch.bfloat16] for name, by_set in ck.TUNED.items()}

    def recording(name, tuner, run):
        def run_and_record(*args, **kwargs):
            before, last = set(tuner.cache), getattr(tuner, "configs_timings", None)
            out = run(*args, **kwargs)
            measured = getattr(tuner, "configs_timings", None)
            if measured is not None and measured is not last:
                for key in set(tuner.cache) - before:
                    # do_bench's quantiles (median first) or one time, per configuration
                    timings.setdefault(name, {})[key] = {cfg: t[0] if isinstance(t, (list, tuple)) else t
                                                         for cfg, t in measured.items()}
            return out
        return run_and_record

    for name, tuner in tuners.items():
        tuner.run = recording(name, tuner, tuner.run)
    try:
        yield
    finally:
        for tuner in tuners.values():
            del tuner.run


def _autotune_choices(timings: dict) -> dict:
    """{kernel: {shape: {config, ms, tflops, others: {configuration: TFLOP/s}}}} of the bf16 conv autotuners of
    the device's configuration set so far: the configuration each shape chose, its benchmark time and TFLOP/s
    (forward, dgrad and wgrad all do 2·M·K·C_OUT·KSIZE² FLOPs), and every configuration's TFLOP/s when the
    benchmark was recorded (`_recording_autotuning`), to prune the list by."""
    import torch

    from fused_hourglass.kernel_report import config_label
    from fused_hourglass.triton import conv_kernels as ck

    def label(cfg):
        return config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages)

    arch = ck.device_config_set(torch.device("cuda"))
    out = {}
    for name, by_set in ck.TUNED.items():
        cache = getattr(by_set[arch][torch.bfloat16], "cache", {}) or {}
        out[name] = {}
        for key, cfg in cache.items():
            # The autotuner's key: the _TUNE_KEY values in order, then the argument dtypes.
            dims = dict(zip(ck._TUNE_KEY, key, strict=False))
            flops = 2 * dims["M"] * dims["K"] * dims["C_OUT"] * dims["KSIZE"] ** 2
            measured = timings.get(name, {}).get(key, {})
            ms = measured.get(cfg)
            out[name][",".join(f"{k}={v}" for k, v in dims.items())] = {
                "config": label(cfg), "ms": ms, "tflops": flops / ms / 1e9 if ms else None,
                "others": {label(c): flops / t / 1e9 for c, t in measured.items() if t and c is not cfg}}
    return out


def section_blocks(ctx: Context) -> dict:
    import torch
    import torch.nn.functional as F

    import fused_hourglass.triton as ft
    from fused_hourglass.reference.model import Hourglass, Residual
    from fused_hourglass.triton.bytes_moved import bytes_moved_table, conv_flops

    if not ft.AVAILABLE:
        raise RuntimeError(f"Triton unavailable: {ft.UNAVAILABLE_REASON}")
    compile_left = ctx.left() * COMPILE_SHARE
    rows, compile_rows = [], []

    def level(hg, inp):
        lo = ft.fused_residual(hg.low1, F.max_pool2d(inp, 2, 2))
        lo = ft.fused_residual(hg.low3, ft.fused_residual(hg.low2, lo))
        return ft.fused_residual(hg.up1, inp, lo)

    cases = [("residual block", s) for s in (64, 32, 16, 8)] + [("hourglass level", s) for s in (64, 16)]
    timings: dict = {}
    with _recording_autotuning(timings):
        for what, side in cases:
            module = (Residual(C, C) if what == "residual block" else Hourglass(1, C)).cuda().train()
            x = torch.randn(N, C, side, side, device="cuda").to(memory_format=torch.channels_last)
            table = bytes_moved_table(N, C, side, side, 2)
            blocks = 1 if what == "residual block" else 4  # a level at side s: up1 at s, three blocks at s/2
            scale = 1.0 if blocks == 1 else 1.75  # bytes and FLOPs of (1 + 3/4) blocks at side s
            flops = 2 * conv_flops(N, side, side, C, C // 2, 1) + conv_flops(N, side, side, C // 2, C // 2, 3)
            for backward in (False, True):
                eager_ms = None
                for impl in ("eager", "compile", "triton"):
                    row = {"what": what, "side": side, "pass": "forward+backward" if backward else "forward",
                           "impl": impl}
                    if ctx.left() < 0:
                        rows.append({**row, "skipped": "section time spent"})
                        continue
                    if impl == "triton":
                        fwd = (lambda inp, m=module: ft.fused_residual(m, inp.to(torch.bfloat16))) if blocks == 1 \
                            else (lambda inp, m=module: level(m, inp.to(torch.bfloat16)))
                    else:
                        target = module
                        if impl == "compile":
                            if compile_left <= 0:
                                rows.append({**row, "skipped": "torch.compile time cap spent"})
                                continue
                            target = torch.compile(module)

                        def fwd(inp, target=target):
                            with torch.autocast("cuda", dtype=torch.bfloat16):
                                return target(inp)

                    def step(fwd=fwd, backward=backward, x=x):
                        inp = x.detach().requires_grad_(backward)
                        out = fwd(inp)
                        if backward:
                            out.float().sum().backward()
                        return out

                    t0 = time.perf_counter()
                    step()  # compilation / autotuning, outside the timing
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    if impl == "compile":
                        compile_left -= first_s
                        compile_rows.append({"what": what, "side": side, "pass": row["pass"], "seconds": first_s})
                    ms = time_ms(step, warmup=1, iters=10, max_seconds=1.5)
                    nbytes = scale * table["total" if backward else "forward"]["fused" if impl == "triton" else
                                                                                 "unfused"]
                    fl = scale * flops * (3 if backward else 1)
                    eager_ms = ms if impl == "eager" else eager_ms
                    rows.append({**row, "ms": ms, "mb": nbytes / 1e6, "tbs": nbytes / ms / 1e9,
                                 "tflops": fl / ms / 1e9, "vs_eager": eager_ms / ms if eager_ms else None})
            torch.cuda.empty_cache()
    return {"rows": rows, "compile": compile_rows, "autotune": _autotune_choices(timings)}


def _model_step(model, x, target, loss_fn, train: bool):
    import torch

    if train:
        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(x), target)
            loss.backward()
    else:
        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)
    return step


def section_model(ctx: Context) -> dict:
    import torch

    from fused_hourglass import HeatmapLoss, StackedHourglass

    model = StackedHourglass(8, 256, 16).cuda().to(memory_format=torch.channels_last)
    loss_fn = HeatmapLoss()
    rows = []
    for batch in (32, 16):
        x = torch.rand(batch, 3, 256, 256, device="cuda").to(memory_format=torch.channels_last)
        target = torch.rand(batch, 16, 64, 64, device="cuda")
        for backend in ("reference", "fused", "triton"):
            row = {"backend": backend, "batch": batch}
            if ctx.left() < 0:
                rows.append({**row, "skipped": "section time spent"})
                continue
            model.backend = backend
            try:
                for mode, train in (("train", True), ("infer", False)):
                    model.train(train)
                    step = _model_step(model, x, target, loss_fn, train)
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    row[f"{mode}_first_s"] = time.perf_counter() - t0
                    torch.cuda.reset_peak_memory_stats()
                    ms = time_ms(step, warmup=1, iters=8, max_seconds=2.0)
                    row[f"{mode}_img_s"] = batch / ms * 1e3
                    row[f"{mode}_ms"] = ms
                    row[f"{mode}_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            except Exception as exc:  # one backend failing leaves the others' rows
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows.append(row)
    return {"rows": rows}


def _fits(model, batch: int, loss_fn) -> bool:
    import torch

    try:
        x = torch.rand(batch, 3, 256, 256, device="cuda").to(memory_format=torch.channels_last)
        target = torch.rand(batch, 16, 64, 64, device="cuda")
        _model_step(model, x, target, loss_fn, True)()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def section_max_batch(ctx: Context) -> dict:
    """Doubling, then bisection, under a 16 GiB allocator cap. The Triton kernels run their first autotune
    configuration here (memory does not depend on the tile), so that each new batch does not autotune again."""
    import torch

    from fused_hourglass import HeatmapLoss, StackedHourglass
    from fused_hourglass.triton import conv_kernels as ck

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 16 * GiB / total))
    arch = ck.device_config_set(torch.device("cuda"))
    pins = {name: ck.gpu_configs(name, torch.bfloat16, arch)[0] for name in ck.TUNED}
    rows = []
    try:
        model = StackedHourglass(8, 256, 16).cuda().to(memory_format=torch.channels_last).train()
        loss_fn = HeatmapLoss()
        share = ctx.left() / 2
        for backend in ("reference", "triton"):
            model.backend = backend
            stop = time.perf_counter() + share
            good, bad, truncated = 0, None, False
            with ck.gpu_tiles(pins):
                batch = 16
                while bad is None or bad - good > max(1, good // 16):
                    if time.perf_counter() > stop:
                        truncated = True
                        break
                    ok = _fits(model, batch, loss_fn)
                    good, bad = (batch, bad) if ok else (good, batch)
                    batch = batch * 2 if bad is None else (good + bad) // 2
            rows.append({"backend": backend, "max_batch": good, "first_failing": bad, "truncated": truncated})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return {"rows": rows, "limit_gib": 16}


SECTION_FUNCS = {"ceilings": section_ceilings, "ops": section_ops, "blocks": section_blocks,
                 "model": section_model, "max_batch": section_max_batch}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def bench(out: Path, sections: list[str], budget_s: float) -> int:
    import torch

    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(schema=1, machine=machine_info(), bench={}, sections={})
    if not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})"
        for name in sections:
            results["sections"][name] = {"status": "skipped", "reason": reason, "seconds": 0.0}
        _write_json(out, results)
        print(f"gpu_bench: {reason}: GPU benchmarks skipped; recorded in {out}")
        return 0
    ctx = Context(budget_s)
    torch.backends.cudnn.benchmark = True
    for name in sections:
        t0 = time.perf_counter()
        ctx.deadline = t0 + budget_s * SECTION_SHARE[name]
        print(f"gpu_bench: {name} ...", flush=True)
        entry = {"status": "ok"}
        try:
            results["bench"][name] = SECTION_FUNCS[name](ctx)
        except Exception as exc:  # recorded; the next section still runs
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500],
                     "traceback": traceback.format_exc()[-2000:]}
            print(entry["traceback"], file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["sections"][name] = entry
        torch.cuda.empty_cache()
        _write_json(out, results)
        print(f"gpu_bench: {name} {entry['status']} in {entry['seconds']} s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def read_steps(path: Path) -> list[dict]:
    """gpu_check.sh's step log: name, status, seconds, log file, exit code (tab-separated)."""
    steps = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, status, seconds, log, rc = (line.split("\t") + [""] * 5)[:5]
            steps.append({"name": name, "status": status, "seconds": int(seconds or 0), "log": log,
                          "rc": int(rc) if rc.lstrip("-").isdigit() else None})
    return steps


def read_junit(path: Path) -> dict:
    """Counts and failing test ids of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_ids"] = failed
    return counts


def _f(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return out + [""]


def render(results: dict) -> str:
    m = results.get("machine", {})
    lines = ["# GPU check report", ""]
    lines.append(f"{m.get('date', '?')} on {m.get('gpu') or 'no CUDA device'}"
                 + (f" ({m.get('sms')} SMs, {m.get('gpu_memory_gib')} GiB, sm_{m.get('capability', '?')})"
                    if m.get("gpu") else "")
                 + f"; driver {m.get('driver', '?')}, torch {m.get('torch', '?')} (CUDA {m.get('torch_cuda')}), "
                 f"triton {m.get('triton')}, python {m.get('python')}, {m.get('cpus')} CPUs"
                 + ("; quick run (build and tests only)" if results.get("quick") else ""))
    lines.append("")
    if results.get("steps"):
        lines += ["## Steps", ""]
        lines += _table(["step", "status", "seconds", "log"],
                        [[s["name"], s["status"], s["seconds"], s["log"] or "-"] for s in results["steps"]])
    tests = results.get("tests")
    if tests:
        lines += ["## Tests (`-m \"gpu or interp_gpu_tiles\"`)", "",
                  f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped "
                  f"of {tests['tests']}.", ""]
        lines += [f"- FAILED {t}" for t in tests["failed_ids"][:30]] + ([""] if tests["failed_ids"] else [])
    kernels = results.get("kernels")
    if kernels:
        from fused_hourglass.kernel_report import problems

        bad = [k for k in kernels if problems(k)]
        gemm = [k for k in kernels if k.get("gemm") and k["arch"] >= 90 and not k.get("error")]
        lines += ["## Kernels (ahead of time)", "",
                  f"{len(kernels)} kernel rows, {len(bad)} with problems; wgmma in "
                  f"{sum(bool(k['wgmma']) for k in gemm)} of {len(gemm)} sm_90 GEMM rows.", ""]
        lines += _table(["kind", "kernel", "config", "dtype", "target", "regs", "spill B", "smem KiB", "wgmma",
                         "status"],
                        [[k["kind"], k["kernel"], k["config"], k["dtype"], k["target"], k["regs"], k["spills"],
                          None if k["smem"] is None else k["smem"] / 1024,
                          ("yes" if k["wgmma"] else "no") if k in gemm else "-", "; ".join(problems(k)) or "ok"]
                         for k in kernels])
    bench = results.get("bench", {})
    if "ceilings" in bench:
        lines += ["## Ceilings", ""]
        lines += _table(["what", "ms", "measured"], [[r["what"], r["ms"], f"{r['value']:,.1f} {r['unit']}"]
                                                      for r in bench["ceilings"]["rows"]])
    if "ops" in bench:
        lines += ["## CUDA ops against a copy of the same bytes", ""]
        lines += _table(["op", "shape", "ms", "MB", "GB/s", "copy GB/s", "of copy"],
                        [[r["op"], r.get("shape"), r.get("ms"), r["bytes"] / 1e6 if "bytes" in r else None,
                          r.get("gbs"), r.get("copy_gbs"), r.get("of_copy", r.get("skipped"))]
                         for r in bench["ops"]["rows"]])
    if "blocks" in bench:
        b = bench["blocks"]
        lines += [f"## Residual block and hourglass level (N = {N}, C = {C}, bf16)", ""]
        lines += _table(["what", "side", "pass", "impl", "ms", "MB moved", "TB/s", "TFLOP/s", "× eager"],
                        [[r["what"], r["side"], r["pass"], r["impl"], r.get("ms", r.get("skipped")), r.get("mb"),
                          r.get("tbs"), r.get("tflops"), r.get("vs_eager")] for r in b["rows"]])
        if b.get("compile"):
            lines += ["torch.compile time (first call, not in the times above):", ""]
            lines += _table(["what", "side", "pass", "seconds"],
                            [[r["what"], r["side"], r["pass"], r["seconds"]] for r in b["compile"]])
        if any(b.get("autotune", {}).values()):
            lines += ["Autotuning's choices (bf16), with the benchmark's time and TFLOP/s of each shape's choice "
                      "and of the other configurations:", ""]
            lines += _table(["kernel", "shape", "configuration", "ms", "TFLOP/s", "others (TFLOP/s)"],
                            [[k, shape, c["config"], c.get("ms"), c.get("tflops"),
                              ", ".join(f"{o} {t:.0f}" for o, t in sorted(c.get("others", {}).items(),
                                                                          key=lambda kv: -kv[1]))]
                             for k, chosen in b["autotune"].items() for shape, c in chosen.items()])
    if "model" in bench:
        lines += ["## StackedHourglass(8, 256, 16), 256 px, bf16 autocast, channels_last", ""]
        lines += _table(["backend", "batch", "train img/s", "train peak GiB", "infer img/s", "infer peak GiB",
                         "first train step s", "note"],
                        [[r["backend"], r["batch"], r.get("train_img_s"), r.get("train_peak_gib"),
                          r.get("infer_img_s"), r.get("infer_peak_gib"), r.get("train_first_s"),
                          r.get("error") or r.get("skipped") or ""] for r in bench["model"]["rows"]])
    if "max_batch" in bench:
        mb = bench["max_batch"]
        lines += [f"## Largest training batch in {mb['limit_gib']} GiB", ""]
        lines += _table(["backend", "largest batch", "first failing", "note"],
                        [[r["backend"], r["max_batch"], r["first_failing"],
                          "search cut short by its time limit" if r["truncated"] else ""] for r in mb["rows"]])
    sections = results.get("sections", {})
    if sections:
        lines += ["## Benchmark sections", ""]
        lines += _table(["section", "status", "seconds", "detail"],
                        [[name, s["status"], s.get("seconds"), s.get("error") or s.get("reason") or ""]
                         for name, s in sections.items()])
    return "\n".join(lines).rstrip() + "\n"


def report(out_dir: Path, steps: Path | None, kernels: Path | None, junit: Path | None, quick: bool) -> int:
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"schema": 1}
    if "machine" not in results:
        results["machine"] = machine_info()
    results["quick"] = quick
    if steps is not None and steps.exists():
        results["steps"] = read_steps(steps)
    if kernels is not None and kernels.exists():
        results["kernels"] = json.loads(kernels.read_text())
    if junit is not None and junit.exists():
        results["tests"] = read_junit(junit)
    _write_json(path, results)
    text = render(results)
    (out_dir / "report.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], prog="tools/gpu_bench.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="run the GPU benchmarks into a results.json")
    p.add_argument("--out", type=Path, required=True, help="results.json to write (updated after each section)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=200.0, help="seconds the sections may use together "
                   "(default: 200)")
    p = sub.add_parser("report", help="write OUT/report.md from OUT/results.json and the check's other outputs")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--steps", type=Path)
    p.add_argument("--kernels", type=Path)
    p.add_argument("--junit", type=Path)
    p.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "bench":
        sections = [s for s in args.sections.split(",") if s]
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            parser.error(f"--sections: unknown {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
        return bench(args.out, sections, args.budget_s)
    return report(args.out_dir, args.steps, args.kernels, args.junit, args.quick)


if __name__ == "__main__":
    sys.exit(main())
