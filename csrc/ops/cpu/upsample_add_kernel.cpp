// CPU kernels of upsample_add and sum_pool2x2. Both layouts are native: the output is written in skip's
// (or grad's) memory format, and an input in the other format is made dense in that one first.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"
#include "ops/upsample_add.h"

namespace fused_hourglass {
namespace {

// One NCHW plane (n, c): out[oh][2j + k] = skip[oh][2j + k] + low[oh / 2][j], k ∈ {0, 1}.
template <typename scalar_t>
FH_CPU_CLONES void up2x_add_plane(const scalar_t* __restrict__ low, const scalar_t* __restrict__ skip,
                                  scalar_t* __restrict__ out, int64_t out_h, int64_t out_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t w = out_w / 2;
  for (int64_t oh = 0; oh < out_h; ++oh) {
    const scalar_t* l = low + (oh / 2) * w;
    const scalar_t* s = skip + oh * out_w;
    scalar_t* o = out + oh * out_w;
    for (int64_t j = 0; j < w; ++j) {
      o[2 * j] = add_in<scalar_t, acc_t>(s[2 * j], l[j]);
      o[2 * j + 1] = add_in<scalar_t, acc_t>(s[2 * j + 1], l[j]);
    }
  }
}

// One NHWC output row (n, oh): pixel ow adds low pixel ow / 2, over all C channels.
template <typename scalar_t>
FH_CPU_CLONES void up2x_add_row_nhwc(const scalar_t* __restrict__ low, const scalar_t* __restrict__ skip,
                                     scalar_t* __restrict__ out, int64_t out_w, int64_t c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t ow = 0; ow < out_w; ++ow) {
    const scalar_t* __restrict__ l = low + (ow / 2) * c;
    const scalar_t* __restrict__ s = skip + ow * c;
    scalar_t* __restrict__ o = out + ow * c;
    for (int64_t ch = 0; ch < c; ++ch) o[ch] = add_in<scalar_t, acc_t>(s[ch], l[ch]);
  }
}

template <typename scalar_t>
void upsample_add_nchw(const scalar_t* low, const scalar_t* skip, scalar_t* out, int64_t nc, int64_t out_h,
                       int64_t out_w) {
  const int64_t plane = out_h * out_w;
  at::parallel_for(0, nc, grain_for(plane), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      up2x_add_plane(low + up2x_source_nchw(p * plane, out_h, out_w), skip + p * plane, out + p * plane, out_h,
                     out_w);
    }
  });
}

template <typename scalar_t>
void upsample_add_nhwc(const scalar_t* low, const scalar_t* skip, scalar_t* out, int64_t n, int64_t c,
                       int64_t out_h, int64_t out_w) {
  const int64_t row = out_w * c;
  at::parallel_for(0, n * out_h, grain_for(row), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      up2x_add_row_nhwc(low + up2x_source_nhwc(r * row, c, out_h, out_w), skip + r * row, out + r * row, out_w, c);
    }
  });
}

at::Tensor upsample_add_cpu(const at::Tensor& low_in, const at::Tensor& skip_in) {
  check_upsample_add(low_in, skip_in);
  const auto fmt = output_memory_format(skip_in);
  at::Tensor out = at::empty(skip_in.sizes(), skip_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor skip = skip_in.contiguous(fmt);
  const at::Tensor low = low_in.contiguous(fmt);
  const int64_t n = skip.size(0), c = skip.size(1), out_h = skip.size(2), out_w = skip.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "upsample_add_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      upsample_add_nhwc(low.const_data_ptr<scalar_t>(), skip.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(), n, c, out_h, out_w);
    } else {
      upsample_add_nchw(low.const_data_ptr<scalar_t>(), skip.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(), n * c, out_h, out_w);
    }
  });
  return out;
}

template <typename scalar_t>
FH_CPU_CLONES void sum_pool2x2_row(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t pw,
                                   int64_t in_w) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t x = 0; x < pw; ++x) out[x] = sum4<scalar_t, acc_t>(in + 2 * x, 1, in_w);
}

template <typename scalar_t>
FH_CPU_CLONES void sum_pool2x2_pixel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t c,
                                     int64_t in_w) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t ch = 0; ch < c; ++ch) out[ch] = sum4<scalar_t, acc_t>(in + ch, c, in_w * c);
}

template <typename scalar_t>
void sum_pool2x2_nchw(const scalar_t* in, scalar_t* out, int64_t nc, int64_t in_h, int64_t in_w) {
  const int64_t ph = in_h / 2, pw = in_w / 2;
  const int64_t grain = grain_for(in_w * 2);
  at::parallel_for(0, nc * ph, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* p = in + pool2x2_origin_nchw(r * pw, in_h, in_w);
      sum_pool2x2_row(p, out + r * pw, pw, in_w);
    }
  });
}

template <typename scalar_t>
void sum_pool2x2_nhwc(const scalar_t* in, scalar_t* out, int64_t n, int64_t c, int64_t in_h, int64_t in_w) {
  const int64_t ph = in_h / 2, pw = in_w / 2;
  const int64_t grain = grain_for(4 * c);
  at::parallel_for(0, n * ph * pw, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      sum_pool2x2_pixel(in + pool2x2_origin_nhwc(q * c, c, in_h, in_w), out + q * c, c, in_w);
    }
  });
}

at::Tensor sum_pool2x2_cpu(const at::Tensor& grad_in) {
  check_sum_pool2x2(grad_in);
  const auto fmt = output_memory_format(grad_in);
  const int64_t n = grad_in.size(0), c = grad_in.size(1), in_h = grad_in.size(2), in_w = grad_in.size(3);
  at::Tensor out = at::empty({n, c, in_h / 2, in_w / 2}, grad_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor grad = grad_in.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sum_pool2x2_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      sum_pool2x2_nhwc(grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, c, in_h, in_w);
    } else {
      sum_pool2x2_nchw(grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n * c, in_h, in_w);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CPU, m) {
  m.impl("upsample_add", &upsample_add_cpu);
  m.impl("sum_pool2x2", &sum_pool2x2_cpu);
}

}  // namespace fused_hourglass
