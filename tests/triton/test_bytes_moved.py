"""The analytic bytes-moved model (`python -m fused_hourglass.triton.bytes_moved`): its layer list against the real
network's modules and shapes, the block formulas at known points, and the whole-model report."""

from __future__ import annotations

import re

import torch

from fused_hourglass import reference
from fused_hourglass.triton import bytes_moved as bm


def _recorded_layers(model: reference.StackedHourglass, side: int) -> dict[str, tuple]:
    """{module path: shape facts} of every Residual, Pool and Conv a forward of the reference model runs."""
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            if isinstance(module, reference.Residual):
                seen[name] = ("residual", x.shape[1], output.shape[1], x.shape[2], x.shape[3])
            elif isinstance(module, reference.Pool):
                seen[name] = ("pool", x.shape[1], x.shape[2], x.shape[3])
            else:
                seen[name] = ("conv", x.shape[1], output.shape[1], module.conv.kernel_size[0], output.shape[2],
                              module.bn is not None and module.relu is not None)
        return record

    for name, module in model.named_modules():
        if isinstance(module, (reference.Residual, reference.Pool)) or (
                isinstance(module, reference.Conv) and re.fullmatch(r"pre\.0|features\.\d+\.1|outs\.\d+", name)):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, side, side))
    return seen


def _listed(layers: list[dict]) -> dict[str, tuple]:
    out = {}
    for layer in layers:
        if layer["kind"] == "residual":
            out[layer["name"]] = ("residual", layer["cin"], layer["cout"], layer["h"], layer["w"])
        elif layer["kind"] == "pool":
            out[layer["name"]] = ("pool", layer["c"], layer["h"], layer["w"])
        elif layer["kind"] == "conv":
            out[layer["name"]] = ("conv", layer["cin"], layer["cout"], layer["k"], layer["h"], layer["bn_relu"])
    return out


def test_model_layers_are_the_network_s():
    """Every Residual, Pool and stem / feature / head Conv the reference runs, with its channels and sides, and
    nothing else; the merge follows exactly each hourglass's up1, and the counts are the design's."""
    model = reference.StackedHourglass(2, 12, 5, increase=4)
    layers = bm.model_layers(64, 2, 12, 5, increase=4)
    assert _listed(layers) == _recorded_layers(model, 64)
    hourglasses = [name for name, m in model.named_modules() if isinstance(m, reference.Hourglass)]
    assert sorted(layer["name"] for layer in layers if layer.get("low")) == sorted(f"{h}.up1" for h in hourglasses)
    kinds = [layer["kind"] for layer in bm.model_layers(256)]
    assert kinds.count("residual") == 3 + 8 * 14 and kinds.count("pool") == 1 + 8 * 4
    assert kinds.count("merge") == 7 and kinds.count("stack") == 1


