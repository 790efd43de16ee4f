"""Ahead-of-time kernel report (DESIGN.md §4): registers, spills and shared memory of every kernel, for GPUs this
machine need not have.

Triton: each kernel × autotune configuration × dtype (bf16; fp32 with IEEE products; fp32 with TF32 products, as
under torch.backends.cuda.matmul.allow_tf32) × arch is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` to PTX, and the PTX assembled by
`ptxas -arch=sm_XX -v` (the `.target` the PTX declares, sm_90a when wgmma is emitted) for registers and spills; the
conv kernels with every epilogue flag on (their largest variant). For sm_90 GEMM kernels the report says whether
the PTX uses wgmma. CUDA C++: the `ptxas -v` lines of a build log (`FH_PTXAS_VERBOSE=1`), or, without one, the
resource usage recorded in the compiled extension (`cuobjdump --dump-resource-usage`; it records local memory,
not spills).

    python -m fused_hourglass info --kernels
    python -m fused_hourglass.kernel_report [--arch 80 90] [--dtype bf16 fp32 tf32] [--one-config] [--jobs 2]
                                            [--build-log LOG] [--triton-only] [--json FILE]

Exits 1 on any compile error, register spill or shared memory above the arch's per-block limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Shared memory one block may use (the opt-in maximum): A100 and H100 / H200.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ACT = "act"  # placeholder for the activation dtype in the argument tables below
F32 = "*fp32"
GEMM_KERNELS = ("conv_forward", "conv_dgrad", "conv_wgrad")


def _interpreted() -> bool:
    """Whether Triton kernels of this process are (or would be) interpreted, so cannot be compiled."""
    ck = sys.modules.get("fused_hourglass.triton.conv_kernels")
    return os.environ.get("TRITON_INTERPRET") == "1" or bool(ck is not None and ck.INTERPRET)


def find_tool(name: str) -> str | None:
    """A CUDA binary (ptxas, cuobjdump): CUDA_HOME's, /usr/local/cuda's, the PATH's, else the one triton ships."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    if found := shutil.which(name):
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if os.access(bundled, os.X_OK) else None


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels, compiled ahead of time
# ----------------------------------------------------------------------------------------------------------------


def triton_kernels() -> list[tuple]:
    """(label, kernel or {configuration set: {torch dtype: autotuned kernel}}, {arg: type or ACT},
    {constexpr: value}, [args divisible by 16])."""
    from .triton import conv_kernels as ck

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
                {"x_ptr": ACT, "sum_ptr": F32, "m2_ptr": F32, "M": "i32", "C": "i32"},
                {"BLOCK_M": ck.STATS_BLOCK_M, "BLOCK_C": ck.EW_BLOCK_C}, ["M", "C"]))
    out.append(("bn_backward_apply", ck._bn_backward_apply_kernel,
                {"dz_ptr": ACT, "u_ptr": ACT, "mean_ptr": F32, "a_ptr": F32, "b_ptr": F32, "c_ptr": F32,
                 "extra_ptr": ACT, "du_ptr": ACT, "M": "i32", "C": "i32"}, {"HAS_EXTRA": True, **ew}, ["M", "C"]))
    out.append(("sum_pool2x2", ck._sum_pool2x2_kernel,
                {"g_ptr": ACT, "out_ptr": ACT, "M_LOW": "i32", "H": "i32", "W": "i32", "C": "i32"}, ew, ["C"]))
    return out


def _kernel_for(label: str, dtype: str, arch: int):
    """The kernel the launchers run for `label` on `dtype` activations on an sm_`arch` GPU (looked up anew: kernels
    do not pickle)."""
    import torch

    from .triton import conv_kernels as ck

    kernel = next(kern for lab, kern, *_ in triton_kernels() if lab == label)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}[dtype]
    return kernel[ck.config_set(arch)][torch_dtype] if isinstance(kernel, dict) else kernel


def triton_jobs(archs: list[int], dtypes: list[str], one_config: bool = False) -> list[tuple]:
    """One job per kernel × configuration of the arch's set (the first only, with one_config) × dtype × arch."""
    import triton

    jobs = []
    for label, _, args, constexprs, aligned in triton_kernels():
        for dtype in dtypes:
            for arch in archs:
                kernel = _kernel_for(label, dtype, arch)
                if dtype == "tf32" and not isinstance(kernel, triton.runtime.Autotuner):
                    continue  # no tl.dot: identical to fp32
                configs = getattr(kernel, "configs", None) or [triton.Config({}, num_warps=4, num_stages=1)]
                for cfg in configs[:1] if one_config else configs:
                    jobs.append((label, cfg.kwargs, cfg.num_warps, cfg.num_stages, arch, dtype, args, constexprs,
                                 aligned))
    return jobs


