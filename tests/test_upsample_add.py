import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_hourglass import ops
from fused_hourglass.reference import ops as reference

from .conftest import requires_cuda, requires_extension

# dtype → (atol, rtol). The op rounds once (fp32 sum, one store), exactly as the eager reference does, so
# results are bitwise equal in every dtype; a tolerance only absorbs the 2×2 sum order in the backward.
TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def sample_inputs(n, c, h, w, dtype, layout="nchw", device="cpu", requires_grad=False):
    low = _layout(torch.randn(n, c, h, w, dtype=dtype, device=device), layout)
    skip = _layout(torch.randn(n, c, 2 * h, 2 * w, dtype=dtype, device=device), layout)
    return low.requires_grad_(requires_grad), skip.requires_grad_(requires_grad)


SHAPES = [
    (2, 3, 4, 5),  # odd W, C
    (1, 1, 1, 1),  # 1×1 low, C = 1
    (3, 17, 7, 3),  # nothing a multiple of a vector width
    (2, 64, 8, 16),  # full vectors in NCHW rows
    (0, 4, 2, 2),  # N = 0
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_forward_and_gradients_match_reference(shape, dtype, layout):
    atol, rtol = TOLERANCE[dtype]
    low, skip = sample_inputs(*shape, dtype, layout, requires_grad=True)
    out = ops.upsample_add(low, skip)
    low_ref = low.detach().clone().requires_grad_()
    skip_ref = skip.detach().clone().requires_grad_()
    expected = reference.upsample_add(low_ref, skip_ref)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    assert out.dtype == dtype and out.shape == skip.shape
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(skip.grad, skip_ref.grad, atol=0, rtol=0)
    torch.testing.assert_close(low.grad, low_ref.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout, expected_format", [("nchw", torch.contiguous_format),
                                                     ("channels_last", torch.channels_last),
                                                     ("strided", torch.contiguous_format)])
def test_output_follows_skip_memory_format(layout, expected_format):
    low, skip = sample_inputs(2, 8, 3, 5, torch.float32, layout)
    assert ops.upsample_add(low, skip).is_contiguous(memory_format=expected_format)
    # low in the other layout than skip: still correct, output still follows skip
    other = low.contiguous(memory_format=torch.channels_last) if layout != "channels_last" else low.contiguous()
    out = ops.upsample_add(other, skip)
    assert out.is_contiguous(memory_format=expected_format)
    torch.testing.assert_close(out, reference.upsample_add(low, skip))


def test_sum_pool_is_exact_adjoint_of_nearest_upsample():
    g = torch.randn(2, 5, 6, 10, dtype=torch.float64)
    low = torch.randn(2, 5, 3, 5, dtype=torch.float64)
    up = reference.upsample_add(low, torch.zeros_like(g))
    # <up2x(low), g> == <low, sum_pool(g)>
    torch.testing.assert_close((up * g).sum(), (low * ops.sum_pool2x2(g)).sum())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64(layout):
    low, skip = sample_inputs(2, 3, 3, 2, torch.float64, layout, requires_grad=True)
    assert torch.autograd.gradcheck(ops.upsample_add, (low, skip))
    assert torch.autograd.gradgradcheck(ops.upsample_add, (low, skip))


@requires_extension
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout):
    low, skip = sample_inputs(2, 3, 3, 5, torch.float32, layout, requires_grad=True)
    torch.library.opcheck(torch.ops.fused_hourglass.upsample_add.default, (low, skip))
    grad = _layout(torch.randn(2, 3, 6, 4), layout).requires_grad_()
    torch.library.opcheck(torch.ops.fused_hourglass.sum_pool2x2.default, (grad,))


@requires_extension
def test_compiled_kernel_is_used():
    from fused_hourglass import _ext

    assert _ext.has_kernel("upsample_add", "cpu") and _ext.has_kernel("sum_pool2x2", "cpu")


def test_nan_and_inf_propagate():
    low = torch.tensor([[[[float("nan"), 1.0]]]])
    skip = torch.zeros(1, 1, 2, 4)
    skip[0, 0, 1, 3] = float("inf")
    out = ops.upsample_add(low, skip)
    assert torch.isnan(out[..., :2]).all()
    assert out[0, 0, 1, 3] == float("inf")
    torch.testing.assert_close(out, reference.upsample_add(low, skip), equal_nan=True)


