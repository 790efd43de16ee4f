"""Command line: `python -m fused_hourglass info | bench`."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import _ext


def _build_info() -> dict:
    try:
        from . import _build_info as info
    except ImportError:
        return {}
    return {"with_cuda": info.WITH_CUDA, "archs": info.CUDA_ARCHS, "torch": info.TORCH_VERSION}


def _triton_status() -> str:
    try:
        import triton
    except ImportError as exc:
        return f"not importable ({exc})"
    return f"{triton.__version__} (kernels need a CUDA device; TRITON_INTERPRET=1 runs them on the CPU)"


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of fn(), in milliseconds, after one untimed call that pays one-time costs (allocator,
    oneDNN primitive creation)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def info(args: argparse.Namespace) -> int:
    from . import HeatmapLoss, StackedHourglass, __version__

    build = _build_info()
    print(f"fused_hourglass {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{torch.get_num_threads()} CPU threads")
    if _ext.HAS_EXTENSION:
        archs = build.get("archs") or "-"
        print(f"extension: built against torch {build.get('torch', '?')}; CUDA kernels "
              f"{'compiled for ' + archs if build.get('with_cuda') else 'not compiled'}")
    else:
        print(f"extension: NOT available ({_ext.EXTENSION_ERROR}); every op runs its plain-PyTorch reference")
    ops = sorted({name for name in _ext.registered_ops() if not name.startswith("_")})
    for device in ("cpu", "cuda"):
        have = [op for op in ops if _ext.has_kernel(op, device)]
        print(f"  {device} kernels: {', '.join(have) if have else 'none'}")
    if _ext.HAS_EXTENSION:
        cache = torch.ops.fused_hourglass._cpu_last_level_cache_bytes()
        print(f"  cpu last-level cache {cache / 2**20:g} MiB: element-wise passes touching more than "
              f"{cache / 2**21:g} MiB write with streaming stores (FH_NONTEMPORAL_STORES=0/1 overrides)")
    print(f"triton: {_triton_status()}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}")

    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.rand(args.batch, 16, args.size // 4, args.size // 4, device=device)
    print(f"StackedHourglass(nstack={args.nstack}, inp_dim={args.inp_dim}, oup_dim=16), input {list(x.shape)}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, median of {args.repeats}:")
    model = StackedHourglass(args.nstack, args.inp_dim, 16).to(device)
    loss_fn = HeatmapLoss()

    def forward_eval():
        model.eval()
        with torch.inference_mode():
            model(x)

    def train_step():
        model.train()
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()

    results = {}
    for backend in ("reference", "auto"):
        model.backend = backend
        results[backend] = (_time(forward_eval, x, args.repeats), _time(train_step, x, args.repeats))
        label = f"auto → {model.resolve_backend(device)}" if backend == "auto" else backend
        print(f"  {label:<18} eval forward {results[backend][0]:9.1f} ms   training forward+backward "
              f"{results[backend][1]:9.1f} ms")
    ref, auto = results["reference"], results["auto"]
    print(f"  speed-up of auto over reference: eval {ref[0] / auto[0]:.2f}×, training {ref[1] / auto[1]:.2f}×")
    return 0


def bench(args: argparse.Namespace) -> int:
    from . import benchmarking

    sides = tuple(int(s) for s in args.sides.split(","))
    cases = benchmarking.upsample_add_cases(n=args.batch, c=args.channels, sides=sides)
    print(f"CPU threads: {torch.get_num_threads()}; fastest of repeated calls; ratios are to a copy of the "
          "same output bytes")
    benchmarking.run_cases(cases, min_seconds=args.seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_hourglass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what was built, and a timed forward and training step of one model")
    p_info.add_argument("--nstack", type=int, default=1)
    p_info.add_argument("--inp-dim", type=int, default=256)
    p_info.add_argument("--size", type=int, default=256, help="input side in pixels, a multiple of 64")
    p_info.add_argument("--batch", type=int, default=4)
    p_info.add_argument("--repeats", type=int, default=3)
    p_info.add_argument("--channels-last", action="store_true", help="feed the input in channels_last layout")
    p_info.set_defaults(func=info)
    p_bench = sub.add_parser("bench", help="fused ops vs eager vs torch.compile vs a plain copy, side by side")
    p_bench.add_argument("--batch", type=int, default=4)
    p_bench.add_argument("--channels", type=int, default=256)
    p_bench.add_argument("--sides", default="8,16,32,64", help="comma-separated output sides in pixels")
    p_bench.add_argument("--seconds", type=float, default=0.3, help="minimum timing per implementation")
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
