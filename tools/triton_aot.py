"""Ahead-of-time compile check of every Triton kernel, for GPUs this machine does not have (DESIGN.md §4).

For each kernel × autotune configuration × architecture (sm_80, sm_90) × dtype (bf16; fp32 with IEEE products; fp32
with TF32 products, as when torch.backends.cuda.matmul.allow_tf32 is set) the kernel is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` to PTX, and the PTX is assembled with
`ptxas -arch=sm_XX -v` (the `.target` the PTX declares, e.g. sm_90a when wgmma is emitted) for registers and
spills. The conv kernels are compiled with every epilogue flag on (the largest variant). Prints a table and exits
non-zero on any compile error, register spill or shared-memory overflow.

    python tools/triton_aot.py [--jobs 2] [--arch 80 90] [--dtype bf16 fp32 tf32] [--ptxas /usr/local/cuda/bin/ptxas]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the GPU autotune configurations, not the interpreter's

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shared memory available to one block (opt-in maximum): A100 and H100.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ACT = "act"  # placeholder for the activation dtype in the argument tables below
F32 = "*fp32"


def _kernels():
    """(label, kernel or {torch dtype: autotuned kernel}, {arg: type or ACT}, {constexpr: value},
    [args divisible by 16])."""
    from fused_hourglass.triton import conv_kernels as ck

    strides = {"stride_wn": "i32", "stride_wk": "i32", "stride_wh": "i32", "stride_ww": "i32"}
    dims = {"M": "i32", "H": "i32", "W": "i32", "K": "i32", "C_OUT": "i32"}
    fwd = {"u_ptr": ACT, "scale_ptr": F32, "shift_ptr": F32, "w_ptr": ACT, **strides, "bias_ptr": F32,
           "res_ptr": ACT, "low_ptr": ACT, "y_ptr": ACT, "sum_ptr": F32, "m2_ptr": F32, **dims}
    dgrad = {"dy_ptr": ACT, "w_ptr": ACT, **strides, "u_ptr": ACT, "scale_ptr": F32, "shift_ptr": F32,
             "mean_ptr": F32, "invstd_ptr": F32, "dz_ptr": ACT, "psum_ptr": F32, "pdot_ptr": F32, **dims}
    wgrad = {"u_ptr": ACT, "scale_ptr": F32, "shift_ptr": F32, "dy_ptr": ACT, "dw_ptr": F32, "db_ptr": F32,
             **dims, "ROWS_PER_SPLIT": "i32"}
    aligned = ["M", "K", "C_OUT", "ROWS_PER_SPLIT"]
    out = []
    for ksize in (1, 3):
        out.append((f"conv_forward_k{ksize}", ck.TUNED["conv_forward"], fwd,
                    {"KSIZE": ksize, "PROLOGUE": True, "HAS_RES": True, "HAS_LOW": True, "STATS": True,
                     "BLOCK_M": ck.STATS_BLOCK_M}, aligned))
        out.append((f"conv_dgrad_k{ksize}", ck.TUNED["conv_dgrad"], dgrad,
                    {"KSIZE": ksize, "PROLOGUE": True, "BLOCK_M": ck.STATS_BLOCK_M}, aligned))
        out.append((f"conv_wgrad_k{ksize}", ck.TUNED["conv_wgrad"], wgrad,
                    {"KSIZE": ksize, "PROLOGUE": True}, aligned))
    ew = {"BLOCK_M": ck.EW_BLOCK_M, "BLOCK_C": ck.EW_BLOCK_C}
    out.append(("channel_stats", ck._channel_stats_kernel,
                {"x_ptr": ACT, "sum_ptr": F32, "m2_ptr": F32, "M": "i32", "C": "i32"}, ew, ["M", "C"]))
    out.append(("bn_backward_apply", ck._bn_backward_apply_kernel,
                {"dz_ptr": ACT, "u_ptr": ACT, "mean_ptr": F32, "a_ptr": F32, "b_ptr": F32, "c_ptr": F32,
                 "extra_ptr": ACT, "du_ptr": ACT, "M": "i32", "C": "i32"}, {"HAS_EXTRA": True, **ew}, ["M", "C"]))
    out.append(("sum_pool2x2", ck._sum_pool2x2_kernel,
                {"g_ptr": ACT, "out_ptr": ACT, "M_LOW": "i32", "H": "i32", "W": "i32", "C": "i32"}, ew, ["C"]))
    return out


def _jobs(archs, dtypes):
    import triton

    jobs = []
    for label, _, args, constexprs, aligned in _kernels():
        for dtype in dtypes:
            kernel = _kernel_for(label, dtype)
            if dtype == "tf32" and not isinstance(kernel, triton.runtime.Autotuner):
                continue  # no tl.dot: identical to fp32
            configs = getattr(kernel, "configs", None) or [triton.Config({}, num_warps=4, num_stages=1)]
            for cfg in configs:
                for arch in archs:
                    jobs.append((label, cfg.kwargs, cfg.num_warps, cfg.num_stages, arch, dtype, args, constexprs,
                                 aligned))
    return jobs


def _kernel_for(label: str, dtype: str):
    """The kernel the launchers run for `label` on `dtype` activations (looked up anew: kernels do not pickle)."""
    import torch

    kernel = next(kern for lab, kern, *_ in _kernels() if lab == label)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}[dtype]
    return kernel[torch_dtype] if isinstance(kernel, dict) else kernel


def _compile(job, ptxas):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    label, cfg_kwargs, num_warps, num_stages, arch, dtype, args, constexprs, aligned = job
    cfg = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg_kwargs.items())
    cfg = f"{cfg + ',' if cfg else ''}w{num_warps}s{num_stages}"
    row = {"kernel": label, "config": cfg, "arch": arch, "dtype": dtype}
    t0 = time.time()
    try:
        kernel = _kernel_for(label, dtype)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction
        act = "*bf16" if dtype == "bf16" else "*fp32"
        consts = {**constexprs, **cfg_kwargs}
        if "DOT_PRECISION" in fn.arg_names:
            consts["DOT_PRECISION"] = "tf32" if dtype == "tf32" else "ieee"
        signature = {}
        for name in fn.arg_names:
            signature[name] = "constexpr" if name in consts else (act if args[name] == ACT else args[name])
        # Specialisations the JIT makes at the H100 shapes: 16-byte-aligned pointers, channel and row counts
        # divisible by 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in consts and (signature[name].startswith("*") or name in aligned)}
        target = GPUTarget("cuda", arch, 32)
        options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
        compiled = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        sm = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "k.ptx")
            path.write_text(ptx)
            res = subprocess.run([ptxas, f"-arch={sm}", "-v", str(path), "-o", str(Path(tmp, "k.cubin"))],
                                 capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip()[-400:])
        log = res.stderr + res.stdout
        spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        row.update(sm=sm, regs=int(re.search(r"Used (\d+) registers", log).group(1)), spills=spills,
                   smem=compiled.metadata.shared, wgmma="wgmma" in ptx, error=None)
    except Exception as exc:  # reported in the table; the exit status fails
        row.update(sm="-", regs=-1, spills=-1, smem=-1, wgmma=False, error=f"{type(exc).__name__}: {exc}"[:300])
    row["seconds"] = time.time() - t0
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32", "tf32"], choices=["bf16", "fp32", "tf32"],
                        help="tf32: fp32 tensors with allow_tf32 (tensor-core products on the fp32 tiles)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--ptxas", default="/usr/local/cuda/bin/ptxas")
    args = parser.parse_args(argv)
    jobs = _jobs(args.arch, args.dtype)
    start = time.time()
    header = (f"{'kernel':<20} {'config':<24} {'dtype':<5} {'target':<7} {'regs':>4} {'smem KiB':>8} "
              f"{'spill B':>7}  status")
    print(header)
    print("-" * len(header), flush=True)
    rows, failures = [], 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(_compile, jobs, [args.ptxas] * len(jobs)):  # rows print in job order as they finish
            rows.append(r)
            problems = []
            if r["error"]:
                problems.append(r["error"])
            else:
                if r["spills"]:
                    problems.append("SPILLS")
                if r["smem"] > SMEM_LIMIT[r["arch"]]:
                    problems.append(f"SHARED > {SMEM_LIMIT[r['arch']] // 1024} KiB")
            failures += bool(problems)
            status = "; ".join(problems) if problems else ("ok (wgmma)" if r["wgmma"] else "ok")
            smem = f"{r['smem'] / 1024:.1f}" if r["smem"] >= 0 else "-"
            print(f"{r['kernel']:<20} {r['config']:<24} {r['dtype']:<5} {r['sm']:<7} {r['regs']:>4} {smem:>8} "
                  f"{r['spills']:>7}  {status}  [{r['seconds']:.0f} s]", flush=True)
    print(f"\n{len(rows)} compilations in {time.time() - start:.0f} s, {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
