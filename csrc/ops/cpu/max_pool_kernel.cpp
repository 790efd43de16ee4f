// CPU kernels of max_pool2x2 and its argmax-recomputing backward, both layouts native.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"
#include "ops/max_pool.h"

namespace fused_hourglass {
namespace {

// Both layouts are walked by output rows: output row t (of the N·C·H/2 NCHW rows, or of the N·H/2
// channels_last rows of pixels) reads input rows 2t and 2t + 1, which never straddle planes or images since H
// is even. So a run of output rows maps to a contiguous run of input rows, with no index division per row.
//
// NCHW: window j of a row pair has its taps at 2j and 2j + 1 of the two input rows; GCC vectorises that
// stride-2 access with grouped loads (two vector loads and even/odd shuffles per row) and, in the backward,
// grouped stores (unpacks) for the four taps of dx. Channels_last: the taps of one output pixel are C apart
// and contiguous across channels, so the loop over channels vectorises with plain loads and stores.

template <typename scalar_t>
FH_CPU_CLONES void pool_rows_nchw(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t rows,
                                  int64_t pw) {
  const int64_t in_w = 2 * pw;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* top = in + 2 * r * in_w;
    const scalar_t* bottom = top + in_w;
    scalar_t* o = out + r * pw;
    for (int64_t j = 0; j < pw; ++j) o[j] = max4(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
  }
}

// Every element of dx is written once: the window's gradient at its argmax, zero at the other three taps.
template <typename scalar_t>
FH_CPU_CLONES void unpool_rows_nchw(const scalar_t* __restrict__ in, const scalar_t* __restrict__ grad,
                                    scalar_t* __restrict__ dx_out, int64_t rows, int64_t pw) {
  const int64_t in_w = 2 * pw;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* top = in + 2 * r * in_w;
    const scalar_t* bottom = top + in_w;
    const scalar_t* g = grad + r * pw;
    scalar_t* d_top = dx_out + 2 * r * in_w;
    scalar_t* d_bottom = d_top + in_w;
    for (int64_t j = 0; j < pw; ++j) {
      scalar_t d0, d1, d2, d3;
      route_grad4(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1], g[j], d0, d1, d2, d3);
      d_top[2 * j] = d0;
      d_top[2 * j + 1] = d1;
      d_bottom[2 * j] = d2;
      d_bottom[2 * j + 1] = d3;
    }
  }
}

// Channels_last forward over output rows [0, rows): the first and the second half of the rows side by side, in one
// channel loop, so the input is read as four sequential streams (two row pairs) rather than two. From DRAM at
// C = 256, 64 px, one row pair at a time took 1.2-1.3x the time of the NCHW pool over the same bytes and two
// side by side 12-17% less; four side by side were slower again (their eight taps of a channel can share one L1
// set). The same for the backward measured no gain, so it keeps one row at a time.
template <typename scalar_t>
FH_CPU_CLONES void pool_rows_nhwc(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t rows,
                                  int64_t pw, int64_t c) {
  const int64_t dy = 2 * pw * c;  // one input row of pixels
  const int64_t half = rows / 2, in_half = 2 * half * dy, out_half = half * pw * c;
  for (int64_t r = 0; r < half; ++r) {
    for (int64_t x = 0; x < pw; ++x) {
      const scalar_t* __restrict__ t = in + 2 * r * dy + 2 * x * c;
      scalar_t* __restrict__ o = out + (r * pw + x) * c;
      for (int64_t ch = 0; ch < c; ++ch) {
        o[ch] = max4(t[ch], t[ch + c], t[dy + ch], t[dy + ch + c]);
        o[out_half + ch] = max4(t[in_half + ch], t[in_half + ch + c], t[in_half + dy + ch], t[in_half + dy + ch + c]);
      }
    }
  }
  if (rows % 2 == 1) {
    for (int64_t x = 0; x < pw; ++x) {
      const scalar_t* __restrict__ t = in + 2 * (rows - 1) * dy + 2 * x * c;
      scalar_t* __restrict__ o = out + ((rows - 1) * pw + x) * c;
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = max4(t[ch], t[ch + c], t[dy + ch], t[dy + ch + c]);
    }
  }
}