def config_label(kwargs: dict, num_warps: int, num_stages: int) -> str:
    """"N128,K32,w8s3" for {"BLOCK_N": 128, "BLOCK_K": 32}, 8 warps, 3 stages."""
    cfg = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in kwargs.items())
    return f"{cfg + ',' if cfg else ''}w{num_warps}s{num_stages}"


def compile_triton(job: tuple, ptxas: str) -> dict:
    """Compile one job; a row of the report (`error` set instead of raising)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    label, cfg_kwargs, num_warps, num_stages, arch, dtype, args, constexprs, aligned = job
    row = {"kind": "triton", "kernel": label, "config": config_label(cfg_kwargs, num_warps, num_stages),
           "arch": arch, "dtype": dtype, "gemm": label.startswith(GEMM_KERNELS)}
    t0 = time.time()
    try:
        kernel = _kernel_for(label, dtype, arch)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction
        act = "*bf16" if dtype == "bf16" else "*fp32"
        consts = {**constexprs, **cfg_kwargs}
        if "DOT_PRECISION" in fn.arg_names:
            consts["DOT_PRECISION"] = "tf32" if dtype == "tf32" else "ieee"
        signature = {}
        for name in fn.arg_names:
            signature[name] = "constexpr" if name in consts else (act if args[name] == ACT else args[name])
        # Specialisations the JIT makes at the model's shapes: 16-byte-aligned pointers, channel and row counts
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
        row.update(target=sm, regs=int(re.search(r"Used (\d+) registers", log).group(1)), spills=spills,
                   smem=compiled.metadata.shared, wgmma="wgmma" in ptx, error=None)
    except Exception as exc:  # reported in the table; the exit status fails
        row.update(target="-", regs=None, spills=None, smem=None, wgmma=None,
                   error=f"{type(exc).__name__}: {exc}"[:300])
    row["seconds"] = round(time.time() - t0, 2)
    return row


def triton_rows(archs: list[int], dtypes: list[str], jobs: int = 2, ptxas: str | None = None,
                one_config: bool = False) -> list[dict]:
    """Every Triton job compiled, in job order. Needs a process whose kernels are not interpreted (`main` re-runs
    itself without TRITON_INTERPRET when they are)."""
    if _interpreted():
        raise RuntimeError("Triton kernels are interpreted in this process (TRITON_INTERPRET=1): they cannot be "
                           "compiled ahead of time here; run `python -m fused_hourglass.kernel_report`")
    ptxas = ptxas or find_tool("ptxas")
    if ptxas is None:
        raise RuntimeError("ptxas not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH, triton's own)")
    work = triton_jobs(archs, dtypes, one_config)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(compile_triton, work, [ptxas] * len(work)))


# ----------------------------------------------------------------------------------------------------------------
# CUDA C++ kernels: a build log's ptxas -v lines, or the compiled extension's resource usage
# ----------------------------------------------------------------------------------------------------------------

ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)(a?)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> list[dict]:
    """One row per `Compiling entry function` of `ptxas -v` output: registers, stack, spill stores / loads and
    static shared memory (bytes). A kernel compiled into several object files appears once per file."""
    rows, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                       "spill_loads": 0, "smem": 0}
            rows.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m.group(1))
            if s := SMEM.search(line):
                current["smem"] = int(s.group(1))
    return rows


def parse_resource_usage(text: str) -> list[dict]:
    """Rows of `cuobjdump --dump-resource-usage`: per arch section, each function's REG, STACK, SHARED, LOCAL."""
    rows, arch = [], None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = m.group(1)
        elif (m := re.match(r"\s*Function ([^:\s]+):", line)) and arch is not None:
            rows.append({"kernel": m.group(1), "arch": arch, "registers": None, "stack": 0, "smem": 0, "local": 0})
        elif rows and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            rows[-1].update(registers=int(fields.get("REG", 0)), stack=int(fields.get("STACK", 0)),
                            smem=int(fields.get("SHARED", 0)), local=int(fields.get("LOCAL", 0)))
    return rows


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def _short(name: str) -> str:
    """`void (anonymous namespace)::bn_relu_apply_kernel<float>(float const*, ...)` → `bn_relu_apply_kernel<float>`."""
    name = re.sub(r"^void |\(anonymous namespace\)::", "", name)
    return re.sub(r"^(?:\w+::)+", "", name.split("(", 1)[0])


