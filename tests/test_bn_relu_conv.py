import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_hourglass import StackedHourglass, ops, reference

from .conftest import requires_extension

# dtype → (atol, rtol) for outputs and gradients against the reference in the same dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.bfloat16: (0.15, 0.05),
}


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.cat([t, t], dim=3)[..., : t.shape[3]]
    return t.contiguous()


def _modules(c_in, c_out, k, dtype):
    bn = nn.BatchNorm2d(c_in).to(dtype)
    conv = nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return bn, conv


def _fused(bn, conv, u, training):
    return ops.bn_relu_conv2d(u, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, 0.1, bn.eps,
                              conv.weight, conv.bias, conv.padding[0])


def _eager(bn, conv, u, training):
    bn.train(training)
    return conv(F.relu(bn(u)))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 8, 1, 2), (3, 4, 5, 7)])
def test_matches_eager_bn_relu_conv(dtype, layout, k, training, shape):
    atol, rtol = TOLERANCE[dtype]
    n, c, h, w = shape
    if training and n * h * w == 1:
        pytest.skip("one value per channel cannot train")
    bn, conv = _modules(c, 6, k, dtype)
    bn_ref, conv_ref = _modules(c, 6, k, dtype)
    bn_ref.load_state_dict(bn.state_dict())
    conv_ref.load_state_dict(conv.state_dict())
    u = _layout(torch.randn(shape, dtype=dtype) * 2 + 0.3, layout).requires_grad_()
    u_ref = u.detach().clone().requires_grad_()
    out = _fused(bn, conv, u, training)
    expected = _eager(bn_ref, conv_ref, u_ref, training)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, atol=atol, rtol=rtol)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, atol=atol, rtol=rtol)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for got, want, name in [(u.grad, u_ref.grad, "u"), (bn.weight.grad, bn_ref.weight.grad, "bn.weight"),
                            (bn.bias.grad, bn_ref.bias.grad, "bn.bias"), (conv.weight.grad, conv_ref.weight.grad,
                                                                         "conv.weight"),
                            (conv.bias.grad, conv_ref.bias.grad, "conv.bias")]:
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol * 10, msg=name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inference_path_matches_the_autograd_path(training, layout):
    """Without a graph to record (no_grad, or nothing requiring grad) the op's autograd kernel records nothing and
    gives the same output and the same running-statistics update, bit for bit."""
    bn, conv = _modules(4, 6, 3, torch.float32)
    u = _layout(torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1)), layout)
    bn_graph = copy.deepcopy(bn)
    y_graph = _fused(bn_graph, conv, u, training)
    assert y_graph.grad_fn is not None
    for context in (torch.no_grad, contextlib.nullcontext):
        bn_plain, conv_plain = copy.deepcopy(bn), copy.deepcopy(conv)
        if context is contextlib.nullcontext:
            for p in (*bn_plain.parameters(), *conv_plain.parameters()):
                p.requires_grad_(False)
        with context():
            y = _fused(bn_plain, conv_plain, u, training)
        assert y.grad_fn is None
        assert torch.equal(y, y_graph.detach()) and y.stride() == y_graph.stride()
        assert torch.equal(bn_plain.running_mean, bn_graph.running_mean)
        assert torch.equal(bn_plain.running_var, bn_graph.running_var)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_gradcheck_float64(training, conv_bias):
    c = 3
    u = torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(c, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    cw = torch.randn(4, c, 3, 3, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(4, dtype=torch.float64, requires_grad=True) if conv_bias else None
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)

    def fn(u, weight, bias, cw, cb):
        # Fresh running buffers per call so the repeated evaluations of gradcheck see the same function.
        return ops.bn_relu_conv2d(u, weight, bias, rm.clone(), rv.clone(), training, 0.1, 1e-5, cw, cb, 1)

    assert torch.autograd.gradcheck(fn, (u, weight, bias, cw, cb))


@requires_extension
def test_saves_u_not_the_activation():
    bn, conv = _modules(16, 16, 3, torch.float32)
    u = torch.randn(4, 16, 8, 8, requires_grad=True)
    saved_fused = _saved_bytes(lambda: _fused(bn, conv, u, True))
    saved_eager = _saved_bytes(lambda: _eager(bn, conv, u, True))
    activation = u.numel() * u.element_size()
    # Eager keeps u (BatchNorm) and r (ReLU and conv share it); fused keeps u plus per-channel vectors (its own
    # and the BN parameters, for the double-backward guard) and the conv weight. 64·16 bytes bound the vectors.
    assert saved_eager - saved_fused >= activation - 64 * 16
    assert saved_fused < activation + conv.weight.numel() * 4 + 64 * 16


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@requires_extension
def test_fused_model_saves_less_than_eager():
    fused = StackedHourglass(1, 32, 4, backend="fused")
    eager = reference.StackedHourglass(1, 32, 4)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    params = {p.untyped_storage().data_ptr() for p in fused.parameters()} | {
        p.untyped_storage().data_ptr() for p in eager.parameters()}

    def activation_bytes(model):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    fused_bytes, eager_bytes = activation_bytes(fused), activation_bytes(eager)
    assert fused_bytes < 0.6 * eager_bytes, (fused_bytes, eager_bytes)


def _compiled_op(*args):
    return torch.ops.fused_hourglass.bn_relu_conv2d.default(*args)


@pytest.mark.parametrize("call", [ops.bn_relu_conv2d, pytest.param(_compiled_op, marks=requires_extension)],
                         ids=["wrapper", "compiled_op"])
def test_errors_name_the_argument(call):
    """The Python wrapper and the compiled op (which the fused model calls directly) make the same checks, with the
    same messages, before anything runs."""
    bn, conv = _modules(4, 6, 1, torch.float32)
    u = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"conv_weight must have 4 input channels \(the channels of u\), "
                                         r"got shape \[6, 5, 1, 1\]"):
        call(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5, torch.zeros(6, 5, 1, 1), None, 0)
    with pytest.raises(TypeError, match=r"conv_weight must be torch.float32 \(u's dtype\), or float16/bfloat16"):
        call(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5, conv.weight.double(), None, 0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        call(torch.randn(1, 4, 1, 1), bn.weight, bn.bias, None, None, True, 0.1, 1e-5, conv.weight, None, 0)

    # Arguments only the convolution uses are checked before the running statistics are touched.
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    bad = [
        ({"conv_bias": torch.zeros(5)}, ValueError, r"conv_bias must be 1-D with 6 elements \(conv_weight's output "
                                                    r"channels\), got shape \[5\]"),
        ({"conv_bias": torch.zeros(6, dtype=torch.float64)}, TypeError,
         "conv_bias must have conv_weight's dtype torch.float32, got torch.float64"),
        ({"padding": -1}, ValueError, "padding must be an int >= 0, got -1"),
        ({"conv_weight": torch.zeros(6, 4, 5, 5)}, ValueError,
         "the 5x5 conv_weight does not fit u's 3x3 planes with padding 0"),
    ]
    for kwargs, exc, message in bad:
        args = {"conv_weight": conv.weight, "conv_bias": None, "padding": 0} | kwargs
        with pytest.raises(exc, match=message):
            call(u, bn.weight, bn.bias, rm, rv, True, 0.1, 1e-5, args["conv_weight"], args["conv_bias"],
                 args["padding"])
        assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)


