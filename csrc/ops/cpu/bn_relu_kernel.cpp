// CPU kernels of the BN-ReLU ops. Both layouts are native: NCHW works plane by plane (one (n, c) plane is a
// contiguous run of H·W values of one channel), channels_last works on blocks of pixel rows with the channel as
// the contiguous, vectorised axis. Inner loops are plain loops over independent lanes calling the shared
// arithmetic of ops/bn_relu.h, written so the compiler vectorises them.
//
// Reductions are deterministic and independent of the thread count: the partition into partials (runs of a
// channel's planes, or fixed row blocks) depends only on the shape, and partials are merged per channel in
// index order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "ops/bn_relu.h"
#include "ops/cpu/cpu_utils.h"

namespace fused_hourglass {
namespace {

// Independent accumulation lanes over a contiguous NCHW plane. 32 lanes of two sums are eight AVX2 registers,
// so the hot loops keep their accumulators in registers (64 lanes, or a third sum, spill them to the stack
// every step), and the loop-carried dependency chains are split 32 ways. The lane loop stays an ordinary inner
// loop that GCC vectorises (with 16 lanes it unrolls it and vectorises the outer loop, at scalar speed).
constexpr int64_t kLanes = 32;

// Rows per channels_last statistics run: rows_sums adds four rows per step into one lane per channel, so each
// lane sums kRunRows values in 64 steps, as a lane of the NCHW runs takes kRun = 64 steps, and the per-channel
// Chan merge (two divisions) is paid once per 256 values.
constexpr int64_t kRunRows = 256;

// Rows (pixels) per channels_last partial: at least a statistics run, and about 32 K values when the channels
// are few; the per-channel state stays in L1.
inline int64_t rows_per_block(int64_t c) { return std::max(kRunRows, grain_for(c)); }

struct Geometry {
  int64_t n, c, hw, m;
  bool channels_last;
  int64_t partials() const { return channels_last ? (m + rows_per_block(c) - 1) / rows_per_block(c) : n; }
};

Geometry geometry_of(const at::Tensor& u, at::MemoryFormat fmt) {
  const int64_t n = u.size(0), c = u.size(1), hw = u.size(2) * u.size(3);
  return {n, c, hw, n * hw, fmt == at::MemoryFormat::ChannelsLast};
}

// ---------------------------------------------------------------------------------------------------------
// bn_stats

// Steps per run of plain sums before a run is folded into the Welford state: short enough that the fp32 sums
// of squares stay accurate (each lane sums kRun values), long enough that the merge (a division and a few
// branches) is amortised.
constexpr int64_t kRun = 64;

// Σx, Σx² (x = value − pivot) of `steps`·kLanes contiguous values in kLanes lanes, and with kNonfinite
// also the sum of the non-finite x (welford_nonfinite). The sums without it are the fast path: a run whose sums
// come out non-finite is summed again with it, so inf and NaN reach the statistics as welford_nonfinite says.
template <bool kNonfinite, typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void run_sums(const scalar_t* __restrict__ p, int64_t steps, acc_t pivot, acc_t& t1, acc_t& t2,
                                 acc_t& tn) {
  acc_t s1[kLanes] = {}, s2[kLanes] = {}, nonfinite[kLanes] = {};
  for (int64_t k = 0; k < steps; ++k) {
    const scalar_t* q = p + k * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t x = static_cast<acc_t>(q[l]) - pivot;
      s1[l] += x;
      s2[l] += x * x;
      if constexpr (kNonfinite) nonfinite[l] += welford_nonfinite(x);
    }
  }
  // Summed in locals: accumulating through the references would store every step (they may alias).
  acc_t a1 = 0, a2 = 0, an = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    a1 += s1[l];
    a2 += s2[l];
    if constexpr (kNonfinite) an += nonfinite[l];
  }
  t1 = a1;
  t2 = a2;
  tn = an;
}

template <typename acc_t>
inline bool finite_sums(acc_t t1, acc_t t2) {
  return std::isfinite(t1) && std::isfinite(t2);
}

// Plain sums (Σx, Σx², Σnon-finite) of `len` contiguous values: lanes (run_sums, rerun with the non-finite sum
// when the fast sums come out non-finite) and a serial tail.
template <typename scalar_t, typename acc_t>
void contiguous_sums(const scalar_t* __restrict__ p, int64_t len, acc_t pivot, acc_t& t1, acc_t& t2, acc_t& tn) {
  const int64_t steps = len / kLanes;
  t1 = t2 = tn = acc_t(0);
  if (steps > 0) {  // (planes shorter than kLanes, 4×4 px and below, skip the lanes' set-up and reduction)
    run_sums<false>(p, steps, pivot, t1, t2, tn);
    if (!finite_sums(t1, t2)) run_sums<true>(p, steps, pivot, t1, t2, tn);
  }
  for (int64_t i = steps * kLanes; i < len; ++i) {
    const acc_t x = static_cast<acc_t>(p[i]) - pivot;
    t1 += x;
    t2 += x * x;
    tn += welford_nonfinite(x);
  }
}

