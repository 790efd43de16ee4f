"""Mixed precision on the fused backend: `torch.autocast` (CPU bfloat16; CUDA float16 and bfloat16) and models
converted with `.to(torch.bfloat16)`, against the reference under the same autocast.

Two kinds of check:
- One op (`bn_relu_conv2d`, a well-conditioned single layer): the fused result equals the reference composition
  `conv2d(relu(batch_norm(u)))` under the same autocast within OP_TOLERANCE. Both round r and the weights to the
  low precision and convolve with the same ATen kernel; they differ only in how BatchNorm's float32 statistics and
  the gradients' reductions are ordered, so a few low-precision ulps remain.
- The whole network: a (2, 16, 4) model amplifies rounding (in training, each BatchNorm renormalises by batch
  statistics of the previous layer's rounded output: the bfloat16 reference's output is itself ~20 % off the
  float64 one). There the low-precision results are judged against float64, as STYLE.md asks: per tensor, the
  fused error may be at most MODEL_TOLERANCE's factor × the same-precision reference's error plus its floor
  (× the float64 tensor's norm); on average over the parameter gradients, at most 2× the reference's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fused_hourglass import StackedHourglass, ops, reference

from .conftest import requires_cuda, requires_extension

pytestmark = requires_extension

# dtype → (atol, rtol) of the fused op against the reference composition under the same autocast; outputs and
# gradients in the low precision, so a few of its ulps (bfloat16 2^-8, float16 2^-11) at |value| ~ 1.
OP_TOLERANCE = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 3e-3)}
# dtype → (factor, floor) of the network check: e_fused ≤ factor · e_reference + floor · ‖float64 value‖ per tensor
# (e: norm of the difference to float64). The factor is above STYLE.md's 2× because one tensor's two rounding
# errors are two draws of the same noise (their ratio was 0.4-3.1 across the (2, 16, 4) model's 600 tensors);
# the 2× holds on the mean. The floor is one bfloat16 / float16 ulp: a tensor the reference happens to round
# almost exactly still lets the fused one be a rounding away.
MODEL_TOLERANCE = {torch.bfloat16: (4.0, 2**-8), torch.float16: (4.0, 2**-11)}
# In training, a convolution bias followed by BatchNorm has an exactly zero gradient (the batch mean absorbs it);
# both low-precision paths leave rounding noise, measured at < 1e-3 of the convolution weight's gradient norm.
ZERO_GRADIENT_NOISE = 1e-2

AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, "fused", id="cpu-bf16-fused"),
    pytest.param("cuda", torch.float16, "fused", id="cuda-fp16-fused", marks=[pytest.mark.gpu, requires_cuda]),
    pytest.param("cuda", torch.bfloat16, "fused", id="cuda-bf16-fused", marks=[pytest.mark.gpu, requires_cuda]),
    pytest.param("cuda", torch.float16, "triton", id="cuda-fp16-triton", marks=[pytest.mark.gpu, requires_cuda]),
    pytest.param("cuda", torch.bfloat16, "triton", id="cuda-bf16-triton", marks=[pytest.mark.gpu, requires_cuda]),
]


def _op_inputs(cin, cout, k, u_dtype, device):
    bn = torch.nn.BatchNorm2d(cin).to(device)
    conv = torch.nn.Conv2d(cin, cout, k, padding=(k - 1) // 2).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    # A mean offset of 2 std: BatchNorm must take its statistics in float32, not in the low precision.
    u = (torch.randn(2, cin, 5, 7, device=device) * 0.5 + 1.0).to(u_dtype)
    return bn, conv, u


def _op_run(bn, conv, u, training, dtype, fused):
    """Output, the gradients of u, γ, β, conv weight and bias, and the running statistics after one call."""
    bn, conv = copy.deepcopy(bn), copy.deepcopy(conv)
    u = u.detach().clone().requires_grad_()
    with torch.autocast(u.device.type, dtype=dtype):
        if fused:
            out = ops.bn_relu_conv2d(u, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, 0.1, 1e-5,
                                     conv.weight, conv.bias, conv.padding[0])
        else:
            r = F.relu(F.batch_norm(u, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, 0.1, 1e-5))
            out = conv(r)
    grad = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
    out.backward(grad)
    return [out, u.grad, bn.weight.grad, bn.bias.grad, conv.weight.grad, conv.bias.grad, bn.running_mean,
            bn.running_var]


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=[pytest.mark.gpu, requires_cuda]),
    pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.gpu, requires_cuda]),
])
@pytest.mark.parametrize("u_dtype", ["low", torch.float32])  # the network's case; float32 u (rounded r)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_bn_relu_conv2d_under_autocast(device, dtype, u_dtype, training, k):
    u_dtype = dtype if u_dtype == "low" else u_dtype
    bn, conv, u = _op_inputs(6, 5, k, u_dtype, device)
    got = _op_run(bn, conv, u, training, dtype, fused=True)
    want = _op_run(bn, conv, u, training, dtype, fused=False)
    names = ["out", "grad u", "grad γ", "grad β", "grad conv weight", "grad conv bias", "running_mean", "running_var"]
    # The reference's dtypes: the convolution's output in the low precision; u's gradient in u's dtype; BN and
    # convolution parameters' gradients and the running statistics in float32 (the parameters' dtype).
    assert [t.dtype for t in want] == [dtype, u_dtype] + [torch.float32] * 6
    atol, rtol = OP_TOLERANCE[dtype]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, name
        # Running statistics are float32 reductions of the same u on both sides.
        tol = (1e-6, 1e-5) if name.startswith("running") else (atol, rtol)
        torch.testing.assert_close(g, w, atol=tol[0], rtol=tol[1], msg=name)


def test_bn_relu_conv2d_autocast_kernel_serves_direct_op_calls():
    """The op itself casts the convolution's operands under autocast (its Autocast kernel), not only the wrapper."""
    bn, conv, u = _op_inputs(4, 3, 3, torch.bfloat16, "cpu")
    args = (u, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, 1e-5, conv.weight, conv.bias, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.fused_hourglass.bn_relu_conv2d.default(*args)
        want = ops.bn_relu_conv2d(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_bn_relu_conv2d_lower_precision_convolution_without_autocast():
    """float32 u with a bfloat16 convolution, no autocast: the same result as under autocast."""
    bn, conv, u = _op_inputs(4, 3, 1, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ops.bn_relu_conv2d(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5, conv.weight, conv.bias)
    got = ops.bn_relu_conv2d(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5, conv.weight.bfloat16(),
                             conv.bias.bfloat16())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bn_relu_conv2d_casts_the_convolution_operands_itself(layout, with_bias):
    """conv_dtype (what the Autocast kernel passes): the op casts float32 conv_weight and conv_bias to it itself.
    Output and every gradient equal those of a call on operands cast beforehand (autograd's cast), bit for bit; the
    weight and bias gradients come back float32, the weight's in conv_weight's own layout."""
    bn, conv, u = _op_inputs(4, 3, 3, torch.float32, "cpu")
    if layout == "channels_last":
        u = u.contiguous(memory_format=torch.channels_last)
    g = torch.randn(u.shape[0], 3, u.shape[2], u.shape[3])
    results = []
    for inside in (True, False):
        leaves = [u.clone().requires_grad_(), bn.weight.detach().clone().requires_grad_(),
                  bn.bias.detach().clone().requires_grad_(), conv.weight.detach().clone().requires_grad_()]
        leaves.append(conv.bias.detach().clone().requires_grad_() if with_bias else None)
        x, w, b, cw, cb = leaves
        running = [bn.running_mean.clone(), bn.running_var.clone()]
        if inside:
            out = torch.ops.fused_hourglass.bn_relu_conv2d.default(x, w, b, *running, True, 0.1, 1e-5, cw, cb, 1,
                                                                   torch.bfloat16)
        else:
            out = torch.ops.fused_hourglass.bn_relu_conv2d.default(
                x, w, b, *running, True, 0.1, 1e-5, cw.bfloat16(), None if cb is None else cb.bfloat16(), 1)
        out.backward(g.bfloat16())
        results.append([out, *running, *(t.grad for t in leaves if t is not None)])
        if inside:
            assert cw.grad.dtype == torch.float32 and cw.grad.stride() == cw.stride()
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_relu_conv2d_opcheck_with_conv_dtype(layout):
    bn, conv, u = _op_inputs(4, 3, 3, torch.float32, "cpu")
    if layout == "channels_last":
        u = u.contiguous(memory_format=torch.channels_last)
    u.requires_grad_()
    cw = conv.weight.detach().clone().requires_grad_()
    for conv_bias in (conv.bias.detach().clone().requires_grad_(), None):
        for training in (True, False):
            torch.library.opcheck(torch.ops.fused_hourglass.bn_relu_conv2d.default,
                                  (u, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone(), training,
                                   0.1, 1e-5, cw, conv_bias, 1, torch.bfloat16))


def test_bn_relu_conv2d_conv_dtype_error_names_it():
    bn, conv, u = _op_inputs(4, 3, 1, torch.float32, "cpu")
    with pytest.raises(TypeError, match=r"conv_dtype must be torch.float32 \(u's dtype\), or float16/bfloat16 for a "
                                        r"lower-precision convolution, got torch.float64"):
        torch.ops.fused_hourglass.bn_relu_conv2d.default(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5,
                                                         conv.weight, conv.bias, 0, torch.float64)


def test_bn_relu_conv2d_dtype_errors_name_the_argument():
    bn, conv, u = _op_inputs(4, 3, 1, torch.bfloat16, "cpu")
    call = ops.bn_relu_conv2d
    with pytest.raises(TypeError, match=r"conv_weight must be torch.bfloat16 \(u's dtype\), or float16/bfloat16 for a "
                                        r"lower-precision convolution, got torch.float32"):
        call(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5, conv.weight, None)
    with pytest.raises(TypeError, match="conv_bias must have conv_weight's dtype torch.bfloat16, got torch.float32"):
        call(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5, conv.weight.bfloat16(), conv.bias)
    # The compiled op says the same to direct callers.
    with pytest.raises(TypeError, match=r"conv_weight must be torch.bfloat16 \(u's dtype\)"):
        torch.ops.fused_hourglass.bn_relu_conv2d.default(u, bn.weight, bn.bias, None, None, True, 0.1, 1e-5,
                                                         conv.weight, None, 0)
    # Under autocast the message gives the dtype the convolution would get, and where it came from.
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            TypeError, match=r"conv_weight must be torch.float64 \(u's dtype\), or float16/bfloat16 for a "
                             r"lower-precision convolution, got torch.bfloat16 \(torch.float32 under autocast\)"):
        call(u.double(), bn.weight.double(), bn.bias.double(), None, None, True, 0.1, 1e-5, conv.weight, None)


def _bias_before_bn(name: str) -> bool:
    """Whether parameter `name` is the bias of a convolution followed by BatchNorm (the stem's and each stack's
    feature convolution, each Residual's conv1 and conv2): in training its gradient is exactly zero."""
    module, _, kind = name.rpartition(".")
    parts = module.split(".")
    return kind == "bias" and (module.endswith((".conv1.conv", ".conv2.conv")) or module == "pre.0.conv"
                               or (parts[0] == "features" and parts[2:] == ["1", "conv"]))


def _model_run(model, x, grad, dtype=None):
    """(output, input gradient, {parameter: gradient}, {buffer: value}) of one forward and backward, under
    autocast to `dtype` when given."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    out.backward(grad.to(out.dtype))
    return (out, x.grad, {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def _judge(name, got, low_ref, truth, factor, floor, errors):
    """One tensor of the network check (see the module docstring); appends (fused, reference) relative errors."""
    scale = truth.double().norm().item()
    e_got = (got.double() - truth.double()).norm().item()
    e_ref = (low_ref.double() - truth.double()).norm().item()
    assert e_got <= factor * e_ref + floor * scale, (
        f"{name}: fused error {e_got:.3g} against float64, reference {e_ref:.3g} (norm {scale:.3g})")
    if errors is not None and scale > 0:
        errors.append((e_got / scale, e_ref / scale))


def _compare_models(fused, ref, truth_model, x, grad, dtype, training, autocast):
    """The network check of a fused model against the same-precision reference, judged against float64."""
    for m in (fused, ref, truth_model):
        m.train(training)
    run_dtype = dtype if autocast else None
    f_out, f_dx, f_grads, f_bufs = _model_run(fused, x, grad, run_dtype)
    r_out, r_dx, r_grads, r_bufs = _model_run(ref, x, grad, run_dtype)
    t_out, t_dx, t_grads, t_bufs = _model_run(truth_model, x.double(), grad.double())
    assert f_out.dtype == r_out.dtype and f_dx.dtype == r_dx.dtype == x.dtype
    assert f_out.shape == r_out.shape and f_out.stride() == r_out.stride()
    factor, floor = MODEL_TOLERANCE[dtype]
    _judge("output", f_out, r_out, t_out, factor, floor, None)
    _judge("input gradient", f_dx, r_dx, t_dx, factor, floor, None)
    errors = []
    for name, truth in t_grads.items():
        got, low_ref = f_grads[name], r_grads[name]
        if truth is None:  # the skip convolutions of identity blocks, unused as in the reference
            assert got is None and low_ref is None, name
            continue
        assert got.dtype == low_ref.dtype == next(p for n, p in ref.named_parameters() if n == name).dtype, name
        if training and _bias_before_bn(name):
            weight_scale = t_grads[name.replace(".bias", ".weight")].norm().item()
            assert got.norm().item() <= ZERO_GRADIENT_NOISE * weight_scale, name
            continue
        _judge(name, got, low_ref, truth, factor, floor, errors)
    fused_mean = sum(e for e, _ in errors) / len(errors)
    ref_mean = sum(e for _, e in errors) / len(errors)
    assert fused_mean <= 2 * ref_mean, f"mean relative gradient error {fused_mean:.3g}, reference {ref_mean:.3g}"
    for name, truth in t_bufs.items():
        assert f_bufs[name].dtype == r_bufs[name].dtype, name
        if name.endswith("num_batches_tracked"):
            assert torch.equal(f_bufs[name], r_bufs[name]), name
        else:
            _judge(name, f_bufs[name], r_bufs[name], truth, factor, floor, None)


def _models(backend, device, dtype=None):
    torch.manual_seed(0)
    fused = StackedHourglass(2, 16, 4, backend=backend).to(device)
    ref = reference.StackedHourglass(2, 16, 4).to(device)
    ref.load_state_dict(fused.state_dict())
    truth_model = copy.deepcopy(ref).double()
    if dtype is not None:
        fused.to(dtype)
        ref.to(dtype)
    return fused, ref, truth_model


def _batch(device, dtype=torch.float32):
    x = torch.randn(2, 3, 128, 128, device=device, dtype=dtype)
    grad = torch.randn(2, 2, 4, 32, 32, device=device)
    return x, grad


@pytest.mark.parametrize("device, dtype, backend", AUTOCAST_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_under_autocast_matches_reference(device, dtype, backend, training):
    """Forward, the input's and every parameter's gradient, running statistics and dtypes of a (2, 16, 4) model
    under autocast: convolutions in the low precision, BatchNorm statistics, running statistics and parameter
    gradients in float32, the output in the reference's dtype."""
    fused, ref, truth_model = _models(backend, device)
    x, grad = _batch(device)
    _compare_models(fused, ref, truth_model, x, grad, dtype, training, autocast=True)
    assert all(b.dtype in (torch.float32, torch.int64) for b in fused.buffers())


@pytest.mark.parametrize("device, backend", [
    ("cpu", "fused"),
    pytest.param("cuda", "fused", marks=[pytest.mark.gpu, requires_cuda]),
    pytest.param("cuda", "triton", marks=[pytest.mark.gpu, requires_cuda]),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bfloat16_model_matches_reference(device, backend, training):
    """A model converted with `.to(torch.bfloat16)`, no autocast: everything bfloat16, as the reference."""
    fused, ref, truth_model = _models(backend, device, torch.bfloat16)
    x, grad = _batch(device, torch.bfloat16)
    _compare_models(fused, ref, truth_model, x, grad, torch.bfloat16, training, autocast=False)
    assert all(p.grad.dtype == torch.bfloat16 for p in fused.parameters() if p.grad is not None)


@pytest.mark.slow
def test_compiled_fused_model_under_autocast():
    """torch.compile(fullgraph=True) of the fused model under autocast: one graph, the eager fused model's values
    (the same ops in the same order; the compiled graph may fuse the casts and elementwise ops around them)."""
    torch.manual_seed(0)
    model = StackedHourglass(1, 8, 2, backend="fused")
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        model.train(training)
        twin.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = compiled(x), twin(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)
        if training:
            got.float().square().mean().backward()
            want.float().square().mean().backward()
            for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
                if q.grad is not None:
                    assert p.grad.dtype == q.grad.dtype == torch.float32, name
                    # A bias's gradient sums the output gradient over every pixel: its rounding noise is on the
                    # scale of the weight's gradient (and all of it, before a BatchNorm in training).
                    tol = 0.0 if _bias_before_bn(name) else 5e-2 * q.grad.norm().item()
                    if name.endswith(".bias"):
                        weight = twin.get_parameter(name.removesuffix(".bias") + ".weight")
                        tol += ZERO_GRADIENT_NOISE * weight.grad.norm().item()
                    assert (p.grad - q.grad).norm().item() <= tol + 1e-6, name
            for (name, b), (_, c) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
                torch.testing.assert_close(b, c, atol=1e-2, rtol=1e-2, msg=name)
