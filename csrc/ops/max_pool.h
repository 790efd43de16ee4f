#pragma once
// max_pool2x2(x): 2×2, stride-2 max pool, and max_pool2x2_backward(grad, x), which recomputes each window's
// argmax from x instead of reading saved int64 indices. The window choice is F.max_pool2d's exactly, so the
// forward values and the routed gradient match it bit for bit.

#include <ATen/OpMathType.h>

#include "ops/common.h"
#include "ops/upsample_add.h"  // pool2x2_origin_*: the window geometry is shared with sum_pool2x2

namespace fused_hourglass {

// Position (0..3, row-major: top-left, top-right, bottom-left, bottom-right) of the value F.max_pool2d picks in
// a window. F's rule is sequential: a value replaces the running maximum when it is strictly greater or NaN.
// Hence, without NaN, the first maximum wins (ties included; an all −inf window gives 0), and with NaNs the
// last NaN wins. It is evaluated here in that closed form, in integer arithmetic on comparison results: no
// branches, which matters on the CPU, where a branchy argmax mispredicts on every other window of real data.
// max(a, b) as a < b ? b : a: a single maxss on x86, branch-free.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t max2(acc_t a, acc_t b) {
  return a < b ? b : a;
}

template <typename acc_t>
FH_HOST_DEVICE inline int argmax4(acc_t v0, acc_t v1, acc_t v2, acc_t v3) {
  // The maximum when there is no NaN. Written out rather than through max2: GCC if-converts (and so
  // vectorises) the open-coded selects, not the nested inlined calls.
  const acc_t a = v0 < v1 ? v1 : v0, b = v2 < v3 ? v3 : v2;
  const acc_t m = a < b ? b : a;
  // v_i < m is "v_i is not the maximum" (no NaN); the first i where it is false is the first maximum.
  const int below0 = v0 < m, below1 = v1 < m, below2 = v2 < m;
  const int first_max = below0 + (below0 & below1) + (below0 & below1 & below2);
  const int nan0 = v0 != v0, nan1 = v1 != v1, nan2 = v2 != v2, nan3 = v3 != v3;
  const int last_nan = 3 * nan3 + (1 - nan3) * (2 * nan2 + (1 - nan2) * nan1);
  const int any_nan = nan0 | nan1 | nan2 | nan3;
  return any_nan * last_nan + (1 - any_nan) * first_max;
}

FH_HOST_DEVICE inline int64_t tap_offset(int k, int64_t dx, int64_t dy) { return (k & 1) * dx + (k >> 1) * dy; }

// The window whose top-left tap is p, with taps at p, p + dx, p + dy, p + dy + dx: the position of its maximum.
template <typename scalar_t>
FH_HOST_DEVICE inline int window_argmax(const scalar_t* p, int64_t dx, int64_t dy) {
  using acc_t = at::opmath_type<scalar_t>;
  return argmax4<acc_t>(static_cast<acc_t>(p[0]), static_cast<acc_t>(p[dx]), static_cast<acc_t>(p[dy]),
                        static_cast<acc_t>(p[dy + dx]));
}

// The k-th of four values, by selects (no data-dependent address, so CPU loops over windows vectorise).
template <typename T>
FH_HOST_DEVICE inline T select4(int k, T v0, T v1, T v2, T v3) {
  const T lo = k == 0 ? v0 : v1;
  const T hi = k == 2 ? v2 : v3;
  return k < 2 ? lo : hi;
}

// The value F.max_pool2d outputs for the window: the element at window_argmax, returned as stored (so −0
// versus +0 among equal maxima, and a NaN's payload, come out bit for bit as F's).
template <typename scalar_t>
FH_HOST_DEVICE inline scalar_t window_max(const scalar_t* p, int64_t dx, int64_t dy) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t v0 = p[0], v1 = p[dx], v2 = p[dy], v3 = p[dy + dx];
  const int k = argmax4<acc_t>(static_cast<acc_t>(v0), static_cast<acc_t>(v1), static_cast<acc_t>(v2),
                               static_cast<acc_t>(v3));
  return select4(k, v0, v1, v2, v3);
}

inline void check_max_pool2x2(const at::Tensor& x, const char* op) {
  check_4d_float(x, op, "x");
  TORCH_CHECK_VALUE(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, op,
                    ": x must have even H and W (the network never pools odd sides), got shape ", shape_str(x));
}

inline void check_max_pool2x2_backward(const at::Tensor& grad, const at::Tensor& x) {
  constexpr const char* op = "max_pool2x2_backward";
  check_max_pool2x2(x, op);
  check_4d_float(grad, op, "grad");
  check_same_dtype_device(grad, "grad", x, "x", op);
  TORCH_CHECK_VALUE(grad.size(0) == x.size(0) && grad.size(1) == x.size(1) && 2 * grad.size(2) == x.size(2) &&
                        2 * grad.size(3) == x.size(3),
                    op, ": grad must be [N, C, H/2, W/2] of x, got grad ", shape_str(grad), " and x ", shape_str(x));
}

}  // namespace fused_hourglass