def test_works_under_torch_compile():
    low, skip = sample_inputs(2, 4, 4, 4, torch.float32, "channels_last")
    compiled = torch.compile(ops.upsample_add, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(low, skip), reference.upsample_add(low, skip))


@pytest.mark.parametrize("low_shape, skip_shape, message", [
    ((2, 64, 16, 16), (2, 64, 33, 32), r"skip must be exactly 2× low in H and W, got skip \[2, 64, 33, 32\] "
                                       r"and low \[2, 64, 16, 16\]"),
    ((2, 8, 4, 4), (2, 9, 8, 8), "same batch size and channel count"),
    ((1, 8, 4, 4), (2, 8, 8, 8), "same batch size and channel count"),
    ((8, 4, 4), (2, 8, 8, 8), r"low must be 4-D \[N, C, H, W\], got shape \[8, 4, 4\]"),
    ((2, 8, 4, 4), (2, 8, 8, 8, 1), "skip must be 4-D"),
])
def test_shape_errors_name_the_argument(low_shape, skip_shape, message):
    with pytest.raises(ValueError, match=message):
        ops.upsample_add(torch.zeros(low_shape), torch.zeros(skip_shape))


def test_dtype_errors():
    with pytest.raises(TypeError, match="low and skip must have the same dtype, got low torch.float16"):
        ops.upsample_add(torch.zeros(1, 1, 2, 2, dtype=torch.float16), torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="low must be float64, float32, float16 or bfloat16, got torch.int64"):
        ops.upsample_add(torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="low must be a torch.Tensor"):
        ops.upsample_add([1.0], torch.zeros(1, 1, 4, 4))


def test_sum_pool_rejects_odd_sides():
    with pytest.raises(ValueError, match="grad must have even H and W, got shape \\[1, 2, 3, 4\\]"):
        ops.sum_pool2x2(torch.zeros(1, 2, 3, 4))


@requires_extension
def test_compiled_op_checks_its_arguments_too():
    # Direct calls of the registered op (bypassing the Python wrapper) get the same messages from C++.
    with pytest.raises(ValueError, match="skip must be exactly 2× low in H and W"):
        torch.ops.fused_hourglass.upsample_add.default(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 5))
    with pytest.raises(TypeError, match="must have the same dtype"):
        torch.ops.fused_hourglass.upsample_add.default(torch.zeros(1, 1, 2, 2, dtype=torch.float64),
                                                       torch.zeros(1, 1, 4, 4))


def test_fallback_without_kernel_warns_once(monkeypatch):
    from fused_hourglass import _ext

    monkeypatch.setattr(_ext, "has_kernel", lambda op, device_type: False)
    monkeypatch.setattr(_ext, "_warned", set())
    low, skip = sample_inputs(1, 2, 2, 2, torch.float32)
    with pytest.warns(RuntimeWarning, match="upsample_add: compiled kernel unavailable"):
        out = ops.upsample_add(low, skip)
    torch.testing.assert_close(out, reference.upsample_add(low, skip))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.upsample_add(low, skip)  # second call: no second warning


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
       dtype=st.sampled_from(list(TOLERANCE)), layout=st.sampled_from(["nchw", "channels_last", "strided"]))
def test_property_matches_reference(n, c, h, w, dtype, layout):
    atol, rtol = TOLERANCE[dtype]
    low, skip = sample_inputs(n, c, h, w, dtype, layout)
    torch.testing.assert_close(ops.upsample_add(low, skip), reference.upsample_add(low, skip), atol=0, rtol=0)
    g = _layout(torch.randn(n, c, 2 * h, 2 * w, dtype=dtype), layout)
    torch.testing.assert_close(ops.sum_pool2x2(g), reference.sum_pool2x2(g).to(dtype), atol=atol, rtol=rtol)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_cuda_matches_cpu(dtype, layout):
    atol, rtol = TOLERANCE[dtype]
    low, skip = sample_inputs(3, 19, 9, 13, dtype, layout)
    out = ops.upsample_add(low.cuda(), skip.cuda())
    torch.testing.assert_close(out.cpu(), ops.upsample_add(low, skip), atol=0, rtol=0)
    g = _layout(torch.randn(3, 19, 18, 26, dtype=dtype), layout)
    torch.testing.assert_close(ops.sum_pool2x2(g.cuda()).cpu(), ops.sum_pool2x2(g), atol=atol, rtol=rtol)