// Values per NCHW run: kRun steps of the kLanes lanes.
constexpr int64_t kRunValues = kRun * kLanes;

// NCHW planes shorter than this are gathered into runs before summing (statistics and gradient sums).
constexpr int64_t kSmallPlane = 512;

// Copies planes n0 … n0 + planes − 1 of NCHW channel ch (planes·H·W ≤ kRunValues values) back to back into buf.
template <typename scalar_t>
void gather_planes(scalar_t* __restrict__ buf, const scalar_t* __restrict__ data, const Geometry& g, int64_t ch,
                   int64_t n0, int64_t planes) {
  for (int64_t k = 0; k < planes; ++k) {
    std::memcpy(buf + k * g.hw, data + ((n0 + k) * g.c + ch) * g.hw, g.hw * sizeof(scalar_t));
  }
}

// Welford state of channel ch of an NCHW tensor: its N planes in runs of up to kRun·kLanes values, each run's
// plain sums folded in with one Chan merge. A plane at least that long is split into runs; shorter planes (the
// 4…32 px levels of the hourglass) are pooled until they fill a run, so the merge is paid once per run rather
// than once per plane, and planes under kSmallPlane values are copied into the run first, so that the lanes'
// set-up and horizontal sums are too.

template <typename scalar_t, typename acc_t>
WelfordState<acc_t> welford_channel_nchw(const scalar_t* __restrict__ data, const Geometry& g, int64_t ch,
                                         acc_t pivot) {
  WelfordState<acc_t> s{acc_t(0), acc_t(0), acc_t(0), 0};
  if (g.hw < kSmallPlane) {
    // Planes this small (8×8 px and below) are copied back to back into a run buffer and summed a run at a
    // time: summed plane by plane, the lanes' set-up and horizontal sums would cost more than the values.
    scalar_t buf[kRunValues];
    const int64_t per_run = kRunValues / g.hw;
    for (int64_t n0 = 0; n0 < g.n; n0 += per_run) {
      const int64_t planes = std::min(per_run, g.n - n0);
      gather_planes(buf, data, g, ch, n0, planes);
      acc_t t1, t2, tn;
      contiguous_sums(buf, planes * g.hw, pivot, t1, t2, tn);
      s = welford_merge(s, welford_from_sums(t1, t2, tn, planes * g.hw));
    }
    return s;
  }
  acc_t c1 = 0, c2 = 0, cn = 0;
  int64_t count = 0;
  for (int64_t n = 0; n < g.n; ++n) {
    const scalar_t* plane = data + (n * g.c + ch) * g.hw;
    for (int64_t i0 = 0; i0 < g.hw; i0 += kRunValues) {
      const int64_t len = std::min(kRunValues, g.hw - i0);
      acc_t t1, t2, tn;
      contiguous_sums(plane + i0, len, pivot, t1, t2, tn);
      c1 += t1;
      c2 += t2;
      cn += tn;
      count += len;
      if (count >= kRunValues) {
        s = welford_merge(s, welford_from_sums(c1, c2, cn, count));
        c1 = c2 = cn = acc_t(0);
        count = 0;
      }
    }
  }
  return welford_merge(s, welford_from_sums(c1, c2, cn, count));
}

// Per-channel Σx, Σx² (and with kNonfinite the non-finite sum) of channels_last rows [q0, q1), a lane per
// channel. Four rows per pass: the per-channel sums are loaded and stored once per four rows, not every row.
template <bool kNonfinite, typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void rows_sums(const scalar_t* __restrict__ u, int64_t c, int64_t q0, int64_t q1,
                                  const acc_t* __restrict__ pivot, acc_t* __restrict__ s1, acc_t* __restrict__ s2,
                                  acc_t* __restrict__ nonfinite) {
  for (int64_t ch = 0; ch < c; ++ch) s1[ch] = s2[ch] = nonfinite[ch] = acc_t(0);
  int64_t r = q0;
  for (; r + 4 <= q1; r += 4) {
    const scalar_t* __restrict__ r0 = u + r * c;
    const scalar_t* __restrict__ r1 = r0 + c;
    const scalar_t* __restrict__ r2 = r1 + c;
    const scalar_t* __restrict__ r3 = r2 + c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t p = pivot[ch];
      const acc_t x0 = static_cast<acc_t>(r0[ch]) - p, x1 = static_cast<acc_t>(r1[ch]) - p;
      const acc_t x2 = static_cast<acc_t>(r2[ch]) - p, x3 = static_cast<acc_t>(r3[ch]) - p;
      s1[ch] += (x0 + x1) + (x2 + x3);
      s2[ch] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3);
      if constexpr (kNonfinite) {
        nonfinite[ch] += (welford_nonfinite(x0) + welford_nonfinite(x1)) +
                         (welford_nonfinite(x2) + welford_nonfinite(x3));
      }
    }
  }
  for (; r < q1; ++r) {
    const scalar_t* __restrict__ row = u + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t x = static_cast<acc_t>(row[ch]) - pivot[ch];
      s1[ch] += x;
      s2[ch] += x * x;
      if constexpr (kNonfinite) nonfinite[ch] += welford_nonfinite(x);
    }
  }
}

