"""The fused backend's memory policies, `StackedHourglass(recompute="none" | "conv1" | "block")`, and the op they
are built from, `ops.recompute.bn_relu_conv_chain`: same outputs, gradients and running statistics as the reference
under every policy, and exactly the saved bytes each policy promises."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_hourglass import HeatmapLoss, StackedHourglass, model_bench, reference
from fused_hourglass import model as fh_model
from fused_hourglass.model import RECOMPUTE, Residual
from fused_hourglass.ops.recompute import ConvStep, bn_relu_conv_chain

from .conftest import requires_extension
from .test_autocast import _batch as autocast_batch
from .test_autocast import _compare_models as compare_models

pytestmark = requires_extension


@pytest.fixture(autouse=True)
def _every_plane(monkeypatch):
    """The policies on every Residual: this file's 64 px images have no plane of RECOMPUTE_MIN_PLANE positions past
    the stem. `test_small_planes_save_as_none` checks the default threshold."""
    monkeypatch.setattr(fh_model, "RECOMPUTE_MIN_PLANE", 0)

CONFIG = (2, 16, 4)  # nstack, inp_dim, oup_dim: skip convolutions in the stem, merges between the two stacks


def _models(recompute, dtype=torch.float64, increase=0):
    torch.manual_seed(0)
    ref = reference.StackedHourglass(*CONFIG, increase=increase).to(dtype)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # not the initial identity affine and unit running statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    fused = StackedHourglass(*CONFIG, increase=increase, backend="fused", recompute=recompute).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def _step(model, x, target):
    """Loss, input gradient, parameter gradients and buffers after one training forward and backward."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    loss = HeatmapLoss()(out, target)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, {n: b.clone() for n, b in model.named_buffers()}


def _inputs(dtype, layout="nchw", batch=2):
    """The same batch in every dtype (drawn in float64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 64, 64, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.rand(batch, CONFIG[2], 16, 16, generator=g, dtype=torch.float64).to(dtype)


def _close64(got, want, name):
    """float64 agreement up to the rounding the network amplifies: 1e-9 of the tensor's largest value (1e-12 at
    least: the stem convolution's bias, followed by BatchNorm, has a gradient of rounding noise only)."""
    torch.testing.assert_close(got, want, atol=max(1e-9 * want.abs().max().item(), 1e-12), rtol=1e-7, msg=name)


