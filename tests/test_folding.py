"""Folded inference (fused_hourglass.folding): the fused model's eval forward with its BatchNorms folded into the
convolutions, judged against the unfolded model in float64; its plain-PyTorch twin (fold_reference); and the cache of
folded weights, recomputed after every kind of change to a parameter or buffer, never stale."""

import pytest
import torch
from torch import nn

from fused_hourglass import StackedHourglass, folding, reference

from .conftest import requires_cuda, requires_extension

pytestmark = requires_extension

CONFIG = (2, 16, 4)  # nstack, inp_dim, oup_dim: every kind of layer, the merges between two stacks included


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm parameters and running statistics away from their identity defaults, so that folding matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.3, 0.3)), (m.running_mean, (-0.5, 0.5)),
                                    (m.running_var, (0.5, 2.0))):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model


def _model(**kwargs) -> StackedHourglass:
    return _randomize(StackedHourglass(*CONFIG, backend="fused", **kwargs)).eval()


def _images(batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, dtype=dtype)


def _folds(model) -> int:
    cache = model.__dict__.get("_fold_cache")
    return 0 if cache is None else cache.folds


@torch.no_grad()
def _folded(model, x):
    before = _folds(model)
    out = model(x)
    return out, _folds(model) - before


@torch.no_grad()
def _unfolded(model, x):
    model.folded_inference = False
    try:
        return model(x)
    finally:
        model.folded_inference = True


@torch.no_grad()
def _float64(model, x):
    ref = reference.StackedHourglass(*CONFIG, input_format=model.input_format).double().eval()
    ref.load_state_dict(model.state_dict())
    return ref(x.double())


def _assert_fp32_tolerance(out, unfolded, exact):
    """The folded output's error against float64 within twice the unfolded model's (or 1e-5 of the output scale)."""
    err, err_unfolded = (float((t.double() - exact).abs().max()) for t in (out, unfolded))
    assert err <= max(2 * err_unfolded, 1e-5 * float(exact.abs().max())), (err, err_unfolded)


def _layers(model) -> int:
    """Folded tensors one forward computes: two folds and bn1's scale/shift per Residual, one per other Conv."""
    residuals = sum(isinstance(m, reference.Residual) for m in model.modules())
    convs = sum(isinstance(m, reference.Conv) for m in model.modules())  # skip layers included, conv1..3 included
    used_skips = sum(isinstance(m, reference.Residual) and m.need_skip for m in model.modules())
    unused_skips = residuals - used_skips
    # every Conv module's convolution once (conv1, conv2 with their BN; conv3; used skips; stem, features, outs,
    # merges), except the skips never applied; plus each bn1
    return convs - unused_skips + residuals


def _model_and_images(layout: str):
    """A model and a batch in `layout`: "nchw", "channels_last" (NCHW input in that memory format) or "nhwc" (the
    port's input_format)."""
    model = _model(input_format="NHWC" if layout == "nhwc" else "NCHW")
    x = _images()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nhwc":
        x = x.permute(0, 2, 3, 1).contiguous()
    return model, x


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nhwc"])
def test_folded_matches_unfolded_in_float32_judged_in_float64(layout):
    model, x = _model_and_images(layout)
    out, folds = _folded(model, x)
    assert folds == _layers(model)  # the folded path ran, every layer folded once
    unfolded = _unfolded(model, x)
    assert out.dtype == unfolded.dtype and out.shape == unfolded.shape and out.stride() == unfolded.stride()
    _assert_fp32_tolerance(out, unfolded, _float64(model, x))


def test_float64_folded_equals_unfolded():
    model = _model().double()
    x = _images(dtype=torch.float64)
    out, folds = _folded(model, x)
    assert folds > 0
    torch.testing.assert_close(out, _unfolded(model, x), atol=1e-12, rtol=1e-12)


