#pragma once
// BN-ReLU split into four ops (the apex / InPlace-ABN decomposition), M = N·H·W values per channel:
//   bn_stats(u, eps)                 -> mean, var (biased), invstd = (var + eps)^-½      [C] in acc dtype
//   bn_relu_apply(u, scale, shift)   -> r = relu(u·scale + shift)                        u's shape and dtype
//   bn_relu_backward_reduce(dr, u, scale, shift, mean, invstd)
//                                    -> Σdz, Σdz·x̂ with dz = dr·[y > 0], x̂ = (u − mean)·invstd   [C] acc dtype
//   bn_relu_backward_apply(dr, u, scale, shift[, mean, invstd, Σdz, Σdz·x̂])
//                                    -> du: scale·(dz − Σdz/M − x̂·Σdz·x̂/M) in training, dz·scale in eval
// The acc ("statistics") dtype is float64 for float64 u and float32 otherwise. The per-element arithmetic
// below is shared by the CPU and CUDA kernels, so the CPU tests run the CUDA kernels' math.

#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>

#include "ops/common.h"

namespace fused_hourglass {

// Welford state of `count` values of one channel, taken relative to the channel's pivot (see welford_pivot):
// `mean` is their mean minus the pivot, m2 the sum of squared deviations from their mean, and `nonfinite` the
// sum of the values that are ±inf or NaN (0 when all are finite; see welford_nonfinite).
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  acc_t nonfinite;
  int64_t count;
};

// Every partial of a channel works on x − pivot, with the pivot one value of that channel (its first), so the
// accumulated means are O(std) rather than O(|mean|): a float32 channel with mean 1e4 and std 1 would otherwise
// lose about 1e-3 of absolute precision in every running-mean update. For such a channel x − pivot is even
// exact (x within a factor 2 of the pivot: Sterbenz). A non-finite first value gives pivot 0, so inf and NaN
// propagate to the statistics exactly as without a pivot.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t welford_pivot(acc_t first) {
  return first - first == acc_t(0) ? first : acc_t(0);
}

// One Welford step for a value x that is the k-th seen by this (mean, m2) pair, inv_k = 1/k. Lanes that see
// the same number of values share inv_k, which keeps the division out of the vectorised CPU loops.
// Stable for |mean| ≫ std: only deviations from the running mean are ever squared.
template <typename acc_t>
FH_HOST_DEVICE inline void welford_step(acc_t& mean, acc_t& m2, acc_t x, acc_t inv_k) {
  const acc_t d = x - mean;
  mean += d * inv_k;
  m2 += d * (x - mean);
}

// Welford's running mean turns NaN at the first finite value after an infinite one (inf + (−inf)·1/k), where
// the plain mean Σx/M that F.batch_norm reports stays ±inf. The non-finite values are therefore also summed on
// their own, and that sum, when not zero, is the channel's mean: ±inf, or NaN for NaN or mixed-sign infinities.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t welford_nonfinite(acc_t x) {
  return x - x == acc_t(0) ? acc_t(0) : x;
}

// The Welford state of `count` values (already taken relative to the pivot) from their plain sum s1 and sum of
// squares s2. The CPU kernels accumulate these in independent lanes over short runs (no division, so the
// loops vectorise) and merge the runs with welford_merge. s2 − s1·mean cancels only when the run's mean is far
// from the pivot in units of its spread, which the pivot (a value of the same channel) keeps small.
template <typename acc_t>
FH_HOST_DEVICE inline WelfordState<acc_t> welford_from_sums(acc_t s1, acc_t s2, acc_t nonfinite, int64_t count) {
  if (count == 0) return {acc_t(0), acc_t(0), acc_t(0), 0};
  const acc_t mean = s1 / static_cast<acc_t>(count);
  const acc_t m2 = s2 - s1 * mean;
  return {mean, m2 < acc_t(0) ? acc_t(0) : m2, nonfinite, count};  // rounding can dip below 0; NaN stays NaN
}

// Chan et al.'s pairwise merge of two Welford states. The mean is moved by the weighted difference of the
// two means rather than recomputed from sums, so large means do not cancel.
template <typename acc_t>
FH_HOST_DEVICE inline WelfordState<acc_t> welford_merge(const WelfordState<acc_t>& a, const WelfordState<acc_t>& b) {
  // An empty side is returned untouched: its mean of 0 must not meet an infinite mean in delta·0 = NaN.
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const int64_t n = a.count + b.count;
  const acc_t nb_over_n = static_cast<acc_t>(b.count) / static_cast<acc_t>(n);
  const acc_t delta = b.mean - a.mean;
  WelfordState<acc_t> out;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * nb_over_n;
  out.nonfinite = a.nonfinite + b.nonfinite;
  out.count = n;
  return out;
}

