"""Memory layout of the fused backend: channels_last inside whatever the input's layout (one conversion at the
stem), the output and the input's gradient in the layout the reference gives for the same input."""

import pytest
import torch

from fused_hourglass import StackedHourglass, reference

from .conftest import requires_extension

pytestmark = requires_extension


def _inputs(layout):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), "NCHW"
    if layout == "nhwc":  # the port's convention: a contiguous [B, H, W, 3] tensor
        return x.permute(0, 2, 3, 1).contiguous(), "NHWC"
    if layout == "strided":  # neither layout: every other column of a wider batch
        return torch.randn(2, 3, 64, 128, dtype=torch.float64)[..., ::2], "NCHW"
    return x, "NCHW"


def _block_inputs(model):
    """The memory formats the first Residual of the stem sees, recorded by a forward pre-hook."""
    seen = []
    model.pre[1].register_forward_pre_hook(lambda module, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    return seen


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nhwc", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_runs_channels_last_and_returns_the_reference_layout(layout, training):
    x, input_format = _inputs(layout)
    fused = StackedHourglass(2, 16, 4, backend="fused", input_format=input_format).double().train(training)
    ref = reference.StackedHourglass(2, 16, 4, input_format=input_format).double().train(training)
    ref.load_state_dict(fused.state_dict())
    seen_fused, seen_ref = _block_inputs(fused), _block_inputs(ref)
    xf, xr = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x).requires_grad_() for _ in range(2))
    out, want = fused(xf), ref(xr)
    assert seen_fused == [True]  # channels_last inside, whatever came in
    assert seen_ref == [layout in ("channels_last", "nhwc")]  # the reference keeps the input's layout
    assert out.stride() == want.stride()
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    assert xf.grad.stride() == xr.grad.stride()
    assert layout == "strided" or xf.grad.stride() == x.stride()  # autograd makes a non-dense leaf's dense
    # The input's gradient sums cancelling terms through every training-mode BatchNorm: float64 still leaves 1e-9.
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-8 * xr.grad.abs().max().item(), rtol=1e-6)


def test_reference_backend_of_the_public_model_keeps_the_input_layout():
    """backend="reference" is the port, layout included: no conversion at the stem."""
    model = StackedHourglass(1, 16, 4, backend="reference")
    seen = _block_inputs(model)
    model(torch.randn(2, 3, 64, 64))
    assert seen == [False]
