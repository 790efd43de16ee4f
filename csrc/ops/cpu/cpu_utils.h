#pragma once
#include <algorithm>
#include <cstdint>

namespace fused_hourglass {

// Work items per at::parallel_for chunk so that each chunk touches about 32 K elements (ATen's own grain):
// small tensors stay on one thread, where the fork would cost more than the work.
inline int64_t grain_for(int64_t elems_per_item) {
  constexpr int64_t kGrainElems = 32768;
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems_per_item, 1));
}

}  // namespace fused_hourglass
