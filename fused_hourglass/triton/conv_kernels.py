"""Triton kernels of the fused BN-ReLU-conv chain (DESIGN.md §2), forward and backward.

Activations are NHWC and contiguous, so an [N, H, W, C] tensor is a row-major [M, C] matrix with M = N·H·W:
a 1×1 convolution is a GEMM over those rows and a 3×3 (stride 1, pad 1) one an implicit GEMM over nine row
shifts ("taps"). A convolution's input u is the tensor *before* its BatchNorm; the kernels apply
r = relu(u·scale + shift) to every A tile as it is loaded (the prologue), so r is never written.

Numerics shared by every kernel:
- products accumulate in fp32 (`tl.dot` with an fp32 accumulator); fp32 operands use IEEE products unless the
  caller asks for TF32 (`DOT_PRECISION`);
- the prologue runs in fp32 on the loaded tile and is rounded to the operand dtype just before the product,
  exactly where the reference rounds r;
- padding is applied after the prologue: an out-of-image tap contributes 0, not relu(shift);
- statistics partials are written per M tile of `BLOCK_M` rows into a [T, C] buffer (T = cdiv(M, BLOCK_M)) and
  reduced by the caller, so results are deterministic (no float atomics). `BLOCK_M` of the kernels that write
  such partials is fixed per platform and never autotuned, so every autotune configuration fills the same rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Fixed (untuned) tile sizes a GPU launches with; the interpreter's are 16 so small test shapes span several tiles.
# `gpu_tiles` switches the interpreter to these.
_GPU_TILES = {"STATS_BLOCK_M": 128, "WGRAD_ROW_QUANTUM": 128, "EW_BLOCK_M": 64, "EW_BLOCK_C": 64}
# Rows per M tile of the kernels that emit per-tile statistics partials (forward and dgrad). Fixed, not tuned.
STATS_BLOCK_M = 16 if INTERPRET else _GPU_TILES["STATS_BLOCK_M"]


# Configuration sets, by the GPU they are tuned for (`config_set`): 80, the A100's (and every GPU that is not a
# Hopper), and 90, Hopper's (H100 / H200: 227 KiB of shared memory per block, wgmma).
CONFIG_SETS = (80, 90)


def config_set(cc: int) -> int:
    """The configuration set for compute capability `cc` (major·10 + minor): 90 for sm_90, else 80."""
    return 90 if cc // 10 == 9 else 80


@functools.cache
def _device_config_set(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return config_set(10 * major + minor)


def device_config_set(device: torch.device) -> int:
    """The configuration set a launch on `device` autotunes over (80 off CUDA, i.e. under the interpreter)."""
    if device.type != "cuda":
        return 80
    return _device_config_set(device.index if device.index is not None else torch.cuda.current_device())


def _conv_configs(fp32: bool, interpret: bool = INTERPRET, arch: int = 80) -> list[triton.Config]:
    """Forward / dgrad tiles: BLOCK_M is STATS_BLOCK_M; BLOCK_N spans output channels, BLOCK_K the reduction.

    bf16 / fp16 (tensor cores; wgmma on sm_90): a 128×128×32 tile takes 16 KiB of shared memory per stage and
    stays below 255 registers with 8 warps. Hopper's set pipelines deeper (4-5 stages, BLOCK_K 64: up to 98 KiB of
    its 227 KiB); 128×256 tiles are left out because with the statistics and residual epilogues they spill with 8
    warps (220-1640 bytes, sm_90) and with 16 (a 128-register cap). fp32 without TF32 is an FMA product whose
    operands live in registers, so its tiles are smaller and always use 8 warps, on both sets. tools/triton_aot.py
    checks every one for spills and shared memory. The interpreter gets one small configuration.
    """
    if interpret:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    if fp32:
        return [
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 32, "BLOCK_K": 16}, num_warps=8, num_stages=3),
        ]
    if arch == 90:
        return [
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=5),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=5),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=5),
        ]
    return [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


def _wgrad_configs(fp32: bool, interpret: bool = INTERPRET, arch: int = 80) -> list[triton.Config]:
    """Weight-gradient tiles: a [BLOCK_K, BLOCK_N] tile of dW reduced over BLOCK_M rows at a time. Hopper's set
    reaches 128×256 with 32 rows per step (128 KiB shared); 64 rows there spill."""
    if interpret:
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_M": 16}, num_warps=1, num_stages=1)]
    if fp32:
        return [
            triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_M": 16}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_K": 32, "BLOCK_N": 64, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        ]
    if arch == 90:
        return [
            triton.Config({"BLOCK_K": 128, "BLOCK_N": 256, "BLOCK_M": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_K": 128, "BLOCK_N": 256, "BLOCK_M": 32}, num_warps=8, num_stages=5),
            triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=5),
            triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_K": 64, "BLOCK_N": 128, "BLOCK_M": 64}, num_warps=4, num_stages=5),
        ]
    return [
        triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64, "BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
    ]


_TUNE_KEY = ["M", "K", "C_OUT", "KSIZE"]
# Rows handled by one split of the weight-gradient reduction are a multiple of every wgrad BLOCK_M.
WGRAD_ROW_QUANTUM = 16 if INTERPRET else _GPU_TILES["WGRAD_ROW_QUANTUM"]
# Elementwise kernels: rows × channels per program.
EW_BLOCK_M = 16 if INTERPRET else _GPU_TILES["EW_BLOCK_M"]
EW_BLOCK_C = 16 if INTERPRET else _GPU_TILES["EW_BLOCK_C"]
# Interpreter work-arounds (triton 3.8): its bf16 `tl.dot` returns garbage, so the operands are widened to fp32
# first (exact: a product of two bf16 or fp16 numbers fits an fp32 mantissa, and accumulation is fp32 anyway); and
# its fp32 → bf16 conversion does not round to nearest even (see `_round`).
_WIDEN_DOT_OPERANDS = tl.constexpr(INTERPRET)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if _WIDEN_DOT_OPERANDS:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 → dtype with round-to-nearest-even, the GPU's conversion. The interpreter's fp32 → bf16 conversion
    truncates (or, asked for RTNE, mis-carries into the exponent), a bias that accumulates in the weight gradient;
    there the rounding is done on the bit pattern so that the final conversion is exact."""
    if dtype == tl.float32:
        out = x
    elif _WIDEN_DOT_OPERANDS and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _conv_bnrelu_forward_kernel(
    u_ptr,  # [N, H, W, K] conv input before its BN, NHWC contiguous (row stride K)
    scale_ptr,  # [K] fp32 BN scale γ·invstd (read only if PROLOGUE)
    shift_ptr,  # [K] fp32 BN shift β − mean·scale (read only if PROLOGUE)
    w_ptr,  # weight [C_OUT, K, KSIZE, KSIZE] addressed through the four strides below
    stride_wn,  # weight stride along output channels
    stride_wk,  # weight stride along input channels
    stride_wh,  # weight stride along the kernel row
    stride_ww,  # weight stride along the kernel column
    bias_ptr,  # [C_OUT] fp32
    res_ptr,  # [M, C_OUT] residual added in the epilogue (read only if HAS_RES)
    low_ptr,  # [N, H/2, W/2, C_OUT] low-resolution branch added nearest-upsampled (read only if HAS_LOW)
    y_ptr,  # [M, C_OUT] output, NHWC contiguous
    sum_ptr,  # [T, C_OUT] fp32 per-tile Σy (written only if STATS)
    m2_ptr,  # [T, C_OUT] fp32 per-tile Σ(y − tile mean)² (written only if STATS)
    M,
    H,
    W,
    K,
    C_OUT,
    KSIZE: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_LOW: tl.constexpr,
    STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < C_OUT
    w_idx = rm % W
    h_idx = (rm // W) % H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, K block) pairs, so the software pipeline spans the whole reduction (a 3×3 over 128
    # channels is 9 × 2 iterations, not 9 loops of 2).
    num_kb = tl.cdiv(K, BLOCK_K)
    for it in range(0, KSIZE * KSIZE * num_kb):
        tap = it // num_kb
        rk = (it - tap * num_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
        dh = tap // KSIZE - KSIZE // 2
        dw = tap % KSIZE - KSIZE // 2
        # The tap reads the same image at (h + dh, w + dw): a shift of dh·W + dw rows when in bounds.
        valid = m_mask & (h_idx + dh >= 0) & (h_idx + dh < H) & (w_idx + dw >= 0) & (w_idx + dw < W)
        src = (rm + dh * W + dw).to(tl.int64)
        k_mask = rk < K
        a_mask = valid[:, None] & k_mask[None, :]
        a = tl.load(u_ptr + src[:, None] * K + rk[None, :], mask=a_mask, other=0.0)
        b = tl.load(w_ptr + tap // KSIZE * stride_wh + tap % KSIZE * stride_ww + rk[:, None] * stride_wk
                    + rn[None, :] * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if PROLOGUE:
            scale = tl.load(scale_ptr + rk, mask=k_mask, other=0.0)
            shift = tl.load(shift_ptr + rk, mask=k_mask, other=0.0)
            r = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
            # Zero padding belongs to r: masked taps must give 0, not relu(shift).
            a = _round(tl.where(a_mask, r, 0.0), b.dtype)
        acc = _mma(a, b, acc, DOT_PRECISION)

    out_mask = m_mask[:, None] & n_mask[None, :]
    acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
    y_off = rm.to(tl.int64)[:, None] * C_OUT + rn[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + y_off, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_LOW:
        # Nearest 2× upsampling: output (n, h, w) reads low (n, h // 2, w // 2).
        n_idx = rm // (H * W)
        low_row = ((n_idx * (H // 2) + h_idx // 2) * (W // 2) + w_idx // 2).to(tl.int64)
        acc += tl.load(low_ptr + low_row[:, None] * C_OUT + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    y = _round(acc, y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off, y, mask=out_mask)
    if STATS:
        # Statistics of the stored (rounded) output, which is what the next BN normalises. The squared deviations
        # are taken about this tile's own mean, so a large common offset does not cancel them away; tiles are
        # combined with Chan's formula by the caller.
        yv = tl.where(out_mask, y.to(tl.float32), 0.0)
        count = tl.sum(m_mask.to(tl.float32), axis=0)
        tile_sum = tl.sum(yv, axis=0)
        dev = tl.where(out_mask, yv - (tile_sum / count)[None, :], 0.0)
        tl.store(sum_ptr + pid_m * C_OUT + rn, tile_sum, mask=n_mask)
        tl.store(m2_ptr + pid_m * C_OUT + rn, tl.sum(dev * dev, axis=0), mask=n_mask)


@triton.jit
def _conv_bnrelu_dgrad_kernel(
    dy_ptr,  # [M, C_OUT] gradient of the conv output, NHWC contiguous
    w_ptr,  # weight [C_OUT, K, KSIZE, KSIZE] addressed through the four strides below
    stride_wn,  # weight stride along output channels
    stride_wk,  # weight stride along input channels
    stride_wh,  # weight stride along the kernel row
    stride_ww,  # weight stride along the kernel column
    u_ptr,  # [M, K] conv input before its BN (read only if PROLOGUE)
    scale_ptr,  # [K] fp32 BN scale, as in the forward prologue (PROLOGUE)
    shift_ptr,  # [K] fp32 BN shift (PROLOGUE)
    mean_ptr,  # [K] fp32 mean the BN normalised with (batch mean in training, running mean in eval) (PROLOGUE)
    invstd_ptr,  # [K] fp32 1/sqrt(var + eps) matching mean_ptr (PROLOGUE)
    dz_ptr,  # [M, K] output: d/dz with z = u·scale + shift if PROLOGUE, else d/d(conv input)
    psum_ptr,  # [T, K] fp32 per-tile Σdz (PROLOGUE)
    pdot_ptr,  # [T, K] fp32 per-tile Σdz·x̂, x̂ = (u − mean)·invstd (PROLOGUE)
    M,
    H,
    W,
    K,
    C_OUT,
    KSIZE: tl.constexpr,
    PROLOGUE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tile over input channels K (the GEMM's output columns here)
    BLOCK_K: tl.constexpr,  # tile over output channels C_OUT (the reduction here)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    k_mask = rk < K
    w_idx = rm % W
    h_idx = (rm // W) % H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_cb = tl.cdiv(C_OUT, BLOCK_K)
    for it in range(0, KSIZE * KSIZE * num_cb):  # flat (tap, C_OUT block) loop, as in the forward kernel
        tap = it // num_cb
        rc = (it - tap * num_cb) * BLOCK_K + tl.arange(0, BLOCK_K)
        dh = tap // KSIZE - KSIZE // 2
        dw = tap % KSIZE - KSIZE // 2
        # Input (h, w) feeds output (h − dh, w − dw) through tap (dh, dw): the transposed convolution.
        valid = m_mask & (h_idx - dh >= 0) & (h_idx - dh < H) & (w_idx - dw >= 0) & (w_idx - dw < W)
        src = (rm - dh * W - dw).to(tl.int64)
        c_mask = rc < C_OUT
        a = tl.load(dy_ptr + src[:, None] * C_OUT + rc[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
        b = tl.load(w_ptr + tap // KSIZE * stride_wh + tap % KSIZE * stride_ww + rc[:, None] * stride_wn
                    + rk[None, :] * stride_wk, mask=c_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _mma(a, b.to(a.dtype), acc, DOT_PRECISION)

    out_mask = m_mask[:, None] & k_mask[None, :]
    off = rm.to(tl.int64)[:, None] * K + rk[None, :]
    if PROLOGUE:
        u = tl.load(u_ptr + off, mask=out_mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + rk, mask=k_mask, other=0.0)
        shift = tl.load(shift_ptr + rk, mask=k_mask, other=0.0)
        # The ReLU mask is recomputed with the forward prologue's exact fp32 expression, so it is bit-identical.
        dz = tl.where(out_mask & (u * scale[None, :] + shift[None, :] > 0.0), acc, 0.0)
        mean = tl.load(mean_ptr + rk, mask=k_mask, other=0.0)
        invstd = tl.load(invstd_ptr + rk, mask=k_mask, other=0.0)
        xhat = (u - mean[None, :]) * invstd[None, :]
        tl.store(psum_ptr + pid_m * K + rk, tl.sum(dz, axis=0), mask=k_mask)
        tl.store(pdot_ptr + pid_m * K + rk, tl.sum(dz * xhat, axis=0), mask=k_mask)
        tl.store(dz_ptr + off, _round(dz, dz_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(dz_ptr + off, _round(acc, dz_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv_bnrelu_wgrad_kernel(
    u_ptr,  # [M, K] conv input before its BN, NHWC contiguous
    scale_ptr,  # [K] fp32 BN scale (read only if PROLOGUE)
    shift_ptr,  # [K] fp32 BN shift (read only if PROLOGUE)
    dy_ptr,  # [M, C_OUT] gradient of the conv output
    dw_ptr,  # [SPLIT, KSIZE·KSIZE, K, C_OUT] fp32 partial dW, one slab per split of the rows
    db_ptr,  # [SPLIT, C_OUT] fp32 partial dbias (written by the programs of tap 0, channel block 0)
    M,
    H,
    W,
    K,
    C_OUT,
    ROWS_PER_SPLIT,  # rows of M reduced by one split; a multiple of BLOCK_M
    KSIZE: tl.constexpr,
    PROLOGUE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_tk = tl.program_id(0)  # tap · cdiv(K, BLOCK_K) + input-channel block
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_kb = tl.cdiv(K, BLOCK_K)
    tap = pid_tk // num_kb
    dh = tap // KSIZE - KSIZE // 2
    dw = tap % KSIZE - KSIZE // 2
    rk = (pid_tk % num_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = rk < K
    n_mask = rn < C_OUT
    if PROLOGUE:
        scale = tl.load(scale_ptr + rk, mask=k_mask, other=0.0)
        shift = tl.load(shift_ptr + rk, mask=k_mask, other=0.0)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < row_end
        w_idx = rm % W
        h_idx = (rm // W) % H
        valid = m_mask & (h_idx + dh >= 0) & (h_idx + dh < H) & (w_idx + dw >= 0) & (w_idx + dw < W)
        src = (rm + dh * W + dw).to(tl.int64)
        a_mask = valid[:, None] & k_mask[None, :]
        d = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * C_OUT + rn[None, :], mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0)
        a = tl.load(u_ptr + src[:, None] * K + rk[None, :], mask=a_mask, other=0.0)
        if PROLOGUE:
            # Recompute r exactly as the forward prologue did (fp32, rounded to the operand dtype), zero padding.
            r = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
            a = _round(tl.where(a_mask, r, 0.0), d.dtype)
        acc = _mma(tl.trans(a), d, acc, DOT_PRECISION)
        if pid_tk == 0:
            db += tl.sum(d.to(tl.float32), axis=0)
    dw_off = ((pid_s * KSIZE * KSIZE + tap) * K + rk.to(tl.int64))[:, None] * C_OUT + rn[None, :]
    tl.store(dw_ptr + dw_off, acc, mask=k_mask[:, None] & n_mask[None, :])
    if pid_tk == 0:
        tl.store(db_ptr + pid_s * C_OUT + rn, db, mask=n_mask)


@triton.jit
def _channel_stats_kernel(
    x_ptr,  # [M, C] NHWC contiguous input whose per-channel batch statistics are wanted
    sum_ptr,  # [T, C] fp32 per-tile Σx, T = cdiv(M, BLOCK_M)
    m2_ptr,  # [T, C] fp32 per-tile Σ(x − tile mean)²
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = rm < M
    c_mask = rc < C
    mask = m_mask[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    count = tl.sum(m_mask.to(tl.float32), axis=0)
    tile_sum = tl.sum(x, axis=0)
    dev = tl.where(mask, x - (tile_sum / count)[None, :], 0.0)
    tl.store(sum_ptr + pid_m * C + rc, tile_sum, mask=c_mask)
    tl.store(m2_ptr + pid_m * C + rc, tl.sum(dev * dev, axis=0), mask=c_mask)


@triton.jit
def _bn_backward_apply_kernel(
    dz_ptr,  # [M, C] gradient with respect to z = u·scale + shift (after the ReLU mask)
    u_ptr,  # [M, C] BN input
    mean_ptr,  # [C] fp32 mean used by the BN
    a_ptr,  # [C] fp32 coefficient of dz: γ·invstd
    b_ptr,  # [C] fp32 coefficient of (u − mean): −γ·invstd²·Σdz·x̂ / M in training, 0 in eval
    c_ptr,  # [C] fp32 constant: −γ·invstd·Σdz / M in training, 0 in eval
    extra_ptr,  # [M, C] gradient reaching u by another path (the identity skip), added (read only if HAS_EXTRA)
    du_ptr,  # [M, C] output gradient of u
    M,
    C,
    HAS_EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # du = (γ·invstd/M)·(M·dz − Σdz − x̂·Σdz·x̂) expanded per channel to a·dz + b·(u − mean) + c.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    mask = (rm < M)[:, None] & c_mask[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    dz = tl.load(dz_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rc, mask=c_mask, other=0.0)
    a = tl.load(a_ptr + rc, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + rc, mask=c_mask, other=0.0)
    c = tl.load(c_ptr + rc, mask=c_mask, other=0.0)
    du = a[None, :] * dz + b[None, :] * (u - mean[None, :]) + c[None, :]
    if HAS_EXTRA:
        du += tl.load(extra_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(du_ptr + off, _round(du, du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_pool2x2_kernel(
    g_ptr,  # [N, H, W, C] NHWC contiguous gradient of the upsample-add output (H, W even)
    out_ptr,  # [N, H/2, W/2, C] NHWC output: the gradient of the low-resolution branch
    M_LOW,  # N·(H/2)·(W/2)
    H,
    W,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rm < M_LOW)[:, None] & (rc < C)[None, :]
    wl = rm % (W // 2)
    hl = (rm // (W // 2)) % (H // 2)
    n = rm // ((W // 2) * (H // 2))
    top = ((n * H + 2 * hl) * W + 2 * wl).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for row in tl.static_range(4):
        src = top + (row // 2) * W + row % 2
        acc += tl.load(g_ptr + src[:, None] * C + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], _round(acc, out_ptr.dtype.element_ty), mask=mask)


# The GEMM kernels autotuned over the same JIT function once per configuration set and operand kind: tensor-core
# tiles for bf16 / fp16 operands, FMA-sized tiles for fp32. `TUNED[name][set][dtype]` is what the launchers run on a
# device of that set (`tuned`), and what tools/triton_aot.py compiles for each arch.
def _autotuned(kernel, configs) -> dict[int, dict[torch.dtype, triton.runtime.Autotuner]]:
    out = {}
    for arch in CONFIG_SETS:
        low, fp32 = (triton.autotune(configs=configs(fp32, arch=arch), key=_TUNE_KEY)(kernel) for fp32 in (False, True))
        out[arch] = {torch.bfloat16: low, torch.float16: low, torch.float32: fp32}
    return out


TUNED = {
    "conv_forward": _autotuned(_conv_bnrelu_forward_kernel, _conv_configs),
    "conv_dgrad": _autotuned(_conv_bnrelu_dgrad_kernel, _conv_configs),
    "conv_wgrad": _autotuned(_conv_bnrelu_wgrad_kernel, _wgrad_configs),
}
_CONFIGS = {"conv_forward": _conv_configs, "conv_dgrad": _conv_configs, "conv_wgrad": _wgrad_configs}
# JIT function → the one configuration its launches use instead of autotuning (set by `gpu_tiles`).
_PINNED: dict[object, triton.Config] = {}


def tuned(name: str, t: torch.Tensor) -> triton.runtime.Autotuner:
    """The autotuned kernel `name` for operands like `t` (its dtype, and its device's configuration set)."""
    return TUNED[name][device_config_set(t.device)][t.dtype]


def gpu_configs(name: str, dtype: torch.dtype, arch: int = 80) -> list[triton.Config]:
    """The configurations `TUNED[name][arch][dtype]` autotunes over on a GPU (also when running under the
    interpreter)."""
    return _CONFIGS[name](dtype == torch.float32, interpret=False, arch=arch)


@contextlib.contextmanager
def gpu_tiles(pinned: dict[str, triton.Config] | None = None) -> Iterator[None]:
    """Launch with the GPU's fixed tile sizes (`STATS_BLOCK_M`, `WGRAD_ROW_QUANTUM`, `EW_BLOCK_M/C`) and, for each
    `TUNED` name in `pinned`, that configuration's block sizes instead of the autotuner's choice (every dtype and
    configuration set).

    For tests under the interpreter, whose own tiles are 16 wide, so that masking, partial tiles and statistics
    partials are exercised at the sizes a GPU launches. Changes module state: not thread-safe, and any statistics
    partials must be combined (`combine_stats`) inside the same block.
    """
    saved = {name: globals()[name] for name in _GPU_TILES}
    pins = {TUNED[name][80][torch.float32].fn: cfg for name, cfg in (pinned or {}).items()}
    globals().update(_GPU_TILES)
    _PINNED.update(pins)
    try:
        yield
    finally:
        globals().update(saved)
        for fn in pins:
            del _PINNED[fn]


# ----------------------------------------------------------------------------------------------------------------
# Launchers, registered as `fused_hourglass::*` ops with `torch.library.triton_op` so torch.compile traces into the
# kernels. Activations are 4-D NHWC-contiguous tensors [N, H, W, C]; weights keep PyTorch's [C_out, C_in, k, k]
# indexing (any strides) and must have the activation dtype; bias and every BN vector are fp32.
# ----------------------------------------------------------------------------------------------------------------

_SM_COUNT_ESTIMATE = 132  # H100 SXM; only sizes the split of the weight-gradient reduction


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through `wrap_triton`, which lets torch.compile trace the kernel and makes it a no-op on fake tensors
    when compiled. An interpreted kernel would instead execute on fake tensors' (absent) storage, so under the
    interpreter a launch with fake arguments is skipped: the op then runs exactly its fake implementation. An
    autotuned kernel whose configuration `gpu_tiles` pinned runs that configuration directly."""
    if INTERPRET and any(isinstance(a, FakeTensor) for a in args):
        return
    if isinstance(kernel, triton.runtime.Autotuner) and (cfg := _PINNED.get(kernel.fn)) is not None:
        kernel = kernel.fn
        kwargs = {**kwargs, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def stats_tiles(m: int) -> int:
    """Rows T of the per-tile statistics partials written for an input of m = N·H·W rows."""
    return triton.cdiv(m, STATS_BLOCK_M)


def wgrad_splits(m: int, k: int, c_out: int, ksize: int) -> int:
    """How many slabs the weight-gradient reduction over m rows is split into, so that the small dW grid still
    fills the GPU (about two programs per SM, counted with nominal 128×128 tiles). Depends on shapes only."""
    if INTERPRET:
        return min(triton.cdiv(m, WGRAD_ROW_QUANTUM), 3)
    tiles = ksize * ksize * triton.cdiv(k, 128) * triton.cdiv(c_out, 128)
    return max(1, min(triton.cdiv(m, WGRAD_ROW_QUANTUM), (2 * _SM_COUNT_ESTIMATE) // tiles, 64))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_nhwc(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 4 or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous 4-D NHWC tensor [N, H, W, C], "
                         f"got shape {list(t.shape)} and strides {list(t.stride())}")


def _check_conv_args(op: str, u: torch.Tensor, weight: torch.Tensor, ksize: int, residual: torch.Tensor | None,
                     low: torch.Tensor | None) -> None:
    _check_nhwc(u, op, "u")
    c_out, c_in = weight.shape[:2]
    if weight.shape != (c_out, u.shape[3], ksize, ksize):
        raise ValueError(f"{op}: weight must be [C_out, {u.shape[3]}, {ksize}, {ksize}] for u {list(u.shape)}, "
                         f"got {list(weight.shape)}")
    if weight.dtype != u.dtype:
        raise TypeError(f"{op}: weight must have u's dtype {u.dtype}, got {weight.dtype}")
    n, h, w, _ = u.shape
    if residual is not None:
        _check_nhwc(residual, op, "residual")
        if residual.shape != (n, h, w, c_out):
            raise ValueError(f"{op}: residual must be {[n, h, w, c_out]}, got {list(residual.shape)}")
    if low is not None:
        _check_nhwc(low, op, "low")
        if h % 2 or w % 2 or low.shape != (n, h // 2, w // 2, c_out):
            raise ValueError(f"{op}: low must be [{n}, H/2, W/2, {c_out}] with H = {h}, W = {w} even, "
                             f"got {list(low.shape)}")


def _conv_forward(u: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor, residual: torch.Tensor | None, low: torch.Tensor | None, stats: bool,
                  ksize: int, op: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_conv_args(op, u, weight, ksize, residual, low)
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: scale and shift must be given together (prologue) or both omitted")
    n, h, w, k = u.shape
    c_out = weight.shape[0]
    m = n * h * w
    y = torch.empty((n, h, w, c_out), dtype=u.dtype, device=u.device)
    tiles = stats_tiles(m) if stats else 0
    psum = torch.empty((tiles, c_out), dtype=torch.float32, device=u.device)
    pm2 = torch.empty((tiles, c_out), dtype=torch.float32, device=u.device)
    if m == 0:
        return y, psum, pm2

    def grid(meta):
        return triton.cdiv(m, STATS_BLOCK_M), triton.cdiv(c_out, meta["BLOCK_N"])

    # Unused pointer arguments are bound to a live tensor; their constexpr flag keeps them unread.
    _launch(
        tuned("conv_forward", u), grid, u, scale if scale is not None else bias,
        shift if shift is not None else bias,
        weight, *weight.stride(), bias, residual if residual is not None else y, low if low is not None else y, y,
        psum if stats else bias, pm2 if stats else bias, m, h, w, k, c_out,
        KSIZE=ksize, PROLOGUE=scale is not None, HAS_RES=residual is not None, HAS_LOW=low is not None,
        STATS=stats, DOT_PRECISION=_dot_precision(u.dtype), BLOCK_M=STATS_BLOCK_M)
    return y, psum, pm2


@torch.library.triton_op("fused_hourglass::conv1x1_bnrelu", mutates_args=())
def conv1x1_bnrelu(u: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, residual: torch.Tensor | None, low: torch.Tensor | None,
                   stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = conv1x1(relu(u·scale + shift)) + bias [+ residual] [+ up2x(low)], with per-tile statistics of y.

    u: [N, H, W, K] NHWC; scale, shift: [K] fp32 or both None (no prologue: the conv reads u itself);
    weight: [C, K, 1, 1]; bias: [C] fp32; residual: [N, H, W, C] or None; low: [N, H/2, W/2, C] or None.
    Returns y [N, H, W, C] and fp32 partials Σy, Σ(y − tile mean)² of shape [T, C] (T = stats_tiles(N·H·W),
    or 0 rows when stats is False); `finalize_stats` reduces them.
    """
    return _conv_forward(u, scale, shift, weight, bias, residual, low, stats, 1, "conv1x1_bnrelu")


@torch.library.triton_op("fused_hourglass::conv3x3_bnrelu", mutates_args=())
def conv3x3_bnrelu(u: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, residual: torch.Tensor | None, low: torch.Tensor | None,
                   stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `conv1x1_bnrelu` for a 3×3, stride 1, zero-padding 1 convolution (weight [C, K, 3, 3]); the padding
    zeros are those of relu(u·scale + shift), as in the reference."""
    return _conv_forward(u, scale, shift, weight, bias, residual, low, stats, 3, "conv3x3_bnrelu")


@torch.library.triton_op("fused_hourglass::conv_bnrelu_dgrad", mutates_args=())
def conv_bnrelu_dgrad(dy: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, scale: torch.Tensor | None,
                      shift: torch.Tensor | None, mean: torch.Tensor | None,
                      invstd: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input gradient of a (1×1 or 3×3, from weight's shape) conv with a BN-ReLU prologue.

    dy: [N, H, W, C]; weight: [C, K, k, k] in dy's dtype; u: [N, H, W, K] the conv input before its BN.
    With scale, shift, mean, invstd ([K] fp32): returns dz = d/dz of z = u·scale + shift (ReLU mask recomputed
    from u) and fp32 per-tile partials Σdz, Σdz·x̂ [T, K]. With all four None: returns d/du of the plain conv
    and empty partials.
    """
    op = "conv_bnrelu_dgrad"
    ksize = weight.shape[-1]
    _check_conv_args(op, u, weight, ksize, None, None)
    _check_nhwc(dy, op, "dy")
    n, h, w, k = u.shape
    c_out = weight.shape[0]
    if dy.shape != (n, h, w, c_out) or dy.dtype != u.dtype:
        raise ValueError(f"{op}: dy must be {[n, h, w, c_out]} of dtype {u.dtype}, got {list(dy.shape)} {dy.dtype}")
    prologue = scale is not None
    if any((t is None) == prologue for t in (shift, mean, invstd)):
        raise ValueError(f"{op}: scale, shift, mean and invstd must be given together or all omitted")
    m = n * h * w
    dz = torch.empty_like(u)
    tiles = stats_tiles(m) if prologue else 0
    psum = torch.empty((tiles, k), dtype=torch.float32, device=u.device)
    pdot = torch.empty((tiles, k), dtype=torch.float32, device=u.device)
    if m == 0:
        return dz, psum, pdot

    def grid(meta):
        return triton.cdiv(m, STATS_BLOCK_M), triton.cdiv(k, meta["BLOCK_N"])

    _launch(
        tuned("conv_dgrad", u), grid, dy, weight, *weight.stride(), u, scale if prologue else dz,
        shift if prologue else dz,
        mean if prologue else dz, invstd if prologue else dz, dz, psum if prologue else dz, pdot if prologue else dz,
        m, h, w, k, c_out, KSIZE=ksize, PROLOGUE=prologue, DOT_PRECISION=_dot_precision(u.dtype),
        BLOCK_M=STATS_BLOCK_M)
    return dz, psum, pdot


@torch.library.triton_op("fused_hourglass::conv_bnrelu_wgrad", mutates_args=())
def conv_bnrelu_wgrad(u: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, dy: torch.Tensor,
                      ksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients of a ksize×ksize conv whose input is relu(u·scale + shift) (or u itself when
    scale and shift are None), with r recomputed from u. Returns fp32 dW [C, K, k, k] (contiguous) and dbias [C];
    the split partials are summed in a fixed order, so the result is deterministic."""
    op = "conv_bnrelu_wgrad"
    _check_nhwc(u, op, "u")
    _check_nhwc(dy, op, "dy")
    n, h, w, k = u.shape
    c_out = dy.shape[3]
    if dy.shape[:3] != u.shape[:3] or dy.dtype != u.dtype or ksize not in (1, 3):
        raise ValueError(f"{op}: dy must be [{n}, {h}, {w}, C] of dtype {u.dtype} and ksize 1 or 3, "
                         f"got dy {list(dy.shape)} {dy.dtype} and ksize {ksize}")
    m = n * h * w
    splits = wgrad_splits(m, k, c_out, ksize)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), WGRAD_ROW_QUANTUM) * WGRAD_ROW_QUANTUM
    dw_parts = torch.zeros((splits, ksize * ksize, k, c_out), dtype=torch.float32, device=u.device)
    db_parts = torch.zeros((splits, c_out), dtype=torch.float32, device=u.device)
    if m > 0:
        def grid(meta):
            return ksize * ksize * triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(c_out, meta["BLOCK_N"]), splits

        _launch(
            tuned("conv_wgrad", u), grid, u, scale if scale is not None else db_parts,
            shift if shift is not None else db_parts, dy, dw_parts,
            db_parts, m, h, w, k, c_out, rows_per_split, KSIZE=ksize, PROLOGUE=scale is not None,
            DOT_PRECISION=_dot_precision(u.dtype))
    dw = dw_parts.sum(0).reshape(ksize, ksize, k, c_out).permute(3, 2, 0, 1).contiguous()
    return dw, db_parts.sum(0)


@torch.library.triton_op("fused_hourglass::channel_stats", mutates_args=())
def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile partials Σx and Σ(x − tile mean)² [T, C] (fp32) of an NHWC tensor [N, H, W, C], for a BN whose
    input is not produced by a conv epilogue (the block input)."""
    _check_nhwc(x, "channel_stats", "x")
    c = x.shape[3]
    m = x.numel() // max(c, 1)
    psum = torch.empty((stats_tiles(m), c), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(psum)
    if m > 0:
        grid = (stats_tiles(m), triton.cdiv(c, EW_BLOCK_C))
        _launch(_channel_stats_kernel, grid, x, psum, pm2, m, c, BLOCK_M=STATS_BLOCK_M,
                                                               BLOCK_C=EW_BLOCK_C)
    return psum, pm2


@torch.library.triton_op("fused_hourglass::bn_backward_apply", mutates_args=())
def bn_backward_apply(dz: torch.Tensor, u: torch.Tensor, mean: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      c: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """du = a·dz + b·(u − mean) + c (+ extra), per channel; see `bn_backward_coefficients`. NHWC [N, H, W, C]."""
    op = "bn_backward_apply"
    _check_nhwc(dz, op, "dz")
    _check_nhwc(u, op, "u")
    if extra is not None:
        _check_nhwc(extra, op, "extra")
    du = torch.empty_like(u)
    ch = u.shape[3]
    m = u.numel() // max(ch, 1)
    if m > 0:
        grid = (triton.cdiv(m, EW_BLOCK_M), triton.cdiv(ch, EW_BLOCK_C))
        _launch(
            _bn_backward_apply_kernel, grid, dz, u, mean, a, b, c, extra if extra is not None else du, du, m, ch,
            HAS_EXTRA=extra is not None,
            BLOCK_M=EW_BLOCK_M, BLOCK_C=EW_BLOCK_C)
    return du


@torch.library.triton_op("fused_hourglass::sum_pool2x2_nhwc", mutates_args=())
def sum_pool2x2_nhwc(g: torch.Tensor) -> torch.Tensor:
    """2×2 stride-2 sum pool of an NHWC [N, H, W, C] tensor (H, W even): the gradient of the upsample-add
    epilogue with respect to the low-resolution branch."""
    _check_nhwc(g, "sum_pool2x2_nhwc", "g")
    n, h, w, c = g.shape
    if h % 2 or w % 2:
        raise ValueError(f"sum_pool2x2_nhwc: g must have even H and W, got {list(g.shape)}")
    out = torch.empty((n, h // 2, w // 2, c), dtype=g.dtype, device=g.device)
    m_low = n * (h // 2) * (w // 2)
    if m_low > 0:
        grid = (triton.cdiv(m_low, EW_BLOCK_M), triton.cdiv(c, EW_BLOCK_C))
        _launch(_sum_pool2x2_kernel, grid, g, out, m_low, h, w, c, BLOCK_M=EW_BLOCK_M,
                                                             BLOCK_C=EW_BLOCK_C)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Per-channel finalisation (tiny [T, C] → [C] reductions in a fixed order; deterministic).
# ----------------------------------------------------------------------------------------------------------------


def combine_stats(psum: torch.Tensor, pm2: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance [C] from per-tile partials of m rows (tiles of STATS_BLOCK_M rows, the last
    one short), by Chan's parallel formula: M2 = Σ M2_t + Σ n_t (mean_t − mean)². No Σy² − (Σy)²/M cancellation."""
    counts = torch.full((psum.shape[0], 1), float(STATS_BLOCK_M), dtype=torch.float32, device=psum.device)
    counts[-1] = m - STATS_BLOCK_M * (psum.shape[0] - 1)
    mean = psum.sum(0) / m
    m2 = pm2.sum(0) + (counts * (psum / counts - mean) ** 2).sum(0)
    return mean, m2 / m


@torch.no_grad()
def finalize_stats(psum: torch.Tensor, pm2: torch.Tensor, m: int, bn: torch.nn.BatchNorm2d
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BN from statistics partials: updates bn's running stats and num_batches_tracked exactly as
    `nn.BatchNorm2d.forward` does, and returns fp32 (scale, shift, mean, invstd) for the prologue."""
    mean, var = combine_stats(psum, pm2, m)
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        # Running variance takes the unbiased estimate M/(M−1), as nn.BatchNorm2d.
        unbiased = var * (m / (m - 1)) if m > 1 else torch.full_like(var, float("nan"))
        bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    return affine_from_stats(mean, var, bn)


def affine_from_stats(mean: torch.Tensor, var: torch.Tensor, bn: torch.nn.BatchNorm2d
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, mean, invstd) in fp32 with scale = γ·invstd and shift = β − mean·scale."""
    mean = mean.float()
    invstd = torch.rsqrt(var.float() + bn.eps)
    weight = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(mean)
    scale = weight * invstd
    return scale.contiguous(), (bias - mean * scale).contiguous(), mean.contiguous(), invstd.contiguous()


def bn_backward_coefficients(gamma: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, sum_dz: torch.Tensor,
                             sum_dz_xhat: torch.Tensor, m: int, training: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (a, b, c) of du = a·dz + b·(u − mean) + c, the expansion of
    du = (γ·invstd/M)·(M·dz − Σdz − x̂·Σdz·x̂) in training and du = dz·γ·invstd in eval (all fp32)."""
    a = gamma * invstd
    if not training:
        zero = torch.zeros_like(a)
        return a.contiguous(), zero, zero.clone()
    b = -a * invstd * sum_dz_xhat / m
    c = -a * sum_dz / m
    return a.contiguous(), b.contiguous(), c.contiguous()
