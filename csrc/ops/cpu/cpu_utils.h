#pragma once
#include <algorithm>
#include <cstdint>

// Hot loops are plain restrict-qualified loops: GCC vectorises them at -O3 for the baseline ISA, and
// target_clones adds an x86-64-v3 copy (AVX2 and FMA) picked at load time, so the build stays portable. The
// CPU sources are compiled with -ffp-contract=fast, so in that copy a·b + c is one fused multiply-add, as in
// the CUDA kernels (nvcc contracts by default); the results are deterministic for a given machine.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FH_CPU_CLONES
#endif

namespace fused_hourglass {

// Work items per at::parallel_for chunk so that each chunk touches about 32 K elements (ATen's own grain):
// small tensors stay on one thread, where the fork would cost more than the work.
inline int64_t grain_for(int64_t elems_per_item) {
  constexpr int64_t kGrainElems = 32768;
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems_per_item, 1));
}

}  // namespace fused_hourglass