// One channels_last partial: rows [r0, r1) of the [M, C] matrix in runs of kRunRows rows, each run folded into the
// channel's Welford state. A run with a non-finite sum in any channel is summed again with the non-finite sums.
template <typename scalar_t, typename acc_t>
void welford_rows(const scalar_t* __restrict__ u, int64_t c, int64_t r0, int64_t r1, const acc_t* __restrict__ pivot,
                  WelfordState<acc_t>* out) {
  std::vector<acc_t> buf(3 * c);
  acc_t* s1 = buf.data();
  acc_t* s2 = s1 + c;
  acc_t* nonfinite = s2 + c;
  for (int64_t ch = 0; ch < c; ++ch) out[ch] = {acc_t(0), acc_t(0), acc_t(0), 0};
  for (int64_t q0 = r0; q0 < r1; q0 += kRunRows) {
    const int64_t q1 = std::min(r1, q0 + kRunRows);
    rows_sums<false>(u, c, q0, q1, pivot, s1, s2, nonfinite);
    bool finite = true;
    for (int64_t ch = 0; ch < c; ++ch) finite &= finite_sums(s1[ch], s2[ch]);
    if (!finite) rows_sums<true>(u, c, q0, q1, pivot, s1, s2, nonfinite);
    for (int64_t ch = 0; ch < c; ++ch) {
      out[ch] = welford_merge(out[ch], welford_from_sums(s1[ch], s2[ch], nonfinite[ch], q1 - q0));
    }
  }
}

// NCHW tensors with fewer channels than this split each channel's statistics by plane, not by channel only.
constexpr int64_t kFewChannels = 16;

template <typename scalar_t>
void bn_stats_impl(const at::Tensor& u, const Geometry& g, double eps, at::Tensor& mean, at::Tensor& var,
                   at::Tensor& invstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* data = u.const_data_ptr<scalar_t>();
  const int64_t parts = g.partials();
  // The first value of each channel: (n, h, w) = (0, 0, 0).
  std::vector<acc_t> pivot(g.c);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    pivot[ch] = welford_pivot(static_cast<acc_t>(data[g.channels_last ? ch : ch * g.hw]));
  }
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* var_p = var.mutable_data_ptr<acc_t>();
  acc_t* invstd_p = invstd.mutable_data_ptr<acc_t>();
  if (!g.channels_last && (g.c >= kFewChannels || g.n == 1)) {
    at::parallel_for(0, g.c, grain_for(g.m), [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        welford_finalize(welford_channel_nchw(data, g, ch, pivot[ch]), pivot[ch], static_cast<acc_t>(eps),
                         mean_p[ch], var_p[ch], invstd_p[ch]);
      }
    });
    return;
  }
  if (!g.channels_last) {
    // Few channels (an RGB input, say): one partial per plane, so that all threads have work, merged per
    // channel in sample order.
    std::vector<WelfordState<acc_t>> plane_state(g.n * g.c);
    const Geometry one_plane{1, 1, g.hw, g.hw, false};
    at::parallel_for(0, g.n * g.c, grain_for(g.hw), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        plane_state[plane] = welford_channel_nchw(data + plane * g.hw, one_plane, 0, pivot[plane % g.c]);
      }
    });
    for (int64_t ch = 0; ch < g.c; ++ch) {
      WelfordState<acc_t> s{acc_t(0), acc_t(0), acc_t(0), 0};
      for (int64_t n = 0; n < g.n; ++n) s = welford_merge(s, plane_state[n * g.c + ch]);
      welford_finalize(s, pivot[ch], static_cast<acc_t>(eps), mean_p[ch], var_p[ch], invstd_p[ch]);
    }
    return;
  }
  // partial[p·C + c]: the Welford state of channel c over channels_last row block p.
  std::vector<WelfordState<acc_t>> partial(parts * g.c);
  const int64_t rows = rows_per_block(g.c);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      welford_rows(data, g.c, p * rows, std::min(g.m, (p + 1) * rows), pivot.data(), partial.data() + p * g.c);
    }
  });
  at::parallel_for(0, g.c, grain_for(parts), [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      WelfordState<acc_t> s{acc_t(0), acc_t(0), acc_t(0), 0};
      for (int64_t p = 0; p < parts; ++p) s = welford_merge(s, partial[p * g.c + ch]);
      welford_finalize(s, pivot[ch], static_cast<acc_t>(eps), mean_p[ch], var_p[ch], invstd_p[ch]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& u_in, double eps) {
  check_bn_stats(u_in);
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor mean = at::empty({u_in.size(1)}, opts);
  at::Tensor var = at::empty({u_in.size(1)}, opts);
  at::Tensor invstd = at::empty({u_in.size(1)}, opts);
  if (u_in.numel() == 0) {
    // No values: the statistics of an empty channel are undefined (NaN), see welford_finalize.
    mean.fill_(NAN);
    var.fill_(NAN);
    invstd.fill_(NAN);
    return {mean, var, invstd};
  }
  const auto fmt = output_memory_format(u_in);
  const at::Tensor u = u_in.contiguous(fmt);
  const Geometry g = geometry_of(u, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_stats_cpu",
                                  [&] { bn_stats_impl<scalar_t>(u, g, eps, mean, var, invstd); });
  return {mean, var, invstd};
}

// ---------------------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------------------
// bn_relu_apply

// Element-wise loops of apply and backward apply, one channels_last row (per-channel vectors) or one NCHW
// plane (per-plane scalars) per call, compiled for the baseline ISA, AVX2 and AVX-512 (FH_CPU_CLONES_WIDE).
template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void apply_row(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                  const acc_t* __restrict__ sc, const acc_t* __restrict__ sh, int64_t c) {
  for (int64_t ch = 0; ch < c; ++ch) {
    dst[ch] = static_cast<scalar_t>(relu_keep_nan(bn_affine(static_cast<acc_t>(src[ch]), sc[ch], sh[ch])));
  }
}

template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void apply_plane(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, acc_t s, acc_t b,
                                    int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    dst[i] = static_cast<scalar_t>(relu_keep_nan(bn_affine(static_cast<acc_t>(src[i]), s, b)));
  }
}

// Channels_last rows [0, rows) of the input gradient, one row per pass. (Two rows per pass, loading the five
// per-channel vectors once per two rows, ran out of registers and measured 1.5× slower.)
template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void grad_rows(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ src,
                                  scalar_t* __restrict__ dst, const acc_t* __restrict__ sc,
                                  const acc_t* __restrict__ sh, const acc_t* __restrict__ mu,
                                  const acc_t* __restrict__ ca, const acc_t* __restrict__ cb, bool training, int64_t c,
                                  int64_t rows) {
  if (!training) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict__ g = gr + r * c;
      const scalar_t* __restrict__ x = src + r * c;
      scalar_t* __restrict__ d = dst + r * c;
      for (int64_t ch = 0; ch < c; ++ch) {
        d[ch] = static_cast<scalar_t>(
            bn_relu_grad_eval(static_cast<acc_t>(g[ch]), static_cast<acc_t>(x[ch]), sc[ch], sh[ch]));
      }
    }
    return;
  }
  int64_t r = 0;
  for (; r < rows; ++r) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t i = r * c + ch;
      dst[i] = static_cast<scalar_t>(bn_relu_grad_train(static_cast<acc_t>(gr[i]), static_cast<acc_t>(src[i]),
                                                        sc[ch], sh[ch], mu[ch], ca[ch], cb[ch]));
    }
  }
}

