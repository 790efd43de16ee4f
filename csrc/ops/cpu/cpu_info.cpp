// Machine helpers of the CPU kernels, for `python -m fused_hourglass info`, the tests and the benchmarks.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ops/cpu/cpu_utils.h"

namespace {

// The last-level cache size behind the streaming-store rule (cpu_utils.h), in bytes; with a directory, what
// sysfs_cache_bytes reads there (0 when nothing), so that the tests can run the C++ reader on made-up trees.
int64_t cpu_last_level_cache_bytes(const std::optional<std::string>& sysfs_dir) {
  return sysfs_dir.has_value() ? fused_hourglass::sysfs_cache_bytes(*sysfs_dir)
                               : fused_hourglass::last_level_cache_bytes();
}

// Writes back and evicts from every cache level each line of t's storage (SSE2 clflush), so that the next
// access to t comes from DRAM while everything else (code, interpreter state) stays where it is. For the
// benchmarks' "dram" rows.
void cpu_flush_cache_lines(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "_cpu_flush_cache_lines: t must be a CPU tensor, got one on ", t.device());
  if (!t.has_storage() || t.storage().nbytes() == 0) return;
#if defined(__SSE2__)
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data()) & ~uintptr_t(63);
  const auto end = reinterpret_cast<uintptr_t>(t.storage().data()) + t.storage().nbytes();
  for (uintptr_t p = begin; p < end; p += 64) _mm_clflush(reinterpret_cast<const void*>(p));
  _mm_mfence();
#else
  TORCH_CHECK_NOT_IMPLEMENTED(false, "_cpu_flush_cache_lines: needs an x86-64 CPU (clflush)");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  // The leading underscores keep these helpers out of the op listings. _cpu_last_level_cache_bytes takes no
  // tensor, so it is a catch-all kernel.
  m.def("_cpu_last_level_cache_bytes(str? sysfs_dir=None) -> int", &cpu_last_level_cache_bytes);
  m.def("_cpu_flush_cache_lines(Tensor t) -> ()");
}

// Every backend, so that a tensor elsewhere gets the error above rather than a missing-kernel one.
TORCH_LIBRARY_IMPL(fused_hourglass, CompositeExplicitAutograd, m) {
  m.impl("_cpu_flush_cache_lines", &cpu_flush_cache_lines);
}
