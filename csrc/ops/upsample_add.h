#pragma once
// upsample_add(low, skip) = skip + nearest_upsample_2x(low), and sum_pool2x2(grad), its backward for low.
// Index arithmetic lives here as FH_HOST_DEVICE functions so the CPU tests run the CUDA kernels' math.

#include "ops/common.h"

namespace fused_hourglass {

// Offset in the dense `low` tensor of the value that feeds element `i` of the dense output; out_h and out_w
// are the output's (even) spatial sizes. NCHW: i = ((n·C + c)·out_h + oh)·out_w + ow.
FH_HOST_DEVICE inline int64_t up2x_source_nchw(int64_t i, int64_t out_h, int64_t out_w) {
  const int64_t ow = i % out_w;
  const int64_t t = i / out_w;
  const int64_t oh = t % out_h;
  const int64_t nc = t / out_h;
  return (nc * (out_h / 2) + oh / 2) * (out_w / 2) + ow / 2;
}

// NHWC (channels_last storage): i = ((n·out_h + oh)·out_w + ow)·C + c.
FH_HOST_DEVICE inline int64_t up2x_source_nhwc(int64_t i, int64_t c, int64_t out_h, int64_t out_w) {
  const int64_t ch = i % c;
  int64_t t = i / c;
  const int64_t ow = t % out_w;
  t /= out_w;
  const int64_t oh = t % out_h;
  const int64_t n = t / out_h;
  return ((n * (out_h / 2) + oh / 2) * (out_w / 2) + ow / 2) * c + ch;
}

// Sum in acc_t (float for half/bfloat16): rounding happens once, on the store.
template <typename scalar_t, typename acc_t>
FH_HOST_DEVICE inline scalar_t add_in(scalar_t a, scalar_t b) {
  return static_cast<scalar_t>(static_cast<acc_t>(a) + static_cast<acc_t>(b));
}

// Offset in the dense input of the top-left tap of the 2×2 window of pooled element `o`; the other taps
// are at +tap_dx, +tap_dy, +tap_dx+tap_dy (see sum_pool_taps_*). in_h, in_w are the input's sizes.
FH_HOST_DEVICE inline int64_t pool2x2_origin_nchw(int64_t o, int64_t in_h, int64_t in_w) {
  const int64_t pw = in_w / 2, ph = in_h / 2;
  const int64_t x = o % pw;
  const int64_t t = o / pw;
  const int64_t y = t % ph;
  const int64_t nc = t / ph;
  return (nc * in_h + 2 * y) * in_w + 2 * x;
}

FH_HOST_DEVICE inline int64_t pool2x2_origin_nhwc(int64_t o, int64_t c, int64_t in_h, int64_t in_w) {
  const int64_t pw = in_w / 2, ph = in_h / 2;
  const int64_t ch = o % c;
  int64_t t = o / c;
  const int64_t x = t % pw;
  t /= pw;
  const int64_t y = t % ph;
  const int64_t n = t / ph;
  return ((n * in_h + 2 * y) * in_w + 2 * x) * c + ch;
}

// Sum of a 2×2 window in acc_t, summed row by row ((a + b) + (c + d)) on every device.
template <typename scalar_t, typename acc_t>
FH_HOST_DEVICE inline scalar_t sum4(const scalar_t* p, int64_t dx, int64_t dy) {
  const acc_t top = static_cast<acc_t>(p[0]) + static_cast<acc_t>(p[dx]);
  const acc_t bottom = static_cast<acc_t>(p[dy]) + static_cast<acc_t>(p[dy + dx]);
  return static_cast<scalar_t>(top + bottom);
}

inline void check_upsample_add(const at::Tensor& low, const at::Tensor& skip) {
  constexpr const char* op = "upsample_add";
  check_4d_float(low, op, "low");
  check_4d_float(skip, op, "skip");
  check_same_dtype_device(low, "low", skip, "skip", op);
  TORCH_CHECK_VALUE(low.size(0) == skip.size(0) && low.size(1) == skip.size(1), op,
                    ": low and skip must have the same batch size and channel count, got skip ", shape_str(skip),
                    " and low ", shape_str(low));
  TORCH_CHECK_VALUE(skip.size(2) == 2 * low.size(2) && skip.size(3) == 2 * low.size(3), op,
                    ": skip must be exactly 2× low in H and W, got skip ", shape_str(skip), " and low ",
                    shape_str(low));
}

inline void check_sum_pool2x2(const at::Tensor& grad) {
  check_4d_float(grad, "sum_pool2x2", "grad");
  TORCH_CHECK_VALUE(grad.size(2) % 2 == 0 && grad.size(3) % 2 == 0,
                    "sum_pool2x2: grad must have even H and W, got shape ", shape_str(grad));
}

}  // namespace fused_hourglass