@requires_extension
def test_model_with_a_bad_weight_fails_before_any_running_statistic_changes():
    """A fused Residual calls the compiled op directly: a conv weight replaced by one of the wrong shape raises the
    op's message, and the BatchNorm in front of that convolution keeps its running mean and variance (its batch
    count has gone up, as nn.BatchNorm2d counts a batch before it computes anything)."""
    model = StackedHourglass(1, 16, 4, backend="fused").train()
    block = model.hgs[0][0].up1
    block.conv2.conv.weight = nn.Parameter(torch.randn(8, 5, 3, 3))
    before = [block.bn2.running_mean.clone(), block.bn2.running_var.clone()]
    with pytest.raises(ValueError, match=r"bn_relu_conv2d: conv_weight must have 8 input channels \(the channels of "
                                         r"u\), got shape \[8, 5, 3, 3\]"):
        model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before[0], block.bn2.running_mean) and torch.equal(before[1], block.bn2.running_var)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(dtype, layout):
    """The op's schema (running statistics mutated in place), its autograd kernel, and meta/fake tensors."""
    c = 4
    u = _layout(torch.randn(2, c, 5, 6, dtype=dtype), layout).requires_grad_()
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=dtype).requires_grad_()
    cw = torch.randn(3, c, 3, 3, dtype=dtype).requires_grad_()
    cb = torch.randn(3, dtype=dtype).requires_grad_()
    for training in (True, False):
        for conv_bias in (cb, None):
            for affine in ((w, b), (None, None)):
                running = (torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5)
                torch.library.opcheck(torch.ops.fused_hourglass.bn_relu_conv2d.default,
                                      (u, *affine, *running, training, 0.1, 1e-5, cw, conv_bias, 1))