template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void grad_plane(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ src,
                                   scalar_t* __restrict__ dst, acc_t s, acc_t b, acc_t m, acc_t ka, acc_t kb,
                                   bool training, int64_t len) {
  if (training) {
    for (int64_t i = 0; i < len; ++i) {
      dst[i] = static_cast<scalar_t>(
          bn_relu_grad_train(static_cast<acc_t>(gr[i]), static_cast<acc_t>(src[i]), s, b, m, ka, kb));
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      dst[i] = static_cast<scalar_t>(bn_relu_grad_eval(static_cast<acc_t>(gr[i]), static_cast<acc_t>(src[i]), s, b));
    }
  }
}

template <typename scalar_t>
void bn_relu_apply_impl(const at::Tensor& u, const Geometry& g, const at::Tensor& scale, const at::Tensor& shift,
                        at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = u.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sh = shift.const_data_ptr<acc_t>();
  const bool stream = stream_output(2 * u.nbytes());
  if (g.channels_last) {
    const int64_t chunk_rows = stream ? stream_chunk_rows<scalar_t>(g.c) : g.m;
    at::parallel_for(0, g.m, grain_for(g.c), [&](int64_t begin, int64_t end) {
      OutputWriter<scalar_t> w(stream, chunk_rows * g.c);
      for (int64_t r0 = begin; r0 < end; r0 += chunk_rows) {
        const int64_t r1 = std::min(end, r0 + chunk_rows);
        scalar_t* t = w.target(o + r0 * g.c);
        for (int64_t r = r0; r < r1; ++r) apply_row(in + r * g.c, t + (r - r0) * g.c, sc, sh, g.c);
        w.commit(o + r0 * g.c, (r1 - r0) * g.c);
      }
    });
  } else {
    const int64_t chunk = stream ? stream_chunk<scalar_t>() : g.hw;
    at::parallel_for(0, g.n * g.c, grain_for(g.hw), [&](int64_t begin, int64_t end) {
      OutputWriter<scalar_t> w(stream, chunk);
      for (int64_t plane = begin; plane < end; ++plane) {
        for (int64_t i0 = 0; i0 < g.hw; i0 += chunk) {
          const int64_t len = std::min(chunk, g.hw - i0), off = plane * g.hw + i0;
          apply_plane(in + off, w.target(o + off), sc[plane % g.c], sh[plane % g.c], len);
          w.commit(o + off, len);
        }
      }
    });
  }
}

