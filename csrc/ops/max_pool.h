#pragma once
// max_pool2x2(x): 2×2, stride-2 max pool, and max_pool2x2_backward(grad, x), which recomputes each window's
// argmax from x instead of reading saved int64 indices. The window choice is F.max_pool2d's exactly, so the
// forward values and the routed gradient match it bit for bit.

#include <ATen/OpMathType.h>

#include "ops/common.h"
#include "ops/upsample_add.h"  // pool2x2_origin_*: the window geometry is shared with sum_pool2x2

namespace fused_hourglass {

// The value F.max_pool2d picks in a window and its position `best` (0..3, row-major: top-left, top-right,
// bottom-left, bottom-right): a value replaces the running maximum when it is strictly greater or NaN. Hence
// among equal maxima the first wins, a NaN beats every number, and among several NaNs the last one wins.
// Written as selects, not branches, so the CPU loops over windows vectorise.
template <typename acc_t>
FH_HOST_DEVICE inline acc_t max4(acc_t v0, acc_t v1, acc_t v2, acc_t v3, int& best) {
  acc_t m = v0;
  best = 0;
  const bool t1 = v1 > m || v1 != v1;
  m = t1 ? v1 : m;
  best = t1 ? 1 : best;
  const bool t2 = v2 > m || v2 != v2;
  m = t2 ? v2 : m;
  best = t2 ? 2 : best;
  const bool t3 = v3 > m || v3 != v3;
  m = t3 ? v3 : m;
  best = t3 ? 3 : best;
  return m;
}

// The window whose top-left tap is p, with taps at p, p + dx, p + dy, p + dy + dx: its maximum, exactly one of
// the four values (the conversion to opmath and back is exact), and the maximum's position.
template <typename scalar_t>
FH_HOST_DEVICE inline scalar_t window_max(const scalar_t* p, int64_t dx, int64_t dy, int& best) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(max4<acc_t>(static_cast<acc_t>(p[0]), static_cast<acc_t>(p[dx]),
                                           static_cast<acc_t>(p[dy]), static_cast<acc_t>(p[dy + dx]), best));
}

FH_HOST_DEVICE inline int64_t tap_offset(int k, int64_t dx, int64_t dy) { return (k & 1) * dx + (k >> 1) * dy; }

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