def test_block_formulas():
    """A C → C block moves 17·A / 6·A forward and 27·A / 17·A backward (A = one full-width activation); 5·A fused
    with bn1's statistics from the previous epilogue; a block with a skip conv and the merge adds exactly the skip
    conv's and the merge's tensors."""
    n, c, side, db = 32, 256, 64, 2
    a = n * c * side * side * db
    table = bm.bytes_moved_table(n, c, side, side, db)
    assert (table["forward"]["unfused"], table["forward"]["fused"]) == (17 * a, 6 * a)
    assert (table["backward"]["unfused"], table["backward"]["fused"]) == (27 * a, 17 * a)
    assert bm.bytes_moved_table(n, c, side, side, db, x_stats=True)["forward"]["fused"] == 5 * a == 335_544_320

    def total(stages, pass_):
        return sum(b for p, _, b in stages if p == pass_)

    a_in, a_out = a // 2, a  # Residual(128, 256)
    plain = bm.fused_block_stages(n, c, side, side, db)
    skip = bm.fused_block_stages(n, c // 2, side, side, db, cout=c, low=True)
    # Input half as wide: stats, conv1 and bn1 read a_in instead of a; plus the skip conv and the low branch.
    assert total(skip, "forward") == total(plain, "forward") - 2 * (a - a_in) + (a_in + a_out) + a_out // 4
    assert total(skip, "backward") == total(plain, "backward") - 7 * (a - a_in) + 2 * (a_in + a_out) + \
        a_out + a_out // 4
    eager = bm.unfused_block_stages(n, c, side, side, db, low=True)
    assert total(eager, "forward") == 17 * a + (a // 4 + a) + 3 * a
    assert total(eager, "backward") == 27 * a + a + a // 4


def test_whole_model_report(capsys):
    """`main` prints the block, then per component and for the whole model forward, backward and total bytes of
    both implementations, equal to `model_table`; fused moves less in every pass of the model."""
    table = bm.model_table(32, 256)
    model = {p: table[("model", p)] for p in ("forward", "backward", "total")}
    assert all(0 < row["fused"] < row["unfused"] for row in model.values())
    assert model["total"]["fused"] == model["forward"]["fused"] + model["backward"]["fused"]
    residuals = [layer for layer in bm.model_layers(256) if layer["kind"] == "residual"]
    fused_blocks = sum(b for layer in residuals for p, _, b in bm.fused_block_stages(
        32, layer["cin"], layer["h"], layer["w"], 2, cout=layer["cout"], low=layer["low"]) if p == "forward")
    assert fused_blocks < model["forward"]["fused"]
    bm.main([])
    printed = {tuple(f[:2]): (float(f[2]), float(f[3])) for line in capsys.readouterr().out.splitlines()
               if len(f := line.split()) == 5 and (f[0], f[1]) in table}
    assert set(printed) == set(table)
    for key, row in table.items():
        assert abs(printed[key][0] - row["unfused"] / 1e9) <= 0.006, key
        assert abs(printed[key][1] - row["fused"] / 1e9) <= 0.006, key


def test_chained_blocks_are_those_fed_by_a_block():
    """bn1's statistics come from the previous epilogue exactly for the blocks whose input left another block or the
    stack's merge (merge_features' epilogue) unchanged: all but the stem's first two (after the stem conv, after the
    pool) and each hourglass's low1 (after its pool). Their forward is 1·A_in cheaper."""
    layers = bm.model_layers(256, nstack=3)
    unchained = sorted(layer["name"] for layer in layers if layer["kind"] == "residual" and not layer["chained"])
    low1 = [f"hgs.{i}.0" + ".low2" * d + ".low1" for i in range(3) for d in range(4)]
    assert unchained == sorted(["pre.1", "pre.3", *low1])
    chained = bm.model_table(32, 256, nstack=3)[("model", "forward")]["fused"]
    per_block = [layer for layer in layers if layer.get("chained")]
    saved = sum(32 * layer["cin"] * layer["h"] * layer["w"] * 2 for layer in per_block)
    unchained_total = sum(b for layer in layers for p, _, b in bm._layer_stages(layer, 32, 2, True, False)
                          if p == "forward")
    assert chained == unchained_total - saved


def test_fused_head_formulas():
    """On the triton backend a stack's head (feature Conv, outs, merge) moves 8·A + 2·P forward (A, P: one activation
    of C and of oup_dim channels; the feature tensor r is never written) and 16·A + 9·P backward, the last stack's
    3·A + P and 10·A + 2·P; eager moves 17·A + 2·P forward for a merged stack."""
    n, c, p_dim, side = 32, 256, 16, 256
    a, p = (n * ch * (side // 4) ** 2 * 2 for ch in (c, p_dim))
    rows = bm.model_stages(n, side, nstack=2, inp_dim=c, oup_dim=p_dim)

    def total(kind, stack, pass_):
        names = (f"features.{stack}.1:", f"outs.{stack}:", f"merge {stack}:", f"feature {stack}:", f"preds {stack}:")
        return sum(b for _, ps, stage, b in rows[kind] if ps == pass_ and stage.startswith(names))

    assert (total("fused", 0, "forward"), total("fused", 0, "backward")) == (8 * a + 2 * p, 16 * a + 9 * p)
    assert (total("fused", 1, "forward"), total("fused", 1, "backward")) == (3 * a + p, 10 * a + 2 * p)
    assert total("unfused", 0, "forward") == 17 * a + 2 * p
