// CUDA kernels of max_pool2x2 and its argmax-recomputing backward: one thread per output element (grid-stride,
// 64-bit indices), the window choice shared with the CPU kernels (ops/max_pool.h).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/max_pool.h"
#include "ops/cuda/launch.h"

namespace fused_hourglass {
namespace {

// Offset of output element q's window and the tap steps, in the dense input.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t window_of(int64_t q, int64_t c, int64_t in_h, int64_t in_w, int64_t& dx,
                                             int64_t& dy) {
  dx = kChannelsLast ? c : 1;
  dy = kChannelsLast ? in_w * c : in_w;
  return kChannelsLast ? pool2x2_origin_nhwc(q, c, in_h, in_w) : pool2x2_origin_nchw(q, in_h, in_w);
}

template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) max_pool2x2_kernel(const scalar_t* __restrict__ x,
                                                               scalar_t* __restrict__ out, int64_t numel, int64_t c,
                                                               int64_t in_h, int64_t in_w) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < numel; q += stride) {
    int64_t dx, dy;
    out[q] = window_max(x + window_of<kChannelsLast>(q, c, in_h, in_w, dx, dy), dx, dy);
  }
}

// Windows tile the input (even H and W): every element of dx is written exactly once.
template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) max_pool2x2_backward_kernel(const scalar_t* __restrict__ grad,
                                                                        const scalar_t* __restrict__ x,
                                                                        scalar_t* __restrict__ dx_out, int64_t numel,
                                                                        int64_t c, int64_t in_h, int64_t in_w) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < numel; q += stride) {
    int64_t dx, dy;
    const int64_t w = window_of<kChannelsLast>(q, c, in_h, in_w, dx, dy);
    scalar_t d[4];
    route_grad4(x[w], x[w + dx], x[w + dy], x[w + dy + dx], grad[q], d[0], d[1], d[2], d[3]);
#pragma unroll
    for (int t = 0; t < 4; ++t) dx_out[w + tap_offset(t, dx, dy)] = d[t];
  }
}

at::Tensor max_pool2x2_cuda(const at::Tensor& x_in) {
  check_max_pool2x2(x_in, "max_pool2x2");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = output_memory_format(x_in);
  const int64_t n = x_in.size(0), c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor out = at::empty({n, c, in_h / 2, in_w / 2}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t numel = out.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      max_pool2x2_kernel<scalar_t, true><<<blocks_for(numel), kThreads, 0, stream>>>(xp, op, numel, c, in_h, in_w);
    } else {
      max_pool2x2_kernel<scalar_t, false><<<blocks_for(numel), kThreads, 0, stream>>>(xp, op, numel, c, in_h, in_w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor max_pool2x2_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_max_pool2x2_backward(grad_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = output_memory_format(x_in);
  const int64_t c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor dx_out = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  if (dx_out.numel() == 0) return dx_out;
  const at::Tensor x = x_in.contiguous(fmt), grad = grad_in.contiguous(fmt);
  const int64_t numel = grad.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_backward_cuda", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx_out.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      max_pool2x2_backward_kernel<scalar_t, true>
          <<<blocks_for(numel), kThreads, 0, stream>>>(gp, xp, dp, numel, c, in_h, in_w);
    } else {
      max_pool2x2_backward_kernel<scalar_t, false>
          <<<blocks_for(numel), kThreads, 0, stream>>>(gp, xp, dp, numel, c, in_h, in_w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CUDA, m) {
  m.impl("max_pool2x2", &max_pool2x2_cuda);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cuda);
}

}  // namespace fused_hourglass
