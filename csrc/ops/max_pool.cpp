// Schemas of the 2×2 max pool. Kernels: cpu/max_pool_kernel.cpp, cuda/max_pool_kernel.cu; fake implementations
// and autograd: fused_hourglass/ops/max_pool.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  m.def("max_pool2x2(Tensor x) -> Tensor");
  m.def("max_pool2x2_backward(Tensor grad, Tensor x) -> Tensor");
}
