// CUDA kernels of the BN-ReLU ops. The per-element arithmetic and the Welford update/merge are the shared
// FH_HOST_DEVICE functions of ops/bn_relu.h, exercised by the CPU tests.
//
// Per-channel reductions (bn_stats, bn_relu_backward_reduce) run in two deterministic stages, no atomics:
//   1. reduce_partial_*: grid (channel or channel tile) × slices; each thread accumulates a state over its
//      strided share of the slice, the block merges its states in a fixed tree (warp shuffles, then shared
//      memory) and writes one partial per (channel, slice).
//   2. reduce_finalize: one warp per channel merges the slices' partials in a fixed order and writes the outputs.
// The results therefore depend on the shape only, never on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "ops/bn_relu.h"
#include "ops/cuda/launch.h"

namespace fused_hourglass {
namespace {

constexpr int kWarp = 32;
constexpr int kTileRows = kThreads / kWarp;  // channels_last partials: 32 channels × 8 row lanes per block
constexpr int64_t kValuesPerSlice = 16384;   // about 64 values per thread per partial
constexpr int64_t kMaxSlices = 256;

inline int slices_for(int64_t m) {
  return static_cast<int>(std::clamp<int64_t>((m + kValuesPerSlice - 1) / kValuesPerSlice, 1, kMaxSlices));
}

// V consecutive values moved as one aligned 16-byte (or narrower) load or store.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

template <int V, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, V> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, V>*>(p);
}

template <int V, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, V>& x) {
  *reinterpret_cast<Pack<scalar_t, V>*>(p) = x;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
__device__ __forceinline__ T shfl_down(T x, int delta) {
  return __shfl_down_sync(0xffffffffu, x, delta);
}

__device__ __forceinline__ int64_t shfl_down(int64_t x, int delta) {
  return static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(x), delta));
}

// ---------------------------------------------------------------------------------------------------------
// Reduction policies: State, an identity, add (one value of u, and of the incoming gradient when kReadsGrad),
// merge, shuffle, and finish (the channel's outputs from its merged state).

template <typename scalar_t>
struct StatsOp {
  using acc_t = at::opmath_type<scalar_t>;
  using State = WelfordState<acc_t>;
  static constexpr bool kReadsGrad = false;
  struct Params {
    const scalar_t* u;
    int64_t channel_stride;  // offset of channel c's first value (n = h = w = 0) is c·channel_stride
    acc_t eps;
    acc_t* mean;
    acc_t* var;
    acc_t* invstd;
  };
  acc_t pivot;

  static __device__ StatsOp make(const Params& p, int64_t c) {
    return {welford_pivot(static_cast<acc_t>(p.u[c * p.channel_stride]))};
  }
  static __device__ State identity() { return {acc_t(0), acc_t(0), acc_t(0), 0}; }
  __device__ void add(State& s, acc_t u, acc_t) const {
    const acc_t x = u - pivot;
    s.count += 1;
    welford_step(s.mean, s.m2, x, acc_t(1) / static_cast<acc_t>(s.count));
    s.nonfinite += welford_nonfinite(x);
  }
  static __device__ State merge(const State& a, const State& b) { return welford_merge(a, b); }
  static __device__ State shuffle(const State& s, int delta) {
    return {shfl_down(s.mean, delta), shfl_down(s.m2, delta), shfl_down(s.nonfinite, delta), shfl_down(s.count, delta)};
  }
  static __device__ void finish(const Params& p, int64_t c, const State& s) {
    welford_finalize(s, make(p, c).pivot, p.eps, p.mean[c], p.var[c], p.invstd[c]);
  }
};

template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xc;  // Σ dz·(u − mean); times invstd it is Σ dz·x̂
};

template <typename scalar_t>
struct GradSumsOp {
  using acc_t = at::opmath_type<scalar_t>;
  using State = GradSums<acc_t>;
  static constexpr bool kReadsGrad = true;
  struct Params {
    const acc_t* scale;
    const acc_t* shift;
    const acc_t* mean;
    const acc_t* invstd;
    acc_t* sum_dz;
    acc_t* sum_dz_xhat;
  };
  acc_t scale, shift, mean;