at::Tensor bn_relu_apply_cpu(const at::Tensor& u_in, const at::Tensor& scale_in, const at::Tensor& shift_in) {
  check_bn_relu_apply(u_in, scale_in, shift_in);
  const auto fmt = output_memory_format(u_in);
  at::Tensor out = at::empty(u_in.sizes(), u_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor u = u_in.contiguous(fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const Geometry g = geometry_of(u, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_apply_cpu",
                                  [&] { bn_relu_apply_impl<scalar_t>(u, g, scale, shift, out); });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// bn_relu_backward_reduce: Σdz and Σdz·(u − mean) per channel; the latter times invstd is Σdz·x̂. Plain sums
// in acc_t: dz·(u − mean) is centred already, so nothing large cancels.

template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xc;  // Σ dz·(u − mean)
};

template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE GradSums<acc_t> grad_sums_plane(const scalar_t* __restrict__ dr, const scalar_t* __restrict__ u,
                                                   int64_t len, acc_t scale, acc_t shift, acc_t mean) {
  acc_t s_dz[kLanes] = {}, s_dzx[kLanes] = {};
  const int64_t steps = len / kLanes;
  for (int64_t k = 0; k < steps; ++k) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t i = k * kLanes + l;
      const acc_t x = static_cast<acc_t>(u[i]);
      const acc_t dz = relu_grad(static_cast<acc_t>(dr[i]), bn_affine(x, scale, shift));
      s_dz[l] += dz;
      s_dzx[l] += dz * (x - mean);
    }
  }
  GradSums<acc_t> s{acc_t(0), acc_t(0)};
  for (int64_t l = 0; l < kLanes; ++l) {
    s.dz += s_dz[l];
    s.dz_xc += s_dzx[l];
  }
  for (int64_t i = steps * kLanes; i < len; ++i) {
    const acc_t x = static_cast<acc_t>(u[i]);
    const acc_t dz = relu_grad(static_cast<acc_t>(dr[i]), bn_affine(x, scale, shift));
    s.dz += dz;
    s.dz_xc += dz * (x - mean);
  }
  return s;
}

// Per-channel sums of channels_last rows [r0, r1), four rows per pass (the sums are loaded and stored once per
// four rows).
template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void grad_sums_rows(const scalar_t* __restrict__ dr, const scalar_t* __restrict__ u, int64_t c,
                                       int64_t r0, int64_t r1, const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                       GradSums<acc_t>* out) {
  std::vector<acc_t> dz_buf(c, acc_t(0)), dzx_buf(c, acc_t(0));
  acc_t* __restrict__ s_dz = dz_buf.data();
  acc_t* __restrict__ s_dzx = dzx_buf.data();
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const scalar_t* __restrict__ g0 = dr + r * c;
    const scalar_t* __restrict__ g1 = g0 + c;
    const scalar_t* __restrict__ g2 = g1 + c;
    const scalar_t* __restrict__ g3 = g2 + c;
    const scalar_t* __restrict__ u0 = u + r * c;
    const scalar_t* __restrict__ u1 = u0 + c;
    const scalar_t* __restrict__ u2 = u1 + c;
    const scalar_t* __restrict__ u3 = u2 + c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t sc = scale[ch], sh = shift[ch], mu = mean[ch];
      const acc_t x0 = static_cast<acc_t>(u0[ch]), x1 = static_cast<acc_t>(u1[ch]);
      const acc_t x2 = static_cast<acc_t>(u2[ch]), x3 = static_cast<acc_t>(u3[ch]);
      const acc_t d0 = relu_grad(static_cast<acc_t>(g0[ch]), bn_affine(x0, sc, sh));
      const acc_t d1 = relu_grad(static_cast<acc_t>(g1[ch]), bn_affine(x1, sc, sh));
      const acc_t d2 = relu_grad(static_cast<acc_t>(g2[ch]), bn_affine(x2, sc, sh));
      const acc_t d3 = relu_grad(static_cast<acc_t>(g3[ch]), bn_affine(x3, sc, sh));
      s_dz[ch] += (d0 + d1) + (d2 + d3);
      s_dzx[ch] += (d0 * (x0 - mu) + d1 * (x1 - mu)) + (d2 * (x2 - mu) + d3 * (x3 - mu));
    }
  }
  for (; r < r1; ++r) {
    const scalar_t* __restrict__ g = dr + r * c;
    const scalar_t* __restrict__ row = u + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t x = static_cast<acc_t>(row[ch]);
      const acc_t dz = relu_grad(static_cast<acc_t>(g[ch]), bn_affine(x, scale[ch], shift[ch]));
      s_dz[ch] += dz;
      s_dzx[ch] += dz * (x - mean[ch]);
    }
  }
  for (int64_t ch = 0; ch < c; ++ch) out[ch] = {s_dz[ch], s_dzx[ch]};
}

