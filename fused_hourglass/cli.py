"""Command line: `python -m fused_hourglass train | evaluate | predict | export | info | bench`.

The main job is `python -m fused_hourglass train --preset demo`: a small stacked hourglass trained on the embedded
synthetic people, with a PCKh table, curves and a prediction picture at the end."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import _ext
from .engine.config import PRESETS, TrainConfig
from .engine.export import OPSET


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

    if args.kernels:
        from .kernel_report import main as kernel_report

        return kernel_report([])
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
    if args.model:
        return _bench_model(args)
    from . import benchmarking

    sides = tuple(int(s) for s in args.sides.split(","))
    cases = benchmarking.upsample_add_cases(n=args.batch, c=args.channels, sides=sides)
    allocator = benchmarking.keep_freed_memory_in_heap()
    print(f"CPU threads: {torch.get_num_threads()}; fastest of repeated calls; ratios are to a copy of the "
          f"same output bytes; {allocator}")
    benchmarking.run_cases(cases, min_seconds=args.seconds)
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from . import model_bench

    for name in ("nstack", "inp_dim", "batch", "rounds", "side"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.side % 64:
        raise ValueError(f"--side must be a multiple of 64 (the network's input side), got {args.side}")
    from .benchmarking import keep_freed_memory_in_heap

    allocator = keep_freed_memory_in_heap()
    header = (f"StackedHourglass({args.nstack}, {args.inp_dim}, 16), {args.side} px, batch {args.batch}, "
              f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds; {allocator}")
    print(header)
    rows = model_bench.run(args.nstack, args.inp_dim, args.side, args.batch, args.rounds,
                           compile=not args.no_compile)
    print(model_bench.table(rows, header))
    if args.png:
        print(model_bench.plot(rows, args.png))
    return 0


def _preset_default(name: str) -> str:
    """The option's value in every preset, for its help text."""
    base = TrainConfig()
    values = {preset: over.get(name, getattr(base, name)) for preset, over in PRESETS.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default: {next(iter(values.values()))}"
    return "default: " + ", ".join(f"{p} {v}" for p, v in values.items())


def _add_train_options(p: argparse.ArgumentParser) -> None:
    d = _preset_default
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: a small model on the embedded SyntheticPoses, about five minutes on two CPU cores; "
                        "mpii: the port's recipe (needs --annotations and --images) (default: demo)")
    p.add_argument("--resume", metavar="DIR|FILE", help="continue a run exactly from its newest checkpoint (a run "
                   "directory) or from a checkpoint file; its saved options apply")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("synthetic", "mpii"), help=f"training data ({d('data')})")
    g.add_argument("--annotations", metavar="H5", help="MPII training annotations in the port's h5 layout")
    g.add_argument("--val-annotations", metavar="H5", help="MPII validation annotations (default: --annotations)")
    g.add_argument("--images", metavar="DIR", help="folder of MPII images")
    g.add_argument("--res", type=int, help=f"input side in pixels, a multiple of 64 ({d('res')})")
    g.add_argument("--sigma", type=float, help=f"heatmap Gaussian σ in heatmap pixels ({d('sigma')}; None is the "
                   f"port's (res/4)/64)")
    g.add_argument("--train-size", type=int, help=f"synthetic training images ({d('train_size')})")
    g.add_argument("--val-size", type=int, help=f"held-out images for the periodic validation ({d('val_size')})")
    g.add_argument("--workers", type=int, help=f"data loader processes ({d('workers')})")
    g = p.add_argument_group("model")
    g.add_argument("--nstack", type=int, help=f"hourglass stacks ({d('nstack')})")
    g.add_argument("--inp-dim", type=int, help=f"features per hourglass ({d('inp_dim')})")
    g.add_argument("--backend", choices=("auto", "fused", "triton", "reference"),
                   help=f"StackedHourglass backend ({d('backend')})")
    g.add_argument("--recompute", choices=("none", "conv1", "block"),
                   help="fused backend's memory policy: what each Residual saves for backward; conv1 and block "
                        f"recompute the BatchNorm inputs of a block from its input ({d('recompute')})")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help=f"run in channels_last memory format ({d('channels_last')})")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help=f"mixed precision: bfloat16 autocast on CPU, float16 on CUDA; auto is on for CUDA and for a "
                        f"CPU with native bf16 (AVX512-BF16 or AMX), off elsewhere and on --backend triton "
                        f"({d('amp')})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help=f"images per step ({d('batch_size')})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate, the peak of the onecycle schedule ({d('lr')})")
    g.add_argument("--schedule", choices=("onecycle", "step"), help=f"learning-rate schedule: onecycle warms up for "
                   f"15 %% of the steps then anneals to lr/1000; step drops lr to --lr-drop-to after --lr-drop-step "
                   f"steps ({d('schedule')})")
    g.add_argument("--lr-drop-step", type=int, help=f"step schedule's drop ({d('lr_drop_step')})")
    g.add_argument("--lr-drop-to", type=float, help=f"step schedule's lr after the drop ({d('lr_drop_to')})")
    g.add_argument("--steps", type=int, help=f"optimizer steps in all ({d('steps')})")
    g.add_argument("--grad-accum", type=int, metavar="K", help=f"micro-batches of --batch-size summed into each "
                   f"optimizer step, each normalised by its own BatchNorm statistics ({d('grad_accum')})")
    g.add_argument("--seed", type=int, help=f"seed of the weights, the data order and the augmentation ({d('seed')})")
    g = p.add_argument_group("output")
    g.add_argument("--device", help=f"auto (CUDA when present), cpu, cuda or cuda:N ({d('device')})")
    g.add_argument("--out", metavar="DIR", help=f"run directory: log.csv, checkpoints/, curves.png, prediction.png "
                   f"({d('out')})")
    g.add_argument("--log-every", type=int, help=f"steps between log rows ({d('log_every')})")
    g.add_argument("--val-every", type=int, help=f"steps between validations ({d('val_every')})")
    g.add_argument("--checkpoint-every", type=int, help=f"steps between checkpoints ({d('checkpoint_every')})")
    g.add_argument("--keep-last", type=int, help=f"step checkpoints kept besides best.pt ({d('keep_last')})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    g = p.add_argument_group("distributed (under torchrun: --batch-size is per process)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help=f"BatchNorm statistics over all processes, as torch.nn.SyncBatchNorm ({d('sync_bn')})")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS", help=f"longest wait of any collective for the "
                   f"other processes, after which a run whose peer died fails ({d('dist_timeout')})")