  static __device__ GradSumsOp make(const Params& p, int64_t c) { return {p.scale[c], p.shift[c], p.mean[c]}; }
  static __device__ State identity() { return {acc_t(0), acc_t(0)}; }
  __device__ void add(State& s, acc_t x, acc_t dr) const {
    const acc_t dz = relu_grad(dr, bn_affine(x, scale, shift));
    s.dz += dz;
    s.dz_xc += dz * (x - mean);
  }
  static __device__ State merge(const State& a, const State& b) { return {a.dz + b.dz, a.dz_xc + b.dz_xc}; }
  static __device__ State shuffle(const State& s, int delta) {
    return {shfl_down(s.dz, delta), shfl_down(s.dz_xc, delta)};
  }
  static __device__ void finish(const Params& p, int64_t c, const State& s) {
    p.sum_dz[c] = s.dz;
    p.sum_dz_xhat[c] = s.dz_xc * p.invstd[c];
  }
};

// Lane 0 ends with the merge of the warp's 32 states, always merged in the same tree order.
template <typename Op>
__device__ __forceinline__ typename Op::State warp_merge(typename Op::State s) {
  for (int delta = kWarp / 2; delta > 0; delta /= 2) s = Op::merge(s, Op::shuffle(s, delta));
  return s;
}

// NCHW partials: block (c, slice) reduces values m ∈ slice of channel c, m = n·HW + hw, V at a time (HW % V == 0,
// so a pack never straddles two planes).
template <typename scalar_t, typename Op, int V>
__global__ void __launch_bounds__(kThreads) reduce_partial_nchw(const scalar_t* __restrict__ u,
                                                                const scalar_t* __restrict__ dr,
                                                                const typename Op::Params params, int64_t c_total,
                                                                int64_t hw, int64_t m, typename Op::State* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using State = typename Op::State;
  const int64_t c = blockIdx.x;
  const int64_t slices = gridDim.y, s = blockIdx.y;
  const int64_t groups = m / V;
  const int64_t g0 = groups * s / slices, g1 = groups * (s + 1) / slices;
  const Op op = Op::make(params, c);
  State st = Op::identity();
  for (int64_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
    const int64_t i = g * V;
    const int64_t off = ((i / hw) * c_total + c) * hw + i % hw;
    const Pack<scalar_t, V> x = load_pack<V>(u + off);
    if constexpr (Op::kReadsGrad) {
      const Pack<scalar_t, V> d = load_pack<V>(dr + off);
#pragma unroll
      for (int v = 0; v < V; ++v) op.add(st, static_cast<acc_t>(x.v[v]), static_cast<acc_t>(d.v[v]));
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) op.add(st, static_cast<acc_t>(x.v[v]), acc_t(0));
    }
  }
  __shared__ State warp_states[kThreads / kWarp];
  st = warp_merge<Op>(st);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x / kWarp) ? warp_states[lane] : Op::identity();
    st = warp_merge<Op>(st);
    if (lane == 0) partial[c * slices + s] = st;
  }
}

// channels_last partials: block (channel tile, slice) with threadIdx.x the channel (coalesced across a warp) and
// threadIdx.y one of kTileRows row lanes striding through the slice's pixel rows.
template <typename scalar_t, typename Op>
__global__ void __launch_bounds__(kThreads) reduce_partial_nhwc(const scalar_t* __restrict__ u,
                                                                const scalar_t* __restrict__ dr,
                                                                const typename Op::Params params, int64_t c_total,
                                                                int64_t m, typename Op::State* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using State = typename Op::State;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t slices = gridDim.y, s = blockIdx.y;
  const int64_t r0 = m * s / slices, r1 = m * (s + 1) / slices;
  State st = Op::identity();
  if (c < c_total) {
    const Op op = Op::make(params, c);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) {
      const int64_t off = r * c_total + c;
      op.add(st, static_cast<acc_t>(u[off]), Op::kReadsGrad ? static_cast<acc_t>(dr[off]) : acc_t(0));
    }
  }
  __shared__ State row_states[kTileRows][kWarp];
  row_states[threadIdx.y][threadIdx.x] = st;
  __syncthreads();
  if (threadIdx.y == 0 && c < c_total) {
    for (int y = 1; y < kTileRows; ++y) st = Op::merge(st, row_states[y][threadIdx.x]);
    partial[c * slices + s] = st;
  }
}