// mean, biased variance and invstd of a channel's merged state. An empty channel (M = 0) gives NaN, as the mean
// of nothing; callers never normalise with it because there is nothing to normalise.
template <typename acc_t>
FH_HOST_DEVICE inline void welford_finalize(const WelfordState<acc_t>& s, acc_t pivot, acc_t eps, acc_t& mean,
                                            acc_t& var, acc_t& invstd) {
  mean = s.count == 0 ? acc_t(NAN) : s.nonfinite == acc_t(0) ? pivot + s.mean : s.nonfinite;
  var = s.count > 0 ? s.m2 / static_cast<acc_t>(s.count) : acc_t(NAN);
  invstd = acc_t(1) / std::sqrt(var + eps);
}

// The pre-activation y = u·scale + shift, evaluated the same way in the forward and in both backward passes
// so the recomputed ReLU mask is exactly the forward's.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t bn_affine(acc_t u, acc_t scale, acc_t shift) {
  return u * scale + shift;
}

// relu(y) propagating NaN like torch.relu (clamp_min): NaN < 0 is false, so NaN passes through.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t relu_keep_nan(acc_t y) {
  return y < acc_t(0) ? acc_t(0) : y;
}

// dz = dr·[r > 0] as ATen's threshold_backward(dr, r, 0) computes it: zero where r <= 0, dr elsewhere,
// including where r is NaN.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t relu_grad(acc_t dr, acc_t y) {
  return y <= acc_t(0) ? acc_t(0) : dr;
}

// Per-channel constants of the training-mode input gradient
//   du = scale·(dz − Σdz/M − x̂·Σdz·x̂/M) = scale·(dz − a − (u − mean)·b),
// with a = Σdz/M and b = invstd·Σdz·x̂/M; inv_m = 1/M comes from the caller, computed once per launch (a
// float64 division on the GPU is a subroutine call). (u − mean) is formed per element, never folded into a constant:
// folding would cancel catastrophically for channels with |mean| ≫ std.
template <typename acc_t>
FH_HOST_DEVICE inline void bn_backward_coefs(acc_t sum_dz, acc_t sum_dz_xhat, acc_t invstd, acc_t inv_m, acc_t& a,
                                             acc_t& b) {
  a = sum_dz * inv_m;
  b = invstd * sum_dz_xhat * inv_m;
}

template <typename acc_t>
FH_HOST_DEVICE inline acc_t bn_relu_grad_train(acc_t dr, acc_t u, acc_t scale, acc_t shift, acc_t mean, acc_t a,
                                               acc_t b) {
  const acc_t dz = relu_grad(dr, bn_affine(u, scale, shift));
  return scale * (dz - a - (u - mean) * b);
}

template <typename acc_t>
FH_HOST_DEVICE inline acc_t bn_relu_grad_eval(acc_t dr, acc_t u, acc_t scale, acc_t shift) {
  return relu_grad(dr, bn_affine(u, scale, shift)) * scale;
}

// Host-side argument checks shared by the CPU and CUDA entry points; messages match fused_hourglass/ops/bn_relu.py.
inline at::ScalarType stats_dtype(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// "torch.float32", as Python prints a dtype, so the C++ and Python messages read the same.
inline std::string dtype_str(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline void check_channel_vector(const at::Tensor& v, const at::Tensor& u, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == u.size(1), op, ": ", name, " must be 1-D with ", u.size(1),
                    " elements (the channels of u), got shape ", shape_str(v));
  TORCH_CHECK_TYPE(v.scalar_type() == stats_dtype(u), op, ": ", name, " must be ", dtype_str(stats_dtype(u)),
                   " (the statistics dtype of ", dtype_str(u.scalar_type()), " u), got ", dtype_str(v.scalar_type()));
  TORCH_CHECK_VALUE(v.device() == u.device(), op, ": ", name, " and u must be on the same device, got ", name,
                    " on ", v.device(), " and u on ", u.device());
}

inline void check_bn_stats(const at::Tensor& u) { check_4d_float(u, "bn_stats", "u"); }

inline void check_bn_relu_apply(const at::Tensor& u, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "bn_relu_apply";
  check_4d_float(u, op, "u");
  check_channel_vector(scale, u, op, "scale");
  check_channel_vector(shift, u, op, "shift");
}

inline void check_bn_relu_backward(const char* op, const at::Tensor& grad, const at::Tensor& u,
                                   std::initializer_list<std::pair<const at::Tensor*, const char*>> vectors) {
  check_4d_float(grad, op, "grad");
  check_4d_float(u, op, "u");
  check_same_dtype_device(grad, "grad", u, "u", op);
  TORCH_CHECK_VALUE(grad.sizes() == u.sizes(), op, ": grad and u must have the same shape, got grad ",
                    shape_str(grad), " and u ", shape_str(u));
  for (const auto& [v, name] : vectors) check_channel_vector(*v, u, op, name);
}

}  // namespace fused_hourglass
