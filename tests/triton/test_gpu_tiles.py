"""Every Triton kernel at the tile sizes a GPU launches, against the float64 reference.

The rest of tests/triton runs the interpreter's own 16-wide tiles. Here `conv_kernels.gpu_tiles` switches to the
GPU's fixed sizes (STATS_BLOCK_M = 128 statistics rows, 64×64 element-wise tiles, 128-row weight-gradient splits)
and pins, one at a time, each GPU autotune configuration's block sizes, of both configuration sets (sm_80's and
Hopper's; deduplicated over sets and dtypes: the interpreter ignores warps and stages). Each runs on three shapes
relative to that configuration's tiles: smaller than one tile in every dimension, a little larger than one, and a
ragged multiple. On a CUDA device the same tests launch each configuration of the device's own set for real.

Deselected by default (pyproject's addopts); `python -m pytest -m interp_gpu_tiles tests/triton/test_gpu_tiles.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_hourglass.reference import conv_bnrelu as ref

from .conftest import DEVICE, SKIP_REASON

if SKIP_REASON is None:
    from fused_hourglass.triton import conv_kernels as ck

pytestmark = pytest.mark.interp_gpu_tiles
ops = torch.ops.fused_hourglass
TOL = (5e-5, 5e-5)

# (N, H, W) by how many 128-row statistics tiles M = N·H·W fills; every side even (the upsample-add epilogue).
ROWS = {
    "below": (1, 4, 6),  # M = 24: one partial tile
    "above": (1, 10, 14),  # M = 140: one full tile and 12 rows
    "ragged": (2, 12, 14),  # M = 336: two full tiles and 80 rows
}


def _channels(block: int, size: str) -> int:
    """A channel count below one block of `block`, a little above one, or a ragged multiple."""
    return {"below": max(block - 5, 3), "above": block + 3, "ragged": 2 * block + 7}[size]


def _configs(name: str) -> list:
    """GPU configurations of TUNED[name] over every dtype and configuration set (A100's, Hopper's), one per
    distinct set of block sizes."""
    if SKIP_REASON is not None:
        return []
    seen = {}
    for arch in ck.CONFIG_SETS if DEVICE == "cpu" else (ck.device_config_set(torch.device(DEVICE)),):
        for dtype in (torch.bfloat16, torch.float32):
            for cfg in ck.gpu_configs(name, dtype, arch):
                seen.setdefault(tuple(sorted(cfg.kwargs.items())), cfg)
    return list(seen.values())


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU launches its own configuration set only")
def test_every_configuration_of_every_set_is_exercised():
    """The block sizes this module launches cover each set's configurations, Hopper's largest tiles included; the
    sets differ for bf16 and agree for fp32."""
    for name in ck.TUNED:
        tested = {tuple(sorted(cfg.kwargs.items())) for cfg in _configs(name)}
        for arch in ck.CONFIG_SETS:
            for dtype in (torch.bfloat16, torch.float32):
                assert {tuple(sorted(c.kwargs.items())) for c in ck.gpu_configs(name, dtype, arch)} <= tested
        assert ck.gpu_configs(name, torch.float32, 90) == ck.gpu_configs(name, torch.float32, 80)
        assert ck.gpu_configs(name, torch.bfloat16, 90) != ck.gpu_configs(name, torch.bfloat16, 80)
    wgrad = [cfg.kwargs for cfg in _configs("conv_wgrad")]
    assert {"BLOCK_K": 128, "BLOCK_N": 256, "BLOCK_M": 32} in wgrad
    assert {c.num_stages for c in ck.gpu_configs("conv_forward", torch.bfloat16, 90)} >= {4, 5}


def _cases(name: str) -> list:
    return [pytest.param(cfg, size, id="-".join(f"{k[6:]}{v}" for k, v in cfg.kwargs.items()) + f"-{size}")
            for cfg in _configs(name) for size in ROWS]


def _randn(g, *shape, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=g) * scale + offset).to(DEVICE)


def _d(t):
    return None if t is None else t.detach().double().cpu()


def _close(actual, expected, tol=TOL):
    torch.testing.assert_close(_d(actual), _d(expected), atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("cfg, size", _cases("conv_forward"))
def test_conv_forward(cfg, size, ksize):
    """Prologue, residual and upsample-add epilogues and statistics partials all on (the largest variant)."""
    n, h, w = ROWS[size]
    c, k = _channels(cfg.kwargs["BLOCK_N"], size), _channels(cfg.kwargs["BLOCK_K"], size)
    g = torch.Generator().manual_seed(20)
    u, scale, shift = _randn(g, n, h, w, k, scale=2, offset=0.5), _randn(g, k, scale=0.3, offset=1), _randn(g, k)
    weight, bias = _randn(g, c, k, ksize, ksize, scale=(k * ksize * ksize) ** -0.5), _randn(g, c)
    residual, low = _randn(g, n, h, w, c), _randn(g, n, h // 2, w // 2, c)
    conv = ops.conv1x1_bnrelu if ksize == 1 else ops.conv3x3_bnrelu
    with ck.gpu_tiles({"conv_forward": cfg}):
        y, psum, pm2 = conv(u, scale, shift, weight, bias, residual, low, True)
        assert psum.shape == (-(-n * h * w // 128), c)
        mean, var = ck.combine_stats(psum, pm2, n * h * w)
    expected = ref.conv_bnrelu(_d(u), _d(scale), _d(shift), _d(weight), _d(bias), _d(residual), _d(low))
    _close(y, expected)
    exp_mean, exp_var = ref.batch_stats(expected)
    _close(mean, exp_mean)
    _close(var, exp_var)


@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("cfg, size", _cases("conv_dgrad"))
def test_conv_dgrad(cfg, size, ksize):
    """dgrad's output columns are the conv's input channels K (BLOCK_N) and its reduction the C_out (BLOCK_K)."""
    n, h, w = ROWS[size]
    k, c = _channels(cfg.kwargs["BLOCK_N"], size), _channels(cfg.kwargs["BLOCK_K"], size)
    g = torch.Generator().manual_seed(21)
    u, dy = _randn(g, n, h, w, k, scale=2, offset=0.5), _randn(g, n, h, w, c)
    weight = _randn(g, c, k, ksize, ksize, scale=(c * ksize * ksize) ** -0.5)
    mean, invstd, gamma, beta = _randn(g, k), _randn(g, k, scale=0.2, offset=1), _randn(g, k, scale=0.3, offset=1), \
        _randn(g, k)
    scale = gamma * invstd
    shift = beta - mean * scale
    with ck.gpu_tiles({"conv_dgrad": cfg}):
        dz, psum, pdot = ops.conv_bnrelu_dgrad(dy, weight, u, scale, shift, mean, invstd)
    z = (_d(u) * _d(scale) + _d(shift)).requires_grad_()
    y = ref.conv_bnrelu(z, torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), _d(weight),
                        torch.zeros(c, dtype=torch.float64))
    (expected,) = torch.autograd.grad(y, z, _d(dy))
    _close(dz, expected)
    assert psum.shape == pdot.shape == (-(-n * h * w // 128), k)
    xhat = (_d(u) - _d(mean)) * _d(invstd)
    _close(psum.sum(0), expected.reshape(-1, k).sum(0))
    _close(pdot.sum(0), (expected * xhat).reshape(-1, k).sum(0))


@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("cfg, size", _cases("conv_wgrad"))
def test_conv_wgrad(cfg, size, ksize):
    """dW tiles are [BLOCK_K input channels, BLOCK_N output channels], reduced BLOCK_M rows at a time inside
    128-row splits (the ragged shape's last split is short)."""
    n, h, w = ROWS[size]
    k, c = _channels(cfg.kwargs["BLOCK_K"], size), _channels(cfg.kwargs["BLOCK_N"], size)
    g = torch.Generator().manual_seed(22)
    u, scale, shift = _randn(g, n, h, w, k, scale=2, offset=0.5), _randn(g, k, scale=0.3, offset=1), _randn(g, k)
    dy = _randn(g, n, h, w, c)
    with ck.gpu_tiles({"conv_wgrad": cfg}):
        dw, db = ops.conv_bnrelu_wgrad(u, scale, shift, dy, ksize)
    wt = torch.zeros(c, k, ksize, ksize, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    exp_dw, exp_db = torch.autograd.grad(ref.conv_bnrelu(_d(u), _d(scale), _d(shift), wt, bt), [wt, bt], _d(dy))
    _close(dw, exp_dw, (2e-4, 5e-5))
    _close(db, exp_db, (2e-4, 5e-5))


# Element-wise kernels: 64 × 64 tiles (channel_stats: 128 rows, the statistics tile). (N, H, W, C) per size.
EW_SHAPES = {"below": (1, 4, 6, 20), "above": (1, 18, 16, 67), "ragged": (2, 18, 20, 133)}


@pytest.mark.parametrize("size", EW_SHAPES)
def test_channel_stats(size):
    n, h, w, c = EW_SHAPES[size]
    x = _randn(torch.Generator().manual_seed(23), n, h, w, c, offset=1e3)  # |mean| ≫ std
    with ck.gpu_tiles():
        psum, pm2 = ops.channel_stats(x)
        assert psum.shape == (-(-n * h * w // 128), c)
        mean, var = ck.combine_stats(psum, pm2, n * h * w)
    exp_mean, exp_var = ref.batch_stats(_d(x))
    torch.testing.assert_close(_d(mean), exp_mean, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(_d(var), exp_var, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("size", EW_SHAPES)
def test_bn_backward_apply(size):
    n, h, w, c = EW_SHAPES[size]
    g = torch.Generator().manual_seed(24)
    dz, u, extra = _randn(g, n, h, w, c), _randn(g, n, h, w, c, scale=3, offset=1), _randn(g, n, h, w, c)
    mean, a, b, cc = (_randn(g, c) for _ in range(4))
    with ck.gpu_tiles():
        du = ops.bn_backward_apply(dz, u, mean, a, b, cc, extra)
    _close(du, _d(a) * _d(dz) + _d(b) * (_d(u) - _d(mean)) + _d(cc) + _d(extra))


@pytest.mark.parametrize("size", EW_SHAPES)
def test_sum_pool2x2_nhwc(size):
    n, h, w, c = EW_SHAPES[size]  # N·H/2·W/2 = 6, 72, 180 rows of 64
    grad = _randn(torch.Generator().manual_seed(25), n, h, w, c)
    with ck.gpu_tiles():
        out = ops.sum_pool2x2_nhwc(grad)
    _close(out, F.avg_pool2d(_d(grad).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1) * 4)


def test_gpu_tiles_pins_the_configuration_and_restores_state():
    """The pinned block sizes reach the kernel (a BLOCK_N that is not a power of two is rejected by tl.arange,
    where the autotuner's own configurations would run), and module state comes back afterwards, also on error."""
    import triton

    before = (ck.STATS_BLOCK_M, ck.WGRAD_ROW_QUANTUM, ck.EW_BLOCK_M, ck.EW_BLOCK_C)
    g = torch.Generator().manual_seed(26)
    u, weight, bias = _randn(g, 1, 2, 2, 8), _randn(g, 8, 8, 1, 1), _randn(g, 8)
    bad = triton.Config({"BLOCK_N": 24, "BLOCK_K": 16}, num_warps=4, num_stages=1)
    with pytest.raises(Exception, match="power of 2|power of two"), ck.gpu_tiles({"conv_forward": bad}):
        assert (ck.STATS_BLOCK_M, ck.EW_BLOCK_M) == (128, 64)
        ops.conv1x1_bnrelu(u, None, None, weight, bias, None, None, False)
    assert (ck.STATS_BLOCK_M, ck.WGRAD_ROW_QUANTUM, ck.EW_BLOCK_M, ck.EW_BLOCK_C) == before
    assert not ck._PINNED
    y, _, _ = ops.conv1x1_bnrelu(u, None, None, weight, bias, None, None, False)  # the autotuner again
    _close(y, ref.conv_bnrelu(_d(u), None, None, _d(weight), _d(bias)))
