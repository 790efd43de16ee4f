import pytest
import torch

from fused_hourglass import HeatmapLoss, reference


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_port_key_count_and_parameters_8_256_16():
    model = reference.StackedHourglass(8, 256, 16)
    state = model.state_dict()
    assert len(state) == 2752
    assert _count(model) == 32_819_328
    skip_params = sum(m.skip_layer.conv.weight.numel() + m.skip_layer.conv.bias.numel()
                      for m in model.modules() if isinstance(m, reference.Residual) and not m.need_skip)
    assert skip_params == 7_385_216


def test_port_key_order_2_128_16():
    model = reference.StackedHourglass(2, 128, 16)
    keys = list(model.state_dict())
    assert len(keys) == 742
    assert _count(model) == 2_239_904
    assert keys[:8] == ["pre.0.conv.weight", "pre.0.conv.bias", "pre.0.bn.weight", "pre.0.bn.bias",
                        "pre.0.bn.running_mean", "pre.0.bn.running_var", "pre.0.bn.num_batches_tracked",
                        "pre.1.bn1.weight"]
    residual = ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
                "conv1.conv.weight", "conv1.conv.bias", "bn2.weight", "bn2.bias", "bn2.running_mean",
                "bn2.running_var", "bn2.num_batches_tracked", "conv2.conv.weight", "conv2.conv.bias",
                "bn3.weight", "bn3.bias", "bn3.running_mean", "bn3.running_var", "bn3.num_batches_tracked",
                "conv3.conv.weight", "conv3.conv.bias", "skip_layer.conv.weight", "skip_layer.conv.bias"]
    assert keys[7:7 + len(residual)] == ["pre.1." + k for k in residual]
    # Top-level order: pre, hgs, features, outs, merge_features, merge_preds.
    firsts = []
    for k in keys:
        top = k.split(".")[0]
        if not firsts or firsts[-1] != top:
            firsts.append(top)
    assert firsts == ["pre", "hgs", "features", "outs", "merge_features", "merge_preds"]
    assert "merge_preds.0.conv.conv.weight" in keys
    assert "hgs.1.0.low2.low2.low2.low2.conv3.conv.bias" in keys  # depth-4 recursion, innermost Residual
    assert not any(k.startswith("hgs.0.0.low2.low2.low2.low2.low2") for k in keys)


def test_thirteen_residuals_per_hourglass():
    hg = reference.Hourglass(4, 32)
    assert sum(isinstance(m, reference.Residual) for m in hg.modules()) == 13


def test_increase_not_passed_down():
    hg = reference.Hourglass(4, 16, increase=8)
    assert hg.low1.conv3.conv.out_channels == 24
    assert hg.low2.low1.conv3.conv.out_channels == 24  # the inner hourglass has f = nf = 24, no further increase
    assert hg.low3.conv3.conv.out_channels == 16


def test_skip_layer_applied_only_when_channels_change():
    block = reference.Residual(8, 8).eval()
    with torch.no_grad():
        block.skip_layer.conv.weight.fill_(100.0)
    x = torch.randn(2, 8, 4, 4)
    expected = block.conv3(block.relu(block.bn3(block.conv2(block.relu(block.bn2(
        block.conv1(block.relu(block.bn1(x))))))))) + x
    torch.testing.assert_close(block(x), expected)
    wide = reference.Residual(8, 12).eval()
    assert wide.need_skip
    y = wide(x)
    assert y.shape == (2, 12, 4, 4)


@pytest.mark.parametrize("nstack", [1, 2])
def test_output_shape(nstack):
    model = reference.StackedHourglass(nstack, 32, 5)
    out = model(torch.randn(2, 3, 128, 64))
    assert out.shape == (2, nstack, 5, 32, 16)


def test_nhwc_input_matches_nchw():
    a = reference.StackedHourglass(1, 16, 4).eval()
    b = reference.StackedHourglass(1, 16, 4, input_format="NHWC").eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(b(x.permute(0, 2, 3, 1)), a(x))


def test_channels_last_input_matches():
    model = reference.StackedHourglass(1, 16, 4).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 96, 64), "multiples of 64"),
    ((2, 3, 64, 100), "multiples of 64"),
    ((2, 1, 64, 64), "3 channels"),
    ((3, 64, 64), "4-D"),
])
def test_bad_input_is_rejected_before_any_layer(shape, message):
    model = reference.StackedHourglass(1, 16, 4)
    calls = []
    model.pre[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))
    assert calls == []


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        reference.StackedHourglass(1, 16, 4)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("kwargs, message", [
    ({"nstack": 0}, "nstack"), ({"inp_dim": -1}, "inp_dim"), ({"increase": -2}, "increase"),
    ({"input_format": "HWC"}, "input_format"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reference.StackedHourglass(**kwargs)


def test_training_step_lowers_loss():
    model = reference.StackedHourglass(2, 32, 4)
    x = torch.randn(4, 3, 64, 64)
    target = torch.rand(4, 4, 16, 16)
    loss_fn = HeatmapLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = loss_fn(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_heatmap_loss_matches_port_definition():
    pred = torch.randn(3, 2, 4, 8, 8)
    target = torch.randn(3, 4, 8, 8)
    per_stack = torch.stack([((pred[:, i] - target) ** 2).mean(dim=3).mean(dim=2).mean(dim=1)
                             for i in range(2)], dim=1)
    torch.testing.assert_close(HeatmapLoss(reduction="none")(pred, target), per_stack)
    torch.testing.assert_close(HeatmapLoss()(pred, target), per_stack.mean())


def test_heatmap_loss_errors():
    with pytest.raises(ValueError, match="target must be"):
        HeatmapLoss()(torch.zeros(2, 2, 4, 8, 8), torch.zeros(2, 4, 8, 9))
    with pytest.raises(ValueError, match="pred must be 5-D"):
        HeatmapLoss()(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="reduction"):
        HeatmapLoss(reduction="sum")