def cuda_rows(build_log: str | None = None) -> tuple[list[dict], str]:
    """Rows of the CUDA C++ kernels and where they came from (or why there are none)."""
    if build_log:
        parsed = parse_ptxas_log(Path(build_log).read_text(errors="replace"))
        source = f"ptxas -v lines of {build_log}"
    else:
        from . import _build_info, _ext

        if not _ext.HAS_EXTENSION:
            return [], f"the extension is not built ({_ext.EXTENSION_ERROR})"
        if not _build_info.WITH_CUDA:
            return [], "the extension was built without CUDA kernels (pass --build-log of a CUDA build instead)"
        cuobjdump = find_tool("cuobjdump")
        if cuobjdump is None:
            return [], "cuobjdump not found (pass --build-log of a build with FH_PTXAS_VERBOSE=1 instead)"
        import fused_hourglass._C as compiled

        res = subprocess.run([cuobjdump, "--dump-resource-usage", compiled.__file__], capture_output=True,
                             text=True)
        if res.returncode != 0:
            return [], f"cuobjdump failed: {res.stderr.strip()[-300:]}"
        parsed = parse_resource_usage(res.stdout)
        source = f"cuobjdump --dump-resource-usage {os.path.basename(compiled.__file__)} (local memory, not spills)"
    unique = {(r["kernel"], r["arch"]): r for r in parsed}
    ordered = sorted(unique.values(), key=lambda r: (r["arch"], r["kernel"]))
    rows = []
    for r, name in zip(ordered, demangle([r["kernel"] for r in ordered]), strict=True):
        spills = r["spill_stores"] + r["spill_loads"] if "spill_stores" in r else None
        rows.append({"kind": "cuda", "kernel": _short(name), "config": "-", "arch": int(r["arch"]), "dtype": "-",
                     "gemm": False, "target": f"sm_{r['arch']}", "regs": r["registers"], "spills": spills,
                     "smem": r["smem"], "local": r.get("local"), "wgmma": None, "error": None, "seconds": 0.0})
    return rows, source


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


def problems(row: dict) -> list[str]:
    """What fails the report in this row: a compile error, spills, shared memory over the arch's limit."""
    if row["error"]:
        return [row["error"]]
    out = []
    if row["spills"]:
        out.append("SPILLS")
    limit = SMEM_LIMIT.get(row["arch"])
    if limit is not None and row["smem"] is not None and row["smem"] > limit:
        out.append(f"SHARED > {limit // 1024} KiB")
    return out


def format_table(rows: list[dict]) -> str:
    header = (f"{'kind':<6} {'kernel':<28} {'config':<20} {'dtype':<5} {'target':<7} {'regs':>4} {'spill B':>7} "
              f"{'smem KiB':>8} {'limit':>5} {'wgmma':>5}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        bad = problems(r)
        smem = f"{r['smem'] / 1024:.1f}" if r["smem"] is not None else "-"
        limit = f"{SMEM_LIMIT[r['arch']] // 1024}" if r["arch"] in SMEM_LIMIT else "-"
        wgmma = ("yes" if r["wgmma"] else "no") if r["gemm"] and r["arch"] >= 90 and not r["error"] else "-"
        status = "; ".join(bad) if bad else "ok"
        if not bad and r.get("local"):
            status += f" (local memory {r['local']} B)"
        lines.append(f"{r['kind']:<6} {r['kernel'][:28]:<28} {r['config']:<20} {r['dtype']:<5} {r['target']:<7} "
                     f"{r['regs'] if r['regs'] is not None else '-':>4} "
                     f"{r['spills'] if r['spills'] is not None else '-':>7} {smem:>8} {limit:>5} {wgmma:>5}  {status}")
    return "\n".join(lines)


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fused_hourglass.kernel_report", *argv], env=env).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_hourglass.kernel_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32", "tf32"], choices=["bf16", "fp32", "tf32"],
                        help="tf32: fp32 tensors with allow_tf32 (tensor-core products on the fp32 tiles)")
    parser.add_argument("--one-config", action="store_true", help="only each kernel's first configuration")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compilations")
    parser.add_argument("--ptxas", help="default: CUDA_HOME's, /usr/local/cuda's, the PATH's, or triton's own")
    parser.add_argument("--build-log", help="CUDA C++ rows from this log's ptxas -v lines (FH_PTXAS_VERBOSE=1)")
    parser.add_argument("--triton-only", action="store_true", help="no CUDA C++ rows")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if _interpreted():
        return _rerun_without_interpreter(argv)
    start = time.time()
    rows = triton_rows(args.arch, args.dtype, jobs=args.jobs, ptxas=args.ptxas, one_config=args.one_config)
    source = None
    if not args.triton_only:
        cuda, source = cuda_rows(args.build_log)
        rows += [r for r in cuda if r["arch"] in args.arch]
    print(format_table(rows))
    failures = sum(bool(problems(r)) for r in rows)
    if source:
        print(f"CUDA C++ kernels: {source}")
    print(f"{len(rows)} kernel rows in {time.time() - start:.0f} s, {failures} with problems")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
