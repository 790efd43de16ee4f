"""Eval forward of the fused model, folded against unfolded, against the reference eager and (with --compile)
torch.compile(reference): interleaved rounds in one process, wall and process CPU time per forward (CPU time is the
steadier figure on a shared machine).

    python tools/bench_folding.py [--side 128] [--batch 4] [--rounds 15] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fused_hourglass import StackedHourglass, folding
from fused_hourglass.benchmarking import keep_freed_memory_in_heap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="2,128,16", help="nstack,inp_dim,oup_dim (default: 2,128,16)")
    parser.add_argument("--side", type=int, default=128, help="input side in pixels (default: 128)")
    parser.add_argument("--batch", type=int, default=4, help="default: 4")
    parser.add_argument("--rounds", type=int, default=15, help="default: 15")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile(reference) (slow to compile)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = keep_freed_memory_in_heap()
    torch.manual_seed(0)
    config = tuple(int(v) for v in args.config.split(","))
    fused = StackedHourglass(*config, backend="fused").eval()
    ref = StackedHourglass(*config, backend="reference").eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(args.batch, 3, args.side, args.side)
    with_post_ops, prepack = folding.POST_OP_MIN_POSITIONS, folding.PREPACK

    def unfolded():
        fused.folded_inference = False
        try:
            return fused(x)
        finally:
            fused.folded_inference = True

    def folded_with(min_positions: int, pack: bool):
        def run():
            folding.POST_OP_MIN_POSITIONS, folding.PREPACK = min_positions, pack
            try:
                return fused(x)
            finally:
                folding.POST_OP_MIN_POSITIONS, folding.PREPACK = with_post_ops, prepack
        return run

    rows = {"reference eager": lambda: ref(x), "fused unfolded": unfolded, "fused folded": lambda: fused(x),
            "fused folded, weights not prepacked": folded_with(with_post_ops, False),
            "fused folded, no oneDNN post-ops": folded_with(1 << 62, False)}
    if args.compile:
        compiled = torch.compile(ref)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        print(f"torch.compile(reference): first call {time.perf_counter() - start:.1f} s")
        rows["torch.compile(reference)"] = lambda: compiled(x)
    wall = {name: [] for name in rows}
    cpu = {name: [] for name in rows}
    with torch.no_grad():
        for fn in rows.values():
            fn()
            fn()
        print(f"max |folded - unfolded| = {float((fused(x) - unfolded()).abs().max()):.3g}")
        for _ in range(args.rounds):
            for name, fn in rows.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    print(f"StackedHourglass{config}, {args.side} px, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds; {allocator}")
    base = statistics.median(cpu["reference eager"])
    for name in rows:
        c, w = cpu[name], wall[name]
        print(f"  {name:<36} CPU time median {statistics.median(c):7.1f} ms  min {min(c):7.1f} ms "
              f"({base / statistics.median(c):.2f}x reference eager)   wall median {statistics.median(w):7.1f} ms  "
              f"min {min(w):7.1f} ms")


if __name__ == "__main__":
    main()
