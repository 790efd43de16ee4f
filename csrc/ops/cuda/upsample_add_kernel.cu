// CUDA kernels of upsample_add and sum_pool2x2: grid-stride loops over the dense output with 64-bit
// indices; the index and rounding arithmetic is shared with the CPU kernels (ops/upsample_add.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/upsample_add.h"
#include "ops/cuda/launch.h"

namespace fused_hourglass {
namespace {

template <typename scalar_t, bool kChannelsLast>
__global__ void upsample_add_kernel(const scalar_t* __restrict__ low, const scalar_t* __restrict__ skip,
                                    scalar_t* __restrict__ out, int64_t numel, int64_t c, int64_t out_h,
                                    int64_t out_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t src = kChannelsLast ? up2x_source_nhwc(i, c, out_h, out_w) : up2x_source_nchw(i, out_h, out_w);
    out[i] = add_in<scalar_t, acc_t>(skip[i], low[src]);
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void sum_pool2x2_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t numel,
                                   int64_t c, int64_t in_h, int64_t in_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < numel; o += stride) {
    if (kChannelsLast) {
      out[o] = sum4<scalar_t, acc_t>(in + pool2x2_origin_nhwc(o, c, in_h, in_w), c, in_w * c);
    } else {
      out[o] = sum4<scalar_t, acc_t>(in + pool2x2_origin_nchw(o, in_h, in_w), 1, in_w);
    }
  }
}

at::Tensor upsample_add_cuda(const at::Tensor& low_in, const at::Tensor& skip_in) {
  check_upsample_add(low_in, skip_in);
  const c10::cuda::CUDAGuard guard(skip_in.device());
  const auto fmt = output_memory_format(skip_in);
  at::Tensor out = at::empty(skip_in.sizes(), skip_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor skip = skip_in.contiguous(fmt);
  const at::Tensor low = low_in.contiguous(fmt);
  const int64_t numel = out.numel(), c = skip.size(1), out_h = skip.size(2), out_w = skip.size(3);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "upsample_add_cuda", [&] {
    const auto* l = low.const_data_ptr<scalar_t>();
    const auto* s = skip.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      upsample_add_kernel<scalar_t, true><<<blocks_for(numel), kThreads, 0, stream>>>(l, s, o, numel, c, out_h, out_w);
    } else {
      upsample_add_kernel<scalar_t, false><<<blocks_for(numel), kThreads, 0, stream>>>(l, s, o, numel, c, out_h, out_w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sum_pool2x2_cuda(const at::Tensor& grad_in) {
  check_sum_pool2x2(grad_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto fmt = output_memory_format(grad_in);
  const int64_t n = grad_in.size(0), c = grad_in.size(1), in_h = grad_in.size(2), in_w = grad_in.size(3);
  at::Tensor out = at::empty({n, c, in_h / 2, in_w / 2}, grad_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor grad = grad_in.contiguous(fmt);
  const int64_t numel = out.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sum_pool2x2_cuda", [&] {
    const auto* g = grad.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      sum_pool2x2_kernel<scalar_t, true><<<blocks_for(numel), kThreads, 0, stream>>>(g, o, numel, c, in_h, in_w);
    } else {
      sum_pool2x2_kernel<scalar_t, false><<<blocks_for(numel), kThreads, 0, stream>>>(g, o, numel, c, in_h, in_w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CUDA, m) {
  m.impl("upsample_add", &upsample_add_cuda);
  m.impl("sum_pool2x2", &sum_pool2x2_cuda);
}

}  // namespace fused_hourglass