template <typename scalar_t>
void bn_relu_backward_reduce_impl(const at::Tensor& dr, const at::Tensor& u, const Geometry& g,
                                  const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
                                  const at::Tensor& invstd, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dr_p = dr.const_data_ptr<scalar_t>();
  const scalar_t* u_p = u.const_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sh = shift.const_data_ptr<acc_t>();
  const acc_t* mu = mean.const_data_ptr<acc_t>();
  // Small NCHW planes: one partial per channel, its planes gathered into runs (as welford_channel_nchw does).
  const bool small_planes = !g.channels_last && g.hw < kSmallPlane;
  const int64_t parts = small_planes ? 1 : g.partials();
  std::vector<GradSums<acc_t>> partial(parts * g.c);
  if (g.channels_last) {
    const int64_t rows = rows_per_block(g.c);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        grad_sums_rows(dr_p, u_p, g.c, p * rows, std::min(g.m, (p + 1) * rows), sc, sh, mu,
                       partial.data() + p * g.c);
      }
    });
  } else if (small_planes) {
    const int64_t per_run = kRunValues / g.hw;
    at::parallel_for(0, g.c, grain_for(2 * g.m), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(2 * kRunValues);
      scalar_t* gb = buf.data();
      scalar_t* ub = gb + kRunValues;
      for (int64_t ch = begin; ch < end; ++ch) {
        GradSums<acc_t> acc{acc_t(0), acc_t(0)};
        for (int64_t n0 = 0; n0 < g.n; n0 += per_run) {
          const int64_t planes = std::min(per_run, g.n - n0);
          gather_planes(gb, dr_p, g, ch, n0, planes);
          gather_planes(ub, u_p, g, ch, n0, planes);
          const GradSums<acc_t> t = grad_sums_plane(gb, ub, planes * g.hw, sc[ch], sh[ch], mu[ch]);
          acc.dz += t.dz;
          acc.dz_xc += t.dz_xc;
        }
        partial[ch] = acc;
      }
    });
  } else {
    at::parallel_for(0, g.n * g.c, grain_for(g.hw), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t ch = plane % g.c;
        partial[plane] = grad_sums_plane(dr_p + plane * g.hw, u_p + plane * g.hw, g.hw, sc[ch], sh[ch], mu[ch]);
      }
    });
  }
  const acc_t* is = invstd.const_data_ptr<acc_t>();
  acc_t* s_dz = sum_dz.mutable_data_ptr<acc_t>();
  acc_t* s_dzx = sum_dz_xhat.mutable_data_ptr<acc_t>();
  at::parallel_for(0, g.c, grain_for(parts), [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t a = acc_t(0), b = acc_t(0);
      for (int64_t p = 0; p < parts; ++p) {
        a += partial[p * g.c + ch].dz;
        b += partial[p * g.c + ch].dz_xc;
      }
      s_dz[ch] = a;
      s_dzx[ch] = b * is[ch];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(const at::Tensor& grad_in, const at::Tensor& u_in,
                                                               const at::Tensor& scale_in, const at::Tensor& shift_in,
                                                               const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_bn_relu_backward("bn_relu_backward_reduce", grad_in, u_in,
                         {{&scale_in, "scale"}, {&shift_in, "shift"}, {&mean_in, "mean"}, {&invstd_in, "invstd"}});
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor sum_dz = at::zeros({u_in.size(1)}, opts);
  at::Tensor sum_dz_xhat = at::zeros({u_in.size(1)}, opts);
  if (u_in.numel() == 0) return {sum_dz, sum_dz_xhat};
  const auto fmt = output_memory_format(u_in);
  const at::Tensor u = u_in.contiguous(fmt), dr = grad_in.contiguous(fmt);
  const Geometry g = geometry_of(u, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    bn_relu_backward_reduce_impl<scalar_t>(dr, u, g, scale_in.contiguous(), shift_in.contiguous(),
                                           mean_in.contiguous(), invstd_in.contiguous(), sum_dz, sum_dz_xhat);
  });
  return {sum_dz, sum_dz_xhat};
}

// ---------------------------------------------------------------------------------------------------------
// bn_relu_backward_apply

template <typename scalar_t>
void bn_relu_backward_apply_impl(const at::Tensor& dr, const at::Tensor& u, const Geometry& g,
                                 const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* mean,
                                 const at::Tensor* invstd, const at::Tensor* sum_dz, const at::Tensor* sum_dz_xhat,
                                 at::Tensor& du) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool training = mean != nullptr;
  const scalar_t* dr_p = dr.const_data_ptr<scalar_t>();
  const scalar_t* u_p = u.const_data_ptr<scalar_t>();
  scalar_t* du_p = du.mutable_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sh = shift.const_data_ptr<acc_t>();
  // Per-channel coefficients a, b of bn_backward_coefs, and the mean (zero in eval, where it is unused).
  std::vector<acc_t> a_buf(g.c, acc_t(0)), b_buf(g.c, acc_t(0)), mean_buf(g.c, acc_t(0));
  if (training) {
    const acc_t* mu = mean->const_data_ptr<acc_t>();
    const acc_t* is = invstd->const_data_ptr<acc_t>();
    const acc_t* sdz = sum_dz->const_data_ptr<acc_t>();
    const acc_t* sdzx = sum_dz_xhat->const_data_ptr<acc_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(g.m);
    for (int64_t ch = 0; ch < g.c; ++ch) {
      bn_backward_coefs(sdz[ch], sdzx[ch], sc[ch], is[ch], inv_m, a_buf[ch], b_buf[ch]);
      mean_buf[ch] = mu[ch];
    }
  }
  const acc_t* ca = a_buf.data();
  const acc_t* cb = b_buf.data();
  const acc_t* mu = mean_buf.data();
  const bool stream = stream_output(3 * u.nbytes());
  if (g.channels_last) {
    const int64_t chunk_rows = stream ? stream_chunk_rows<scalar_t>(g.c) : g.m;
    at::parallel_for(0, g.m, grain_for(2 * g.c), [&](int64_t begin, int64_t end) {
      OutputWriter<scalar_t> w(stream, chunk_rows * g.c);
      for (int64_t r0 = begin; r0 < end; r0 += chunk_rows) {
        const int64_t rows = std::min(end - r0, chunk_rows), off = r0 * g.c;
        grad_rows(dr_p + off, u_p + off, w.target(du_p + off), sc, sh, mu, ca, cb, training, g.c, rows);
        w.commit(du_p + off, rows * g.c);
      }
    });
  } else {
    const int64_t chunk = stream ? stream_chunk<scalar_t>() : g.hw;
    at::parallel_for(0, g.n * g.c, grain_for(2 * g.hw), [&](int64_t begin, int64_t end) {
      OutputWriter<scalar_t> w(stream, chunk);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t ch = plane % g.c;
        for (int64_t i0 = 0; i0 < g.hw; i0 += chunk) {
          const int64_t len = std::min(chunk, g.hw - i0), off = plane * g.hw + i0;
          grad_plane(dr_p + off, u_p + off, w.target(du_p + off), sc[ch], sh[ch], mu[ch], ca[ch], cb[ch], training,
                     len);
          w.commit(du_p + off, len);
        }
      }
    });
  }
}

