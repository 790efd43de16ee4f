"""Analytic DRAM traffic of a residual block and of the whole model, fused vs unfused (DESIGN.md §2).

    python -m fused_hourglass.triton.bytes_moved [N C H W dtype_bytes] [--nstack 8] [--oup-dim 16] [--increase 0]
                                                 [--block-only]

(default 32 256 64 64 2: a 256-channel block at the top hourglass level, batch 32, bf16). The block table comes
first, then StackedHourglass(nstack, C, oup_dim, increase=increase) on N images of side 4·H (256 px by default),
one training step, per component.

Assumptions (first principles, no cache effects beyond the ones named):
- every kernel reads each input tensor once and writes each output once; weights and per-channel vectors are
  ignored (< 1 MB per block at C = 256); a 3×3 convolution's halo re-reads hit in cache;
- unfused = eager PyTorch on the reference module: training BatchNorm reads its input twice (statistics, then
  normalisation) and writes its output; ReLU is out of place (`nn.ReLU()` in the reference); conv reads its
  input and writes its output; an add reads two tensors and writes one; nearest upsampling reads the low branch
  and writes the full one; max pooling writes int64 indices beside its output. Backward: conv dgrad reads dy and
  writes dx (none into the images), wgrad reads the saved input and dy; ReLU backward reads dr and the saved
  output, writes dz; BN backward reads (dz, u) for its reductions and again for the apply pass, writes du; the
  upsample's backward reads g and writes the 2×2 sums; max-pool backward reads g and the indices, writes dx; an
  add's backward moves nothing, but autograd sums the gradients of a tensor used twice (read 2, write 1);
- fused = what the "triton" backend runs (`model.py`): the kernels of `conv_kernels` as
  `residual.FusedResidualFunction` chains them (a statistics pass over x unless x came straight from another
  block, whose conv3 epilogue gave them; three prologue convs, BN-ReLU never written, the skip add and the
  hourglass merge `+ up2x(low3)` in conv3's epilogue; backward as in `fused_block_stages`), `max_pool2x2` (no
  indices: its backward re-reads the input), and `bn_relu` after the stem and feature convolutions (statistics
  and apply: read 2, write 1; backward read 2, then read 2 and write 1) after the stem convolution; each stack's
  head as `head.FusedHeadFunction` runs it: the feature convolution with a statistics epilogue, its BN-ReLU the
  prologue of outs and merge_features (r never written), the merge additions in the epilogues of merge_preds (+ x)
  and merge_features (+ that, with statistics for the next hourglass's up1); backward one dgrad and one wgrad over
  outs' and merge_features' concatenated output gradients (the concatenation written once), the BN apply pass, the
  feature convolution's dgrad and wgrad, merge_preds' dgrad and wgrad.
  The stem convolution and the output stack are eager in both. The weight-gradient split partials (fp32, a few %
  at C = 256) are not counted.
With A = N·H·W·C·dtype_bytes (one full-width activation): a C → C block's forward is 17·A unfused against 6·A fused
(5·A, DESIGN.md's ≈336 MB, when x's statistics come from the previous block's conv3 epilogue: `x_stats=True`);
backward 27·A against 17·A.
"""

from __future__ import annotations

import argparse

__all__ = ["bytes_moved_table", "unfused_block_stages", "fused_block_stages", "conv_bytes", "conv_flops",
           "model_layers", "model_stages", "model_table", "main"]

Stage = tuple[str, str, int]  # (pass, stage, bytes)


