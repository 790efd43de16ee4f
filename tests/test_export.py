"""Export: torch.export of the fused eval model (our ops in the graph, through their fake implementations) and
`python -m fused_hourglass export --onnx` (the reference network with its BatchNorms folded), run with onnxruntime."""

import importlib.util

import pytest
import torch
from torch import nn

from fused_hourglass import StackedHourglass, reference, save_checkpoint
from fused_hourglass.cli import main
from fused_hourglass.engine.export import OPSET

from .conftest import requires_extension

CONFIG = (2, 16, 4)
FUSED_OPS = {"fused_hourglass.bn_relu_conv2d.default", "fused_hourglass.bn_relu_forward.default",
             "fused_hourglass.max_pool2x2.default", "fused_hourglass.upsample_add.default"}
_MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
requires_onnx = pytest.mark.skipif(bool(_MISSING), reason=f"optional test dependencies missing: {', '.join(_MISSING)} "
                                   "(pip install 'fused_hourglass[onnx]')")


def _trained_looking(model: nn.Module) -> nn.Module:
    """BatchNorm parameters and running statistics away from their defaults, so that folding them matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@requires_extension
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_export_of_the_fused_eval_model_keeps_our_ops(grad, tmp_path):
    model = _trained_looking(StackedHourglass(*CONFIG, backend="fused")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert FUSED_OPS <= targets, FUSED_OPS - targets
    assert not {"aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"} & targets
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.module()(x), want, atol=1e-5, rtol=1e-5)


@requires_onnx
@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime(tmp_path, capsys):
    import onnx
    import onnxruntime

    model = _trained_looking(StackedHourglass(*CONFIG, backend="reference")).eval()
    checkpoint, out = tmp_path / "model.pt", tmp_path / "model.onnx"
    save_checkpoint(checkpoint, model, train_config={"res": 64})
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ONNX opset {OPSET}" in printed and "[batch, 3, 64, 64]" in printed

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model.onnx")] == ["model.onnx"]  # one file
    graph = onnx.load(str(out))
    assert {(o.domain, o.version) for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {("", OPSET)}
    residuals = sum(isinstance(m, reference.Residual) for m in model.modules())
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    kinds = [node.op_type for node in graph.graph.node]
    assert kinds.count("BatchNormalization") == residuals  # only each Residual's bn1; the rest are folded
    assert f"{batchnorms - residuals} of {batchnorms} BatchNorms folded" in printed

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = torch.rand(3, 3, 64, 64)  # another batch size than the export's: the batch axis is dynamic
    (heatmaps,) = session.run(None, {"images": x.numpy()})
    exact = model.double()(x.double()).detach()
    with torch.no_grad():
        unfolded = model.float()(x)
    err = float((torch.from_numpy(heatmaps).double() - exact).abs().max())
    err_fp32 = float((unfolded.double() - exact).abs().max())
    assert heatmaps.shape == (3, CONFIG[0], CONFIG[2], 16, 16)
    assert err <= max(2 * err_fp32, 1e-5 * float(exact.abs().max())), (err, err_fp32)


def _run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_export_errors_follow_the_cli_style(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    code, err = _run_cli(["export", "--checkpoint", str(missing), "--onnx", str(tmp_path / "a.onnx")], capsys)
    assert code == 2 and err.startswith("error: ") and "nope.pt" in err and "does not exist" in err

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    code, err = _run_cli(["export", "--checkpoint", str(text), "--onnx", str(tmp_path / "a.onnx")], capsys)
    assert code == 2 and err.startswith("error: ") and "text file" in err

    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, StackedHourglass(1, 16, 4, backend="reference"))
    code, err = _run_cli(["export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / "no" / "a.onnx")],
                         capsys)
    assert code == 2 and err.startswith("error: export: --onnx") and "does not exist" in err
    code, err = _run_cli(["export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / "a.onnx"),
                          "--res", "100"], capsys)
    assert code == 2 and err == "error: export: --res must be a positive multiple of 64, got 100\n"
    assert not (tmp_path / "a.onnx").exists()
