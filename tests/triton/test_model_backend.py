"""The public model's "triton" backend against the reference network: a small stacked hourglass, one
training step (outputs, loss, every gradient, running statistics) and an eval forward, under the interpreter."""

import pytest
import torch

from fused_hourglass import HeatmapLoss, StackedHourglass, reference

from .conftest import DEVICE


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_backend_training_step_matches_reference(layout):
    torch.manual_seed(0)
    model = StackedHourglass(1, 8, 3, backend="triton").to(DEVICE)
    ref = reference.StackedHourglass(1, 8, 3).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.rand(2, 3, 16, 16, device=DEVICE)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    HeatmapLoss()(out, target).backward()
    HeatmapLoss()(expected, target).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-3, msg=name)
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5, msg=name)
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