// One warp per channel: lane l merges partials l, l + 32, ... in order, then the warp tree-merges.
template <typename Op>
__global__ void __launch_bounds__(kThreads) reduce_finalize(const typename Op::State* __restrict__ partial,
                                                            int64_t slices, int64_t c_total,
                                                            const typename Op::Params params) {
  using State = typename Op::State;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= c_total) return;  // whole warps leave together: c is uniform across a warp
  State st = Op::identity();
  for (int64_t s = lane; s < slices; s += kWarp) st = Op::merge(st, partial[c * slices + s]);
  st = warp_merge<Op>(st);
  if (lane == 0) Op::finish(params, c, st);
}

template <typename scalar_t, typename Op>
void launch_reduce(const at::Tensor& u, const scalar_t* dr, const typename Op::Params& params, bool channels_last) {
  using State = typename Op::State;
  const int64_t n = u.size(0), c = u.size(1), hw = u.size(2) * u.size(3), m = n * hw;
  const int slices = slices_for(m);
  at::Tensor partial = at::empty({c * slices * static_cast<int64_t>(sizeof(State))}, u.options().dtype(at::kByte));
  auto* part = reinterpret_cast<State*>(partial.mutable_data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* up = u.const_data_ptr<scalar_t>();
  if (channels_last) {
    const dim3 grid(static_cast<unsigned>((c + kWarp - 1) / kWarp), slices);
    reduce_partial_nhwc<scalar_t, Op><<<grid, dim3(kWarp, kTileRows), 0, stream>>>(up, dr, params, c, m, part);
  } else {
    constexpr int V = 16 / sizeof(scalar_t);
    const dim3 grid(static_cast<unsigned>(c), slices);
    if (hw % V == 0 && aligned16(up) && (dr == nullptr || aligned16(dr))) {
      reduce_partial_nchw<scalar_t, Op, V><<<grid, kThreads, 0, stream>>>(up, dr, params, c, hw, m, part);
    } else {
      reduce_partial_nchw<scalar_t, Op, 1><<<grid, kThreads, 0, stream>>>(up, dr, params, c, hw, m, part);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int per_block = kThreads / kWarp;
  reduce_finalize<Op><<<static_cast<unsigned>((c + per_block - 1) / per_block), kThreads, 0, stream>>>(
      part, slices, c, params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise kernels: grid-stride over packs of V values of the dense tensor. A pack lies in one channel
// (NCHW, HW % V == 0) or spans V consecutive channels (channels_last, C % V == 0).

struct ChannelIndex {
  int64_t c, hw;
  bool channels_last;
  __device__ __forceinline__ int64_t operator()(int64_t i) const { return channels_last ? i % c : (i / hw) % c; }
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) bn_relu_apply_kernel(const scalar_t* __restrict__ u,
                                                                 scalar_t* __restrict__ out,
                                                                 const at::opmath_type<scalar_t>* __restrict__ scale,
                                                                 const at::opmath_type<scalar_t>* __restrict__ shift,
                                                                 int64_t numel, ChannelIndex channel) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = numel / V;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < packs; g += stride) {
    const int64_t i = g * V;
    const Pack<scalar_t, V> x = load_pack<V>(u + i);
    Pack<scalar_t, V> r;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t ch = channel(i + v);
      r.v[v] = static_cast<scalar_t>(relu_keep_nan(bn_affine(static_cast<acc_t>(x.v[v]), scale[ch], shift[ch])));
    }
    store_pack<V>(out + i, r);
  }
}

template <typename acc_t>
struct TrainGradParams {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* sum_dz;
  const acc_t* sum_dz_xhat;
  acc_t inv_m;  // 1/M
};

template <typename scalar_t, int V, bool kTraining>
__global__ void __launch_bounds__(kThreads) bn_relu_backward_apply_kernel(
    const scalar_t* __restrict__ dr, const scalar_t* __restrict__ u, scalar_t* __restrict__ du,
    const at::opmath_type<scalar_t>* __restrict__ scale, const at::opmath_type<scalar_t>* __restrict__ shift,
    const TrainGradParams<at::opmath_type<scalar_t>> train, int64_t numel, ChannelIndex channel) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = numel / V;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < packs; g += stride) {
    const int64_t i = g * V;
    const Pack<scalar_t, V> x = load_pack<V>(u + i);
    const Pack<scalar_t, V> d = load_pack<V>(dr + i);
    Pack<scalar_t, V> r;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int64_t ch = channel(i + v);
      const acc_t xv = static_cast<acc_t>(x.v[v]), dv = static_cast<acc_t>(d.v[v]);
      if constexpr (kTraining) {
        acc_t a, b;
        bn_backward_coefs(train.sum_dz[ch], train.sum_dz_xhat[ch], scale[ch], train.invstd[ch], train.inv_m, a, b);
        r.v[v] = static_cast<scalar_t>(bn_relu_grad_train(dv, xv, scale[ch], shift[ch], train.mean[ch], a, b));
      } else {
        r.v[v] = static_cast<scalar_t>(bn_relu_grad_eval(dv, xv, scale[ch], shift[ch]));
      }
    }
    store_pack<V>(du + i, r);
  }
}

