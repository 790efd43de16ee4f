#pragma once
// Launch geometry shared by the grid-stride element-wise kernels.
#include <algorithm>
#include <cstdint>

namespace fused_hourglass {

constexpr int kThreads = 256;

// Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{65535} * 8));
}

}  // namespace fused_hourglass
