// CPU kernels of max_pool2x2 and its argmax-recomputing backward. Both layouts are native: NCHW walks output
// rows, channels_last walks output pixels with the channel as the contiguous inner axis.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"
#include "ops/max_pool.h"

namespace fused_hourglass {
namespace {

// Calls body(q, window, dx, dy) for every output element q (its offset in the dense output) with `window` the
// offset of its top-left tap in the dense input and dx, dy the tap steps.
template <typename Body>
void for_each_window(bool channels_last, int64_t n, int64_t c, int64_t in_h, int64_t in_w, const Body& body) {
  const int64_t ph = in_h / 2, pw = in_w / 2;
  if (channels_last) {
    at::parallel_for(0, n * ph * pw, grain_for(4 * c), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t origin = pool2x2_origin_nhwc(pix * c, c, in_h, in_w);
        for (int64_t ch = 0; ch < c; ++ch) body(pix * c + ch, origin + ch, c, in_w * c);
      }
    });
  } else {
    at::parallel_for(0, n * c * ph, grain_for(2 * in_w), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t origin = pool2x2_origin_nchw(r * pw, in_h, in_w);
        for (int64_t x = 0; x < pw; ++x) body(r * pw + x, origin + 2 * x, int64_t{1}, in_w);
      }
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
    for_each_window(fmt == at::MemoryFormat::ChannelsLast, n, c, in_h, in_w,
                    [&](int64_t q, int64_t w, int64_t dx, int64_t dy) {
                      const scalar_t* p = in + w;
                      o[q] = p[tap_offset(window_argmax(p, dx, dy), dx, dy)];
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
    // Windows tile the input exactly (even H and W), so every element of dx is written once: the window's
    // gradient at its argmax, zero at the other three taps.
    for_each_window(fmt == at::MemoryFormat::ChannelsLast, n, c, in_h, in_w,
                    [&](int64_t q, int64_t w, int64_t dx, int64_t dy) {
                      const int k = window_argmax(in + w, dx, dy);
                      for (int t = 0; t < 4; ++t) d[w + tap_offset(t, dx, dy)] = t == k ? g[q] : scalar_t(0);
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
