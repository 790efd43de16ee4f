#pragma once
// BN-ReLU split into four ops (the apex / InPlace-ABN decomposition), M = N·H·W values per channel:
//   bn_stats(u, eps)                 -> mean, var (biased), invstd = (var + eps)^-½      [C] in acc dtype
//   bn_relu_apply(u, scale, shift)   -> r = relu(u·scale + shift)                        u's shape and dtype
//   bn_relu_backward_reduce(dr, u, scale, shift, mean, invstd)
//                                    -> Σdz, Σdz·x̂ with dz = dr·[y > 0], x̂ = (u − mean)·invstd   [C] acc dtype
//   bn_relu_backward_apply(dr, u, scale, shift[, mean, invstd, Σdz, Σdz·x̂])
//                                    -> du: scale·(dz − Σdz/M − x̂·Σdz·x̂/M) in training, dz·scale in eval
// and two composites, which are what the autograd functions call:
//   bn_relu_forward(u, weight, bias, running_mean, running_var, training, momentum, eps)
//                                    -> r, scale, shift, mean, invstd (statistics, running update, apply)
//   bn_relu_backward(dr, u, scale, shift, mean, invstd) -> du, Σdz, Σdz·x̂ (training: reduce, then apply)
// The acc ("statistics") dtype is float64 for float64 u and float32 otherwise. The per-element arithmetic
// below is shared by the CPU and CUDA kernels, so the CPU tests run the CUDA kernels' math.

#include <cmath>
#include <initializer_list>
#include <optional>
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

// ---------------------------------------------------------------------------------------------------------
// bn_relu_forward: one call for relu(F.batch_norm(u, ...)), with the per-channel work (scale, shift and the
// running-statistics update) done per channel by bn_forward_channel, after the statistics and before the
// apply pass.

// The per-channel operands of bn_relu_forward in the statistics dtype, contiguous; null when not given.
template <typename acc_t>
struct BnForwardArgs {
  const acc_t* weight;  // null: γ = 1
  const acc_t* bias;    // null: β = 0
  acc_t* running_mean;  // null: no running statistics (then the batch's are used in eval too)
  acc_t* running_var;
  acc_t momentum;
  acc_t eps;
  acc_t unbias;         // M / (M − 1): the running variance is the unbiased one, as nn.BatchNorm2d's
  bool batch_stats;     // normalise with the batch statistics (training, or no running statistics)
  bool update_running;  // training with running statistics and M > 0
};

// nn.BatchNorm2d's update of a running statistic: momentum·batch + (1 − momentum)·running.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t running_stat_update(acc_t running, acc_t batch, acc_t momentum) {
  return momentum * batch + (acc_t(1) - momentum) * running;
}

