"""The public model's "triton" routing against the reference: an hourglass (depth 2, so both the merge folded
into up1's last convolution and the recursion are exercised) in one training step and in eval, under the
interpreter. (A whole StackedHourglass is too slow for the interpreter: its stem alone runs 128-channel blocks
at 32×32.)"""

import pytest
import torch

from fused_hourglass import model as fh_model
from fused_hourglass import reference

from .conftest import DEVICE


def _set_mode(module, mode):
    for m in module.modules():
        if isinstance(m, fh_model._MODAL):
            m.mode = mode


@pytest.mark.parametrize("increase", [0, 3])
def test_triton_hourglass_matches_reference(increase):
    torch.manual_seed(0)
    hg = fh_model.Hourglass(2, 6, increase=increase).to(DEVICE)
    ref = reference.Hourglass(2, 6, increase=increase).to(DEVICE)
    ref.load_state_dict(hg.state_dict())
    _set_mode(hg, "triton")
    x = torch.randn(2, 6, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_()
    x.requires_grad_()
    out, expected = hg(x), ref(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=2e-4, rtol=2e-3)
    for (name, p), (_, q) in zip(hg.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name  # skip convs of identity blocks get no gradient, as in the reference
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-3, msg=name)
    for (name, b), (_, c) in zip(hg.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5, msg=name)
    hg.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(hg(x), ref(x), atol=1e-4, rtol=1e-4)


def test_triton_hourglass_takes_statistics_from_epilogues(monkeypatch):
    """In a depth-2 hourglass only up1 (the test's input), low1 and low2.low1 (after the pools) run a statistics
    pass over their input; the other four blocks read bn1's statistics from the conv3 epilogue that wrote it."""
    from fused_hourglass.triton import conv_kernels as ck

    launched = []
    real = ck._launch
    monkeypatch.setattr(ck, "_launch", lambda kernel, *a, **k: launched.append(kernel) or real(kernel, *a, **k))
    hg = fh_model.Hourglass(2, 6).to(DEVICE)
    _set_mode(hg, "triton")
    hg(torch.randn(1, 6, 4, 4, device=DEVICE))
    assert launched.count(ck._channel_stats_kernel) == 3
