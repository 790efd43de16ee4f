"""The Triton backend under `torch.autocast` (bfloat16; float16 too on CUDA), on the interpreter when no GPU is
present: an hourglass of depth 2 (the merge folded into up1's last convolution, the recursion) in training and in
eval against the reference under the same autocast, judged against float64 as tests/test_autocast.py judges the
whole model. Its input is bfloat16, as the stem hands it to every block under autocast."""

import copy

import pytest
import torch

from fused_hourglass import model as fh_model
from fused_hourglass import reference

from ..test_autocast import MODEL_TOLERANCE, _judge
from .conftest import DEVICE

DTYPES = [torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])


def _run(module, x, grad, dtype):
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = module(x)
    out.backward(grad.to(out.dtype))
    return out, x.grad, {n: p.grad for n, p in module.named_parameters()}, dict(module.named_buffers())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [
    # Measured on the interpreter: the input gradient is 25 % off float64 under autocast (the reference 2.2 %;
    # 8.8 % against 5.2 % for a .to(bfloat16) hourglass without autocast), and most parameter gradients 10-50x the
    # reference's error; eval is within the reference's. Not found yet: strict, so that the fix shows.
    pytest.param(True, id="train", marks=pytest.mark.xfail(
        strict=True, reason="Triton training backward under autocast: errors 10-50x the reference's")),
    pytest.param(False, id="eval"),
])
def test_triton_hourglass_under_autocast(dtype, training):
    torch.manual_seed(0)
    hg = fh_model.Hourglass(2, 6).to(DEVICE)
    ref = reference.Hourglass(2, 6).to(DEVICE)
    ref.load_state_dict(hg.state_dict())
    truth_model = copy.deepcopy(ref).double()
    for m in hg.modules():
        if isinstance(m, fh_model._MODAL):
            m.mode = "triton"
    for m in (hg, ref, truth_model):
        m.train(training)
    x = torch.randn(2, 6, 8, 8, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 6, 8, 8, device=DEVICE)
    f_out, f_dx, f_grads, f_bufs = _run(hg, x, grad, dtype)
    r_out, r_dx, r_grads, r_bufs = _run(ref, x, grad, dtype)
    t_out, t_dx, t_grads, t_bufs = _run(truth_model, x.double(), grad.double(), None)
    assert f_out.dtype == r_out.dtype == dtype and f_dx.dtype == r_dx.dtype == dtype
    factor, floor = MODEL_TOLERANCE[dtype]
    _judge("output", f_out, r_out, t_out, factor, floor, None)
    _judge("input gradient", f_dx, r_dx, t_dx, factor, floor, None)
    errors = []
    for name, truth in t_grads.items():
        if truth is None:
            assert f_grads[name] is None, name
            continue
        assert f_grads[name].dtype == r_grads[name].dtype == torch.float32, name
        module, _, kind = name.rpartition(".")
        if training and kind == "bias" and module.endswith((".conv1.conv", ".conv2.conv")):
            continue  # exactly zero before a training-mode BatchNorm; tests/test_autocast.py bounds its noise
        _judge(name, f_grads[name], r_grads[name], truth, factor, floor, errors)
    assert sum(e for e, _ in errors) <= 2 * sum(e for _, e in errors)
    for name, truth in t_bufs.items():
        assert f_bufs[name].dtype == r_bufs[name].dtype, name
        if truth.is_floating_point():
            _judge(name, f_bufs[name], r_bufs[name], truth, factor, floor, None)
        else:
            assert torch.equal(f_bufs[name], r_bufs[name]), name