at::Tensor bn_relu_backward_apply_cpu(const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& scale_in,
                                      const at::Tensor& shift_in, const std::optional<at::Tensor>& mean,
                                      const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& sum_dz,
                                      const std::optional<at::Tensor>& sum_dz_xhat) {
  constexpr const char* op = "bn_relu_backward_apply";
  const bool training = mean.has_value();
  TORCH_CHECK_VALUE(training == invstd.has_value() && training == sum_dz.has_value() &&
                        training == sum_dz_xhat.has_value(),
                    op, ": mean, invstd, sum_dz and sum_dz_xhat must be all given (training) or all None (eval)");
  if (training) {
    check_bn_relu_backward(op, grad_in, u_in,
                           {{&scale_in, "scale"}, {&shift_in, "shift"}, {&*mean, "mean"}, {&*invstd, "invstd"},
                            {&*sum_dz, "sum_dz"}, {&*sum_dz_xhat, "sum_dz_xhat"}});
  } else {
    check_bn_relu_backward(op, grad_in, u_in, {{&scale_in, "scale"}, {&shift_in, "shift"}});
  }
  const auto fmt = output_memory_format(u_in);
  at::Tensor du = at::empty(u_in.sizes(), u_in.options().memory_format(fmt));
  if (du.numel() == 0) return du;
  const at::Tensor u = u_in.contiguous(fmt), dr = grad_in.contiguous(fmt);
  const Geometry g = geometry_of(u, fmt);
  at::Tensor mean_c, invstd_c, sdz_c, sdzx_c;
  if (training) {
    mean_c = mean->contiguous();
    invstd_c = invstd->contiguous();
    sdz_c = sum_dz->contiguous();
    sdzx_c = sum_dz_xhat->contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_backward_apply_cpu", [&] {
    bn_relu_backward_apply_impl<scalar_t>(dr, u, g, scale_in.contiguous(), shift_in.contiguous(),
                                          training ? &mean_c : nullptr, training ? &invstd_c : nullptr,
                                          training ? &sdz_c : nullptr, training ? &sdzx_c : nullptr, du);
  });
  return du;
}

