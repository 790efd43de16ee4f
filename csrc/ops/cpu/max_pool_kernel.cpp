// CPU kernels of max_pool2x2 and its argmax-recomputing backward, both layouts native.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"
#include "ops/max_pool.h"

namespace fused_hourglass {
namespace {

// Both layouts are walked by output rows: output row t (of the N·C·H/2 NCHW rows, or of the N·H/2
// channels_last rows of pixels) reads input rows 2t and 2t + 1, which never straddle planes or images since H
// is even. So a run of output rows maps to a contiguous run of input rows, with no index division per row.
//
// NCHW: window j of a row pair has its taps at 2j and 2j + 1 of the two input rows; GCC vectorises that
// stride-2 access with grouped loads (two vector loads and even/odd shuffles per row) and, in the backward,
// grouped stores (unpacks) for the four taps of dx. Channels_last: the taps of one output pixel are C apart
// and contiguous across channels, so the loop over channels vectorises with plain loads and stores.

template <typename scalar_t>
FH_CPU_CLONES void pool_rows_nchw(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t rows,
                                  int64_t pw) {
  const int64_t in_w = 2 * pw;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* top = in + 2 * r * in_w;
    const scalar_t* bottom = top + in_w;
    scalar_t* o = out + r * pw;
    for (int64_t j = 0; j < pw; ++j) o[j] = max4(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
  }
}

// Every element of dx is written once: the window's gradient at its argmax, zero at the other three taps.
// `stream` writes dx with streaming stores, a piece of each input row at a time (see write_out in cpu_utils.h).
// Unlike write_out, the ordinary stores keep their own loop over whole rows: run through the streamed pieces
// they measured up to 1.5x slower at 16-32 px in channels_last (and no faster in NCHW); with no arithmetic,
// both loops give the same bits.
template <typename scalar_t>
FH_CPU_CLONES void unpool_rows_nchw(const scalar_t* __restrict__ in, const scalar_t* __restrict__ grad,
                                    scalar_t* __restrict__ dx_out, int64_t rows, int64_t pw, bool stream) {
  const int64_t in_w = 2 * pw;
  // Windows per piece: their taps fill half a piece in each of the two input rows.
  constexpr int64_t kWindows = kStreamPieceBytes / (4 * static_cast<int64_t>(sizeof(scalar_t)));
  alignas(64) scalar_t piece_top[2 * kWindows];
  alignas(64) scalar_t piece_bottom[2 * kWindows];
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* top = in + 2 * r * in_w;
    const scalar_t* bottom = top + in_w;
    const scalar_t* g = grad + r * pw;
    scalar_t* d_top = dx_out + 2 * r * in_w;
    scalar_t* d_bottom = d_top + in_w;
    if (!stream) {
      for (int64_t j = 0; j < pw; ++j) {
        scalar_t d0, d1, d2, d3;
        route_grad4(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1], g[j], d0, d1, d2, d3);
        d_top[2 * j] = d0;
        d_top[2 * j + 1] = d1;
        d_bottom[2 * j] = d2;
        d_bottom[2 * j + 1] = d3;
      }
      continue;
    }
    for (int64_t j0 = 0; j0 < pw; j0 += kWindows) {
      const int64_t n = std::min(kWindows, pw - j0);
      const scalar_t* t = top + 2 * j0;
      const scalar_t* b = bottom + 2 * j0;
      for (int64_t j = 0; j < n; ++j) {
        scalar_t d0, d1, d2, d3;
        route_grad4(t[2 * j], t[2 * j + 1], b[2 * j], b[2 * j + 1], g[j0 + j], d0, d1, d2, d3);
        piece_top[2 * j] = d0;
        piece_top[2 * j + 1] = d1;
        piece_bottom[2 * j] = d2;
        piece_bottom[2 * j + 1] = d3;
      }
      stream_copy(d_top + 2 * j0, piece_top, static_cast<size_t>(2 * n) * sizeof(scalar_t));
      stream_copy(d_bottom + 2 * j0, piece_bottom, static_cast<size_t>(2 * n) * sizeof(scalar_t));
    }
  }
}