_OVERRIDES = ("data", "annotations", "val_annotations", "images", "res", "sigma", "train_size", "val_size",
              "workers", "nstack", "inp_dim", "backend", "recompute", "channels_last", "amp", "batch_size", "lr",
              "schedule", "lr_drop_step", "lr_drop_to", "steps", "seed", "device", "out", "log_every", "val_every",
              "checkpoint_every", "keep_last", "grad_accum", "sync_bn", "dist_timeout")


def train(args: argparse.Namespace) -> int:
    from .engine.config import from_preset
    from .engine.train import train as run

    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    config = None if args.resume else from_preset(args.preset, **overrides)
    summary = run(config, resume=args.resume, overrides=overrides, progress=False if args.no_progress else None)
    if summary["status"] == "finished" and summary.get("rank", 0) == 0:
        best = summary.get("best_pckh_mpii")
        print(f"done: {summary['step']} steps in {summary['seconds']:.0f} s"
              + (f", best validation PCKh@0.5 {100 * best:.1f} % (MPII mean)" if best is not None else "")
              + f"; run directory {summary['out']}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .engine.evaluate import evaluate as run
    from .engine.train import find_checkpoint

    checkpoint = _model_checkpoint(args.checkpoint, find_checkpoint)
    run(checkpoint, data=args.data, annotations=args.annotations, images=args.images, flip=args.flip, n=args.n,
        batch_size=args.batch_size, device=args.device, backend=args.backend, res=args.res, out_json=args.json)
    return 0


def _model_checkpoint(path: str, find) -> str:
    """A checkpoint file, or a run directory's model.pt (its best), else its newest step checkpoint."""
    import os

    if os.path.isdir(path):
        for name in ("model.pt", os.path.join("checkpoints", "best.pt")):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        return find(path)
    return path


def predict(args: argparse.Namespace) -> int:
    from .engine.predict import parse_box
    from .engine.predict import predict as run
    from .engine.train import find_checkpoint

    box = parse_box(args.box) if args.box else None
    run(_model_checkpoint(args.checkpoint, find_checkpoint), args.images, box=box, out=args.out, device=args.device,
        backend=args.backend, res=args.res, flip=args.flip)
    return 0


def export(args: argparse.Namespace) -> int:
    from .engine.export import export_onnx
    from .engine.train import find_checkpoint

    done = export_onnx(_model_checkpoint(args.checkpoint, find_checkpoint), args.onnx, res=args.res,
                       opset=args.opset)
    config = done["config"]
    print(f"wrote {done['path']}: StackedHourglass(nstack={config['nstack']}, inp_dim={config['inp_dim']}, "
          f"oup_dim={config['oup_dim']}), ONNX opset {done['opset']}, input images [batch, 3, {done['res']}, "
          f"{done['res']}], {done['folded']} of {done['batchnorms']} BatchNorms folded into their convolutions")
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE|DIR", help="a checkpoint of this package or of the "
                   "published port, or a run directory (its model.pt)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", default="fused", choices=("auto", "fused", "triton", "reference"),
                   help="StackedHourglass backend (default: fused)")
    p.add_argument("--res", type=int, help="input side in pixels (default: the checkpoint's, 256 for the port's)")
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored image's heatmaps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_hourglass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a stacked hourglass (the demo preset: on embedded synthetic data)",
                       description="Train a stacked hourglass. Checkpoints are atomic; Ctrl-C or SIGTERM writes one "
                       "at the next step boundary, and --resume continues exactly.")
    _add_train_options(p)
    p.set_defaults(func=train)
    p = sub.add_parser("evaluate", help="PCKh@0.5 per joint of a checkpoint, both conventions",
                       description="PCKh@0.5 of a checkpoint on held-out synthetic images (default, at the "
                       "checkpoint's resolution) or on MPII.")
    _add_model_options(p)
    p.add_argument("--data", choices=("synthetic", "mpii"), default="synthetic", help="default: synthetic")
    p.add_argument("--annotations", metavar="H5", help="MPII annotations (with --data mpii)")
    p.add_argument("--images", metavar="DIR", help="MPII image folder (with --data mpii)")
    p.add_argument("-n", type=int, help="images evaluated (default: 500 held-out synthetic ones; every MPII entry)")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON here")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("predict", help="keypoints of the person in your own images: JSON and a PNG per image")
    _add_model_options(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--box", metavar="x0,y0,x1,y1", help="the person's box in image pixels (default: the whole "
                   "image); the crop is 1.25 × its longer side")
    p.add_argument("--out", default="predictions", metavar="DIR", help="default: predictions")
    p.set_defaults(func=predict)
    p = sub.add_parser("export", help="a checkpoint as an ONNX file (BatchNorms folded), for onnxruntime and others",
                       description="Export a checkpoint's network to ONNX through the reference backend, every "
                       "BatchNorm that follows a convolution folded into it (each Residual's first BatchNorm stays a "
                       f"BatchNormalization node). Default ONNX opset {OPSET}; input 'images' [batch, 3, res, res] "
                       "float32 NCHW in [0, 1] with a dynamic batch axis, output 'heatmaps' [batch, nstack, oup_dim, "
                       "res/4, res/4]. Needs the onnx and onnxscript packages (pip install 'fused_hourglass[onnx]').")
    p.add_argument("--checkpoint", required=True, metavar="FILE|DIR", help="a checkpoint of this package or of the "
                   "published port, or a run directory (its model.pt)")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument("--res", type=int, help="input side in pixels, a multiple of 64 (default: the checkpoint's, 256 "
                   "for the port's)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    p.set_defaults(func=export)
    p_info = sub.add_parser("info", help="what was built, and a timed forward and training step of one model")
    p_info.add_argument("--nstack", type=int, default=1, help="default: 1")
    p_info.add_argument("--inp-dim", type=int, default=256, help="default: 256")
    p_info.add_argument("--size", type=int, default=256, help="input side in pixels, a multiple of 64 (default: 256)")
    p_info.add_argument("--batch", type=int, default=4, help="default: 4")
    p_info.add_argument("--repeats", type=int, default=3, help="default: 3")
    p_info.add_argument("--channels-last", action="store_true", help="feed the input in channels_last layout")
    p_info.add_argument("--kernels", action="store_true", help="instead: registers, spills and shared memory of "
                        "every kernel, compiled ahead of time for sm_80 and sm_90 (fused_hourglass.kernel_report)")
    p_info.set_defaults(func=info)
    p_bench = sub.add_parser("bench", help="fused ops vs eager vs torch.compile vs a plain copy, side by side")
    p_bench.add_argument("--batch", type=int, default=4, help="default: 4")
    p_bench.add_argument("--channels", type=int, default=256, help="default: 256")
    p_bench.add_argument("--sides", default="8,16,32,64", help="comma-separated output sides in pixels "
                         "(default: 8,16,32,64)")
    p_bench.add_argument("--seconds", type=float, default=0.3, help="minimum timing per implementation (default: 0.3)")
    g = p_bench.add_argument_group("the whole model (--model): every backend, layout, precision, memory policy and "
                                   "torch.compile, interleaved rounds in one process")
    g.add_argument("--model", action="store_true", help="benchmark the whole model instead of the upsample_add op")
    g.add_argument("--nstack", type=int, default=2, help="default: 2")
    g.add_argument("--inp-dim", type=int, default=128, help="default: 128")
    g.add_argument("--side", type=int, default=128, help="input side in pixels (default: 128)")
    g.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    g.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (minutes to compile)")
    g.add_argument("--png", metavar="FILE", help="write saved memory against step time as a PNG")
    p_bench.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .engine.train import TrainingError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, CheckpointError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, TrainingError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        # a collective that failed because another process of a distributed run died or timed out
        import torch.distributed as dist

        if not (dist.is_available() and isinstance(exc, dist.DistError)):
            raise
        print(f"error: distributed training failed on this process: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
