// Schemas of the BN-ReLU ops (see ops/bn_relu.h for what each computes). Kernels: cpu/bn_relu_kernel.cpp,
// cuda/bn_relu_kernel.cu; fake implementations and the autograd of the composite: fused_hourglass/ops/bn_relu.py.
#include <torch/library.h>

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