def unfused_block_stages(n: int, c: int, h: int, w: int, dtype_bytes: int, *, cout: int | None = None,
                         low: bool = False) -> list[Stage]:
    """(pass, stage, bytes) of the eager reference block `Residual(c, cout)` (cout defaults to c), training step;
    with `low`, also the hourglass merge `+ up2x(low)` that follows it."""
    cout = c if cout is None else cout
    mid = cout // 2
    a_in, a_mid, a_out = (n * h * w * ch * dtype_bytes for ch in (c, mid, cout))
    fwd = [
        ("bn1 (stats + normalise)", 3 * a_in), ("relu1", 2 * a_in), ("conv1 1×1", a_in + a_mid),
        ("bn2", 3 * a_mid), ("relu2", 2 * a_mid), ("conv2 3×3", 2 * a_mid),
        ("bn3", 3 * a_mid), ("relu3", 2 * a_mid), ("conv3 1×1", a_mid + a_out),
    ]
    bwd = [
        ("conv3 dgrad + wgrad", 2 * a_out + 2 * a_mid), ("relu3 backward", 3 * a_mid), ("bn3 backward", 5 * a_mid),
        ("conv2 dgrad + wgrad", 4 * a_mid), ("relu2 backward", 3 * a_mid), ("bn2 backward", 5 * a_mid),
        ("conv1 dgrad + wgrad", 2 * a_mid + 2 * a_in), ("relu1 backward", 3 * a_in), ("bn1 backward", 5 * a_in),
    ]
    if c != cout:
        fwd.append(("skip conv 1×1", a_in + a_out))
        bwd.append(("skip conv dgrad + wgrad", 2 * a_in + 2 * a_out))
    fwd.append(("skip add", 3 * a_out))
    bwd.append(("dx = du1 + " + ("g" if c == cout else "dx_skip"), 3 * a_in))
    if low:
        fwd += [("upsample low 2×", a_out // 4 + a_out), ("merge add", 3 * a_out)]
        bwd.append(("upsample backward (2×2 sums of g)", a_out + a_out // 4))
    return [("forward", s, b) for s, b in fwd] + [("backward", s, b) for s, b in bwd]


def fused_block_stages(n: int, c: int, h: int, w: int, dtype_bytes: int, *, cout: int | None = None,
                       low: bool = False, x_stats: bool = False) -> list[Stage]:
    """(pass, kernel, bytes) of the fused block `Residual(c, cout)` (cout defaults to c), training step; with `low`
    the hourglass merge in conv3's epilogue; with `x_stats` bn1's statistics come with x (the previous block's
    conv3 epilogue) instead of a pass over it."""
    cout = c if cout is None else cout
    mid = cout // 2
    a_in, a_mid, a_out = (n * h * w * ch * dtype_bytes for ch in (c, mid, cout))
    a_low = a_out // 4 if low else 0
    skip = c != cout
    fwd = [] if x_stats else [("channel_stats(x)", a_in)]
    fwd += [
        ("conv1 1×1 [bn1 prologue, stats epilogue]", a_in + a_mid),
        ("conv2 3×3 [bn2 prologue, stats epilogue]", 2 * a_mid),
    ]
    if skip:
        fwd.append(("skip conv 1×1", a_in + a_out))
    fwd.append(("conv3 1×1 [bn3 prologue, + skip" + (" + up2x(low)" if low else "") + " epilogue]",
                a_mid + 2 * a_out + a_low))
    bwd = [
        ("conv3 dgrad [relu mask, Σdz, Σdz·x̂]: g, y2 → dz3", a_out + 2 * a_mid),
        ("conv3 wgrad: y2, g", a_mid + a_out),
        ("bn3 apply: dz3, y2 → dy2", 3 * a_mid),
        ("conv2 dgrad: dy2, y1 → dz2", 3 * a_mid),
        ("conv2 wgrad: y1, dy2", 2 * a_mid),
        ("bn2 apply: dz2, y1 → dy1", 3 * a_mid),
    ]
    if skip:
        bwd += [("skip dgrad: g → dx_skip", a_out + a_in), ("skip wgrad: x, g", a_in + a_out)]
    bwd += [
        ("conv1 dgrad: dy1, x → dz1", a_mid + 2 * a_in),
        ("conv1 wgrad: x, dy1", a_in + a_mid),
        ("bn1 apply + skip grad: dz1, x, " + ("dx_skip" if skip else "g") + " → dx", 4 * a_in),
    ]
    if low:
        bwd.append(("sum_pool2x2(g) → dlow", a_out + a_low))
    return [("forward", s, b) for s, b in fwd] + [("backward", s, b) for s, b in bwd]


def _table(stages_by_kind: dict[str, list[Stage]]) -> dict[str, dict[str, int]]:
    table = {p: {kind: 0 for kind in stages_by_kind} for p in ("forward", "backward", "total")}
    for kind, stages in stages_by_kind.items():
        for pass_, _, nbytes in stages:
            table[pass_][kind] += nbytes
            table["total"][kind] += nbytes
    return table


def bytes_moved_table(n: int, c: int, h: int, w: int, dtype_bytes: int, *, x_stats: bool = False
                      ) -> dict[str, dict[str, int]]:
    """{'forward' | 'backward' | 'total': {'unfused': bytes, 'fused': bytes}} for one C → C residual block."""
    return _table({"unfused": unfused_block_stages(n, c, h, w, dtype_bytes),
                   "fused": fused_block_stages(n, c, h, w, dtype_bytes, x_stats=x_stats)})


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


# ----------------------------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------------------------


def model_layers(side: int, nstack: int = 8, inp_dim: int = 256, oup_dim: int = 16, increase: int = 0
                 ) -> list[dict]:
    """The layers of StackedHourglass(nstack, inp_dim, oup_dim, increase=increase) on images of `side` pixels, in
    forward order, each a dict with `name` (the module path, or the tensor a step acts on), `kind` and its shape:
    - residual: cin, cout, h, w; low (the hourglass merge follows); chained (x left the previous residual block or
      the stack's merge unchanged, so the triton backend takes bn1's statistics from that epilogue);
    - conv: cin, cout, k, stride, h and w of the output, bn_relu; head: "feature" (a stack's feature Conv) or
      "outs" (its prediction), with merge (the merge follows); pool: c, h and w of the input;
    - merge: the stack's `x + merge_preds(p) + merge_features(f)`, c, p, h, w;
    - fanout: a tensor used twice, whose gradients autograd sums, c, h, w, and eager_only where the triton backend
      never writes that tensor; stack: the output, nstack, c, h, w."""
    layers: list[dict] = []

    def residual(name, cin, cout, h, low=False, chained=True):
        layers.append({"name": name, "kind": "residual", "cin": cin, "cout": cout, "h": h, "w": h, "low": low,
                       "chained": chained})

    def hourglass(name, depth, f, h, inc, chained):
        nf = f + inc
        layers.append({"name": f"{name} (input)", "kind": "fanout", "c": f, "h": h, "w": h})  # up1 and pool1
        layers.append({"name": f"{name}.pool1", "kind": "pool", "c": f, "h": h, "w": h})
        residual(f"{name}.low1", f, nf, h // 2, chained=False)
        if depth > 1:
            hourglass(f"{name}.low2", depth - 1, nf, h // 2, 0, chained=True)
        else:
            residual(f"{name}.low2", nf, nf, h // 2)
        residual(f"{name}.low3", nf, f, h // 2)
        residual(f"{name}.up1", f, f, h, low=True, chained=chained)  # the low branch runs first (model.Hourglass)

    s2, s4 = side // 2, side // 4
    layers.append({"name": "pre.0", "kind": "conv", "cin": 3, "cout": 64, "k": 7, "stride": 2, "h": s2, "w": s2,
                   "bn_relu": True})
    residual("pre.1", 64, 128, s2, chained=False)
    layers.append({"name": "pre.2", "kind": "pool", "c": 128, "h": s2, "w": s2})
    residual("pre.3", 128, 128, s4, chained=False)
    residual("pre.4", 128, inp_dim, s4)
    for i in range(nstack):
        if i < nstack - 1:
            layers.append({"name": f"x (stack {i} input)", "kind": "fanout", "c": inp_dim, "h": s4, "w": s4})
        hourglass(f"hgs.{i}.0", 4, inp_dim, s4, increase, chained=True)  # later stacks: x from the merge's epilogue
        residual(f"features.{i}.0", inp_dim, inp_dim, s4)
        merge = i < nstack - 1
        layers.append({"name": f"features.{i}.1", "kind": "conv", "cin": inp_dim, "cout": inp_dim, "k": 1,
                       "stride": 1, "h": s4, "w": s4, "bn_relu": True, "head": "feature", "merge": merge})
        layers.append({"name": f"outs.{i}", "kind": "conv", "cin": inp_dim, "cout": oup_dim, "k": 1, "stride": 1,
                       "h": s4, "w": s4, "bn_relu": False, "head": "outs", "merge": merge})
        if merge:
            layers += [{"name": f"feature {i}", "kind": "fanout", "c": inp_dim, "h": s4, "w": s4, "eager_only": True},
                       {"name": f"preds {i}", "kind": "fanout", "c": oup_dim, "h": s4, "w": s4},
                       {"name": f"merge {i}", "kind": "merge", "c": inp_dim, "p": oup_dim, "h": s4, "w": s4}]
    layers.append({"name": "stack", "kind": "stack", "nstack": nstack, "c": oup_dim, "h": s4, "w": s4})
    return layers


def _layer_stages(layer: dict, n: int, db: int, fused: bool, x_stats: bool) -> list[Stage]:
    """(pass, stage, bytes) of one `model_layers` entry, eager (fused=False) or on the triton backend."""
    kind = layer["kind"]

    def act(c, h=None, w=None):
        return n * c * (layer["h"] if h is None else h) * (layer["w"] if w is None else w) * db

    if kind == "residual":
        args = (n, layer["cin"], layer["h"], layer["w"], db)
        if fused:
            return fused_block_stages(*args, cout=layer["cout"], low=layer["low"], x_stats=x_stats)
        return unfused_block_stages(*args, cout=layer["cout"], low=layer["low"])
    if kind == "conv" and fused and "head" in layer:
        return _fused_head_stages(layer, n, db)
    if kind == "conv":
        a_in = act(layer["cin"], layer["h"] * layer["stride"], layer["w"] * layer["stride"])
        y = act(layer["cout"])
        dgrad = [] if layer["cin"] == 3 else [("conv dgrad", y + a_in)]  # none into the images
        out = [("forward", "conv", a_in + y), ("backward", "conv wgrad", a_in + y)] + \
              [("backward", s, b) for s, b in dgrad]
        if layer["bn_relu"]:
            out += [("forward", "bn_relu", 3 * y), ("backward", "bn_relu backward", 5 * y)] if fused else \
                   [("forward", "bn", 3 * y), ("forward", "relu", 2 * y), ("backward", "relu backward", 3 * y),
                    ("backward", "bn backward", 5 * y)]
        return out
    if kind == "pool":
        a = act(layer["c"])
        if fused:  # max_pool2x2: no indices; the backward recomputes the argmax from the input
            return [("forward", "max_pool2x2", a + a // 4), ("backward", "max_pool2x2 backward", a // 4 + 2 * a)]
        idx = a // 4 // db * 8
        return [("forward", "max_pool2d + int64 indices", a + a // 4 + idx),
                ("backward", "max_pool2d backward", a // 4 + idx + a)]
    if kind == "fanout":
        return [] if fused and layer.get("eager_only") else [("backward", "gradient sum", 3 * act(layer["c"]))]
    if kind == "merge":
        a, p = act(layer["c"]), act(layer["p"])
        if fused:
            return [("forward", "merge_preds 1×1 [+ x epilogue]", p + 2 * a),
                    ("forward", "merge_features 1×1 [bn prologue, + merge_preds epilogue, stats]", 3 * a),
                    ("backward", "merge_preds dgrad: g → dpreds", a + p),
                    ("backward", "merge_preds wgrad: preds, g", p + a),
                    ("backward", "concatenate (dpreds, g) for outs + merge_features", 2 * (p + a))]
        return [("forward", "merge_features conv", 2 * a), ("forward", "merge_preds conv", p + a),
                ("forward", "two adds", 6 * a), ("backward", "merge_features dgrad + wgrad", 4 * a),
                ("backward", "merge_preds dgrad + wgrad", 2 * a + 2 * p)]
    if kind == "stack":
        return [("forward", "torch.stack", 2 * layer["nstack"] * act(layer["c"]))]
    raise ValueError(f"unknown layer kind {kind!r}")


def _fused_head_stages(layer: dict, n: int, db: int) -> list[Stage]:
    """A stack's feature Conv or outs on the triton backend (`head.FusedHeadFunction`; the merge's own stages are the
    merge layer's): BN-ReLU never written; its backward reductions in the dgrad over the concatenated gradients."""
    a = n * layer["cin"] * layer["h"] * layer["w"] * db
    if layer["head"] == "feature":
        return [("forward", "conv 1×1 [stats epilogue]", 2 * a), ("backward", "bn apply: dz, y → du", 3 * a),
                ("backward", "conv dgrad: du → dh", 2 * a), ("backward", "conv wgrad: h, du", 2 * a)]
    dy = n * (layer["cout"] + (layer["cin"] if layer["merge"] else 0)) * layer["h"] * layer["w"] * db
    heads = "outs + merge_features" if layer["merge"] else "outs"
    return [("forward", "outs 1×1 [bn prologue]", a + n * layer["cout"] * layer["h"] * layer["w"] * db),
            ("backward", f"{heads} dgrad [relu mask, Σdz, Σdz·x̂]: dy, y → dz", dy + 2 * a),
            ("backward", f"{heads} wgrad: y, dy", a + dy)]


def model_stages(n: int, side: int, nstack: int = 8, inp_dim: int = 256, oup_dim: int = 16, increase: int = 0,
                 dtype_bytes: int = 2) -> dict[str, list[tuple[str, str, str, int]]]:
    """{'unfused' | 'fused': [(component, pass, layer: stage, bytes)]} of one training step of the whole model on
    n images of `side` pixels; components: stem (`pre`), hourglasses, features, heads (outs, merges, the stack)."""
    layers = model_layers(side, nstack, inp_dim, oup_dim, increase)
    out = {}
    for kind in ("unfused", "fused"):
        rows = []
        for layer in layers:
            name = layer["name"]
            component = ("stem" if name.startswith("pre.") else "hourglasses" if name.startswith("hgs.") else
                         "features" if name.startswith("features.") else "heads")
            for pass_, stage, nbytes in _layer_stages(layer, n, dtype_bytes, kind == "fused",
                                                      layer.get("chained", False)):
                rows.append((component, pass_, f"{name}: {stage}", nbytes))
        out[kind] = rows
    return out


def model_table(n: int, side: int, **model: int) -> dict[tuple[str, str], dict[str, int]]:
    """{(component | 'model', 'forward' | 'backward' | 'total'): {'unfused': bytes, 'fused': bytes}}."""
    table: dict[tuple[str, str], dict[str, int]] = {}
    for kind, rows in model_stages(n, side, **model).items():
        for component, pass_, _, nbytes in rows:
            for key in ((component, pass_), (component, "total"), ("model", pass_), ("model", "total")):
                table.setdefault(key, {"unfused": 0, "fused": 0})[kind] += nbytes
    return table


def _print_block(n: int, c: int, h: int, w: int, db: int) -> None:
    print(f"Residual block {c}→{c} (mid {c // 2}), N={n}, {h}×{w}, {db}-byte activations; MB = 1e6 bytes")
    for title, stages in (("unfused (eager)", unfused_block_stages(n, c, h, w, db)),
                          ("fused (Triton)", fused_block_stages(n, c, h, w, db))):
        print(f"\n{title}")
        for pass_, stage, nbytes in stages:
            print(f"  {pass_:<9} {stage:<52} {nbytes / 1e6:9.1f}")
    print(f"\n{'pass':<9} {'unfused MB':>11} {'fused MB':>9} {'ratio':>6}")
    for pass_, row in bytes_moved_table(n, c, h, w, db).items():
        print(f"{pass_:<9} {row['unfused'] / 1e6:11.1f} {row['fused'] / 1e6:9.1f} {row['unfused'] / row['fused']:6.2f}")
    saved = sum(b for _, s, b in fused_block_stages(n, c, h, w, db) if s == "channel_stats(x)")
    print(f"(bn1's statistics from the previous block's conv3 epilogue: forward "
          f"{bytes_moved_table(n, c, h, w, db, x_stats=True)['forward']['fused'] / 1e6:.1f} MB, "
          f"{saved / 1e6:.1f} MB less)")


def _print_model(n: int, side: int, db: int, **model: int) -> None:
    cfg = ", ".join(f"{k}={v}" for k, v in model.items())
    print(f"\nStackedHourglass({cfg}), {n} images of {side}×{side} px, {db}-byte activations, one training step; "
          f"fused = the triton backend; GB = 1e9 bytes")
    print(f"{'component':<12} {'pass':<9} {'unfused GB':>11} {'fused GB':>9} {'ratio':>6}")
    order = {name: i for i, name in enumerate(("stem", "hourglasses", "features", "heads", "model",
                                               "forward", "backward", "total"))}
    for (component, pass_), row in sorted(model_table(n, side, dtype_bytes=db, **model).items(),
                                          key=lambda kv: (order[kv[0][0]], order[kv[0][1]])):
        print(f"{component:<12} {pass_:<9} {row['unfused'] / 1e9:11.2f} {row['fused'] / 1e9:9.2f} "
              f"{row['unfused'] / row['fused']:6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_hourglass.triton.bytes_moved",
                                     description="Analytic bytes moved, fused against unfused.")
    parser.add_argument("shape", type=int, nargs="*", metavar="N C H W dtype_bytes",
                        help="the block (default 32 256 64 64 2); the model takes N, C as inp_dim and images of 4·H")
    parser.add_argument("--nstack", type=int, default=8)
    parser.add_argument("--oup-dim", type=int, default=16)
    parser.add_argument("--increase", type=int, default=0)
    parser.add_argument("--block-only", action="store_true", help="the residual block alone")
    args = parser.parse_args(argv)
    shape = args.shape or [32, 256, 64, 64, 2]
    if len(shape) != 5:
        parser.error(f"give all five of N C H W dtype_bytes, got {shape}")
    n, c, h, w, db = shape
    _print_block(n, c, h, w, db)
    if args.block_only:
        return
    if h != w or h % 16:
        print(f"\n(no model table: the model's top level is square with a side that is a multiple of 16, got {h}×{w})")
        return
    _print_model(n, 4 * h, db, nstack=args.nstack, inp_dim=c, oup_dim=args.oup_dim, increase=args.increase)


if __name__ == "__main__":
    main()