@requires_extension
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("running", [True, False], ids=["running-stats", "no-running-stats"])
@pytest.mark.parametrize(("has_weight", "has_bias", "conv_bias"),
                         [(True, True, True), (False, True, False), (True, False, True), (False, False, False)])
def test_gradients_of_each_input_alone(training, running, has_weight, has_bias, conv_bias):
    """Only the input that requires grad gets one, and it equals the gradient eager computes; the autograd
    kernel maps the gradient edges of whichever optional tensors are present (running statistics included:
    without them both modes normalise with the batch statistics)."""
    bn, conv = _modules(5, 6, 3, torch.float64)
    if not conv_bias:
        conv.bias = None
    u = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    g = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    names = ["u", "conv_weight"] + (["weight"] if has_weight else []) + (["bias"] if has_bias else [])
    names += ["conv_bias"] if conv_bias else []
    for name in names:
        leaves = {"u": u.clone(), "weight": bn.weight.detach().clone(), "bias": bn.bias.detach().clone(),
                  "conv_weight": conv.weight.detach().clone(),
                  "conv_bias": conv.bias.detach().clone() if conv_bias else None}
        if not has_weight:
            leaves["weight"] = None
        if not has_bias:
            leaves["bias"] = None
        leaves[name].requires_grad_()
        rm, rv = (bn.running_mean.clone(), bn.running_var.clone()) if running else (None, None)
        out = ops.bn_relu_conv2d(leaves["u"], leaves["weight"], leaves["bias"], rm, rv, training, 0.1, 1e-5,
                                 leaves["conv_weight"], leaves["conv_bias"], 1)
        (got,) = torch.autograd.grad(out, leaves[name], g)
        ref = {k: (v.detach().clone().requires_grad_(k == name) if v is not None else None)
               for k, v in leaves.items()}
        rm, rv = (bn.running_mean.clone(), bn.running_var.clone()) if running else (None, None)
        r = F.relu(F.batch_norm(ref["u"], rm, rv, ref["weight"], ref["bias"], training or not running, 0.1, 1e-5))
        (want,) = torch.autograd.grad(F.conv2d(r, ref["conv_weight"], ref["conv_bias"], padding=1), ref[name], g)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@requires_extension
@pytest.mark.parametrize("wrt", ["u", "conv_weight"])
def test_double_backward_raises(wrt):
    """With wrt="conv_weight", u is data and the incoming gradient is constant: the conv weight's gradient
    still depends on the BN weight and bias, so differentiating it must raise, not return a constant."""
    bn, conv = _modules(3, 4, 3, torch.float64)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=wrt == "u")
    out = _fused(bn, conv, u, True)
    (grad,) = torch.autograd.grad(out.sum(), u if wrt == "u" else conv.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="bn_relu_conv2d: double backward is not supported"):
        grad.sum().backward()


@requires_extension
@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_matches_eager_call(training):
    bn, conv = _modules(4, 5, 3, torch.float32)
    bn_c = copy.deepcopy(bn)
    u = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 5, 6, 6).contiguous(memory_format=torch.channels_last)

    def forward(bn_mod, x):
        return _fused(bn_mod, conv, x, training)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")

    def step(fn, bn_mod):
        x = u.clone().requires_grad_()
        conv.zero_grad(set_to_none=True)
        out = fn(bn_mod, x)
        out.backward(g)
        return out.detach(), x.grad, bn_mod.weight.grad, bn_mod.bias.grad, conv.weight.grad, conv.bias.grad

    want = step(forward, bn)
    got = step(compiled, bn_c)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_c.running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn_c.running_var, bn.running_var, rtol=1e-6, atol=1e-6)