def test_fold_reference_is_the_plain_pytorch_twin():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin = folding.fold_reference(model)
    assert type(twin) is reference.StackedHourglass and not twin.training
    residuals = sum(isinstance(m, reference.Residual) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in twin.modules()) == residuals  # only the bn1s are left
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, state[k]), k
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(_folded(model, x)[0], twin(x), atol=1e-5, rtol=1e-5)
        model64, x64 = model.double(), x.double()
        torch.testing.assert_close(folding.fold_reference(model64)(x64), _unfolded(model64, x64), atol=1e-12,
                                   rtol=1e-12)


def test_cache_serves_the_second_forward_bit_identically():
    model, x = _model(), _images()
    first, folds = _folded(model, x)
    second, again = _folded(model, x)
    assert folds > 0 and again == 0
    assert torch.equal(first, second)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nhwc"])
def test_folded_forward_leaves_its_input_and_the_model_unchanged(layout, monkeypatch):
    # every addition as a post-op that writes into its skip tensor: none of them may be the caller's
    monkeypatch.setattr(folding, "POST_OP_MIN_POSITIONS", 0)
    model, x = _model_and_images(layout)
    x_before, state = x.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    first, _ = _folded(model, x)
    second, _ = _folded(model, x)
    assert torch.equal(x, x_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(first, second)
    _assert_fp32_tolerance(first, _unfolded(model, x), _float64(model, x))


def test_each_precision_rechecks_the_cache_after_a_change():
    """One check of the whole model stands for every layer's key only within the kind of run (dtype, layout) that
    made it: a change seen by a float32 forward must still refold the bfloat16 weights."""
    model, x = _model(), _images()
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    _folded(model, x)
    with bf16:
        _folded(model, x)
    conv = model.pre[0].conv
    with torch.no_grad():
        conv.weight.mul_(1.5)
    _, folds32 = _folded(model, x)
    with bf16:
        out16, folds16 = _folded(model, x)
        want16 = _unfolded(model, x)
    assert folds32 == folds16 == 1  # the stem alone, once in each precision
    err = float((out16.float() - want16.float()).abs().max())
    assert err <= 0.05 * float(want16.float().abs().max()), err
    _, again = _folded(model, x)
    assert again == 0


def _train_forward(model, x):
    model.train()
    model(x)  # running statistics updated in place
    model.eval()


def _optimizer_step(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    model.eval()


def _load_other(model, x):
    model.load_state_dict(_randomize(StackedHourglass(*CONFIG), seed=1).state_dict())


def _weight_inplace(model, x):
    with torch.no_grad():
        model.hgs[0][0].up1.conv2.conv.weight.mul_(1.5)


def _running_var_inplace(model, x):
    with torch.no_grad():
        model.pre[1].bn2.running_var.mul_(3.0)


def _stem_bn_bias_inplace(model, x):
    with torch.no_grad():
        model.pre[0].bn.bias.add_(0.5)


def _replace_parameter(model, x):
    conv = model.features[0][1].conv
    conv.weight = nn.Parameter(conv.weight.detach() * -1.0)


def _change_eps(model, x):
    model.hgs[1][0].low1.bn3.eps = 0.5


CHANGES = {
    "train_eval_toggle": _train_forward,
    "optimizer_step": _optimizer_step,
    "load_state_dict": _load_other,
    "inplace_weight": _weight_inplace,
    "inplace_running_var": _running_var_inplace,
    "inplace_bn_bias": _stem_bn_bias_inplace,
    "replaced_parameter": _replace_parameter,
    "bn_eps": _change_eps,
}


@pytest.mark.parametrize("change", CHANGES)
def test_changes_refold_never_stale(change):
    model, x = _model(), _images()
    before, _ = _folded(model, x)
    CHANGES[change](model, _images(4))
    after, folds = _folded(model, x)
    assert folds > 0
    assert not torch.allclose(after, before, atol=1e-4)  # the change matters ...
    unfolded = _unfolded(model, x)
    _assert_fp32_tolerance(after, unfolded, _float64(model, x))  # ... and the folded model saw it


@pytest.mark.parametrize("to", ["float64", "channels_last", "bfloat16"])
def test_to_refolds(to):
    model, x = _model(), _images()
    _folded(model, x)
    if to == "channels_last":
        model.to(memory_format=torch.channels_last)
    else:
        model.to(getattr(torch, to))
        x = x.to(getattr(torch, to))
    out, folds = _folded(model, x)
    residuals = sum(isinstance(m, reference.Residual) for m in model.modules())
    # every layer refolded from the converted tensors; channels_last leaves the 1-D ones (bn1's) as they were
    assert folds == _layers(model) - (residuals if to == "channels_last" else 0)
    assert out.dtype == x.dtype
    unfolded = _unfolded(model, x)
    if to == "float64":
        torch.testing.assert_close(out, unfolded, atol=1e-12, rtol=1e-12)
    elif to == "channels_last":
        _assert_fp32_tolerance(out, unfolded, _float64(model, x))
    else:  # bfloat16 weights: within twice the unfolded bfloat16 model's error (plus a bfloat16 ulp of the scale)
        exact = _float64(model, x)
        err, err_unfolded = (float((t.double() - exact).abs().max()) for t in (out, unfolded))
        assert err <= 2 * err_unfolded + 2**-8 * float(exact.abs().max()), (err, err_unfolded)


def test_writes_through_data_need_clear_cache():
    """`.data` bypasses the version counter (documented): clear_cache is the way to refold after it."""
    model, x = _model(), _images()
    _folded(model, x)
    model.pre[1].bn2.running_var.data.mul_(3.0)
    folding.clear_cache(model)
    out, folds = _folded(model, x)
    assert folds == _layers(model)
    _assert_fp32_tolerance(out, _unfolded(model, x), _float64(model, x))


def _fresh_copy(model):
    """A model with `model`'s weights and an empty fold cache: its folded forward folds every layer and records
    nothing."""
    copy = StackedHourglass(*CONFIG, backend="fused", input_format=model.input_format).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def _bound_constants(plan):
    return [plan.steps[step][1][arg] for step, arg, _, _ in plan.binds]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
def test_a_training_step_releases_the_folded_tensors_and_the_next_eval_refreshes_its_plan(autocast, monkeypatch):
    """A training forward drops every folded tensor (stale after the step) but keeps the recorded forward without
    its constants; the next eval forward refolds every layer, rebinds them and replays: the output of a model that
    folds from scratch, bit for bit (under bf16 autocast too, where the folded weights are bfloat16)."""
    model, x = _model(), _images()
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with precision:
        for _ in range(2):  # fold and record, then replay
            _folded(model, x)
    (plan,) = _plans(model).values()
    assert plan.binds and all(isinstance(t, torch.Tensor) for t in _bound_constants(plan))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()
    cache = model.__dict__["_fold_cache"]
    assert cache.entries == {} and all(t is None for t in _bound_constants(plan))
    replayed = []
    original = folding._Plan.replay
    monkeypatch.setattr(folding._Plan, "replay", lambda self, x: replayed.append(self) or original(self, x))
    with precision:
        out, folds = _folded(model, x)
        assert replayed == [plan] and plan.refreshes == 1 and folds == _layers(model)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(out, _folded(_fresh_copy(model), x)[0])
        assert torch.equal(_folded(model, x)[0], out) and replayed == [plan, plan] and plan.refreshes == 1
    if not autocast:
        _assert_fp32_tolerance(out, _unfolded(model, x), _float64(model, x))


def test_a_plan_whose_folded_tensors_would_change_shape_is_dropped():
    """A parameter replaced by one of another shape (no module or attribute changed) cannot rebind into the recorded
    ops: the forward folds and runs afresh, and fails where the unfolded model fails."""
    model, x = _model(), _images()
    for _ in range(4):
        _folded(model, x)
    conv = model.hgs[0][0].up1.conv1.conv
    conv.weight = nn.Parameter(torch.randn(conv.out_channels + 1, conv.in_channels, 1, 1))
    with pytest.raises((RuntimeError, ValueError)):
        _unfolded(model, x)
    with pytest.raises(RuntimeError):
        _folded(model, x)
    assert _plans(model) == {}


def test_gradients_hooks_and_the_switch_keep_the_unfolded_path():
    model, x = _model(), _images()
    out = model(x)  # eval with gradients recorded: the unfolded, differentiable path
    assert out.requires_grad and _folds(model) == 0
    out.sum().backward()
    assert model.pre[0].conv.weight.grad is not None
    seen = []
    handle = model.features[0][0].register_forward_hook(lambda m, args, output: seen.append(output.shape))
    assert _folded(model, x)[1] == 0 and len(seen) == 1  # a hook on a submodule still fires
    handle.remove()
    model.folded_inference = False
    assert _folded(model, x)[1] == 0
    model.folded_inference = True
    assert _folded(model, x)[1] > 0
    with torch.inference_mode():
        assert torch.equal(model(x), _folded(model, x)[0])


def test_reference_and_triton_backends_do_not_fold():
    model, x = _model(), _images()
    model.backend = "reference"
    assert _folded(model, x)[1] == 0
    assert not folding.applies(model, "triton")


def test_missing_running_statistics_is_a_clear_error():
    model, x = _model(), _images()
    model.pre[0].bn.running_mean = None
    model.pre[0].bn.running_var = None
    with pytest.raises(ValueError, match="folded inference: every BatchNorm needs running statistics"):
        _folded(model, x)
    model.folded_inference = False
    assert _unfolded(model, x).shape == (2, CONFIG[0], CONFIG[2], 16, 16)


requires_post_ops = pytest.mark.skipif(not folding.pointwise_conv_available(torch.empty(1)),
                                       reason="torch.ops.mkldnn._convolution_pointwise is not available in this torch")


def _count_post_ops(monkeypatch) -> dict:
    """{post-op: calls} of oneDNN's post-op convolutions from now on, and the weights they were called with under
    "weights"."""
    calls = {"relu": 0, "none": 0, "add": 0, "weights": []}
    pointwise, inplace = folding._POINTWISE, folding._POINTWISE_INPLACE

    class Counting:
        def default(self, *args):
            calls[args[7]] += 1
            calls["weights"].append(args[1])
            return pointwise.default(*args)

    class CountingInplace:  # the additions write into the skip tensor, an intermediate dead afterwards
        def binary(self, *args):
            calls[args[8]] += 1
            calls["weights"].append(args[2])
            return inplace.binary(*args)

    monkeypatch.setattr(folding, "_POINTWISE", Counting())
    monkeypatch.setattr(folding, "_POINTWISE_INPLACE", CountingInplace())
    return calls


@requires_post_ops
@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain"])
def test_relu_and_additions_run_as_onednn_post_ops(prepack, monkeypatch):
    monkeypatch.setattr(folding, "PREPACK", prepack)
    calls = _count_post_ops(monkeypatch)
    model, x = _model(), _images()
    out, _ = _folded(model, x)
    # by default the 1×1 convolutions of small planes are matrix products, and without prepacking the planes below
    # POST_OP_MIN_POSITIONS positions (all but the stem's 2·64·64 input and the 2·32·32 stem Residuals here) take
    # ATen's convolution and an in-place op
    assert 0 < len(calls["weights"]) < _layers(model)
    _assert_fp32_tolerance(out, _unfolded(model, x), _float64(model, x))
    calls.update(relu=0, none=0, add=0, weights=[])
    monkeypatch.setattr(folding, "MATMUL_MAX_POSITIONS", 0)
    monkeypatch.setattr(folding, "POST_OP_MIN_POSITIONS", 0 if not prepack else folding.POST_OP_MIN_POSITIONS)
    out, _ = _folded(model, x)
    nstack = CONFIG[0]
    residuals = sum(isinstance(m, reference.Residual) for m in model.modules())
    used_skips = sum(isinstance(m, reference.Residual) and m.need_skip for m in model.modules())
    # relu: the stem, conv1 and conv2 of every Residual, each stack's feature Conv; add: each conv3 (the skip) and
    # the two merges between stacks; none: the used skip convolutions and each stack's output convolution
    assert calls == {"relu": 1 + 2 * residuals + nstack, "add": residuals + 2 * (nstack - 1),
                     "none": used_skips + nstack, "weights": calls["weights"]}
    _assert_fp32_tolerance(out, _unfolded(model, x), _float64(model, x))


@requires_post_ops
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
def test_replays_read_prepacked_weights_bit_identically(autocast, monkeypatch):
    """The first forward of a shape records with plain weights; its first replay prepacks every post-op
    convolution's weight and every later replay reads those: the same output bit for bit. After a change to the
    weights the refreshed recording replays once with plain weights (the new ones), then packs them again."""
    model, x = _model(), _images()
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    calls = _count_post_ops(monkeypatch)
    with precision:
        first, _ = _folded(model, x)
    (plan,) = _plans(model).values()
    assert calls["weights"] and not any(w.is_mkldnn for w in calls["weights"]) and not plan.packed
    assert len(plan.packs) == len(calls["weights"])
    for run in range(2):
        calls["weights"] = []
        with precision:
            again, _ = _folded(model, x)
        assert plan.packed and len(calls["weights"]) == len(plan.packs), run
        assert all(w.is_mkldnn for w in calls["weights"]) and torch.equal(again, first), run
    with torch.no_grad():
        model.hgs[0][0].low1.conv2.conv.weight.mul_(-1.5)
    outs = []
    for _ in range(2):
        calls["weights"] = []
        with precision:
            outs.append(_folded(model, x)[0])
        outs.append(any(w.is_mkldnn for w in calls["weights"]))
    assert plan.refreshes == 1 and outs[1:4:2] == [False, True]
    assert not torch.equal(outs[0], first) and torch.equal(outs[0], outs[2])
    with precision:
        assert torch.equal(outs[0], _folded(_fresh_copy(model), x)[0])


def test_autocast_bfloat16_within_the_reference_error():
    model, x = _model(), _images()
    ref = reference.StackedHourglass(*CONFIG).eval()
    ref.load_state_dict(model.state_dict())
    exact = _float64(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, folds = _folded(model, x)
        with torch.no_grad():
            want = ref(x)
    assert folds > 0 and out.dtype == want.dtype == torch.bfloat16
    err, err_ref = (float((t.double() - exact).abs().max()) for t in (out, want))
    assert err <= 2 * err_ref, (err, err_ref)


@pytest.mark.gpu
@requires_cuda
def test_folded_on_cuda_matches_unfolded():
    model, x = _model().cuda(), _images().cuda()
    out, folds = _folded(model, x)
    assert folds == _layers(model) and out.device.type == "cuda"
    unfolded = _unfolded(model, x)
    _assert_fp32_tolerance(out, unfolded, _float64(model.cpu(), x.cpu()).cuda())


def _plans(model):
    return model.__dict__["_fold_cache"].plans


@pytest.mark.parametrize("post_ops_from", [None, 0])
def test_recorded_forward_replays_bit_identically_and_never_stale(post_ops_from, monkeypatch):
    """The first forward folds and records its ops, later ones replay them: the same output bit for bit. After a
    change to one of the model's tensors, that layer refolds and the plan replays with it: the output of a model that
    folds from scratch, bit for bit."""
    if post_ops_from is not None:
        monkeypatch.setattr(folding, "POST_OP_MIN_POSITIONS", post_ops_from)
    model, x = _model(), _images()
    first, folds = _folded(model, x)
    ((plan_key, plan),) = _plans(model).items()
    assert folds == _layers(model)
    replayed = []
    original = folding._Plan.replay

    def spy(self, x):
        replayed.append(self)
        return original(self, x)

    monkeypatch.setattr(folding._Plan, "replay", spy)
    second, folds = _folded(model, x)
    third, _ = _folded(model, x)
    assert replayed == [plan, plan] and folds == 0
    assert torch.equal(first, second) and torch.equal(second, third)
    with torch.no_grad():
        model.hgs[0][0].low1.bn2.running_var.mul_(2.0)
    changed, folds = _folded(model, x)
    assert replayed == [plan, plan, plan] and folds == 1 and plan.refreshes == 1  # that one layer refolds, rebound
    _assert_fp32_tolerance(changed, _unfolded(model, x), _float64(model, x))
    assert torch.equal(changed, _folded(_fresh_copy(model), x)[0])
    again, folds = _folded(model, x)
    assert _plans(model) == {plan_key: plan} and folds == 0 and torch.equal(again, changed)


def test_a_plan_per_input_shape():
    model = _model()
    small, large = _images(1), _images(3)
    for _ in range(3):
        _folded(model, small)
        _folded(model, large)
    assert len(_plans(model)) == 2
    for x in (small, large, small):
        _assert_fp32_tolerance(_folded(model, x)[0], _unfolded(model, x), _float64(model, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_plane_1x1_convolutions_run_as_matrix_products(dtype, monkeypatch):
    calls = []
    matmul = folding._conv1x1_as_matmul

    def counting(x, w_t, b):
        calls.append(tuple(x.shape))
        return matmul(x, w_t, b)

    monkeypatch.setattr(folding, "_conv1x1_as_matmul", counting)
    model = _model().to(dtype)
    x = _images(dtype=dtype)
    out, _ = _folded(model, x)
    # below MATMUL_MAX_POSITIONS where a recorded forward replays prepacked post-op convolutions (float32), below
    # POST_OP_MIN_POSITIONS elsewhere (float64, which has no post-op convolutions)
    limit = folding.MATMUL_MAX_POSITIONS if dtype == torch.float32 else folding.POST_OP_MIN_POSITIONS
    assert calls and all(n * h * w < limit for n, _, h, w in calls)
    if dtype == torch.float64:
        torch.testing.assert_close(out, _unfolded(model, x), atol=1e-12, rtol=1e-12)
    else:
        _assert_fp32_tolerance(out, _unfolded(model, x), _float64(model, x))


def test_no_stale_replay_after_a_module_is_replaced_or_an_attribute_changes():
    """A change that touches no tensor (a ReLU module set on a head that had none, a BatchNorm's eps) still makes
    the next forward fold and trace anew rather than replay the recorded ops."""
    model, x = _model(), _images()
    for _ in range(2):  # fold and record, then replay
        _folded(model, x)
    assert _plans(model)
    model.outs[0].relu = nn.ReLU()  # the first stack's predictions now go through a ReLU
    relu_out, _ = _folded(model, x)
    assert float(relu_out[:, 0].min()) >= 0 and float(_unfolded(model, x)[:, 0].min()) >= 0
    _assert_fp32_tolerance(relu_out, _unfolded(model, x), _float64(model, x))
    for _ in range(3):
        _folded(model, x)
    model.hgs[0][0].up1.bn2.eps = 0.5
    changed, folds = _folded(model, x)
    assert folds == 1
    _assert_fp32_tolerance(changed, _unfolded(model, x), _float64(model, x))
    assert not torch.equal(changed, relu_out)


def test_batched_affines_equal_each_batchnorms_own_bit_for_bit():
    """A refold computes every BatchNorm's (s, t) in one batch; the same values as one BatchNorm at a time, also for
    a BatchNorm without affine parameters, and none for one without running statistics."""
    model = _model()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    plain, untracked = bns[3], bns[5]
    plain.register_parameter("weight", None)
    plain.register_parameter("bias", None)
    untracked.register_buffer("running_mean", None)
    untracked.register_buffer("running_var", None)
    batched = folding._batched_affines(model)
    assert untracked not in batched and len(batched) == len(bns) - 1
    for bn, (s, t) in batched.items():
        want_s, want_t = folding._bn_affine(bn)
        assert s.dtype == torch.float64 and torch.equal(s, want_s) and torch.equal(t, want_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", [torch.contiguous_format, torch.channels_last])
def test_folds_computed_together_equal_fold_conv_bn_bit_for_bit(dtype, variant):
    """Every layer's folded tensors as a refresh computes them together (one multiply per weight, the biases and
    BatchNorm scales on their concatenation) equal `fold_conv_bn`'s and `bn_scale_shift`'s one layer at a time, in
    value, dtype and layout; a BatchNorm with its own eps and one without affine parameters included."""
    model = _model()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[2].eps = 1e-3
    bns[4].register_parameter("weight", None)
    bns[4].register_parameter("bias", None)
    recipes = []
    for m in model.modules():
        if isinstance(m, reference.Residual):
            recipes += [("bn", None, m.bn1), ("conv", m.conv1.conv, m.bn2), ("conv", m.conv2.conv, m.bn3),
                        ("conv", m.conv3.conv, None)]
        elif isinstance(m, reference.Conv) and m.bn is not None:
            recipes.append(("conv", m.conv, m.bn))
    values = folding._compute(recipes, dtype, variant, folding._batched_affines(model))
    for (kind, conv, bn), value in zip(recipes, values, strict=True):
        if kind == "bn":
            want = folding.bn_scale_shift(bn, dtype)
        else:
            w, b = folding.fold_conv_bn(conv, bn, dtype)
            want = (w.contiguous(memory_format=variant), b)
        for got, expected in zip(value, want, strict=True):
            assert got.dtype == expected.dtype and torch.equal(got, expected)
        if kind == "conv":
            assert value[0].is_contiguous(memory_format=variant)


def test_the_cache_holds_every_folded_source_after_a_training_step():
    """After a training forward the refreshed entries carry no per-layer key, but they still hold their sources'
    storages: no other tensor can take a folded weight's address while the model key names it (a parameter replaced
    by a new tensor at the old one's address, with the same version count, would otherwise replay stale weights)."""
    model, x = _model(), _images()
    _folded(model, x)
    model.train()
    model(x)
    model.eval()
    _folded(model, x)
    cache = model.__dict__["_fold_cache"]
    (plan,) = cache.plans.values()
    assert plan.refreshes == 1
    pinned = {st.data_ptr() for entry in cache.entries.values() for st in entry[1]}
    for recipe in plan.recipes.values():
        sources, _ = folding._recipe_sources(recipe)
        assert all(t.untyped_storage().data_ptr() in pinned for t in sources if t is not None), recipe


def test_stack_count_and_submodules_in_training_mode_are_honoured():
    """The model's nstack is part of the model key, and a BatchNorm left in training mode (normalising with batch
    statistics) keeps the whole forward unfolded; a module whose training flag changes nothing (a new ReLU) does not."""
    model, x = _model(), _images()
    _folded(model, x)
    _folded(model, x)
    model.nstack = 1
    out, _ = _folded(model, x)
    assert out.shape[1] == 1
    _assert_fp32_tolerance(out, _unfolded(model, x), _float64(model, x)[:, :1])
    model.nstack = 2
    model.outs[0].relu = nn.ReLU()  # in training mode, as every new module
    with torch.no_grad():
        assert folding.applies(model, "fused")
        model.hgs[0][0].up1.bn2.train()
        assert not folding.applies(model, "fused")
    out, folds = _folded(model, x)
    assert folds == 0 and torch.equal(out, _unfolded(model, x))


def test_a_model_pickles_and_copies_with_an_empty_cache(tmp_path):
    """torch.save(model) and copy.deepcopy work after folded forwards and after a training forward: the copy gets an
    empty cache (the recorded ops hold functions that do not pickle) and folds its own weights."""
    import copy

    model, x = _model(), _images()
    want, _ = _folded(model, x)
    _folded(model, x)
    for after_training in (False, True):
        if after_training:
            model.train()
            model(x)
            model.eval()
            want, _ = _folded(model, x)
        path = tmp_path / f"model{int(after_training)}.pt"
        torch.save(model, path)
        for twin in (torch.load(path, weights_only=False), copy.deepcopy(model)):
            assert _folds(twin) == 0
            out, folds = _folded(twin, x)
            assert folds == _layers(twin) and torch.equal(out, want)


def test_parametrized_weights_under_inference_mode_refresh():
    """A parametrized convolution weight evaluated under inference_mode is an inference tensor (no version counter):
    its layer is refolded at every refresh instead of keyed, and the outputs stay those of the unfolded model."""
    import torch.nn.utils.parametrize as parametrize

    class Twice(nn.Module):
        def forward(self, w):
            return 2 * w

    model, x = _model(), _images()
    parametrize.register_parametrization(model.hgs[0][0].up1.conv2.conv, "weight", Twice())
    for _ in range(4):
        with torch.inference_mode():
            out, unfolded = model(x), _unfolded(model, x)
        torch.testing.assert_close(out, unfolded, rtol=1e-4, atol=1e-4 * float(unfolded.abs().max()))
        with torch.no_grad():
            model.hgs[0][0].up1.conv2.conv.parametrizations.weight.original.mul_(1.5)  # the next forward refreshes


def test_running_statistics_removed_after_recording_give_the_clear_error():
    model, x = _model(), _images()
    _folded(model, x)
    _folded(model, x)
    bn = model.hgs[0][0].up1.bn2
    bn.register_buffer("running_mean", None)
    bn.register_buffer("running_var", None)
    for _ in range(2):
        with pytest.raises(ValueError, match="every BatchNorm needs running statistics"):
            _folded(model, x)


def test_recorded_forwards_are_capped(monkeypatch):
    monkeypatch.setattr(folding, "MAX_PLANS", 2)
    model = _model()
    for batch in (1, 2, 3):
        _folded(model, _images(batch))
    assert [key[1][0] for key in _plans(model)] == [2, 3]
    for batch in (1, 2, 3):
        _assert_fp32_tolerance(_folded(model, _images(batch))[0], _unfolded(model, _images(batch)),
                               _float64(model, _images(batch)))


@pytest.mark.parametrize("optimizer", ["adam_fused", "sgd_fused", "adam"])
def test_an_optimizer_step_is_never_missed(optimizer):
    """The fused optimizers write the parameters without bumping their version counters: a folded forward after
    their step (with no training forward since the last folded one, e.g. a prediction logged between backward and
    step) still sees the new weights, through the optimizer step hook that releases the model's folded tensors."""
    model, x = _model(), _images()
    make = {"adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
            "sgd_fused": lambda p: torch.optim.SGD(p, lr=1e-1, fused=True),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[optimizer]
    opt = make(model.parameters())
    other = make(_model().parameters())  # another model's optimizer leaves this one's folded tensors alone
    model.train()
    model(x).square().mean().backward()
    model.eval()
    before, _ = _folded(model, x)
    _folded(model, x)
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    other.step()
    assert _folded(model, x)[1] == 0 and model.__dict__["_fold_cache"].entries
    version = model.pre[0].conv.weight._version
    opt.step()
    if optimizer != "adam":
        assert model.pre[0].conv.weight._version == version  # the case the hook is for
    after, _ = _folded(model, x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _folded(_fresh_copy(model), x)[0])
    assert torch.equal(_folded(model, x)[0], after)
    _assert_fp32_tolerance(after, _unfolded(model, x), _float64(model, x))


def test_a_held_model_key_keeps_its_tensors_alive():
    """A recording's model key names every parameter's address: it holds those tensors, so that a parameter replaced
    (and refolded by another shape's forward) cannot be freed and its address taken by a new parameter with the same
    version count, which would pass for the old one and replay its folded weights."""
    import gc
    import weakref

    model, small, large = _model(), _images(1), _images(2)
    for x in (small, large, small, large):
        _folded(model, x)
    conv = model.hgs[0][0].low3.conv2.conv
    old = weakref.ref(conv.weight)
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))
    _folded(model, small)  # this shape refreshes and refolds the layer; the other shape's recording still names `old`
    gc.collect()
    assert old() is not None
    _assert_fp32_tolerance(_folded(model, large)[0], _unfolded(model, large), _float64(model, large))


@requires_post_ops
def test_packing_cut_short_resumes(monkeypatch):
    """A pack interrupted part-way (Ctrl-C in the first replay) leaves some weights packed: the next forward packs
    the rest and replays, the same output bit for bit."""
    model, x = _model(), _images()
    first, _ = _folded(model, x)
    (plan,) = _plans(model).values()
    pack, calls = folding._PACK, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return pack(*args)

    monkeypatch.setattr(folding, "_PACK", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _folded(model, x)
    assert not plan.packed
    monkeypatch.setattr(folding, "_PACK", pack)
    assert torch.equal(_folded(model, x)[0], first) and plan.packed
    plan.pack()  # packing again changes nothing
    assert torch.equal(_folded(model, x)[0], first)