// The pack width for an elementwise launch: 16 bytes when the packs stay in one channel (NCHW) or cover whole
// channel runs (channels_last) and every pointer is 16-byte aligned, else 1.
template <typename scalar_t>
bool can_pack(const ChannelIndex& ch, std::initializer_list<const void*> ptrs) {
  constexpr int64_t V = 16 / sizeof(scalar_t);
  if ((ch.channels_last ? ch.c : ch.hw) % V != 0) return false;
  return std::all_of(ptrs.begin(), ptrs.end(), aligned16);
}

// ---------------------------------------------------------------------------------------------------------
// Host entry points: checks → device guard → allocate → early return on empty → dense in the output's memory
// format → dispatch → launch on the current stream → check the launch.

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& u_in, double eps) {
  check_bn_stats(u_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor mean = at::empty({u_in.size(1)}, opts);
  at::Tensor var = at::empty({u_in.size(1)}, opts);
  at::Tensor invstd = at::empty({u_in.size(1)}, opts);
  if (u_in.numel() == 0) {
    mean.fill_(NAN);  // see welford_finalize: the statistics of no values are undefined
    var.fill_(NAN);
    invstd.fill_(NAN);
    return {mean, var, invstd};
  }
  const auto fmt = output_memory_format(u_in);
  const at::Tensor u = u_in.contiguous(fmt);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const typename StatsOp<scalar_t>::Params params{u.const_data_ptr<scalar_t>(),
                                                    cl ? int64_t{1} : u.size(2) * u.size(3),
                                                    static_cast<acc_t>(eps),
                                                    mean.mutable_data_ptr<acc_t>(),
                                                    var.mutable_data_ptr<acc_t>(),
                                                    invstd.mutable_data_ptr<acc_t>()};
    launch_reduce<scalar_t, StatsOp<scalar_t>>(u, nullptr, params, cl);
  });
  return {mean, var, invstd};
}

