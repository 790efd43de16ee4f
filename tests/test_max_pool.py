"""max_pool2x2 against F.max_pool2d(x, 2, 2): values and gradients bit for bit, including ties and NaNs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from fused_hourglass import _ext
from fused_hourglass.ops import max_pool2x2
from fused_hourglass.reference import ops as reference

from .conftest import requires_cuda, requires_extension

OPS = torch.ops.fused_hourglass if _ext.HAS_EXTENSION else None
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def both(x: torch.Tensor, grad: torch.Tensor | None = None, fn=max_pool2x2):
    """(output, input gradient) of `fn` and of F.max_pool2d on copies of x."""
    results = []
    for f in (fn, lambda t: F.max_pool2d(t, 2, 2)):
        t = x.detach().clone().requires_grad_()
        y = f(t)
        g = grad if grad is not None else torch.arange(1, y.numel() + 1, dtype=torch.float64).reshape(y.shape)
        y.backward(g.to(y.dtype))
        results.append((y.detach(), t.grad))
    return results


def assert_same(x: torch.Tensor, grad: torch.Tensor | None = None):
    (y, dx), (y_ref, dx_ref) = both(x, grad)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)  # a max is exact: no tolerance
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0, equal_nan=True)
    fmt = torch.channels_last if _ext.memory_format_of(x) == torch.channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    if x.is_contiguous(memory_format=fmt):  # otherwise autograd lays the gradient out like x
        assert dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 17, 2, 2), (3, 1, 10, 4), (3, 20, 38, 12), (2, 512, 14, 32)],
                         ids=["rect", "C-odd-2x2", "C=1", "57-rows", "7-rows-per-thread"])
def test_random_matches_max_pool2d(dtype, channels_last, shape):
    """The channels_last forward pairs the first and second half of each thread's output rows: 57 rows are one
    thread's (an odd count), and at 2 threads (2, 512, 14, 32) gives each thread 7."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert_same(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_ties_first_maximum_wins(channels_last):
    # Values from {0, 1}: most windows hold two or more equal maxima; constant windows are all ties.
    x = torch.randint(0, 2, (2, 4, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    x[0, 0] = 3.0
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    assert_same(x)
    (_, dx), _ = both(x)
    assert torch.equal(dx[0, 0, 0::2, 0::2], torch.arange(1, 17, dtype=torch.float32).reshape(4, 4))
    assert not dx[0, 0, 1::2].any() and not dx[0, 0, :, 1::2].any()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_infinities(channels_last, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    mask = torch.rand(x.shape, generator=gen)
    x[mask < 0.15] = float("nan")  # several windows with one, two or more NaNs
    x[(mask > 0.15) & (mask < 0.25)] = float("-inf")
    x[(mask > 0.25) & (mask < 0.3)] = float("inf")
    x[0, 0, :2, :2] = float("-inf")  # an all −inf window
    x[0, 1, :2, :2] = float("nan")  # an all-NaN window
    x[0, 2, :2, :2] = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0]])  # two NaNs: F picks the last
    x = x.to(dtype)
    assert_same(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bit patterns (NCHW order), so −0 ≠ +0 and NaN payloads count."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _quiet_nans(dtype: torch.dtype, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` quiet NaNs of either sign with distinct low payload bits."""
    itype, quiet, sign = {torch.float64: (torch.int64, 0x7FF8000000000000, -(1 << 63)),
                          torch.float32: (torch.int32, 0x7FC00000, -(1 << 31)),
                          torch.float16: (torch.int16, 0x7E00, -(1 << 15)),
                          torch.bfloat16: (torch.int16, 0x7FC0, -(1 << 15))}[dtype]
    payload = torch.arange(1, count + 1, dtype=torch.int64) % 31 + 1
    signs = torch.randint(0, 2, (count,), generator=gen, dtype=torch.int64) * sign
    return (quiet | payload | signs).to(itype).view(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bitwise_signed_zeros_and_nan_payloads(dtype, channels_last):
    # C = 37 and W/2 = 19 are not multiples of any vector width: vector bodies and scalar tails in both
    # layouts. Values from {−1, −0, +0, 1} and NaNs with payloads; the gradient has −0 and NaN payloads too.
    gen = torch.Generator().manual_seed(7)
    shape = (2, 37, 6, 38)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    x = (torch.randint(0, 2, shape, generator=gen) * sign).to(dtype)  # 0 · −1 is −0
    nan_mask = torch.rand(shape, generator=gen) < 0.1
    x[nan_mask] = _quiet_nans(dtype, int(nan_mask.sum()), gen)
    g_sign = torch.randint(0, 2, (2, 37, 3, 19), generator=gen) * 2 - 1
    g = (torch.randint(0, 2, g_sign.shape, generator=gen) * g_sign).to(dtype)
    g_nan = torch.rand(g.shape, generator=gen) < 0.1
    g[g_nan] = _quiet_nans(dtype, int(g_nan.sum()), gen)
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    (y, dx), (y_ref, dx_ref) = both(x, g)
    # The output is the element F picks, as stored. F's float16/bfloat16 kernels return NaNs re-encoded
    # from float (canonical payloads), so only float32/float64 outputs equal F's bit for bit.
    _, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    assert torch.equal(_bits(y), _bits(x).flatten(2).gather(2, idx.flatten(2)).view_as(y))
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(_bits(y), _bits(y_ref))
    # The gradient lands as F's +0 + g: −0 becomes +0, NaN payloads are kept. F's bfloat16 backward re-encodes
    # the sum from float, which makes its NaNs canonical: there, NaNs are compared as NaNs.
    if dtype == torch.bfloat16:
        dx, dx_ref = (torch.where(t.isnan(), torch.full_like(t, float("nan")), t) for t in (dx, dx_ref))
    assert torch.equal(_bits(dx), _bits(dx_ref))


def test_non_contiguous_input():
    base = torch.randn(2, 6, 10, 12, generator=torch.Generator().manual_seed(3))
    assert_same(base[:, ::2, 1:9, 2:])
    assert_same(base.transpose(2, 3))


@settings(max_examples=15)
@given(n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 6), w=st.integers(1, 6),
       dtype=st.sampled_from(DTYPES), channels_last=st.booleans(), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_max_pool2d(n, c, h, w, dtype, channels_last, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, c, 2 * h, 2 * w)
    x = torch.randint(-2, 3, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen)
    x = x.to(dtype)
    assert_same(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("shape", "channels_last"), [((2, 3, 66, 70), False), ((2, 3, 4, 64), False),
                                                      ((2, 64, 64, 64), False), ((1, 1100, 4, 2), True),
                                                      ((2, 200, 4, 14), True), ((3, 5, 6, 10), True),
                                                      ((1, 64, 4, 6), True), ((4, 64, 64, 64), True),
                                                      ((1, 1, 2, 2), False)],
                         ids=["nchw-rows-across-pieces", "nchw-whole-pieces", "nchw-two-threads",
                              "cl-window-longer-than-a-piece", "cl-row-across-pieces", "cl-odd-c", "cl-whole-blocks",
                              "cl-two-threads", "one-window"])
def test_streaming_stores_match_max_pool2d(monkeypatch, dtype, shape, channels_last):
    """The backward writes dx through non-temporal stores when its data fill more than half the last-level cache
    (FH_NONTEMPORAL_STORES=1 forces it), with the same gradient as F.max_pool2d's."""
    monkeypatch.setenv("FH_NONTEMPORAL_STORES", "1")
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, shape, generator=gen).to(dtype)  # ties in many windows
    assert_same(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def test_empty_batch():
    assert_same(torch.empty(0, 3, 4, 4))


def test_gradcheck_float64():
    # Distinct values a step apart, so no finite-difference probe crosses a window's argmax.
    x = torch.randperm(2 * 3 * 4 * 6, generator=torch.Generator().manual_seed(4)).double().reshape(2, 3, 4, 6)
    assert torch.autograd.gradcheck(max_pool2x2, (x.requires_grad_(),), eps=1e-3, atol=1e-8)


@requires_extension
def test_double_backward_raises():
    """A gradient taken with create_graph=True is right, and differentiating it again raises."""
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    (dx,) = torch.autograd.grad(max_pool2x2(x), x, g, create_graph=True)
    (dx_ref,) = torch.autograd.grad(F.max_pool2d(x, 2, 2), x, g)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="max_pool2x2: double backward is not supported"):
        dx.sum().backward()


@requires_extension
def test_backward_saves_the_input_only():
    saved = []
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        max_pool2x2(x)
    assert [t.dtype for t in saved] == [torch.float32] and saved[0].shape == x.shape  # no int64 indices


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(dtype, channels_last):
    x = torch.randn(2, 3, 6, 4, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    g = torch.randn(2, 3, 3, 2, dtype=dtype)
    torch.library.opcheck(OPS.max_pool2x2.default, (x,))
    torch.library.opcheck(OPS.max_pool2x2_backward.default, (g, x))


@requires_extension
def test_torch_compile():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(max_pool2x2, backend="aot_eager", fullgraph=True)
    (y, dx), (y_ref, dx_ref) = both(x, fn=compiled)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_fallback_without_kernel_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device_type: False)
    monkeypatch.setattr(_ext, "_warned", set())
    x = torch.randn(1, 2, 4, 4)
    with pytest.warns(RuntimeWarning, match="max_pool2x2: compiled kernel unavailable"):
        y = max_pool2x2(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        max_pool2x2(x)
    assert torch.equal(y, reference.max_pool2x2(x))


@pytest.mark.parametrize(("x", "exc", "message"), [
    (torch.randn(1, 2, 5, 4), ValueError,
     r"max_pool2x2: x must have even H and W \(the network never pools odd sides\), got shape \[1, 2, 5, 4\]"),
    (torch.randn(1, 2, 4, 3), ValueError, r"max_pool2x2: x must have even H and W .*got shape \[1, 2, 4, 3\]"),
    (torch.randn(2, 4, 4), ValueError, r"max_pool2x2: x must be 4-D \[N, C, H, W\], got shape \[2, 4, 4\]"),
    (torch.ones(1, 1, 2, 2, dtype=torch.int64), TypeError,
     "max_pool2x2: x must be float64, float32, float16 or bfloat16, got torch.int64"),
])
def test_argument_errors(x, exc, message):
    with pytest.raises(exc, match=message):
        max_pool2x2(x)


@requires_extension
@pytest.mark.parametrize(("args", "exc", "message"), [
    ((torch.randn(1, 2, 2, 3), torch.randn(1, 2, 4, 4)), ValueError,
     r"max_pool2x2_backward: grad must be \[N, C, H/2, W/2\] of x, got grad \[1, 2, 2, 3\] and x \[1, 2, 4, 4\]"),
    ((torch.randn(1, 2, 2, 2).double(), torch.randn(1, 2, 4, 4)), TypeError,
     "max_pool2x2_backward: grad and x must have the same dtype"),
    ((torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 5)), ValueError,
     r"max_pool2x2_backward: x must have even H and W \(the network never pools odd sides\)"),
])
def test_backward_op_errors_kernel_and_fake(args, exc, message):
    with pytest.raises(exc, match=message):
        OPS.max_pool2x2_backward(*args)
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) for a in args)
        with pytest.raises(exc, match=message):
            OPS.max_pool2x2_backward(*fake)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_kernels_match_cpu_kernels(dtype, channels_last):
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (4, 19, 34, 18), generator=gen).float()
    x[torch.rand(x.shape, generator=gen) < 0.05] = float("nan")
    x = x.to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    g = torch.randn(4, 19, 17, 9, generator=gen).to(dtype)
    y_gpu, y_cpu = OPS.max_pool2x2(x.cuda()), OPS.max_pool2x2(x)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=0, equal_nan=True)
    assert y_gpu.stride() == y_cpu.stride()
    dx_gpu, dx_cpu = OPS.max_pool2x2_backward(g.cuda(), x.cuda()), OPS.max_pool2x2_backward(g, x)
    torch.testing.assert_close(dx_gpu.cpu(), dx_cpu, rtol=0, atol=0)
    (y, dx), (y_ref, dx_ref) = both(x.cuda())
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