// Channels_last forward over output rows [0, rows): the first and the second half of the rows side by side, in one
// channel loop, so the input is read as four sequential streams (two row pairs) rather than two. From DRAM at
// C = 256, 64 px, one row pair at a time took 1.2-1.3x the time of the NCHW pool over the same bytes and two
// side by side 12-17% less; four side by side were slower again (their eight taps of a channel can share one L1
// set). The same for the backward measured no gain, so it keeps one row at a time.
template <typename scalar_t>
FH_CPU_CLONES void pool_rows_nhwc(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t rows,
                                  int64_t pw, int64_t c) {
  const int64_t dy = 2 * pw * c;  // one input row of pixels
  const int64_t half = rows / 2, in_half = 2 * half * dy, out_half = half * pw * c;
  for (int64_t r = 0; r < half; ++r) {
    for (int64_t x = 0; x < pw; ++x) {
      const scalar_t* __restrict__ t = in + 2 * r * dy + 2 * x * c;
      scalar_t* __restrict__ o = out + (r * pw + x) * c;
      for (int64_t ch = 0; ch < c; ++ch) {
        o[ch] = max4(t[ch], t[ch + c], t[dy + ch], t[dy + ch + c]);
        o[out_half + ch] = max4(t[in_half + ch], t[in_half + ch + c], t[in_half + dy + ch], t[in_half + dy + ch + c]);
      }
    }
  }
  if (rows % 2 == 1) {
    for (int64_t x = 0; x < pw; ++x) {
      const scalar_t* __restrict__ t = in + 2 * (rows - 1) * dy + 2 * x * c;
      scalar_t* __restrict__ o = out + ((rows - 1) * pw + x) * c;
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = max4(t[ch], t[ch + c], t[dy + ch], t[dy + ch + c]);
    }
  }
}

// Output pixels [0, npix) of one output row: their windows' taps are at top/bottom + 2x·c and + (2x + 1)·c, and
// their input-gradient taps at the same offsets from d_top/d_bottom (the two input rows of dx). `stream` writes
// dx with streaming stores, a block of channels of the four taps at a time (see write_out in cpu_utils.h).
template <typename scalar_t>
FH_CPU_CLONES void unpool_pixels_nhwc(const scalar_t* __restrict__ top, const scalar_t* __restrict__ bottom,
                                      const scalar_t* __restrict__ grad, scalar_t* __restrict__ d_top,
                                      scalar_t* __restrict__ d_bottom, int64_t npix, int64_t c, bool stream) {
  // Channels per block: the block's four taps fill one piece.
  constexpr int64_t kBlock = kStreamPieceBytes / (4 * static_cast<int64_t>(sizeof(scalar_t)));
  alignas(64) scalar_t piece[4][kBlock];
  for (int64_t x = 0; x < npix; ++x) {
    const scalar_t* t = top + 2 * x * c;
    const scalar_t* b = bottom + 2 * x * c;
    const scalar_t* g = grad + x * c;
    scalar_t* dt = d_top + 2 * x * c;
    scalar_t* db = d_bottom + 2 * x * c;
    if (!stream) {
      for (int64_t ch = 0; ch < c; ++ch) {
        scalar_t d0, d1, d2, d3;
        route_grad4(t[ch], t[ch + c], b[ch], b[ch + c], g[ch], d0, d1, d2, d3);
        dt[ch] = d0;
        dt[ch + c] = d1;
        db[ch] = d2;
        db[ch + c] = d3;
      }
      continue;
    }
    for (int64_t c0 = 0; c0 < c; c0 += kBlock) {
      const int64_t n = std::min(kBlock, c - c0);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t ch = c0 + k;
        route_grad4(t[ch], t[ch + c], b[ch], b[ch + c], g[ch], piece[0][k], piece[1][k], piece[2][k], piece[3][k]);
      }
      const size_t bytes = static_cast<size_t>(n) * sizeof(scalar_t);
      stream_copy(dt + c0, piece[0], bytes);
      stream_copy(dt + c + c0, piece[1], bytes);
      stream_copy(db + c0, piece[2], bytes);
      stream_copy(db + c + c0, piece[3], bytes);
    }
  }
}

// bfloat16 as its bits. c10::BFloat16's conversion to float goes through a memcpy in a helper that GCC leaves as a
// scalar call per element, so the loops above ran 4-8x slower in bfloat16 than in float32 (a bf16 autocast step of
// the (2, 128, 16) model spent 10 ms in them, more than eager's pooling). A bfloat16 is the top half of a float:
// the same scan on `Bf16Bits`, comparing the floats that a 16-bit shift makes (exact, NaN stays NaN), vectorises.
// The overloads below are found by argument-dependent lookup when the loops are instantiated with Bf16Bits, and
// keep max4's and route_grad4's rules: the picked element as stored, +0 elsewhere, a −0 or +0 gradient as +0.
struct Bf16Bits {
  uint16_t bits;
};
static_assert(sizeof(Bf16Bits) == sizeof(c10::BFloat16), "bfloat16 is 16 bits");

