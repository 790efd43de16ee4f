// What the CPU kernels found out about the machine, for `python -m fused_hourglass info` and the tests.
#include <torch/library.h>

#include <optional>
#include <string>

#include "ops/cpu/cpu_utils.h"

namespace {

// The last-level cache size behind the streaming-store rule (cpu_utils.h), in bytes; with a directory, what
// sysfs_cache_bytes reads there (0 when nothing), so that the tests can run the C++ reader on made-up trees.
int64_t cpu_last_level_cache_bytes(const std::optional<std::string>& sysfs_dir) {
  return sysfs_dir.has_value() ? fused_hourglass::sysfs_cache_bytes(*sysfs_dir)
                               : fused_hourglass::last_level_cache_bytes();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  // Takes no tensor, so it is registered as a catch-all kernel; the leading underscore keeps it out of the op
  // listings.
  m.def("_cpu_last_level_cache_bytes(str? sysfs_dir=None) -> int", &cpu_last_level_cache_bytes);
}
