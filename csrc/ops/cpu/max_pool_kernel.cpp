// CPU kernels of max_pool2x2 and its argmax-recomputing backward. Both layouts are native: NCHW walks pairs of
// input rows, channels_last walks output pixels with the channel as the contiguous (vectorised) inner axis.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"
#include "ops/max_pool.h"

namespace fused_hourglass {
namespace {

// Calls row(out_offset, in_offset, count, dx, dy) over runs of `count` windows whose top-left taps are
// in_offset + j·step (step = 2 in NCHW, 1 in channels_last) and whose outputs are out_offset + j.
template <typename Row>
void for_each_window_run(bool channels_last, int64_t n, int64_t c, int64_t in_h, int64_t in_w, const Row& row) {
  const int64_t ph = in_h / 2, pw = in_w / 2;
  if (channels_last) {
    at::parallel_for(0, n * ph * pw, grain_for(4 * c), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) row(pix * c, pool2x2_origin_nhwc(pix * c, c, in_h, in_w), c, c, in_w * c);
    });
  } else {
    at::parallel_for(0, n * c * ph, grain_for(2 * in_w), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(r * pw, pool2x2_origin_nchw(r * pw, in_h, in_w), pw, int64_t{1}, in_w);
    });
  }
}

// In a run, window j starts at in + j·step: step = 2 and dx = 1 in NCHW, step = 1 and dx = C in channels_last.
// Both are compile-time in NCHW so its stride-2 loads vectorise as such.
template <bool kChannelsLast, typename scalar_t>
FH_CPU_CLONES void pool_run(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t count, int64_t dx_in, int64_t dy) {
  const int64_t step = kChannelsLast ? 1 : 2, dx = kChannelsLast ? dx_in : 1;
  for (int64_t j = 0; j < count; ++j) {
    out[j] = window_max(in + j * step, dx, dy);
  }
}

template <bool kChannelsLast, typename scalar_t>
FH_CPU_CLONES void unpool_run(const scalar_t* __restrict__ in, const scalar_t* __restrict__ grad,
                scalar_t* __restrict__ dx_out, int64_t count, int64_t dx_in, int64_t dy) {
  const int64_t step = kChannelsLast ? 1 : 2, dx = kChannelsLast ? dx_in : 1;
  const scalar_t zero(0);
  // Windows tile the input exactly (even H and W), so every element of dx is written once: the window's
  // gradient at its argmax, zero at the other three taps. Four selects (not an indexed store after four zero
  // stores) keep the loop free of data-dependent addresses, so it vectorises across windows.
  for (int64_t j = 0; j < count; ++j) {
    const int64_t o = j * step;
    const int best = window_argmax(in + o, dx, dy);
    const scalar_t g = grad[j];
    dx_out[o] = best == 0 ? g : zero;
    dx_out[o + dx] = best == 1 ? g : zero;
    dx_out[o + dy] = best == 2 ? g : zero;
    dx_out[o + dy + dx] = best == 3 ? g : zero;
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
    for_each_window_run(cl, n, c, in_h, in_w, [&](int64_t q, int64_t w, int64_t count, int64_t dx, int64_t dy) {
      cl ? pool_run<true>(in + w, o + q, count, dx, dy) : pool_run<false>(in + w, o + q, count, dx, dy);
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
    for_each_window_run(cl, n, c, in_h, in_w, [&](int64_t q, int64_t w, int64_t count, int64_t dx, int64_t dy) {
      cl ? unpool_run<true>(in + w, g + q, d + w, count, dx, dy) : unpool_run<false>(in + w, g + q, d + w, count, dx, dy);
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
