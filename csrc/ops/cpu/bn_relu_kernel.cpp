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

// Rows per channels_last statistics run: rows_sums adds eight rows per step into one lane per channel, so each
// lane sums kRunRows values in 32 steps (a lane of the NCHW runs takes kRun = 64), and the per-channel Chan
// merge is paid once per 256 values.
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

// Channels_last reductions (statistics and gradient sums) add kSegments rows per pass, one from each of
// kSegments equal segments of the rows they sum, so each input is read as kSegments sequential streams and
// a channel's sums are loaded and stored once per kSegments rows. Adjacent rows per pass (four: one 4 KiB page
// at C = 256) read each page in four interleaved pieces, a pattern the hardware prefetchers follow badly: from
// DRAM those reductions took 1.4-1.6x the time of the NCHW ones over the same bytes; with eight segments they
// take about the same.
constexpr int64_t kSegments = 8;

// The sum of kSegments values as a balanced tree (three dependent additions instead of seven).
static_assert(kSegments == 8, "tree8 adds one value per segment");
template <typename acc_t>
inline acc_t tree8(acc_t a0, acc_t a1, acc_t a2, acc_t a3, acc_t a4, acc_t a5, acc_t a6, acc_t a7) {
  return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
}

// Per-channel Σx, Σx² (and with kNonfinite the non-finite sum) of channels_last rows [q0, q1), x = value −
// pivot, a lane per channel, kSegments rows per pass; the rows left over by the segments are added one by one.
template <bool kNonfinite, typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void rows_sums(const scalar_t* __restrict__ u, int64_t c, int64_t q0, int64_t q1,
                                  const acc_t* __restrict__ pivot, acc_t* __restrict__ s1, acc_t* __restrict__ s2,
                                  acc_t* __restrict__ nonfinite) {
  for (int64_t ch = 0; ch < c; ++ch) s1[ch] = s2[ch] = nonfinite[ch] = acc_t(0);
  const int64_t seg = (q1 - q0) / kSegments, stride = seg * c;
  for (int64_t r = q0; r < q0 + seg; ++r) {
    const scalar_t* __restrict__ row = u + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      acc_t x[kSegments];
#pragma GCC unroll 8
      for (int64_t k = 0; k < kSegments; ++k) x[k] = static_cast<acc_t>(row[k * stride + ch]) - pivot[ch];
      s1[ch] += tree8(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]);
      s2[ch] += tree8(x[0] * x[0], x[1] * x[1], x[2] * x[2], x[3] * x[3], x[4] * x[4], x[5] * x[5], x[6] * x[6],
                      x[7] * x[7]);
      if constexpr (kNonfinite) {
        nonfinite[ch] += tree8(welford_nonfinite(x[0]), welford_nonfinite(x[1]), welford_nonfinite(x[2]),
                               welford_nonfinite(x[3]), welford_nonfinite(x[4]), welford_nonfinite(x[5]),
                               welford_nonfinite(x[6]), welford_nonfinite(x[7]));
      }
    }
  }
  for (int64_t r = q0 + kSegments * seg; r < q1; ++r) {
    const scalar_t* __restrict__ row = u + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t x = static_cast<acc_t>(row[ch]) - pivot[ch];
      s1[ch] += x;
      s2[ch] += x * x;
      if constexpr (kNonfinite) nonfinite[ch] += welford_nonfinite(x);
    }
  }
}

// Welford states of channels that have all seen the same number of values, kept as arrays (one entry per
// channel) with one count: each merge's weights are then scalars and the merge vectorises over the channels.
template <typename acc_t>
struct WelfordRows {
  acc_t* mean;
  acc_t* m2;
  acc_t* nonfinite;
  int64_t count;
};

// a ← welford_merge(a, b) for channels [0, c), b's arrays given with its count: welford_merge's formulas, which
// the AVX2 and AVX-512 copies may contract into fused multiply-adds (so the last bit can differ from the scalar
// merge; the result depends on the machine's ISA, never on the thread count).
template <typename acc_t>
FH_CPU_CLONES_WIDE void welford_merge_rows(WelfordRows<acc_t>& a, const acc_t* __restrict__ b_mean,
                                           const acc_t* __restrict__ b_m2, const acc_t* __restrict__ b_nonfinite,
                                           int64_t b_count, int64_t c) {
  if (b_count == 0) return;
  acc_t* __restrict__ mean = a.mean;
  acc_t* __restrict__ m2 = a.m2;
  acc_t* __restrict__ nonfinite = a.nonfinite;
  if (a.count == 0) {
    for (int64_t ch = 0; ch < c; ++ch) {
      mean[ch] = b_mean[ch];
      m2[ch] = b_m2[ch];
      nonfinite[ch] = b_nonfinite[ch];
    }
  } else {
    const acc_t nb_over_n = static_cast<acc_t>(b_count) / static_cast<acc_t>(a.count + b_count);
    const acc_t na = static_cast<acc_t>(a.count);
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t delta = b_mean[ch] - mean[ch];
      mean[ch] = mean[ch] + delta * nb_over_n;
      m2[ch] = m2[ch] + b_m2[ch] + delta * delta * na * nb_over_n;
      nonfinite[ch] = nonfinite[ch] + b_nonfinite[ch];
    }
  }
  a.count += b_count;
}

