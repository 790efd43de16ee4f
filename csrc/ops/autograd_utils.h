#pragma once
// Shared by the C++ autograd kernels (ops/bn_relu.cpp, ops/max_pool.cpp).
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <string>

namespace fused_hourglass {

// Gradients computed with create_graph=True. The backward ops have no derivative of their own, so rather than
// hand back gradients that autograd would silently treat as constants, each one gets a grad_fn that raises if
// anything differentiates through it (as Python's @once_differentiable does). `grad_mode` is the grad mode the
// backward was called in (on under create_graph=True); `deps` are the tensors the gradients depend on (the
// incoming gradient, the saved input, and any parameter they are a function of; undefined ones are skipped). The
// gradients themselves must have been computed with grad mode off.
inline torch::autograd::variable_list once_differentiable(torch::autograd::variable_list grads, const char* op,
                                                          bool grad_mode, const torch::autograd::variable_list& deps) {
  bool differentiable = false;
  for (const at::Tensor& t : deps) differentiable |= t.defined() && t.requires_grad();
  if (!grad_mode || !differentiable) return grads;
  auto error = c10::make_intrusive<torch::autograd::Error>(
      std::string(op) + ": double backward is not supported (its gradient was computed with create_graph=True "
                        "and is now being differentiated)",
      torch::autograd::collect_next_edges(deps));
  for (at::Tensor& g : grads) {
    if (g.defined()) torch::autograd::set_history(g, error);
  }
  return grads;
}

}  // namespace fused_hourglass
