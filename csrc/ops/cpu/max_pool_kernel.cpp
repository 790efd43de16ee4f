// CPU kernels of max_pool2x2 and its argmax-recomputing backward, both layouts native.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"
#include "ops/max_pool.h"

namespace fused_hourglass {
namespace {

// Channels_last: the windows of one output pixel are C apart in memory and contiguous across channels, so a
// loop over channels vectorises with dx = C. NCHW: window j of a row pair has its taps at 2j and 2j + 1 of
// the two input rows, a stride-2 pattern GCC does not vectorise; the row pair is de-interleaved into chunks of
// four contiguous tap arrays, the arithmetic runs vectorised over those, and the results are interleaved back.
constexpr int64_t kChunk = 64;

template <typename scalar_t>
FH_CPU_CLONES void pool_pixel_nhwc(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t c,
                                   int64_t dy) {
  for (int64_t ch = 0; ch < c; ++ch) out[ch] = window_max(in + ch, c, dy);
}

template <typename scalar_t>
FH_CPU_CLONES void unpool_pixel_nhwc(const scalar_t* __restrict__ in, const scalar_t* __restrict__ grad,
                                     scalar_t* __restrict__ dx_out, int64_t c, int64_t dy) {
  const scalar_t zero(0);
  // Every element of dx is written once: the window's gradient at its argmax, zero at the other three taps.
  for (int64_t ch = 0; ch < c; ++ch) {
    const int best = window_argmax(in + ch, c, dy);
    const scalar_t g = grad[ch];
    dx_out[ch] = best == 0 ? g : zero;
    dx_out[ch + c] = best == 1 ? g : zero;
    dx_out[ch + dy] = best == 2 ? g : zero;
    dx_out[ch + dy + c] = best == 3 ? g : zero;
  }
}

// Taps of `count` ≤ kChunk consecutive windows of an NCHW row pair (top, top + in_w), as four arrays.
template <typename scalar_t>
inline void deinterleave_taps(const scalar_t* top, int64_t in_w, int64_t count, scalar_t (&v)[4][kChunk]) {
  const scalar_t* bottom = top + in_w;
  for (int64_t j = 0; j < count; ++j) {
    v[0][j] = top[2 * j];
    v[1][j] = top[2 * j + 1];
    v[2][j] = bottom[2 * j];
    v[3][j] = bottom[2 * j + 1];
  }
}

template <typename scalar_t>
FH_CPU_CLONES void pool_rows_nchw(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t pw,
                                  int64_t in_w) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t v[4][kChunk];
  for (int64_t j0 = 0; j0 < pw; j0 += kChunk) {
    const int64_t count = std::min(kChunk, pw - j0);
    deinterleave_taps(in + 2 * j0, in_w, count, v);
    for (int64_t j = 0; j < count; ++j) {
      const int k = argmax4<acc_t>(static_cast<acc_t>(v[0][j]), static_cast<acc_t>(v[1][j]),
                                   static_cast<acc_t>(v[2][j]), static_cast<acc_t>(v[3][j]));
      out[j0 + j] = select4(k, v[0][j], v[1][j], v[2][j], v[3][j]);
    }
  }
}

template <typename scalar_t>
FH_CPU_CLONES void unpool_rows_nchw(const scalar_t* __restrict__ in, const scalar_t* __restrict__ grad,
                                    scalar_t* __restrict__ dx_out, int64_t pw, int64_t in_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t zero(0);
  scalar_t v[4][kChunk];
  scalar_t d[4][kChunk];
  for (int64_t j0 = 0; j0 < pw; j0 += kChunk) {
    const int64_t count = std::min(kChunk, pw - j0);
    deinterleave_taps(in + 2 * j0, in_w, count, v);
    for (int64_t j = 0; j < count; ++j) {
      const int best = argmax4<acc_t>(static_cast<acc_t>(v[0][j]), static_cast<acc_t>(v[1][j]),
                                      static_cast<acc_t>(v[2][j]), static_cast<acc_t>(v[3][j]));
      const scalar_t g = grad[j0 + j];
      d[0][j] = best == 0 ? g : zero;
      d[1][j] = best == 1 ? g : zero;
      d[2][j] = best == 2 ? g : zero;
      d[3][j] = best == 3 ? g : zero;
    }
    scalar_t* top = dx_out + 2 * j0;
    scalar_t* bottom = top + in_w;
    for (int64_t j = 0; j < count; ++j) {
      top[2 * j] = d[0][j];
      top[2 * j + 1] = d[1][j];
      bottom[2 * j] = d[2][j];
      bottom[2 * j + 1] = d[3][j];
    }
  }
}

// Calls row(out_offset, in_offset) for each NCHW row pair or channels_last output pixel, in parallel.
template <typename Item>
void for_each_item(bool channels_last, int64_t n, int64_t c, int64_t in_h, int64_t in_w, const Item& item) {
  const int64_t ph = in_h / 2, pw = in_w / 2;
  if (channels_last) {
    at::parallel_for(0, n * ph * pw, grain_for(4 * c), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) item(pix * c, pool2x2_origin_nhwc(pix * c, c, in_h, in_w));
    });
  } else {
    at::parallel_for(0, n * c * ph, grain_for(2 * in_w), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) item(r * pw, pool2x2_origin_nchw(r * pw, in_h, in_w));
    });
  }
}

at::Tensor max_pool2x2_cpu(const at::Tensor& x_in) {
  check_max_pool2x2(x_in, "max_pool2x2");
  const auto fmt = output_memory_format(x_in);
  const int64_t n = x_in.size(0), c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor out = at::empty({n, c, in_h / 2, in_w / 2}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    for_each_item(cl, n, c, in_h, in_w, [&](int64_t q, int64_t w) {
      cl ? pool_pixel_nhwc(in + w, o + q, c, in_w * c) : pool_rows_nchw(in + w, o + q, in_w / 2, in_w);
    });
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
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* d = dx_out.mutable_data_ptr<scalar_t>();
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    for_each_item(cl, n, c, in_h, in_w, [&](int64_t q, int64_t w) {
      cl ? unpool_pixel_nhwc(in + w, g + q, d + w, c, in_w * c) : unpool_rows_nchw(in + w, g + q, d + w, in_w / 2, in_w);
    });
  });
  return dx_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace fused_hourglass
