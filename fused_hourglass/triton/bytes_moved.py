"""Analytic DRAM traffic of one residual block (C → C, mid = C/2, identity skip), fused vs unfused (DESIGN.md §2).

    python -m fused_hourglass.triton.bytes_moved [N C H W dtype_bytes]     (default 32 256 64 64 2)

Assumptions (first principles, no cache effects beyond the ones named):
- every kernel reads each input tensor once and writes each output once; weights and per-channel vectors are
  ignored (< 1 MB per block at C = 256); a 3×3 convolution's halo re-reads hit in cache;
- unfused = eager PyTorch on the reference module: training BatchNorm reads its input twice (statistics, then
  normalisation) and writes its output; ReLU is out of place (`nn.ReLU()` in the reference); conv reads its
  input and writes its output; the skip add reads two tensors and writes one. Backward: conv dgrad reads dy and
  writes dx, wgrad reads the saved input and dy; ReLU backward reads dr and the saved output, writes dz; BN
  backward reads (dz, u) for its reductions and again for the apply pass, writes du; autograd adds the two
  gradients of x (read 2, write 1);
- fused = the kernels of `conv_kernels` as `residual.FusedResidualFunction` chains them: a statistics pass over x,
  three prologue convs (BN-ReLU never written), the skip add in conv3's epilogue; backward as listed in
  `fused_block_stages`. The weight-gradient split partials (fp32, a few % at C = 256) are not counted.
With A = N·H·W·C·dtype_bytes (one full-width activation): forward unfused 17·A against 6·A fused (5·A, DESIGN.md's
≈336 MB, once x's statistics come from the previous block's conv3 epilogue instead of the separate pass over x the
block function makes today); backward 27·A against 17·A.
"""

from __future__ import annotations

import sys

__all__ = ["bytes_moved_table", "unfused_block_stages", "fused_block_stages", "conv_bytes", "conv_flops", "main"]


def unfused_block_stages(n: int, c: int, h: int, w: int, dtype_bytes: int) -> list[tuple[str, str, int]]:
    """(pass, stage, bytes) of the eager reference block, training step."""
    big = n * h * w * c * dtype_bytes
    mid = big // 2
    fwd = [
        ("bn1 (stats + normalise)", 3 * big), ("relu1", 2 * big), ("conv1 1×1", big + mid),
        ("bn2", 3 * mid), ("relu2", 2 * mid), ("conv2 3×3", 2 * mid),
        ("bn3", 3 * mid), ("relu3", 2 * mid), ("conv3 1×1", mid + big),
        ("skip add", 3 * big),
    ]
    bwd = [
        ("conv3 dgrad + wgrad", 2 * big + 2 * mid), ("relu3 backward", 3 * mid), ("bn3 backward", 5 * mid),
        ("conv2 dgrad + wgrad", 4 * mid), ("relu2 backward", 3 * mid), ("bn2 backward", 5 * mid),
        ("conv1 dgrad + wgrad", 2 * mid + 2 * big), ("relu1 backward", 3 * big), ("bn1 backward", 5 * big),
        ("dx = du1 + g", 3 * big),
    ]
    return [("forward", s, b) for s, b in fwd] + [("backward", s, b) for s, b in bwd]


def fused_block_stages(n: int, c: int, h: int, w: int, dtype_bytes: int) -> list[tuple[str, str, int]]:
    """(pass, kernel, bytes) of the fused block, training step."""
    big = n * h * w * c * dtype_bytes
    mid = big // 2
    fwd = [
        ("channel_stats(x)", big),
        ("conv1 1×1 [bn1 prologue, stats epilogue]", big + mid),
        ("conv2 3×3 [bn2 prologue, stats epilogue]", 2 * mid),
        ("conv3 1×1 [bn3 prologue, + x epilogue]", mid + 2 * big),
    ]
    bwd = [
        ("conv3 dgrad [relu mask, Σdz, Σdz·x̂]: g, y2 → dz3", big + 2 * mid),
        ("conv3 wgrad: y2, g", mid + big),
        ("bn3 apply: dz3, y2 → dy2", 3 * mid),
        ("conv2 dgrad: dy2, y1 → dz2", 3 * mid),
        ("conv2 wgrad: y1, dy2", 2 * mid),
        ("bn2 apply: dz2, y1 → dy1", 3 * mid),
        ("conv1 dgrad: dy1, x → dz1", mid + 2 * big),
        ("conv1 wgrad: x, dy1", big + mid),
        ("bn1 apply + skip grad: dz1, x, g → dx", 4 * big),
    ]
    return [("forward", s, b) for s, b in fwd] + [("backward", s, b) for s, b in bwd]


def bytes_moved_table(n: int, c: int, h: int, w: int, dtype_bytes: int) -> dict[str, dict[str, int]]:
    """{'forward' | 'backward' | 'total': {'unfused': bytes, 'fused': bytes}} for one C → C residual block."""
    table = {p: {"unfused": 0, "fused": 0} for p in ("forward", "backward", "total")}
    for kind, stages in (("unfused", unfused_block_stages), ("fused", fused_block_stages)):
        for pass_, _, nbytes in stages(n, c, h, w, dtype_bytes):
            table[pass_][kind] += nbytes
            table["total"][kind] += nbytes
    return table


def conv_bytes(n: int, h: int, w: int, cin: int, cout: int, ksize: int, dtype_bytes: int, residual: bool = False,
               low: bool = False) -> int:
    """DRAM bytes of one fused forward conv: input and output activations, weights, optional residual and the
    quarter-size low-resolution branch (3×3 halo re-reads assumed cached)."""
    act = n * h * w * dtype_bytes
    total = act * (cin + cout) + cin * cout * ksize * ksize * dtype_bytes
    if residual:
        total += act * cout
    if low:
        total += act * cout // 4
    return total


def conv_flops(n: int, h: int, w: int, cin: int, cout: int, ksize: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one stride-1 'same' convolution; dgrad and wgrad each cost the same."""
    return 2 * n * h * w * cin * cout * ksize * ksize


def main(argv: list[str] | None = None) -> None:
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)] or [32, 256, 64, 64, 2]
    n, c, h, w, db = args
    print(f"Residual block {c}→{c} (mid {c // 2}), N={n}, {h}×{w}, {db}-byte activations; MB = 1e6 bytes")
    for title, stages in (("unfused (eager)", unfused_block_stages), ("fused (Triton)", fused_block_stages)):
        print(f"\n{title}")
        for pass_, stage, nbytes in stages(n, c, h, w, db):
            print(f"  {pass_:<9} {stage:<52} {nbytes / 1e6:9.1f}")
    print(f"\n{'pass':<9} {'unfused MB':>11} {'fused MB':>9} {'ratio':>6}")
    for pass_, row in bytes_moved_table(n, c, h, w, db).items():
        print(f"{pass_:<9} {row['unfused'] / 1e6:11.1f} {row['fused'] / 1e6:9.1f} {row['unfused'] / row['fused']:6.2f}")


if __name__ == "__main__":
    main()
