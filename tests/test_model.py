import pytest
import torch

from fused_hourglass import BACKENDS, HeatmapLoss, StackedHourglass, reference

# "triton" runs Triton kernels: tested on a small model under the interpreter in tests/triton/test_model_backend.py.
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]


def _pair(backend, **kwargs):
    fused = StackedHourglass(2, 32, 5, backend=backend, **kwargs)
    ref = reference.StackedHourglass(2, 32, 5, **kwargs)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def test_same_state_dict_as_reference():
    model = StackedHourglass(8, 256, 16)
    ref_keys = list(reference.StackedHourglass(8, 256, 16).state_dict())
    assert list(model.state_dict()) == ref_keys
    assert sum(p.numel() for p in model.parameters()) == 32_819_328


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_train_step_matches_reference(backend, layout):
    fused, ref = _pair(backend)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused.double()
    ref.double()
    target = torch.rand(2, 5, 16, 16, dtype=torch.float64)
    loss_f = HeatmapLoss()(fused(x), target)
    loss_r = HeatmapLoss()(ref(x), target)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-10, rtol=1e-10)
    loss_f.backward()
    loss_r.backward()
    for (name, pf), (_, pr) in zip(fused.named_parameters(), ref.named_parameters(), strict=True):
        if pr.grad is None:
            assert pf.grad is None, name
            continue
        torch.testing.assert_close(pf.grad, pr.grad, atol=1e-10, rtol=1e-8, msg=name)
    for (name, bf), (_, br) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(bf, br, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eval_matches_reference_float32(backend):
    fused, ref = _pair(backend, input_format="NHWC")
    fused.eval()
    ref.eval()
    x = torch.rand(1, 64, 128, 3)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)


def test_backend_resolution_and_validation():
    model = StackedHourglass(1, 16, 4, backend="reference")
    assert model.resolve_backend(torch.device("cpu")) == "reference"
    model.backend = "auto"
    from fused_hourglass import _ext

    assert model.resolve_backend(torch.device("cpu")) == ("fused" if _ext.has_kernel("upsample_add", "cpu")
                                                          else "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"
    with pytest.raises(ValueError, match="backend must be one of"):
        StackedHourglass(backend="triton-ish")
    assert StackedHourglass(1, 16, 4, backend="triton").resolve_backend(torch.device("cpu")) == "triton"


def test_auto_backend_on_cuda_picks_triton_only_for_its_dtypes(monkeypatch):
    """The Triton kernels take float32/float16/bfloat16: a float64 model on CUDA resolves to "fused"."""
    from fused_hourglass import _ext
    from fused_hourglass import model as model_module

    monkeypatch.setattr(model_module, "_triton_available", lambda: True)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device_type: True)
    model = StackedHourglass(1, 16, 4)
    cuda = torch.device("cuda")
    assert model.resolve_backend(cuda) == "triton"
    assert model.resolve_backend(cuda, torch.bfloat16) == "triton"
    assert model.resolve_backend(cuda, torch.float64) == "fused"
    assert model.double().resolve_backend(cuda) == "fused"


def test_fused_backend_routes_through_upsample_add(monkeypatch):
    from fused_hourglass import model as model_module

    calls = []
    real = model_module.ops.upsample_add
    monkeypatch.setattr(model_module.ops, "upsample_add", lambda low, skip: calls.append(1) or real(low, skip))
    model = StackedHourglass(1, 16, 4, backend="fused").eval()
    model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4  # one merge per hourglass level
    calls.clear()
    model.backend = "reference"
    model(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_fused_model_under_torch_compile():
    model = StackedHourglass(1, 16, 4, backend="fused").eval()
    ref = reference.StackedHourglass(1, 16, 4).eval()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)
