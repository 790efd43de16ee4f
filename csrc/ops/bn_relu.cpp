// Schemas of the BN-ReLU ops (see ops/bn_relu.h for what each computes) and the autograd kernel of
// bn_relu_forward. Kernels: cpu/bn_relu_kernel.cpp, cuda/bn_relu_kernel.cu; fake implementations:
// fused_hourglass/ops/bn_relu.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd_utils.h"
#include "ops/bn_relu_autograd.h"

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  m.def("bn_stats(Tensor u, float eps) -> (Tensor mean, Tensor var, Tensor invstd)");
  m.def("bn_relu_apply(Tensor u, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "bn_relu_backward_reduce(Tensor grad, Tensor u, Tensor scale, Tensor shift, Tensor mean, Tensor invstd) "
      "-> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "bn_relu_backward_apply(Tensor grad, Tensor u, Tensor scale, Tensor shift, Tensor? mean, Tensor? invstd, "
      "Tensor? sum_dz, Tensor? sum_dz_xhat) -> Tensor");
  // The composites: relu(batch_norm(u)) in one call (updating the running statistics in place when training),
  // returning the per-channel vectors its backward needs; and the training-mode backward (reduce, then apply).
  m.def(
      "bn_relu_forward(Tensor u, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps) -> (Tensor r, Tensor scale, Tensor shift, Tensor mean, "
      "Tensor invstd)");
  m.def(
      "bn_relu_backward(Tensor grad, Tensor u, Tensor scale, Tensor shift, Tensor mean, Tensor invstd) "
      "-> (Tensor du, Tensor sum_dz, Tensor sum_dz_xhat)");
}

// ---------------------------------------------------------------------------------------------------------
// Autograd of bn_relu_forward, in C++ as torchvision's ops (a Python autograd function costs ~15 µs more per
// training step, as long as the kernels at 8 px): r is differentiable in u, weight and bias; the per-channel
// vectors are not. Saves u and the per-channel vectors (never r); backward recomputes the ReLU mask
// (bn_relu_grads, shared with bn_relu_conv2d's autograd kernel in ops/bn_relu_conv.cpp).

namespace fused_hourglass {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

class BnReLUFunction : public torch::autograd::Function<BnReLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& u, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [r, scale, shift, mean, invstd] =
        call_bn_relu_forward(u, weight, bias, running_mean, running_var, training, momentum, eps);
    // weight and bias only for the double-backward guard (the gradients depend on them through scale and shift).
    ctx->save_for_backward({u, scale, shift, mean, invstd, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())});
    save_bn_relu_flags(ctx, training || !running_mean.has_value(), weight, bias);
    ctx->mark_non_differentiable({scale, shift, mean, invstd});
    // The four vectors never get a gradient: without this, every backward would first allocate zeros for them.
    ctx->set_materialize_grads(false);
    return {r, scale, shift, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return variable_list(8);  // no gradient reached r: none for any input
    const BnReLUNeeds need = bn_relu_needs(ctx);
    const variable_list saved = ctx->get_saved_variables();
    const bool grad_mode = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;
    variable_list out = bn_relu_grads(ctx, grad, saved, need);
    out = once_differentiable(std::move(out), "bn_relu", grad_mode, {grad, saved[0], saved[5], saved[6]});
    out.resize(8);  // nothing for running_mean, running_var, training, momentum, eps
    return out;
  }
};

}  // namespace

BnReLUOutputs call_bn_relu_forward(const at::Tensor& u, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                   double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_hourglass::bn_relu_forward", "")
                             .typed<BnReLUOutputs(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                  const OptTensor&, const OptTensor&, bool, double, double)>();
  return op.call(u, weight, bias, running_mean, running_var, training, momentum, eps);
}

void save_bn_relu_flags(AutogradContext* ctx, bool batch_stats, const OptTensor& weight, const OptTensor& bias) {
  ctx->saved_data["batch_stats"] = batch_stats;
  ctx->saved_data["weight_dtype"] = weight.has_value() ? static_cast<int64_t>(weight->scalar_type()) : int64_t(-1);
  ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
}

BnReLUNeeds bn_relu_needs(AutogradContext* ctx) {
  const bool has_weight = ctx->saved_data["weight_dtype"].toInt() >= 0;
  const bool has_bias = ctx->saved_data["bias_dtype"].toInt() >= 0;
  return {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
          has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
}

variable_list bn_relu_grads(AutogradContext* ctx, const at::Tensor& grad, const variable_list& saved,
                            const BnReLUNeeds& need) {
  const at::Tensor &u = saved[0], &scale = saved[1], &shift = saved[2], &mean = saved[3], &invstd = saved[4];
  const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
  const bool need_u = need.u, need_w = need.weight, need_b = need.bias;
  at::Tensor du, sum_dz, sum_dz_xhat;
  if (need_u && batch_stats) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fused_hourglass::bn_relu_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&)>();
    std::tie(du, sum_dz, sum_dz_xhat) = op.call(grad, u, scale, shift, mean, invstd);
  } else {
    if (need_w || need_b) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fused_hourglass::bn_relu_backward_reduce", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor>(
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&)>();
      std::tie(sum_dz, sum_dz_xhat) = op.call(grad, u, scale, shift, mean, invstd);
    }
    if (need_u) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fused_hourglass::bn_relu_backward_apply", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const OptTensor&, const OptTensor&,
                                                   const OptTensor&, const OptTensor&)>();
      du = op.call(grad, u, scale, shift, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
    }
  }
  const auto dtype = [&](const char* key) { return static_cast<at::ScalarType>(ctx->saved_data[key].toInt()); };
  const at::Tensor grad_w = need_w ? sum_dz_xhat.to(dtype("weight_dtype")) : at::Tensor();
  const at::Tensor grad_b = need_b ? sum_dz.to(dtype("bias_dtype")) : at::Tensor();
  return {du, grad_w, grad_b};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_autograd(
    const at::Tensor& u, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, double momentum, double eps) {
  const variable_list out =
      BnReLUFunction::apply(u, weight, bias, running_mean, running_var, training, momentum, eps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, Autograd, m) { m.impl("bn_relu_forward", &bn_relu_forward_autograd); }

}  // namespace fused_hourglass
