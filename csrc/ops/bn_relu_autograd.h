#pragma once
// The backward of relu(batch_norm(u)) shared by the C++ autograd kernels of bn_relu_forward (ops/bn_relu.cpp) and
// bn_relu_conv2d (ops/bn_relu_conv.cpp).
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fused_hourglass {

using BnReLUOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The bn_relu_forward op (r, scale, shift, mean, invstd), called through the dispatcher; autograd kernels call it
// below autograd (at::AutoDispatchBelowADInplaceOrView).
BnReLUOutputs call_bn_relu_forward(const at::Tensor& u, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                   double eps);

// What the BN-ReLU backward needs besides the saved tensors, saved by the forward: whether it normalised with the
// batch statistics (training, or no running statistics) and the dtypes of weight and bias (-1 when absent).
void save_bn_relu_flags(torch::autograd::AutogradContext* ctx, bool batch_stats,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias);

// Which of u, weight and bias need a gradient. Their gradient edges are the forward's first ones: u, then weight
// and bias when present (an absent optional tensor has no edge).
struct BnReLUNeeds {
  bool u, weight, bias;
  bool any() const { return u || weight || bias; }
};
BnReLUNeeds bn_relu_needs(torch::autograd::AutogradContext* ctx);

// {du, dweight, dbias} from grad = ∂L/∂r, r = relu(u·scale + shift), recomputing the ReLU mask from u; each one
// undefined when not needed. saved = {u, scale, shift, mean, invstd, ...} as bn_relu_forward returned them; the
// flags are save_bn_relu_flags'. With batch statistics du also carries the statistics' gradient
// (bn_relu_backward), else du = dz·scale. Call with grad mode off.
torch::autograd::variable_list bn_relu_grads(torch::autograd::AutogradContext* ctx, const at::Tensor& grad,
                                            const torch::autograd::variable_list& saved, const BnReLUNeeds& need);

}  // namespace fused_hourglass