inline float widen(Bf16Bits v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline Bf16Bits max4(Bf16Bits v0, Bf16Bits v1, Bf16Bits v2, Bf16Bits v3) {
  Bf16Bits m = v0;
  float am = widen(v0);
  float a = widen(v1);
  bool r = replaces_max(a, am);
  m.bits = r ? v1.bits : m.bits;
  am = r ? a : am;
  a = widen(v2);
  r = replaces_max(a, am);
  m.bits = r ? v2.bits : m.bits;
  am = r ? a : am;
  a = widen(v3);
  m.bits = replaces_max(a, am) ? v3.bits : m.bits;
  return m;
}

inline void route_grad4(Bf16Bits v0, Bf16Bits v1, Bf16Bits v2, Bf16Bits v3, Bf16Bits g_in, Bf16Bits& d0,
                        Bf16Bits& d1, Bf16Bits& d2, Bf16Bits& d3) {
  const uint16_t zero = 0;
  const uint16_t g = widen(g_in) == 0.0f ? zero : g_in.bits;
  float m = widen(v0);
  float a = widen(v1);
  bool r = replaces_max(a, m);
  m = r ? a : m;
  d0.bits = r ? zero : g;
  d1.bits = r ? g : zero;
  a = widen(v2);
  r = replaces_max(a, m);
  m = r ? a : m;
  d0.bits = r ? zero : d0.bits;
  d1.bits = r ? zero : d1.bits;
  d2.bits = r ? g : zero;
  a = widen(v3);
  r = replaces_max(a, m);
  d0.bits = r ? zero : d0.bits;
  d1.bits = r ? zero : d1.bits;
  d2.bits = r ? zero : d2.bits;
  d3.bits = r ? g : zero;
}

// The element type the loops run on: bfloat16 as its bits (above), every other type as itself.
template <typename scalar_t>
struct LoopType {
  using type = scalar_t;
};
template <>
struct LoopType<c10::BFloat16> {
  using type = Bf16Bits;
};

// Calls rows(first_output_row, row_count) over the output rows, in parallel; `row_elems` is the number of
// input elements behind one output row (two input rows).
template <typename Rows>
void for_each_row_run(int64_t out_rows, int64_t row_elems, const Rows& rows) {
  at::parallel_for(0, out_rows, grain_for(row_elems),
                   [&](int64_t begin, int64_t end) { rows(begin, end - begin); });
}

at::Tensor max_pool2x2_cpu(const at::Tensor& x_in) {
  check_max_pool2x2(x_in, "max_pool2x2");
  const auto fmt = output_memory_format(x_in);
  const int64_t n = x_in.size(0), c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor out = at::empty({n, c, in_h / 2, in_w / 2}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cpu", [&] {
    using loop_t = typename LoopType<scalar_t>::type;
    const loop_t* in = reinterpret_cast<const loop_t*>(x.const_data_ptr<scalar_t>());
    loop_t* o = reinterpret_cast<loop_t*>(out.mutable_data_ptr<scalar_t>());
    const int64_t pw = in_w / 2;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      for_each_row_run(n * in_h / 2, 2 * in_w * c, [&](int64_t r, int64_t rows) {
        pool_rows_nhwc(in + 2 * r * in_w * c, o + r * pw * c, rows, pw, c);
      });
    } else {
      for_each_row_run(n * c * in_h / 2, 2 * in_w, [&](int64_t r, int64_t rows) {
        pool_rows_nchw(in + 2 * r * in_w, o + r * pw, rows, pw);
      });
    }
  });
  return out;
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_max_pool2x2_backward(grad_in, x_in);
  const auto fmt = output_memory_format(x_in);
  const int64_t n = x_in.size(0), c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor dx_out = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  if (dx_out.numel() == 0) return dx_out;
  const at::Tensor x = x_in.contiguous(fmt), grad = grad_in.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    using loop_t = typename LoopType<scalar_t>::type;
    const loop_t* in = reinterpret_cast<const loop_t*>(x.const_data_ptr<scalar_t>());
    const loop_t* g = reinterpret_cast<const loop_t*>(grad.const_data_ptr<scalar_t>());
    loop_t* d = reinterpret_cast<loop_t*>(dx_out.mutable_data_ptr<scalar_t>());
    const int64_t pw = in_w / 2;
    const bool stream = stream_output(x.nbytes() * 9 / 4);
    if (fmt == at::MemoryFormat::ChannelsLast) {
      // Output row r (of N·H/2) reads input rows 2r and 2r + 1, dy = W·C elements apart.
      const int64_t dy = in_w * c;
      at::parallel_for(0, n * in_h / 2, grain_for(2 * dy), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t top = 2 * r * dy;
          unpool_pixels_nhwc(in + top, in + top + dy, g + r * pw * c, d + top, d + top + dy, pw, c, stream);
        }
        if (stream) stream_fence();
      });
    } else {
      // Output row r (of N·C·H/2) reads the 2·W input elements from 2r·W on.
      const int64_t row_elems = 2 * in_w;
      at::parallel_for(0, n * c * in_h / 2, grain_for(row_elems), [&](int64_t begin, int64_t end) {
        unpool_rows_nchw(in + begin * row_elems, g + begin * pw, d + begin * row_elems, end - begin, pw, stream);
        if (stream) stream_fence();
      });
    }
  });
  return dx_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace fused_hourglass