@pytest.mark.parametrize("recompute", ["conv1", "block"])
@pytest.mark.parametrize("increase", [0, 8])  # 8: skip convolutions inside the hourglasses too
def test_policy_matches_reference_float64(recompute, increase):
    fused, ref = _models(recompute, increase=increase)
    x, target = _inputs(torch.float64)
    for _ in range(2):  # two steps: the running statistics and num_batches_tracked advance once per forward
        for m in (fused, ref):
            m.zero_grad(set_to_none=True)
        out_f, dx_f, grads_f, bufs_f = _step(fused, x, target)
        out_r, dx_r, grads_r, bufs_r = _step(ref, x, target)
        _close64(out_f, out_r, "output")
        _close64(dx_f, dx_r, "input grad")
        assert grads_f.keys() == grads_r.keys()
        for name in grads_r:
            _close64(grads_f[name], grads_r[name], name)
        for name in bufs_r:
            torch.testing.assert_close(bufs_f[name], bufs_r[name], atol=1e-12, rtol=1e-12, msg=name)
    assert all(int(b) == 2 for n, b in fused.named_buffers() if n.endswith("num_batches_tracked"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_policies_judged_against_float64(layout):
    """Per tensor, each policy's float32 error against the float64 reference within 2× the larger of the float32
    reference's and the "none" policy's (plus a floor of a few float32 ulps of the tensor's norm), and its distance
    to the "none" policy's result within a tenth of that: the same computation up to float32 rounding. (Some
    gradients are ill-conditioned at this size, the 4×4 levels' and the biases whose output a BatchNorm absorbs,
    zero in exact arithmetic: there float32 errors exceed the values, for the reference as for "none".)"""
    truth = _step(_models("none")[1], *_inputs(torch.float64, layout))
    ref32 = _step(_models("none", torch.float32)[1], *_inputs(torch.float32, layout))
    none = _step(_models("none", torch.float32)[0], *_inputs(torch.float32, layout))
    for recompute in ("conv1", "block"):
        got = _step(_models(recompute, torch.float32)[0], *_inputs(torch.float32, layout))
        pairs = [("output", got[0], ref32[0], truth[0], none[0]), ("input grad", got[1], ref32[1], truth[1], none[1])]
        pairs += [(n, got[2][n], ref32[2][n], truth[2][n], none[2][n]) for n in truth[2]]
        pairs += [(n, got[3][n], ref32[3][n], truth[3][n], none[3][n]) for n in truth[3]
                  if truth[3][n].is_floating_point()]
        for name, g, r, t, n in pairs:
            scale = t.norm().item()
            e_got, e_ref, e_none = ((v.double() - t).norm().item() for v in (g, r, n))
            base = max(e_ref, e_none)
            assert e_got <= 2 * base + 1e-6 * scale, (
                f"{recompute} {name}: {e_got:.3g} against float64, reference {e_ref:.3g}, none {e_none:.3g}")
            diff = (g.double() - n.double()).norm().item()
            noise = e_ref > scale  # float32 rounding alone: two draws of it differ by as much as each is
            assert diff <= (4 if noise else 0.1) * base + 1e-6 * scale, (
                f"{recompute} {name}: {diff:.3g} from none ({base:.3g})")
        assert got[0].stride() == none[0].stride() and got[1].stride() == none[1].stride()


@pytest.mark.parametrize("recompute", ["conv1", "block"])
def test_policies_under_cpu_autocast(recompute):
    """bfloat16 autocast, training: the network check tests/test_autocast.py runs for the "none" policy (against the
    reference under the same autocast, judged against float64)."""
    torch.manual_seed(0)
    fused = StackedHourglass(2, 16, 4, backend="fused", recompute=recompute)
    ref = reference.StackedHourglass(2, 16, 4)
    ref.load_state_dict(fused.state_dict())
    x, grad = autocast_batch("cpu")
    compare_models(fused, ref, copy.deepcopy(ref).double(), x, grad, torch.bfloat16, True, autocast=True)


def _saved_bytes(model, x):
    return model_bench.saved_bytes(model, x)


def _expected_bytes(model, x, recompute, min_plane=0):
    """What the fused model saves, from the shapes alone (itemsize s; per-channel vectors in the same dtype here):
    - stem convolution + bn_relu: the image, the convolution's output u, 4 vectors (scale, shift, mean, invstd);
    - each Residual: its input x (shared with the skip convolution and, in an hourglass, with the pool), 4 vectors
      per BatchNorm, and the BatchNorm inputs the policy keeps: conv1's and conv2's outputs ("none"), conv2's
      ("conv1"), none ("block"), on planes of at least `min_plane` positions (both, as "none", below);
    - the stem's pool: its input (the hourglass pools' inputs are their up1's);
    - each stack's head: the feature convolution's input h and 4 vectors, plus ("none") that convolution's output u
      and the ReLU output r the prediction and merge convolutions keep; the merge_preds convolution's input; under
      "conv1" and "block", the prediction and merge convolutions' concatenated weight and bias (all but the last
      stack, which has no merge)."""
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, args: shapes.append((m, args[0].shape)))
             for m in model.modules() if isinstance(m, Residual)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    s = x.element_size()
    n, _, side, _ = x.shape
    total = x.numel() * s + n * 64 * (side // 2) ** 2 * s + 4 * 64 * s
    total += n * 128 * (side // 2) ** 2 * s
    for m, (_, cin, h, w) in shapes:
        mid = m.conv1.conv.out_channels
        total += n * cin * h * w * s + 4 * (cin + 2 * mid) * s
        policy = recompute if h * w >= min_plane else "none"
        total += {"none": 2, "conv1": 1, "block": 0}[policy] * n * mid * h * w * s
    nstack, inp_dim, oup_dim = CONFIG
    head = n * inp_dim * (side // 4) ** 2 * s
    total += nstack * (head * (3 if recompute == "none" else 1) + 4 * inp_dim * s)
    total += (nstack - 1) * n * oup_dim * (side // 4) ** 2 * s
    if recompute != "none":
        total += (nstack - 1) * (oup_dim + inp_dim) * (inp_dim + 1) * s
    return total


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_saved_bytes_exactly(recompute):
    fused, _ = _models(recompute)
    x, _ = _inputs(torch.float64)
    expected = _expected_bytes(fused, x, recompute)
    assert _saved_bytes(fused, x) == expected
    # what each policy drops, in activations of the BatchNorm inputs it recomputes
    if recompute != "none":
        assert expected < _expected_bytes(fused, x, "none")


@pytest.mark.parametrize("recompute", ["conv1", "block"])
def test_small_planes_save_as_none(recompute, monkeypatch):
    """With the default threshold the Residuals of planes under RECOMPUTE_MIN_PLANE positions save as "none": here
    (128 px, a 32×32 hourglass top) the stem's and the top level's Residuals recompute, the lower levels do not; the
    gradients are those of the reference all the same."""
    monkeypatch.setattr(fh_model, "RECOMPUTE_MIN_PLANE", 32 * 32)
    fused, ref = _models(recompute)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 128, 128, generator=g, dtype=torch.float64)
    target = torch.rand(1, CONFIG[2], 32, 32, generator=g, dtype=torch.float64)
    expected = _expected_bytes(fused, x, recompute, min_plane=32 * 32)
    assert _saved_bytes(fused, x) == expected
    assert _expected_bytes(fused, x, recompute) < expected < _expected_bytes(fused, x, "none")
    got, want = _step(fused, x, target), _step(ref, x, target)
    for name, a, b in (("output", got[0], want[0]), ("input grad", got[1], want[1])):
        _close64(a, b, name)
    for n in want[2]:
        _close64(got[2][n], want[2][n], n)


def test_recomputing_policies_save_less_than_eager():
    x, _ = _inputs(torch.float32)
    eager = _saved_bytes(_models("none", torch.float32)[1], x)
    saved = {r: _saved_bytes(_models(r, torch.float32)[0], x) for r in RECOMPUTE}
    assert saved["block"] < saved["conv1"] < saved["none"] < eager


def test_recompute_attribute_validated_and_routed():
    model = StackedHourglass(1, 16, 4, backend="fused")
    assert model.recompute == "none"
    model.recompute = "block"
    assert all(m.recompute == "block" for m in model.modules() if isinstance(m, Residual))
    with pytest.raises(ValueError, match=r"recompute must be one of \('none', 'conv1', 'block'\), got 'all'"):
        model.recompute = "all"
    assert model.recompute == "block"
    with pytest.raises(ValueError, match=r"StackedHourglass: recompute must be one of .*got None"):
        StackedHourglass(1, 16, 4, recompute=None)


def test_auto_prefers_fused_over_triton_for_training_under_a_policy(monkeypatch):
    from fused_hourglass import _ext
    from fused_hourglass import model as model_module

    monkeypatch.setattr(model_module, "_triton_available", lambda: True)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device_type: True)
    model = StackedHourglass(1, 16, 4, recompute="conv1")
    cuda = torch.device("cuda")
    assert model.resolve_backend(cuda) == "fused"
    assert model.eval().resolve_backend(cuda) == "triton"
    model.train().recompute = "none"
    assert model.resolve_backend(cuda) == "triton"


@pytest.mark.parametrize("recompute", ["conv1", "block"])
def test_eval_with_gradients(recompute):
    """Eval mode with autograd on (frozen BatchNorm statistics): the chain's eval form, against the reference."""
    fused, ref = _models(recompute)
    fused.eval()
    ref.eval()
    x, target = _inputs(torch.float64)
    got, want = _step(fused, x, target), _step(ref, x, target)
    _close64(got[0], want[0], "output")
    _close64(got[1], want[1], "input grad")
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        _close64(got[2][name], want[2][name], name)


# The op itself.

def _chain_inputs(first_conv, training=True):
    g = torch.Generator().manual_seed(2)
    u = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 0.7 + 0.5).requires_grad_()
    chans = [4, 6, 3, 5] if first_conv else [4, 3, 5]

    def param(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    first = (param(6, 4, 3, 3), param(6), 1) if first_conv else None
    bn_chans, conv_chans = (chans[1:-1], chans[1:]) if first_conv else (chans[:-1], chans)
    steps = []
    for i, c in enumerate(bn_chans):
        k = 3 if i == 0 else 1
        rm = None if training else torch.randn(c, generator=g, dtype=torch.float64) * 0.1
        rv = None if training else torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        steps.append(ConvStep((1 + param(c)).detach().requires_grad_(), param(c), rm, rv, training, 0.1, 1e-5,
                              param(conv_chans[i + 1], c, k, k), param(conv_chans[i + 1]), (k - 1) // 2))
    return u, steps, first


def _chain_reference(u, steps, first):
    h = u if first is None else F.conv2d(u, first[0], first[1], padding=first[2])
    for s in steps:
        r = F.relu(F.batch_norm(h, s.running_mean, s.running_var, s.weight, s.bias, s.training, s.momentum, s.eps))
        h = F.conv2d(r, s.conv_weight, s.conv_bias, padding=s.padding)
    return h


@pytest.mark.parametrize("first_conv", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_chain_gradients(first_conv, training):
    u, steps, first = _chain_inputs(first_conv, training)
    leaves = [u] + ([first[0], first[1]] if first else []) + [t for s in steps
                                                               for t in (s.weight, s.bias, s.conv_weight, s.conv_bias)]
    out = bn_relu_conv_chain(u, steps, first_conv=first)
    want = _chain_reference(u, steps, first)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, leaves, grad)
    want_grads = torch.autograd.grad(want, leaves, grad)
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=f"leaf {i}")


def test_chain_gradients_only_where_asked():
    """Frozen parameters and an input that needs no gradient: the others are still right, none is made up."""
    u, steps, _ = _chain_inputs(False)
    u.requires_grad_(False)
    steps[0].weight.requires_grad_(False)
    steps[1].conv_weight.requires_grad_(False)
    out = bn_relu_conv_chain(u, steps)
    want = _chain_reference(u, steps, None)
    asked = [steps[0].bias, steps[0].conv_weight, steps[1].weight]
    for a, b in zip(torch.autograd.grad(out.sum(), asked), torch.autograd.grad(want.sum(), asked), strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_chain_updates_running_statistics_once():
    u, steps, _ = _chain_inputs(False)
    steps = [s._replace(running_mean=torch.zeros(s.weight.shape[0], dtype=torch.float64),
                        running_var=torch.ones(s.weight.shape[0], dtype=torch.float64)) for s in steps]
    ref_steps = copy.deepcopy(steps)
    out = bn_relu_conv_chain(u, steps)
    want = _chain_reference(u, ref_steps, None)
    before = [(s.running_mean.clone(), s.running_var.clone()) for s in steps]
    out.sum().backward()
    for s, r, (m, v) in zip(steps, ref_steps, before, strict=True):
        torch.testing.assert_close(s.running_mean, r.running_mean, atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(s.running_var, r.running_var, atol=1e-14, rtol=1e-12)
        assert torch.equal(s.running_mean, m) and torch.equal(s.running_var, v)  # backward changed nothing
    torch.testing.assert_close(out, want)


def test_chain_saves_only_its_input_and_vectors():
    u, steps, first = _chain_inputs(True)
    params = {t.untyped_storage().data_ptr() for s in steps for t in (s.weight, s.bias, s.conv_weight, s.conv_bias)}
    params |= {first[0].untyped_storage().data_ptr(), first[1].untyped_storage().data_ptr()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bn_relu_conv_chain(u, steps, first_conv=first)
    assert saved[0] is u
    assert [tuple(t.shape) for t in saved[1:]] == [(6,)] * 4 + [(3,)] * 4


def test_chain_double_backward_raises():
    u, steps, _ = _chain_inputs(False)
    out = bn_relu_conv_chain(u, steps)
    v = torch.ones_like(out, requires_grad=True)
    (gu,) = torch.autograd.grad(out, u, v, create_graph=True)
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked with "
                                           "@once_differentiable"):
        gu.sum().backward()


def test_chain_errors_name_the_argument():
    u, steps, _ = _chain_inputs(False)
    with pytest.raises(ValueError, match="steps must hold at least one ConvStep"):
        bn_relu_conv_chain(u, [])
    with pytest.raises(TypeError, match=r"steps\[0\] must be a ConvStep, got tuple"):
        bn_relu_conv_chain(u, [tuple(steps[0])])
    bad = steps[1]._replace(conv_weight=torch.zeros(5, 4, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"steps\[1\].conv_weight must have 3 input channels \(the channels of its "
                                         r"input\), got shape \[5, 4, 1, 1\]"):
        bn_relu_conv_chain(u, [steps[0], bad])
    bad = steps[1]._replace(bias=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"steps\[1\].bias must be 1-D with 3 elements"):
        bn_relu_conv_chain(u, [steps[0], bad])
    with pytest.raises(ValueError, match=r"first_conv\[0\] must have 4 input channels"):
        bn_relu_conv_chain(u, steps, first_conv=(torch.zeros(4, 3, 1, 1, dtype=torch.float64), None, 0))


def test_train_config_recompute():
    from fused_hourglass.engine.config import from_preset

    assert from_preset("demo", recompute="block").recompute == "block"
    with pytest.raises(ValueError, match="--recompute must be one of none, conv1, block; got 'all'"):
        from_preset("demo", recompute="all")


@pytest.mark.parametrize("where", ["outs", "feature conv", "merge_features"])
def test_hooks_on_a_stack_head_fire_under_a_policy(where):
    """The recompute heads call the head's weights, not its modules: with a forward hook on one of them the reference
    forward runs instead, so the hook fires, with the same output and gradients as the fused heads."""
    torch.manual_seed(0)
    model = StackedHourglass(2, 16, 4, backend="fused", recompute="conv1").double()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    module = {"outs": model.outs[0], "feature conv": model.features[1][1].conv,
              "merge_features": model.merge_features[0]}[where]
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    out, expected = model(x), twin(x)
    assert len(seen) == 1
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    handle.remove()
    assert not model._heads_hooked()