// Channel ch of bn_relu_forward: the mean and invstd it normalises with (the batch's, from the statistics pass,
// or the running ones), scale = γ·invstd and shift = β − mean·scale, and the in-place running update.
template <typename acc_t>
FH_HOST_DEVICE inline void bn_forward_channel(const BnForwardArgs<acc_t>& a, int64_t ch, acc_t batch_mean,
                                              acc_t batch_var, acc_t batch_invstd, acc_t& mean, acc_t& invstd,
                                              acc_t& scale, acc_t& shift) {
  if (a.batch_stats) {
    mean = batch_mean;
    invstd = batch_invstd;
    if (a.update_running) {
      a.running_mean[ch] = running_stat_update(a.running_mean[ch], batch_mean, a.momentum);
      a.running_var[ch] = running_stat_update(a.running_var[ch], batch_var * a.unbias, a.momentum);
    }
  } else {
    mean = a.running_mean[ch];
    invstd = acc_t(1) / std::sqrt(a.running_var[ch] + a.eps);
  }
  scale = a.weight ? a.weight[ch] * invstd : invstd;
  shift = (a.bias ? a.bias[ch] : acc_t(0)) - mean * scale;
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
//   du = scale·(dz − Σdz/M − x̂·Σdz·x̂/M) = scale·dz − (a + (u − mean)·b),
// with a = scale·Σdz/M and b = scale·invstd·Σdz·x̂/M, so each element costs one multiply-add for the bracket and
// one for du; inv_m = 1/M comes from the caller, computed once per launch (a float64 division on the GPU is a
// subroutine call). (u − mean) is formed per element, never folded into a constant: folding would cancel
// catastrophically for channels with |mean| ≫ std.
template <typename acc_t>
FH_HOST_DEVICE inline void bn_backward_coefs(acc_t sum_dz, acc_t sum_dz_xhat, acc_t scale, acc_t invstd, acc_t inv_m,
                                             acc_t& a, acc_t& b) {
  a = scale * (sum_dz * inv_m);
  b = scale * (invstd * sum_dz_xhat * inv_m);
}

template <typename acc_t>
FH_HOST_DEVICE inline acc_t bn_relu_grad_train(acc_t dr, acc_t u, acc_t scale, acc_t shift, acc_t mean, acc_t a,
                                               acc_t b) {
  const acc_t dz = relu_grad(dr, bn_affine(u, scale, shift));
  return scale * dz - (a + (u - mean) * b);
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

// weight, bias and the running statistics of bn_relu_forward: C-vectors of u's dtype, or float32 for float16
// and bfloat16 u (the usual mixed-precision module; F.batch_norm accepts no other mix), on u's device. Messages
// as fused_hourglass/ops/bn_relu.py's _check_parameter.
inline void check_bn_parameter(const std::optional<at::Tensor>& p, const at::Tensor& u, const char* name) {
  constexpr const char* op = "bn_relu_forward";
  if (!p.has_value()) return;
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == u.size(1), op, ": ", name, " must be 1-D with ", u.size(1),
                    " elements (the channels of u), got shape ", shape_str(*p));
  const bool low_precision = u.scalar_type() == at::kHalf || u.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(p->scalar_type() == u.scalar_type() || (low_precision && p->scalar_type() == at::kFloat), op,
                   ": ", name, " must be ", dtype_str(u.scalar_type()), " (u's dtype)",
                   low_precision ? " or torch.float32" : "", ", got ", dtype_str(p->scalar_type()));
  TORCH_CHECK_VALUE(p->device() == u.device(), op, ": ", name, " and u must be on the same device, got ", name, " on ",
                    p->device(), " and u on ", u.device());
}

inline void check_bn_relu_forward(const at::Tensor& u, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, bool training) {
  check_4d_float(u, "bn_relu_forward", "u");
  check_bn_parameter(weight, u, "weight");
  check_bn_parameter(bias, u, "bias");
  check_bn_parameter(running_mean, u, "running_mean");
  check_bn_parameter(running_var, u, "running_var");
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "bn_relu_forward: running_mean and running_var must be both given or both None, got running_mean ",
                    running_mean.has_value() ? "a tensor" : "None", " and running_var ",
                    running_var.has_value() ? "a tensor" : "None");
  const bool batch_stats = training || !running_mean.has_value();
  // F.batch_norm's own message.
  TORCH_CHECK_VALUE(!batch_stats || u.size(0) * u.size(2) * u.size(3) != 1,
                    "Expected more than 1 value per channel when training, got input size ", u.sizes());
}

// The per-channel tensors behind BnForwardArgs: each given vector as a contiguous tensor of the statistics
// dtype (the caller's own tensor when it already is one, so running statistics update in place; a converted
// copy otherwise, written back by finish()).
struct BnForwardVectors {
  at::Tensor weight, bias, running_mean, running_var;
  std::optional<at::Tensor> running_mean_out, running_var_out;  // the caller's buffers when converted

  BnForwardVectors(const at::Tensor& u, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                   const std::optional<at::Tensor>& rm, const std::optional<at::Tensor>& rv) {
    const auto sd = stats_dtype(u);
    const auto as_stats = [&](const std::optional<at::Tensor>& t) {
      return t.has_value() ? t->to(sd).contiguous() : at::Tensor();
    };
    weight = as_stats(w);
    bias = as_stats(b);
    running_mean = as_stats(rm);
    running_var = as_stats(rv);
    if (rm.has_value() && !running_mean.is_same(*rm)) running_mean_out = rm;
    if (rv.has_value() && !running_var.is_same(*rv)) running_var_out = rv;
  }

  template <typename acc_t>
  BnForwardArgs<acc_t> args(const at::Tensor& u, bool training, double momentum, double eps) {
    const int64_t m = u.size(0) * u.size(2) * u.size(3);
    const bool has_running = running_mean.defined();
    const auto ptr = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<acc_t>() : nullptr; };
    return {ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var), static_cast<acc_t>(momentum),
            static_cast<acc_t>(eps), m > 1 ? static_cast<acc_t>(static_cast<double>(m) / static_cast<double>(m - 1))
                                           : acc_t(1),
            training || !has_running, training && has_running && m > 0};
  }

  // Writes converted running statistics back into the caller's buffers.
  void finish() {
    if (running_mean_out) running_mean_out->copy_(running_mean);
    if (running_var_out) running_var_out->copy_(running_var);
  }
};

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
