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



def test_triton_model_heads_match_reference(monkeypatch):
    """A StackedHourglass(2, 6, 3) on the triton backend, its stem left on the reference modules (the stem's 64- and
    128-channel blocks at 32×32 take minutes in the interpreter): each stack's head runs as one `fused_head` (the
    second hourglass's up1 taking bn1's statistics from the merge's epilogue), and one training step (output, input
    and parameter gradients, running statistics) and an eval forward equal the float64 reference's. Judged on each
    tensor's scale: through two depth-4 hourglasses whose innermost BatchNorms see 2 values per channel, fp32
    rounding grows to ~1e-3 of a gradient's largest entry."""
    import fused_hourglass.triton as fh_triton

    heads = []
    real = fh_triton.fused_head
    monkeypatch.setattr(fh_triton, "fused_head", lambda *a, **k: heads.append(len(a)) or real(*a, **k))
    torch.manual_seed(0)
    model = fh_model.StackedHourglass(2, 6, 3, backend="triton").to(DEVICE)
    ref = reference.StackedHourglass(2, 6, 3).double()
    ref.load_state_dict(model.state_dict())
    model._active = "triton"  # as the first forward would set it, so that the modes below are kept
    _set_mode(model, "triton")
    _set_mode(model.pre, "reference")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    x_f = x.float().to(DEVICE).requires_grad_()

    def close(got, expected, rel, msg, scale=None):
        scale = expected.abs().max().item() if scale is None else scale
        torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=rel * scale + 1e-4, msg=msg)

    out, expected = model(x_f), ref(x_ref)
    assert heads == [6, 3]  # with the merge, then the last stack's
    close(out, expected.detach(), 1e-3, "output")
    grad = torch.randn_like(expected)
    out.backward(grad.float().to(DEVICE))
    expected.backward(grad)
    close(x_f.grad, x_ref.grad, 5e-3, "input gradient")
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None, name
        else:
            # a bias before a BatchNorm has a zero gradient: judged on its weight's gradient scale
            weight = ref_params[name.rsplit(".", 1)[0] + ".weight"].grad
            close(p.grad, q.grad, 5e-3, name, max(q.grad.abs().max().item(), weight.abs().max().item()))
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        close(b, c.double(), 1e-4, name)
    model.eval()
    ref.eval()
    with torch.no_grad():
        close(model(x_f), ref(x), 1e-3, "eval output")


def test_triton_heads_give_way_to_hooks(monkeypatch):
    """With a forward hook on a stack head's module, the triton backend runs that model's reference forward (the
    fused head calls the weights, so the hook would never fire); without one, each head is one fused_head."""
    import fused_hourglass.triton as fh_triton

    heads = []
    real = fh_triton.fused_head
    monkeypatch.setattr(fh_triton, "fused_head", lambda *a, **k: heads.append(len(a)) or real(*a, **k))
    torch.manual_seed(0)
    model = fh_model.StackedHourglass(2, 6, 3, backend="triton").to(DEVICE).eval()
    model._active = "triton"
    _set_mode(model, "reference")  # the blocks on the reference modules: only the heads' routing is under test
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    seen = []
    handle = model.outs[1].register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        hooked = model._fused_forward(x)
    assert heads == [] and seen == [(1, 3, 16, 16)]
    handle.remove()
    with torch.no_grad():
        fused = model._fused_forward(x)
    assert heads == [6, 3] and len(seen) == 1
    torch.testing.assert_close(fused, hooked, atol=1e-4, rtol=1e-4)


def test_triton_hourglass_merge_gives_way_to_a_hook_on_up1():
    """A hook on up1 sees up1's own output (the merge is not folded into its last convolution then), and the
    hourglass's output is unchanged."""
    torch.manual_seed(0)
    hg = fh_model.Hourglass(1, 6).to(DEVICE)
    ref = reference.Hourglass(1, 6).to(DEVICE)
    ref.load_state_dict(hg.state_dict())
    _set_mode(hg, "triton")
    hg.eval()
    ref.eval()
    x = torch.randn(1, 6, 4, 4, device=DEVICE)
    seen, expected_up1 = [], []
    hg.up1.register_forward_hook(lambda m, args, out: seen.append(out))
    ref.up1.register_forward_hook(lambda m, args, out: expected_up1.append(out))
    with torch.no_grad():
        out, expected = hg(x), ref(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected_up1[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
