#pragma once
// The backward of relu(batch_norm(u)) shared by the C++ autograd kernels of bn_relu_forward (ops/bn_relu.cpp) and
// bn_relu_conv2d (ops/bn_relu_conv.cpp).
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>

#include <cstdint>

namespace fused_hourglass {

// {du, dweight, dbias} from grad = ∂L/∂r, r = relu(u·scale + shift), recomputing the ReLU mask from u; each one
// undefined when not needed. saved = {u, scale, shift, mean, invstd, ...} as bn_relu_forward returned them;
// batch_stats: whether the forward normalised with the batch statistics (then du also carries the statistics'
// gradient: bn_relu_backward), else with the running ones (du = dz·scale). weight_dtype, bias_dtype: the
// parameters' at::ScalarType, as int64_t. Call with grad mode off.
torch::autograd::variable_list bn_relu_grads(const at::Tensor& grad, const torch::autograd::variable_list& saved,
                                            bool batch_stats, bool need_u, bool need_w, bool need_b,
                                            int64_t weight_dtype, int64_t bias_dtype);

}  // namespace fused_hourglass
