"""A stack's fused head (feature Conv with BN-ReLU, prediction, merge) against the reference modules (float64):
predictions, the merged stack input, running statistics and the gradients of h, x and every parameter, in training
and eval, with and without the merge; the statistics it hands the next hourglass; frozen parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from fused_hourglass.reference.model import Conv

from .conftest import DEVICE, SKIP_REASON

if SKIP_REASON is None:
    from fused_hourglass.triton import conv_kernels as ck
    from fused_hourglass.triton import fused_head
    from fused_hourglass.triton.residual import _take_stats

ATOL, RTOL = 1e-4, 1e-4  # fused fp32 against the float64 reference


def _head(c: int, p: int, seed: int) -> torch.nn.ModuleDict:
    torch.manual_seed(seed)
    head = torch.nn.ModuleDict({"feature": Conv(c, c, 1, bn=True, relu=True), "outs": Conv(c, p, 1, relu=False),
                                "merge_preds": Conv(p, c, 1, relu=False), "merge_features": Conv(c, c, 1, relu=False)})
    with torch.no_grad():
        bn = head["feature"].bn
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()  # shifts of both signs: some channels mostly rectified, some mostly passed
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return head


def _reference(head, h, x):
    feature = head["feature"](h)
    preds = head["outs"](feature)
    return preds, None if x is None else x + head["merge_preds"](preds) + head["merge_features"](feature)


def _fused(head, h, x):
    if x is None:
        return fused_head(h, head["feature"], head["outs"])
    return fused_head(h, head["feature"], head["outs"], x, head["merge_preds"], head["merge_features"])


def _grads(head, outs, gs, inputs):
    params = [p for name, p in head.named_parameters() if outs[1] is not None or not name.startswith("merge")]
    pairs = [(o, g) for o, g in zip(outs, gs, strict=True) if o is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs + params, [g for _, g in pairs])


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "last-stack"])
@pytest.mark.parametrize("n, side, training", [
    (2, 1, True),  # 1×1 spatial, M = 2
    (2, 3, True),  # odd side, M = 18: two statistics tiles, the last short
    (1, 5, False),
    (2, 3, False),
])
def test_fused_head_matches_reference(merge, n, side, training):
    c, p = 6, 5  # channel counts that are not multiples of the interpreter's 16-wide tiles
    ref = _head(c, p, seed=side + n).double().train(training)
    head = copy.deepcopy(ref).float().to(DEVICE).train(training)
    gen = torch.Generator().manual_seed(side)
    h = torch.randn(n, c, side, side, generator=gen, dtype=torch.float64) * 2 + 3  # nonzero mean
    x = torch.randn(n, c, side, side, generator=gen, dtype=torch.float64) if merge else None
    gs = [torch.randn(n, p, side, side, generator=gen, dtype=torch.float64),
          torch.randn(n, c, side, side, generator=gen, dtype=torch.float64) if merge else None]

    inputs_ref = [t.clone().requires_grad_() for t in (h, x) if t is not None]
    out_ref = _reference(ref, *inputs_ref, *([] if merge else [None]))
    grads_ref = _grads(ref, out_ref, gs, inputs_ref)
    to = dict(device=DEVICE, dtype=torch.float32)
    inputs = [t.to(**to).contiguous(memory_format=torch.channels_last).requires_grad_() for t in (h, x)
              if t is not None]
    out = _fused(head, *inputs, *([] if merge else [None]))
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    grads = _grads(head, out, [None if g is None else g.to(**to) for g in gs], inputs)

    for got, expected in zip(out, out_ref, strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got.double().cpu(), expected.detach(), atol=ATOL, rtol=RTOL)
    names = ["h"] + (["x"] if merge else []) + [name for name, _ in ref.named_parameters()
                                                if merge or not name.startswith("merge")]
    for name, got, expected in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(got.double().cpu(), expected, atol=2e-4, rtol=2e-3, msg=name)
    for (name, b), (_, e) in zip(head.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b.double().cpu(), e.double(), atol=1e-5, rtol=1e-5, msg=name)


def test_fused_head_hands_its_statistics_on():
    """In training the merged tensor carries the partials `channel_stats` would compute over it, for the next
    hourglass's first block; in eval (and in the last stack) nothing is attached."""
    head = _head(6, 5, seed=0).to(DEVICE)
    h, x = torch.randn(2, 6, 5, 5, device=DEVICE), torch.randn(2, 6, 5, 5, device=DEVICE)
    _, x_next = _fused(head, h, x)
    stats = _take_stats(x_next, 2 * 5 * 5)
    assert stats is not None
    expected = ck.channel_stats(x_next.permute(0, 2, 3, 1).contiguous())
    for got, want in zip(stats, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _take_stats(x_next, 2 * 5 * 5) is None  # taken once
    head.eval()
    assert _take_stats(_fused(head, h, x)[1], 2 * 5 * 5) is None


def test_fused_head_frozen_parameters(monkeypatch):
    """Frozen head convolutions get no weight-gradient launch and no gradient; h needing none, the feature
    convolution's dgrad is not launched; what is computed equals the reference."""
    launched = []
    real = ck._launch
    monkeypatch.setattr(ck, "_launch", lambda kernel, *a, **k: launched.append(kernel) or real(kernel, *a, **k))
    ref = _head(6, 5, seed=1).double()
    head = copy.deepcopy(ref).float().to(DEVICE)
    for module in (head, ref):
        for name in ("outs", "merge_preds", "merge_features"):
            module[name].requires_grad_(False)
    h = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    x_f = x.detach().float().to(DEVICE).requires_grad_()
    out = _fused(head, h.float().to(DEVICE), x_f)
    launched.clear()
    torch.autograd.backward(out, [torch.ones_like(out[0]), torch.ones_like(out[1])])
    out_ref = _reference(ref, h, x)
    torch.autograd.backward(out_ref, [torch.ones_like(out_ref[0]), torch.ones_like(out_ref[1])])
    wgrad, dgrad = ck.TUNED["conv_wgrad"][80][torch.float32], ck.TUNED["conv_dgrad"][80][torch.float32]
    assert launched.count(wgrad) == 1  # the feature convolution's only
    assert launched.count(dgrad) == 2  # merge_preds' into preds, and the BatchNorm's reductions
    for (name, p), (_, q) in zip(head.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad.double().cpu(), q.grad, atol=2e-4, rtol=2e-3, msg=name)
    torch.testing.assert_close(x_f.grad.double().cpu(), x.grad)
