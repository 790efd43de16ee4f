"""The fused residual block against the reference `Residual` (float64): output, running statistics and the gradient
of the input, the low branch and every parameter, in training and eval, with identity and convolutional skips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_hourglass.reference.model import Residual

from .conftest import DEVICE, SKIP_REASON

if SKIP_REASON is None:
    from fused_hourglass.triton import FusedResidual, fused_residual

# Fused fp32 against the float64 reference.
ATOL, RTOL = 1e-4, 1e-4


def _randomised_block(cin: int, cout: int, seed: int) -> Residual:
    torch.manual_seed(seed)
    block = Residual(cin, cout)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2, block.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()  # shifts of both signs: some channels mostly rectified, some mostly passed
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return block


def _run(block, x, low, fused: bool):
    x = x.detach().clone().requires_grad_()
    low = None if low is None else low.detach().clone().requires_grad_()
    if fused:
        out = fused_residual(block, x, low)
    else:
        out = block(x)
        if low is not None:
            out = out + F.interpolate(low, scale_factor=2, mode="nearest")
    return out, x, low


def _grads(out, g, x, low, block):
    params = [p for p in block.parameters()]
    inputs = [x] + ([low] if low is not None else []) + params
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


CASES = [
    # (N, H, with_low, modes)
    (1, 1, False, (False,)),  # 1×1 spatial, M = 1: batch statistics undefined, eval only
    (2, 1, False, (True, False)),  # M = 2
    (2, 3, False, (True, False)),  # odd side: every 3×3 tap partly out of bounds
    (1, 5, False, (True, False)),
    (2, 8, True, (True, False)),  # even side with the upsample-add epilogue
]


@pytest.mark.parametrize("cin, cout", [(6, 6), (6, 10)], ids=["identity-skip", "skip-conv"])
@pytest.mark.parametrize("n, h, with_low, training", [(n, h, low, t) for n, h, low, modes in CASES for t in modes])
def test_fused_residual_matches_reference(cin, cout, n, h, with_low, training):
    ref = _randomised_block(cin, cout, seed=cin + cout + h).double().train(training)
    fused_block = copy.deepcopy(ref).float().to(DEVICE).train(training)
    gen = torch.Generator().manual_seed(h)
    x = torch.randn(n, cin, h, h, generator=gen, dtype=torch.float64) * 2 + 3  # nonzero mean
    low = torch.randn(n, cout, h // 2, h // 2, generator=gen, dtype=torch.float64) if with_low else None
    g = torch.randn(n, cout, h, h, generator=gen, dtype=torch.float64)

    out_ref, x_ref, low_ref = _run(ref, x, low, fused=False)
    grads_ref = _grads(out_ref, g, x_ref, low_ref, ref)
    to = dict(device=DEVICE, dtype=torch.float32)
    out, x_f, low_f = _run(fused_block, x.to(**to), None if low is None else low.to(**to), fused=True)
    assert out.shape == out_ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    grads = _grads(out, g.to(**to), x_f, low_f, fused_block)

    torch.testing.assert_close(out.double().cpu(), out_ref.detach(), atol=ATOL, rtol=RTOL)
    names = ["x"] + (["low"] if with_low else []) + [name for name, _ in ref.named_parameters()]
    # A conv bias that feeds a training-mode BN has a gradient that cancels to exactly 0 (Σ over the batch of
    # BN's input gradient); in float32 the residue scales with the terms it sums, which can reach the size of the
    # block's largest gradients when M is tiny (M = 2: invstd is large). The absolute tolerance scales with them.
    atol = ATOL * max(1.0, max(w.abs().max().item() for w in grads_ref if w is not None))
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        if want is None:  # the unused skip conv of an identity-skip block
            assert got is None, name
            continue
        torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    for (name, want), got in zip(ref.named_buffers(), fused_block.buffers(), strict=True):
        torch.testing.assert_close(got.double().cpu(), want.double(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_saves_only_x_and_conv_outputs():
    """Forward keeps three activation-sized tensors (x, conv1 and conv2 outputs before their BN), nothing else."""
    block = _randomised_block(6, 10, seed=0).to(DEVICE)
    x = torch.randn(2, 6, 4, 4, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_residual(block, x)
    activations = sorted(tuple(t.shape) for t in saved if t.dim() == 4 and t.shape[1:3] == (4, 4))
    assert activations == [(2, 4, 4, 5), (2, 4, 4, 5), (2, 4, 4, 6)]


def test_two_training_steps_accumulate_running_stats():
    ref = _randomised_block(6, 6, seed=1)
    fused_block = copy.deepcopy(ref).to(DEVICE)
    for step in range(2):
        x = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(step)) + step
        ref(x)
        fused_residual(fused_block, x.to(DEVICE))
    for (name, want), got in zip(ref.named_buffers(), fused_block.buffers(), strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert fused_block.bn3.num_batches_tracked.item() == 2


def test_bf16_error_within_twice_reference_error():
    """bf16 end to end (the kernels' autocast dtype): the fused error against float64 is at most about twice the
    error of the reference evaluated in bf16, for the output and the input gradient."""
    ref64 = _randomised_block(6, 10, seed=2).double()
    ref16 = copy.deepcopy(ref64).to(torch.bfloat16)
    fused_block = copy.deepcopy(ref64).float().to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, 8, generator=gen, dtype=torch.float64)
    low = torch.randn(2, 10, 4, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 10, 8, 8, generator=gen, dtype=torch.float64)

    out64, x64, _ = _run(ref64, x, low, fused=False)
    (dx64,) = torch.autograd.grad(out64, x64, g)
    out16, x16, _ = _run(ref16, x.bfloat16(), low.bfloat16(), fused=False)
    (dx16,) = torch.autograd.grad(out16, x16, g.bfloat16())
    xf = x.to(DEVICE, torch.bfloat16).requires_grad_()
    out = fused_residual(fused_block, xf, low.to(DEVICE, torch.bfloat16))
    (dx,) = torch.autograd.grad(out, xf, g.to(DEVICE, torch.bfloat16))
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    for got, lowp, exact in ((out, out16, out64), (dx, dx16, dx64)):
        err = (got.double().cpu() - exact).abs().max().item()
        err_ref = (lowp.double() - exact).abs().max().item()
        assert err <= 2 * err_ref + 1e-2, (err, err_ref)


def test_fused_residual_module_is_a_drop_in():
    ref = _randomised_block(6, 10, seed=4)
    module = FusedResidual(6, 10)
    assert list(module.state_dict()) == list(ref.state_dict())
    module.load_state_dict(ref.state_dict())
    module.to(DEVICE).eval()
    ref.eval()
    x = torch.randn(1, 6, 4, 4)
    low = torch.randn(1, 10, 2, 2)
    with torch.no_grad():
        want = ref(x) + F.interpolate(low, scale_factor=2, mode="nearest")
        got = module(x.to(DEVICE), low.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"x must be \[N, 6, H, W\]"):
        fused_residual(Residual(6, 6).to(DEVICE), torch.randn(1, 5, 4, 4, device=DEVICE))


def _launches(monkeypatch) -> list[tuple[str, int | None, bool | None]]:
    """Record every Triton launch as (kernel name without the leading underscore and `_kernel`, KSIZE, PROLOGUE)."""
    from fused_hourglass.triton import conv_kernels as ck

    seen = []
    real = ck._launch

    def launch(kernel, grid, *args, **kwargs):
        name = getattr(kernel, "fn", kernel).__name__.strip("_").removesuffix("_kernel")
        seen.append((name, kwargs.get("KSIZE"), kwargs.get("PROLOGUE")))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ck, "_launch", launch)
    return seen


def _frozen_case(block: Residual, x: torch.Tensor, frozen: list[str], x_grad: bool, monkeypatch):
    """Backward of the fused block with the parameters named in `frozen` at requires_grad=False and x needing a
    gradient or not, against the reference block with the same parameters frozen (float64). Returns the backward's
    launches."""
    ref = block.double()
    fused_block = copy.deepcopy(ref).float().to(DEVICE)
    for module in (ref, fused_block):
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)
    g = torch.randn(x.shape[0], ref.conv3.conv.out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    x_ref = x.clone().requires_grad_(x_grad)
    x_f = x.to(DEVICE, torch.float32).requires_grad_(x_grad)
    ref(x_ref).backward(g)
    out = fused_residual(fused_block, x_f)
    seen = _launches(monkeypatch)
    out.backward(g.to(DEVICE, torch.float32))
    for (name, want), got in zip(ref.named_parameters(), fused_block.parameters(), strict=True):
        if want.grad is None:
            assert got.grad is None, name
        else:
            torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")
    if x_grad:
        torch.testing.assert_close(x_f.grad.double().cpu(), x_ref.grad, atol=1e-4, rtol=1e-4)
    return seen


def test_frozen_convs_get_no_gradient_and_no_wgrad(monkeypatch):
    """A frozen conv (weight and bias at requires_grad=False) launches no weight-gradient kernel; the others' and
    x's gradients still match the reference."""
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 1
    frozen = ["conv2.conv.weight", "conv2.conv.bias", "skip_layer.conv.weight", "skip_layer.conv.bias"]
    seen = _frozen_case(_randomised_block(6, 10, seed=5), x, frozen, True, monkeypatch)
    wgrads = [(k, p) for name, k, p in seen if name == "conv_bnrelu_wgrad"]
    assert wgrads == [(1, True), (1, True)]  # conv3 and conv1; neither conv2 (3×3) nor the skip conv (no prologue)
    assert [(k, p) for name, k, p in seen if name == "conv_bnrelu_dgrad"] == [(1, True), (3, True), (1, False),
                                                                              (1, True)]


def test_input_without_grad_gets_no_dgrad(monkeypatch):
    """x needing no gradient: no dgrad through conv1 nor the skip conv and no BN-apply pass for bn1, but conv1's
    dgrad still runs for bn1's parameters (its epilogue reduces their gradients); with bn1 frozen too it does not."""
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 1
    seen = _frozen_case(_randomised_block(6, 10, seed=6), x, [], False, monkeypatch)
    assert [(k, p) for name, k, p in seen if name == "conv_bnrelu_dgrad"] == [(1, True), (3, True), (1, True)]
    assert sum(name == "bn_backward_apply" for name, *_ in seen) == 2  # bn3 and bn2 only
    assert [(k, p) for name, k, p in seen if name == "conv_bnrelu_wgrad"] == [(1, True), (3, True), (1, False),
                                                                              (1, True)]
    seen = _frozen_case(_randomised_block(6, 10, seed=6), x, ["bn1.weight", "bn1.bias"], False, monkeypatch)
    assert [(k, p) for name, k, p in seen if name == "conv_bnrelu_dgrad"] == [(1, True), (3, True)]


def test_only_the_low_branch_needs_grad(monkeypatch):
    """Everything frozen and x without gradient: the backward is the 2×2 sum pool for low alone."""
    block = _randomised_block(6, 6, seed=8).to(DEVICE).requires_grad_(False)
    x = torch.randn(1, 6, 4, 4, device=DEVICE)
    low = torch.randn(1, 6, 2, 2, device=DEVICE, requires_grad=True)
    out = fused_residual(block, x, low)
    seen = _launches(monkeypatch)
    g = torch.randn_like(out)
    out.backward(g)
    assert [name for name, *_ in seen] == ["sum_pool2x2"]
    torch.testing.assert_close(low.grad, F.avg_pool2d(g, 2) * 4)


def test_freeze_unused_skips_changes_no_launch(monkeypatch):
    """The training engine's frozen identity-skip convs (never applied): gradients None as before, and the same
    kernels run."""
    from fused_hourglass.engine.distributed import freeze_unused_skips

    block = _randomised_block(6, 6, seed=9).to(DEVICE)
    x = torch.randn(1, 6, 3, 3, device=DEVICE, requires_grad=True)
    before = _launches(monkeypatch)
    fused_residual(block, x).sum().backward()
    assert freeze_unused_skips(block) == 6 * 6 + 6
    after = _launches(monkeypatch)
    fused_residual(block, x).sum().backward()
    assert block.skip_layer.conv.weight.grad is None and block.conv1.conv.weight.grad is not None
    assert after == before[:len(after)] and len(before) == 2 * len(after)  # `before` also saw the second call


def _chain(blocks, x, fused: bool, between=None):
    out = x
    for i, block in enumerate(blocks):
        out = fused_residual(block, out) if fused else block(out)
        if between is not None and i == 0:
            out = between(out)
    return out


@pytest.mark.parametrize("in_place", [False, True], ids=["chained", "changed-in-between"])
def test_next_block_takes_bn1_statistics_from_the_epilogue(monkeypatch, in_place):
    """Block 2 reading block 1's output unchanged launches no statistics pass over it (conv3's epilogue gave them),
    with output, every gradient and the running statistics still the reference's; an in-place change in between
    (the version counter) makes block 2 compute its own."""
    ref = [_randomised_block(6, 10, seed=10).double(), _randomised_block(10, 10, seed=11).double()]
    fused = [copy.deepcopy(b).float().to(DEVICE) for b in ref]
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 2 - 1
    g = torch.randn(2, 10, 4, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    between = (lambda t: t.mul_(1.5)) if in_place else None
    x_ref = x.clone().requires_grad_()
    _chain(ref, x_ref, False, between).backward(g)
    seen = _launches(monkeypatch)
    x_f = x.to(DEVICE, torch.float32).requires_grad_()
    out = _chain(fused, x_f, True, between)
    assert sum(name == "channel_stats" for name, *_ in seen) == (2 if in_place else 1)
    out.backward(g.to(DEVICE, torch.float32))
    torch.testing.assert_close(x_f.grad.double().cpu(), x_ref.grad, atol=1e-4, rtol=1e-4)
    for r, f in zip(ref, fused, strict=True):
        for (name, want), got in zip(r.named_parameters(), f.parameters(), strict=True):
            if want.grad is not None:
                torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=1e-4, rtol=1e-4,
                                           msg=lambda m, n=name: f"{n}: {m}")
        for (name, want), got in zip(r.named_buffers(), f.buffers(), strict=True):
            torch.testing.assert_close(got.double().cpu(), want.double(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_eval_output_carries_no_statistics(monkeypatch):
    block = _randomised_block(6, 6, seed=14).to(DEVICE).eval()
    seen = _launches(monkeypatch)
    with torch.no_grad():
        out = fused_residual(block, fused_residual(block, torch.randn(1, 6, 3, 3, device=DEVICE)))
    assert not any(name == "channel_stats" for name, *_ in seen)
    assert not hasattr(out, "_fused_hourglass_batch_stats")
