// Schemas of the upsample-add pair. Kernels: cpu/upsample_add_kernel.cpp, cuda/upsample_add_kernel.cu;
// fake implementations and autograd: fused_hourglass/ops/upsample_add.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  m.def("upsample_add(Tensor low, Tensor skip) -> Tensor");
  m.def("sum_pool2x2(Tensor grad) -> Tensor");
}
