// What the CPU kernels found out about the machine, for `python -m fused_hourglass info` and the tests.
#include <torch/library.h>

#include "ops/cpu/cpu_utils.h"

TORCH_LIBRARY_FRAGMENT(fused_hourglass, m) {
  // The last-level cache size behind the streaming-store rule (cpu_utils.h), in bytes. Takes no tensor, so it
  // is registered as a catch-all kernel; the leading underscore keeps it out of the op listings.
  m.def("_cpu_last_level_cache_bytes() -> int", [] { return fused_hourglass::last_level_cache_bytes(); });
}