// s1, s2 ← the mean and m2 of welford_from_sums(s1, s2, ·, count), for channels [0, c) (its formulas, as above).
template <typename acc_t>
FH_CPU_CLONES_WIDE void welford_from_sums_rows(acc_t* __restrict__ s1, acc_t* __restrict__ s2, int64_t count,
                                               int64_t c) {
  const acc_t n = static_cast<acc_t>(count);
  for (int64_t ch = 0; ch < c; ++ch) {
    const acc_t mean = s1[ch] / n;
    const acc_t m2 = s2[ch] - s1[ch] * mean;
    s1[ch] = mean;
    s2[ch] = m2 < acc_t(0) ? acc_t(0) : m2;  // as welford_from_sums: NaN stays NaN
  }
}

// One channels_last partial: the Welford states of rows [r0, r1) of the [M, C] matrix, in runs of kRunRows rows,
// each run's sums folded in by channel arrays. A run with a non-finite sum in any channel is summed again with
// the non-finite sums.
template <typename scalar_t, typename acc_t>
void welford_rows(const scalar_t* __restrict__ u, int64_t c, int64_t r0, int64_t r1, const acc_t* __restrict__ pivot,
                  WelfordRows<acc_t>& out) {
  std::vector<acc_t> buf(3 * c);
  acc_t* s1 = buf.data();
  acc_t* s2 = s1 + c;
  acc_t* nonfinite = s2 + c;
  out.count = 0;
  for (int64_t q0 = r0; q0 < r1; q0 += kRunRows) {
    const int64_t q1 = std::min(r1, q0 + kRunRows);
    rows_sums<false>(u, c, q0, q1, pivot, s1, s2, nonfinite);
    bool finite = true;
    for (int64_t ch = 0; ch < c; ++ch) finite &= finite_sums(s1[ch], s2[ch]);
    if (!finite) rows_sums<true>(u, c, q0, q1, pivot, s1, s2, nonfinite);
    welford_from_sums_rows(s1, s2, q1 - q0, c);
    welford_merge_rows(out, s1, s2, nonfinite, q1 - q0, c);
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
  const int64_t rows = rows_per_block(g.c);
  // The Welford states of every channel over each channels_last row block p, as three [parts, C] arrays in one
  // buffer (means, then m2, then non-finite sums) and a count per block; merged per channel in block order.
  std::vector<acc_t> part(3 * parts * g.c);
  std::vector<int64_t> part_count(parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      WelfordRows<acc_t> st{part.data() + p * g.c, part.data() + (parts + p) * g.c,
                            part.data() + (2 * parts + p) * g.c, 0};
      welford_rows(data, g.c, p * rows, std::min(g.m, (p + 1) * rows), pivot.data(), st);
      part_count[p] = st.count;
    }
  });
  at::parallel_for(0, g.c, grain_for(parts), [&](int64_t begin, int64_t end) {
    const int64_t len = end - begin;
    std::vector<acc_t> acc(3 * len);
    WelfordRows<acc_t> s{acc.data(), acc.data() + len, acc.data() + 2 * len, 0};
    for (int64_t p = 0; p < parts; ++p) {
      welford_merge_rows(s, part.data() + p * g.c + begin, part.data() + (parts + p) * g.c + begin,
                         part.data() + (2 * parts + p) * g.c + begin, part_count[p], len);
    }
    for (int64_t i = 0; i < len; ++i) {
      const int64_t ch = begin + i;
      welford_finalize(WelfordState<acc_t>{s.mean[i], s.m2[i], s.nonfinite[i], s.count}, pivot[ch],
                       static_cast<acc_t>(eps), mean_p[ch], var_p[ch], invstd_p[ch]);
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

// Element-wise loops of apply and backward apply over channels_last rows (per-channel vectors) or one NCHW
// plane (per-plane scalars), compiled for the baseline ISA, AVX2 and AVX-512 (FH_CPU_CLONES_WIDE); `stream`
// writes the output with streaming stores (write_out).
template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void apply_rows(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                   const acc_t* __restrict__ sc, const acc_t* __restrict__ sh, int64_t c,
                                   int64_t rows, bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ x = src + r * c;
    write_out(stream, dst + r * c, c, [&](int64_t ch) {
      return static_cast<scalar_t>(relu_keep_nan(bn_affine(static_cast<acc_t>(x[ch]), sc[ch], sh[ch])));
    });
  }
}

template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void apply_plane(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, acc_t s, acc_t b,
                                    int64_t len, bool stream) {
  write_out(stream, dst, len, [&](int64_t i) {
    return static_cast<scalar_t>(relu_keep_nan(bn_affine(static_cast<acc_t>(src[i]), s, b)));
  });
}

// Channels_last rows [0, rows) of the input gradient, one row per pass. (Two rows per pass, loading the five
// per-channel vectors once per two rows, ran out of registers and measured 1.5× slower.)
template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void grad_rows(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ src,
                                  scalar_t* __restrict__ dst, const acc_t* __restrict__ sc,
                                  const acc_t* __restrict__ sh, const acc_t* __restrict__ mu,
                                  const acc_t* __restrict__ ca, const acc_t* __restrict__ cb, bool training, int64_t c,
                                  int64_t rows, bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ g = gr + r * c;
    const scalar_t* __restrict__ x = src + r * c;
    if (training) {
      write_out(stream, dst + r * c, c, [&](int64_t ch) {
        return static_cast<scalar_t>(bn_relu_grad_train(static_cast<acc_t>(g[ch]), static_cast<acc_t>(x[ch]), sc[ch],
                                                        sh[ch], mu[ch], ca[ch], cb[ch]));
      });
    } else {
      write_out(stream, dst + r * c, c, [&](int64_t ch) {
        return static_cast<scalar_t>(
            bn_relu_grad_eval(static_cast<acc_t>(g[ch]), static_cast<acc_t>(x[ch]), sc[ch], sh[ch]));
      });
    }
  }
}

template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void grad_plane(const scalar_t* __restrict__ gr, const scalar_t* __restrict__ src,
                                   scalar_t* __restrict__ dst, acc_t s, acc_t b, acc_t m, acc_t ka, acc_t kb,
                                   bool training, int64_t len, bool stream) {
  if (training) {
    write_out(stream, dst, len, [&](int64_t i) {
      return static_cast<scalar_t>(
          bn_relu_grad_train(static_cast<acc_t>(gr[i]), static_cast<acc_t>(src[i]), s, b, m, ka, kb));
    });
  } else {
    write_out(stream, dst, len, [&](int64_t i) {
      return static_cast<scalar_t>(bn_relu_grad_eval(static_cast<acc_t>(gr[i]), static_cast<acc_t>(src[i]), s, b));
    });
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
    at::parallel_for(0, g.m, grain_for(g.c), [&](int64_t begin, int64_t end) {
      apply_rows(in + begin * g.c, o + begin * g.c, sc, sh, g.c, end - begin, stream);
      if (stream) stream_fence();
    });
  } else {
    at::parallel_for(0, g.n * g.c, grain_for(g.hw), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        apply_plane(in + plane * g.hw, o + plane * g.hw, sc[plane % g.c], sh[plane % g.c], g.hw, stream);
      }
      if (stream) stream_fence();
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

// Per-channel sums of channels_last rows [r0, r1), kSegments rows per pass as rows_sums.
template <typename scalar_t, typename acc_t>
FH_CPU_CLONES_WIDE void grad_sums_rows(const scalar_t* __restrict__ dr, const scalar_t* __restrict__ u, int64_t c,
                                       int64_t r0, int64_t r1, const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                       GradSums<acc_t>* out) {
  std::vector<acc_t> dz_buf(c, acc_t(0)), dzx_buf(c, acc_t(0));
  acc_t* __restrict__ s_dz = dz_buf.data();
  acc_t* __restrict__ s_dzx = dzx_buf.data();
  const int64_t seg = (r1 - r0) / kSegments, stride = seg * c;
  for (int64_t r = r0; r < r0 + seg; ++r) {
    const scalar_t* __restrict__ gr = dr + r * c;
    const scalar_t* __restrict__ row = u + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t sc = scale[ch], sh = shift[ch], mu = mean[ch];
      acc_t x[kSegments], d[kSegments];
#pragma GCC unroll 8
      for (int64_t k = 0; k < kSegments; ++k) {
        x[k] = static_cast<acc_t>(row[k * stride + ch]);
        d[k] = relu_grad(static_cast<acc_t>(gr[k * stride + ch]), bn_affine(x[k], sc, sh));
      }
      s_dz[ch] += tree8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
      s_dzx[ch] += tree8(d[0] * (x[0] - mu), d[1] * (x[1] - mu), d[2] * (x[2] - mu), d[3] * (x[3] - mu),
                         d[4] * (x[4] - mu), d[5] * (x[5] - mu), d[6] * (x[6] - mu), d[7] * (x[7] - mu));
    }
  }
  for (int64_t r = r0 + kSegments * seg; r < r1; ++r) {
    const scalar_t* __restrict__ gr = dr + r * c;
    const scalar_t* __restrict__ row = u + r * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t x = static_cast<acc_t>(row[ch]);
      const acc_t dz = relu_grad(static_cast<acc_t>(gr[ch]), bn_affine(x, scale[ch], shift[ch]));
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
    at::parallel_for(0, g.m, grain_for(2 * g.c), [&](int64_t begin, int64_t end) {
      const int64_t off = begin * g.c;
      grad_rows(dr_p + off, u_p + off, du_p + off, sc, sh, mu, ca, cb, training, g.c, end - begin, stream);
      if (stream) stream_fence();
    });
  } else {
    at::parallel_for(0, g.n * g.c, grain_for(2 * g.hw), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t ch = plane % g.c, off = plane * g.hw;
        grad_plane(dr_p + off, u_p + off, du_p + off, sc[ch], sh[ch], mu[ch], ca[ch], cb[ch], training, g.hw, stream);
      }
      if (stream) stream_fence();
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