at::Tensor bn_relu_apply_cuda(const at::Tensor& u_in, const at::Tensor& scale_in, const at::Tensor& shift_in) {
  check_bn_relu_apply(u_in, scale_in, shift_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const auto fmt = output_memory_format(u_in);
  at::Tensor out = at::empty(u_in.sizes(), u_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor u = u_in.contiguous(fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const ChannelIndex channel{u.size(1), u.size(2) * u.size(3), fmt == at::MemoryFormat::ChannelsLast};
  const int64_t numel = u.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    if (can_pack<scalar_t>(channel, {up, op})) {
      bn_relu_apply_kernel<scalar_t, V><<<blocks_for(numel / V), kThreads, 0, stream>>>(up, op, sc, sh, numel, channel);
    } else {
      bn_relu_apply_kernel<scalar_t, 1><<<blocks_for(numel), kThreads, 0, stream>>>(up, op, sc, sh, numel, channel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(const at::Tensor& grad_in, const at::Tensor& u_in,
                                                                const at::Tensor& scale_in,
                                                                const at::Tensor& shift_in, const at::Tensor& mean_in,
                                                                const at::Tensor& invstd_in) {
  check_bn_relu_backward("bn_relu_backward_reduce", grad_in, u_in,
                         {{&scale_in, "scale"}, {&shift_in, "shift"}, {&mean_in, "mean"}, {&invstd_in, "invstd"}});
  const c10::cuda::CUDAGuard guard(u_in.device());
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor sum_dz = at::zeros({u_in.size(1)}, opts);
  at::Tensor sum_dz_xhat = at::zeros({u_in.size(1)}, opts);
  if (u_in.numel() == 0) return {sum_dz, sum_dz_xhat};
  const auto fmt = output_memory_format(u_in);
  const at::Tensor u = u_in.contiguous(fmt), dr = grad_in.contiguous(fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const typename GradSumsOp<scalar_t>::Params params{
        scale.const_data_ptr<acc_t>(),  shift.const_data_ptr<acc_t>(),  mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(), sum_dz.mutable_data_ptr<acc_t>(), sum_dz_xhat.mutable_data_ptr<acc_t>()};
    launch_reduce<scalar_t, GradSumsOp<scalar_t>>(u, dr.const_data_ptr<scalar_t>(), params,
                                                  fmt == at::MemoryFormat::ChannelsLast);
  });
  return {sum_dz, sum_dz_xhat};
}

at::Tensor bn_relu_backward_apply_cuda(const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& scale_in,
                                       const at::Tensor& shift_in, const std::optional<at::Tensor>& mean,
                                       const std::optional<at::Tensor>& invstd,
                                       const std::optional<at::Tensor>& sum_dz,
                                       const std::optional<at::Tensor>& sum_dz_xhat) {
  constexpr const char* op_name = "bn_relu_backward_apply";
  const bool training = mean.has_value();
  TORCH_CHECK_VALUE(training == invstd.has_value() && training == sum_dz.has_value() &&
                        training == sum_dz_xhat.has_value(),
                    op_name, ": mean, invstd, sum_dz and sum_dz_xhat must be all given (training) or all None (eval)");
  if (training) {
    check_bn_relu_backward(op_name, grad_in, u_in,
                           {{&scale_in, "scale"}, {&shift_in, "shift"}, {&*mean, "mean"}, {&*invstd, "invstd"},
                            {&*sum_dz, "sum_dz"}, {&*sum_dz_xhat, "sum_dz_xhat"}});
  } else {
    check_bn_relu_backward(op_name, grad_in, u_in, {{&scale_in, "scale"}, {&shift_in, "shift"}});
  }
  const c10::cuda::CUDAGuard guard(u_in.device());
  const auto fmt = output_memory_format(u_in);
  at::Tensor du = at::empty(u_in.sizes(), u_in.options().memory_format(fmt));
  if (du.numel() == 0) return du;
  const at::Tensor u = u_in.contiguous(fmt), dr = grad_in.contiguous(fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor mean_c, invstd_c, sdz_c, sdzx_c;
  if (training) {
    mean_c = mean->contiguous();
    invstd_c = invstd->contiguous();
    sdz_c = sum_dz->contiguous();
    sdzx_c = sum_dz_xhat->contiguous();
  }
  const ChannelIndex channel{u.size(1), u.size(2) * u.size(3), fmt == at::MemoryFormat::ChannelsLast};
  const int64_t numel = u.numel(), m = u.size(0) * channel.hw;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_backward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* dp = dr.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* gp = du.mutable_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(m);
    TrainGradParams<acc_t> train{nullptr, nullptr, nullptr, nullptr, inv_m};
    if (training) {
      train = {mean_c.const_data_ptr<acc_t>(), invstd_c.const_data_ptr<acc_t>(), sdz_c.const_data_ptr<acc_t>(),
               sdzx_c.const_data_ptr<acc_t>(), inv_m};
    }
    const bool packed = can_pack<scalar_t>(channel, {dp, up, gp});
    const int blocks = blocks_for(packed ? numel / V : numel);
    if (training && packed) {
      bn_relu_backward_apply_kernel<scalar_t, V, true>
          <<<blocks, kThreads, 0, stream>>>(dp, up, gp, sc, sh, train, numel, channel);
    } else if (training) {
      bn_relu_backward_apply_kernel<scalar_t, 1, true>
          <<<blocks, kThreads, 0, stream>>>(dp, up, gp, sc, sh, train, numel, channel);
    } else if (packed) {
      bn_relu_backward_apply_kernel<scalar_t, V, false>
          <<<blocks, kThreads, 0, stream>>>(dp, up, gp, sc, sh, train, numel, channel);
    } else {
      bn_relu_backward_apply_kernel<scalar_t, 1, false>
          <<<blocks, kThreads, 0, stream>>>(dp, up, gp, sc, sh, train, numel, channel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return du;
}

// ---------------------------------------------------------------------------------------------------------
// The composites: bn_relu_forward = statistics (training) → per-channel finish → apply, and bn_relu_backward =
// reduce → apply, as launches of the kernels above on the current stream.

// One thread per channel: bn_forward_channel with the batch statistics (training; `fill` for every channel
// when there are none, NaN for an empty batch) and writes mean, invstd, scale and shift.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) bn_forward_channels_kernel(const BnForwardArgs<acc_t> a, int64_t c,
                                                                       acc_t fill, acc_t* __restrict__ mean,
                                                                       const acc_t* __restrict__ var,
                                                                       acc_t* __restrict__ invstd,
                                                                       acc_t* __restrict__ scale,
                                                                       acc_t* __restrict__ shift) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  const bool have_batch = var != nullptr;
  const acc_t bm = have_batch ? mean[ch] : fill, bv = have_batch ? var[ch] : fill;
  const acc_t bi = have_batch ? invstd[ch] : fill;
  bn_forward_channel(a, ch, bm, bv, bi, mean[ch], invstd[ch], scale[ch], shift[ch]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cuda(
    const at::Tensor& u_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  check_bn_relu_forward(u_in, weight, bias, running_mean, running_var, training);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const int64_t c = u_in.size(1);
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor scale = at::empty({c}, opts), shift = at::empty({c}, opts);
  BnForwardVectors vectors(u_in, weight, bias, running_mean, running_var);
  const bool batch_stats = training || !running_mean.has_value();
  at::Tensor mean, var, invstd;
  if (batch_stats && u_in.numel() > 0) {
    std::tie(mean, var, invstd) = bn_stats_cuda(u_in, eps);
  } else {
    mean = at::empty({c}, opts);
    invstd = at::empty({c}, opts);
  }
  if (c > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_in.scalar_type(), "bn_relu_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto args = vectors.args<acc_t>(u_in, training, momentum, eps);
      bn_forward_channels_kernel<acc_t><<<blocks_for(c), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          args, c, static_cast<acc_t>(NAN), mean.mutable_data_ptr<acc_t>(),
          var.defined() ? var.const_data_ptr<acc_t>() : nullptr, invstd.mutable_data_ptr<acc_t>(),
          scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  vectors.finish();
  at::Tensor out = bn_relu_apply_cuda(u_in, scale, shift);
  return {out, scale, shift, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(const at::Tensor& grad, const at::Tensor& u,
                                                                     const at::Tensor& scale, const at::Tensor& shift,
                                                                     const at::Tensor& mean, const at::Tensor& invstd) {
  check_bn_relu_backward("bn_relu_backward", grad, u,
                         {{&scale, "scale"}, {&shift, "shift"}, {&mean, "mean"}, {&invstd, "invstd"}});
  auto [sum_dz, sum_dz_xhat] = bn_relu_backward_reduce_cuda(grad, u, scale, shift, mean, invstd);
  at::Tensor du = bn_relu_backward_apply_cuda(grad, u, scale, shift, mean, invstd, sum_dz, sum_dz_xhat);
  return {du, sum_dz, sum_dz_xhat};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_relu_apply", &bn_relu_apply_cuda);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cuda);
  m.impl("bn_relu_forward", &bn_relu_forward_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
}

}  // namespace fused_hourglass
