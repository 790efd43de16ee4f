// Schemas of the 2×2 max pool and its autograd kernel. Kernels: cpu/max_pool_kernel.cpp,
// cuda/max_pool_kernel.cu; fake implementations: fused_hourglass/ops/max_pool.py.
//
// The autograd kernel is C++ (as torchvision's ops are): forward saves x, backward recomputes each window's
// argmax from it through max_pool2x2_backward. A Python autograd function would add a Python call to every
// forward and backward, about as long as the whole kernel at the hourglass's 8–16 px levels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd_utils.h"

namespace fused_hourglass {
namespace {

at::Tensor max_pool2x2_call(const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_hourglass::max_pool2x2", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor max_pool2x2_backward_call(const at::Tensor& grad, const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_hourglass::max_pool2x2_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, x);
}

class MaxPool2x2Function : public torch::autograd::Function<MaxPool2x2Function> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x});
    return max_pool2x2_call(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor()};
    const at::Tensor x = ctx->get_saved_variables()[0];
    const bool grad_mode = at::GradMode::is_enabled();
    at::Tensor dx;
    {
      at::NoGradGuard no_grad;
      dx = max_pool2x2_backward_call(grads[0], x);
    }
    return once_differentiable({dx}, "max_pool2x2", grad_mode, {grads[0], x});
  }
};

at::Tensor max_pool2x2_autograd(const at::Tensor& x) { return MaxPool2x2Function::apply(x); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  m.def("max_pool2x2(Tensor x) -> Tensor");
  m.def("max_pool2x2_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_hourglass, Autograd, m) { m.impl("max_pool2x2", &max_pool2x2_autograd); }

}  // namespace fused_hourglass
