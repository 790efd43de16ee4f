#pragma once
// max_pool2x2(x): 2×2, stride-2 max pool, and max_pool2x2_backward(grad, x), which recomputes each window's
// argmax from x instead of reading saved int64 indices. The window choice is F.max_pool2d's exactly, so the
// forward values and the routed gradient match it bit for bit.

#include <ATen/OpMathType.h>

#include "ops/common.h"
#include "ops/upsample_add.h"  // pool2x2_origin_*: the window geometry is shared with sum_pool2x2

namespace fused_hourglass {

// F.max_pool2d's window rule is a sequential scan in row-major order (top-left, top-right, bottom-left,
// bottom-right): a value replaces the running maximum m when it is strictly greater or NaN. Hence, without
// NaN, the first maximum wins (ties included; an all −inf window gives tap 0), and with NaNs the last NaN wins.
// The helpers below run that scan literally, three steps of compare + select: no branches (a branchy argmax
// mispredicts on every other window of real data) and no integer arithmetic on comparison results, so GCC
// if-converts and vectorises the CPU loops over windows, each step becoming a compare, an unordered compare,
// an or and a blend. The selects are open-coded: GCC vectorises those, not nested helper calls.

// Does v, met later in the scan, replace the running maximum m?
template <typename acc_t>
FH_HOST_DEVICE inline bool replaces_max(acc_t v, acc_t m) {
  return (v > m) | (v != v);
}

// The window's gradient g routed to its taps: g at the tap F.max_pool2d picks, +0 at the other three. F adds
// g into a zero-filled gradient, so a −0 gradient lands as +0: it is mapped to +0 here too, by a select rather
// than an add, which keeps NaN payloads as F's float32/float64/float16 kernels do (its bfloat16 backward
// re-encodes the sum from float and makes them canonical).
// The scan carries the four outputs instead of the picked position: selects on an integer position made GCC
// thread jumps through the chain of known positions before if-conversion, and the CPU loop did not vectorise.
template <typename scalar_t>
FH_HOST_DEVICE inline void route_grad4(scalar_t v0, scalar_t v1, scalar_t v2, scalar_t v3, scalar_t g_in,
                                       scalar_t& d0, scalar_t& d1, scalar_t& d2, scalar_t& d3) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t zero(0);
  const scalar_t g = static_cast<acc_t>(g_in) == acc_t(0) ? zero : g_in;
  acc_t m = static_cast<acc_t>(v0);
  acc_t a = static_cast<acc_t>(v1);
  bool r = replaces_max(a, m);
  m = r ? a : m;
  d0 = r ? zero : g;
  d1 = r ? g : zero;
  a = static_cast<acc_t>(v2);
  r = replaces_max(a, m);
  m = r ? a : m;
  d0 = r ? zero : d0;
  d1 = r ? zero : d1;
  d2 = r ? g : zero;
  a = static_cast<acc_t>(v3);
  r = replaces_max(a, m);
  d0 = r ? zero : d0;
  d1 = r ? zero : d1;
  d2 = r ? zero : d2;
  d3 = r ? g : zero;
}

// The value F.max_pool2d outputs for the window: the picked element as stored, so −0 versus +0 among equal
// maxima, and a NaN's payload, come out bit for bit as F's (whose float16/bfloat16 kernels make NaNs canonical).
// The comparisons are in acc_t (exact: converting a reduced-precision float to float is), the running maximum
// is kept as stored too; for float and double the two are the same variable.
template <typename scalar_t>
FH_HOST_DEVICE inline scalar_t max4(scalar_t v0, scalar_t v1, scalar_t v2, scalar_t v3) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t m = v0;
  acc_t am = static_cast<acc_t>(v0);
  acc_t a = static_cast<acc_t>(v1);
  bool r = replaces_max(a, am);
  m = r ? v1 : m;
  am = r ? a : am;
  a = static_cast<acc_t>(v2);
  r = replaces_max(a, am);
  m = r ? v2 : m;
  am = r ? a : am;
  a = static_cast<acc_t>(v3);
  return replaces_max(a, am) ? v3 : m;
}

FH_HOST_DEVICE inline int64_t tap_offset(int k, int64_t dx, int64_t dy) { return (k & 1) * dx + (k >> 1) * dy; }

// The value F.max_pool2d outputs for that window (see max4).
template <typename scalar_t>
FH_HOST_DEVICE inline scalar_t window_max(const scalar_t* p, int64_t dx, int64_t dy) {
  return max4(p[0], p[dx], p[dy], p[dy + dx]);
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