// ---------------------------------------------------------------------------------------------------------
// bn_relu_forward and bn_relu_backward: the composite ops, each one call for what the autograd functions
// would otherwise do in several: a reduction pass over u (and the gradient), the per-channel work, then the
// element-wise pass. Both passes stream through memory in address order. Two alternatives measured slower on a
// 2-core EPYC, with the data in L3 and in a training step where it is not: finishing one NCHW channel at a time
// so that its second pass reads from L2 (each thread then hops between the N planes of a channel, C·H·W values
// apart), and walking the second pass backwards to start on the data read last (up to 1.6× slower): both
// defeat the hardware prefetchers.

template <typename scalar_t>
void bn_relu_forward_impl(const at::Tensor& u, const Geometry& g, const BnForwardArgs<at::opmath_type<scalar_t>>& a,
                          at::Tensor& out, at::Tensor& scale, at::Tensor& shift, at::Tensor& mean,
                          at::Tensor& invstd) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* sc = scale.mutable_data_ptr<acc_t>();
  acc_t* sh = shift.mutable_data_ptr<acc_t>();
  acc_t* mu = mean.mutable_data_ptr<acc_t>();
  acc_t* is = invstd.mutable_data_ptr<acc_t>();
  if (u.numel() == 0) {
    // Nothing to normalise; the batch statistics of no values are NaN (welford_finalize), and an empty batch
    // leaves the running statistics alone (BnForwardArgs::update_running).
    const acc_t nan = static_cast<acc_t>(NAN);
    for (int64_t ch = 0; ch < g.c; ++ch) bn_forward_channel(a, ch, nan, nan, nan, mu[ch], is[ch], sc[ch], sh[ch]);
    return;
  }
  if (a.batch_stats) {
    at::Tensor var = at::empty_like(mean);
    bn_stats_impl<scalar_t>(u, g, static_cast<double>(a.eps), mean, var, invstd);
    const acc_t* v = var.const_data_ptr<acc_t>();
    for (int64_t ch = 0; ch < g.c; ++ch) {
      bn_forward_channel(a, ch, mu[ch], v[ch], is[ch], mu[ch], is[ch], sc[ch], sh[ch]);
    }
  } else {
    for (int64_t ch = 0; ch < g.c; ++ch) {
      bn_forward_channel(a, ch, acc_t(0), acc_t(0), acc_t(0), mu[ch], is[ch], sc[ch], sh[ch]);
    }
  }
  bn_relu_apply_impl<scalar_t>(u, g, scale, shift, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cpu(
    const at::Tensor& u_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  check_bn_relu_forward(u_in, weight, bias, running_mean, running_var, training);
  const auto fmt = output_memory_format(u_in);
  at::Tensor out = at::empty(u_in.sizes(), u_in.options().memory_format(fmt));
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor scale = at::empty({u_in.size(1)}, opts), shift = at::empty({u_in.size(1)}, opts);
  at::Tensor mean = at::empty({u_in.size(1)}, opts), invstd = at::empty({u_in.size(1)}, opts);
  BnForwardVectors vectors(u_in, weight, bias, running_mean, running_var);
  const at::Tensor u = u_in.contiguous(fmt);
  const Geometry g = geometry_of(u, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = vectors.args<acc_t>(u, training, momentum, eps);
    bn_relu_forward_impl<scalar_t>(u, g, args, out, scale, shift, mean, invstd);
  });
  vectors.finish();
  return {out, scale, shift, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& u_in,
                                                                    const at::Tensor& scale_in,
                                                                    const at::Tensor& shift_in,
                                                                    const at::Tensor& mean_in,
                                                                    const at::Tensor& invstd_in) {
  check_bn_relu_backward("bn_relu_backward", grad_in, u_in,
                         {{&scale_in, "scale"}, {&shift_in, "shift"}, {&mean_in, "mean"}, {&invstd_in, "invstd"}});
  const auto fmt = output_memory_format(u_in);
  at::Tensor du = at::empty(u_in.sizes(), u_in.options().memory_format(fmt));
  const auto opts = u_in.options().dtype(stats_dtype(u_in));
  at::Tensor sum_dz = at::zeros({u_in.size(1)}, opts);
  at::Tensor sum_dz_xhat = at::zeros({u_in.size(1)}, opts);
  if (u_in.numel() == 0) return {du, sum_dz, sum_dz_xhat};
  const at::Tensor u = u_in.contiguous(fmt), dr = grad_in.contiguous(fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const Geometry g = geometry_of(u, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "bn_relu_backward_cpu", [&] {
    bn_relu_backward_reduce_impl<scalar_t>(dr, u, g, scale, shift, mean, invstd, sum_dz, sum_dz_xhat);
    bn_relu_backward_apply_impl<scalar_t>(dr, u, g, scale, shift, &mean, &invstd, &sum_dz, &sum_dz_xhat, du);
  });
  return {du, sum_dz, sum_dz_xhat};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_relu_apply", &bn_relu_apply_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cpu);
  m.impl("bn_relu_forward", &bn_relu_forward_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
}

}  // namespace fused_hourglass