// Output pixels [0, npix) of one output row: their windows' taps are at top/bottom + 2x·c and + (2x + 1)·c, and
// their input-gradient taps at the same offsets from d_top/d_bottom (the two input rows of dx, or, when dx is
// streamed, the two halves of a buffer).
template <typename scalar_t>
FH_CPU_CLONES void unpool_pixels_nhwc(const scalar_t* __restrict__ top, const scalar_t* __restrict__ bottom,
                                      const scalar_t* __restrict__ grad, scalar_t* __restrict__ d_top,
                                      scalar_t* __restrict__ d_bottom, int64_t npix, int64_t c) {
  for (int64_t x = 0; x < npix; ++x) {
    const scalar_t* t = top + 2 * x * c;
    const scalar_t* b = bottom + 2 * x * c;
    const scalar_t* g = grad + x * c;
    scalar_t* dt = d_top + 2 * x * c;
    scalar_t* db = d_bottom + 2 * x * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      scalar_t d0, d1, d2, d3;
      route_grad4(t[ch], t[ch + c], b[ch], b[ch + c], g[ch], d0, d1, d2, d3);
      dt[ch] = d0;
      dt[ch + c] = d1;
      db[ch] = d2;
      db[ch + c] = d3;
    }
  }
}

// Calls rows(first_output_row, row_count) over the output rows, in parallel; `row_elems` is the number of
// input elements behind one output row (two input rows).
template <typename Rows>
void for_each_row_run(int64_t out_rows, int64_t row_elems, const Rows& rows) {
  at::parallel_for(0, out_rows, grain_for(row_elems),
                   [&](int64_t begin, int64_t end) { rows(begin, end - begin); });
}

at::Tensor max_pool2x2_cpu(const at::Tensor& x_in) {
  check_max_pool2x2(x_in, "max_pool2x2");
  const auto fmt = output_memory_format(x_in);
  const int64_t n = x_in.size(0), c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor out = at::empty({n, c, in_h / 2, in_w / 2}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t pw = in_w / 2;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      for_each_row_run(n * in_h / 2, 2 * in_w * c, [&](int64_t r, int64_t rows) {
        pool_rows_nhwc(in + 2 * r * in_w * c, o + r * pw * c, rows, pw, c);
      });
    } else {
      for_each_row_run(n * c * in_h / 2, 2 * in_w, [&](int64_t r, int64_t rows) {
        pool_rows_nchw(in + 2 * r * in_w, o + r * pw, rows, pw);
      });
    }
  });
  return out;
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_max_pool2x2_backward(grad_in, x_in);
  const auto fmt = output_memory_format(x_in);
  const int64_t n = x_in.size(0), c = x_in.size(1), in_h = x_in.size(2), in_w = x_in.size(3);
  at::Tensor dx_out = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  if (dx_out.numel() == 0) return dx_out;
  const at::Tensor x = x_in.contiguous(fmt), grad = grad_in.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* d = dx_out.mutable_data_ptr<scalar_t>();
    const int64_t pw = in_w / 2;
    const bool stream = stream_output(x.nbytes() * 9 / 4);
    if (fmt == at::MemoryFormat::ChannelsLast) {
      // Output row r (of N·H/2) reads input rows 2r and 2r + 1, dy = W·C elements apart. Streamed, each chunk of
      // a row's pixels puts its top taps in the first half of the buffer and its bottom taps in the second.
      const int64_t dy = in_w * c;
      const int64_t chunk_pix = stream ? std::max<int64_t>(1, stream_chunk<scalar_t>() / (4 * c)) : pw;
      at::parallel_for(0, n * in_h / 2, grain_for(2 * dy), [&](int64_t begin, int64_t end) {
        OutputWriter<scalar_t> w(stream, 4 * chunk_pix * c);
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t x0 = 0; x0 < pw; x0 += chunk_pix) {
            const int64_t npix = std::min(chunk_pix, pw - x0), half = 2 * npix * c, top = 2 * r * dy + 2 * x0 * c;
            scalar_t* d_top = w.target(d + top);
            scalar_t* d_bottom = w.streaming() ? d_top + half : d + top + dy;
            unpool_pixels_nhwc(in + top, in + top + dy, g + (r * pw + x0) * c, d_top, d_bottom, npix, c);
            w.commit(d + top, half);
            w.commit(d + top + dy, half, half);
          }
        }
      });
    } else {
      // Output row r (of N·C·H/2) reads the 2·W input elements from 2r·W on; chunks of whole output rows.
      const int64_t row_elems = 2 * in_w, rows = n * c * in_h / 2;
      const int64_t chunk_rows = stream ? std::max<int64_t>(1, stream_chunk<scalar_t>() / row_elems) : rows;
      at::parallel_for(0, rows, grain_for(row_elems), [&](int64_t begin, int64_t end) {
        OutputWriter<scalar_t> w(stream, chunk_rows * row_elems);
        for (int64_t r = begin; r < end; r += chunk_rows) {
          const int64_t count = std::min(chunk_rows, end - r);
          unpool_rows_nchw(in + r * row_elems, g + r * pw, w.target(d + r * row_elems), count, pw);
          w.commit(d + r * row_elems, count * row_elems);
        }
      });
    }
  });
  return dx_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_hourglass, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace fused_hourglass
