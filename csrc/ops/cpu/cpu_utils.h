#pragma once
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Hot loops are plain restrict-qualified loops: GCC vectorises them at -O3 for the baseline ISA, and
// target_clones adds an x86-64-v3 copy (AVX2 and FMA) picked at load time, so the build stays portable. The
// CPU sources are compiled with -ffp-contract=fast, so in that copy a·b + c is one fused multiply-add, as in
// the CUDA kernels (nvcc contracts by default); the results are deterministic for a given machine.
//
// FH_CPU_CLONES_WIDE adds an x86-64-v4 copy (AVX-512) as well, for the BN-ReLU loops: on a 2-core AMD EPYC
// (Zen 4) it ran the channels_last statistics and gradient sums 1.2–1.6× faster and nothing slower. The
// max-pool loops keep FH_CPU_CLONES: their stride-2 NCHW taps vectorised for AVX-512 ran 3–10× slower at 16 px.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FH_CPU_CLONES_WIDE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FH_CPU_CLONES
#define FH_CPU_CLONES_WIDE
#endif

namespace fused_hourglass {

// Work items per at::parallel_for chunk so that each chunk touches about 32 K elements (ATen's own grain):
// small tensors stay on one thread, where the fork would cost more than the work.
inline int64_t grain_for(int64_t elems_per_item) {
  constexpr int64_t kGrainElems = 32768;
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems_per_item, 1));
}

// ---------------------------------------------------------------------------------------------------------
// Non-temporal output. An element-wise pass whose inputs and output fill much of the last-level cache gains
// little from caching its output: most of its lines are evicted before anything reads them, and ordinary stores
// first read every output line (write-allocate), a read that competes with the pass's own inputs for memory
// bandwidth. Such passes compute their output into a small piece of L1 and copy each piece out with streaming
// stores right away (write_out), so that the streaming stores and the loads of the next piece overlap.
//
// Piece size, measured on a 2-core AMD EPYC (Zen 4) from DRAM, 16 MiB per stream, against ordinary stores:
// one input and one output 0.73-0.77x the time with 256-byte pieces, 0.83-0.89x with 1 KiB, 0.85-1.29x with
// 8 KiB; two inputs and one output (the backward apply) 0.66-0.69x, 0.73-1.04x and 1.19-1.27x. Streaming stores
// of 16, 32 or 64 bytes made no difference at 256 bytes, so the copy uses SSE2's (x86-64's baseline).
//
// When: a pass streams when it touches more than half the last-level cache. Measured on that machine (32 MiB
// L3) at N = 4, 64 px: a BN-ReLU training step at C = 128 ran 9-10% faster back to back, and 0-8% faster from
// cold caches, with its input gradient (25 MiB touched) streamed; the forward alone (16 MiB: input and output
// fit the L3 together when it runs back to back) ran 1.2-1.7x slower with its output streamed, so half the
// cache stays cached. At C = 256 (32-50 MiB) streaming won in every case measured; at 32 px and below it made
// no difference, or can only send to DRAM an output that the next layer would read from cache.
//
// FH_NONTEMPORAL_STORES=0 never streams, =1 always does (the tests use it on small tensors); unset, the rule
// above applies. The variable is read at every call, so it can be changed at run time.

// Parses a sysfs cache size ("32768K", "1M", "512"); 0 when unreadable.
inline int64_t parse_cache_size(const char* text) {
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || value <= 0) return 0;
  switch (*end) {
    case 'K': return static_cast<int64_t>(value) << 10;
    case 'M': return static_cast<int64_t>(value) << 20;
    case 'G': return static_cast<int64_t>(value) << 30;
    default: return static_cast<int64_t>(value);
  }
}

// The size of the highest cache level of CPU 0: from Linux's sysfs, else sysconf, else 32 MiB. Sysfs comes
// first because glibc's sysconf derives the L3 from CPUID, which virtual machines can misreport (a 2-vCPU
// EPYC guest whose sysfs and lscpu give 32 MiB has sysconf report 320 MiB).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    int best_level = 0;
    for (int index = 0; index < 16; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      int level = 0;
      char text[32] = {};
      if (std::FILE* f = std::fopen((dir + "level").c_str(), "r")) {
        if (std::fscanf(f, "%d", &level) != 1) level = 0;
        std::fclose(f);
      }
      if (std::FILE* f = std::fopen((dir + "size").c_str(), "r")) {
        if (std::fgets(text, sizeof(text), f) == nullptr) text[0] = '\0';
        std::fclose(f);
      }
      const int64_t size = parse_cache_size(text);
      if (level > 0 && size > 0 && level >= best_level) {
        best = size;
        best_level = level;
      }
    }
    if (best > 0) return best;
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? static_cast<int64_t>(l3) : int64_t(32) << 20;
  }();
  return bytes;
}

inline bool stream_output(int64_t bytes_touched) {
  const char* mode = std::getenv("FH_NONTEMPORAL_STORES");
  if (mode != nullptr && mode[0] == '0') return false;
  if (mode != nullptr && mode[0] == '1') return true;
  return 2 * bytes_touched > last_level_cache_bytes();
}

// Copies n bytes to dst, the 16-byte-aligned middle with streaming stores (SSE2, part of x86-64's baseline),
// the ragged ends with ordinary ones. Elsewhere an ordinary copy.
inline void stream_copy(void* dst, const void* src, size_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(__SSE2__)
  const size_t head = std::min(n, static_cast<size_t>((16 - reinterpret_cast<uintptr_t>(d) % 16) % 16));
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  for (; n >= 64; n -= 64, d += 64, s += 64) {
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
    const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
    const __m128i v3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), v0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), v1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), v2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), v3);
  }
  for (; n >= 16; n -= 16, d += 16, s += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
#endif
  std::memcpy(d, s, n);
}

// Orders a thread's streaming stores before whatever follows (they are weakly ordered): each thread calls it
// once its share of a streamed pass is written.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Bytes per streamed piece (see above).
constexpr int64_t kStreamPieceBytes = 256;

// dst[i] = value(i) for i in [0, n): with ordinary stores, or (stream) a piece at a time through an L1 buffer
// copied out with streaming stores; the caller fences (stream_fence) before its output is read. Inlined into
// the target_clones loops that call it, so value's loop is vectorised for each clone's ISA.
#if defined(__GNUC__)
#define FH_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FH_ALWAYS_INLINE inline
#endif
template <typename scalar_t, typename Value>
FH_ALWAYS_INLINE void write_out(bool stream, scalar_t* __restrict__ dst, int64_t n, const Value& value) {
  if (!stream) {
    for (int64_t i = 0; i < n; ++i) dst[i] = value(i);
    return;
  }
  constexpr int64_t kPiece = kStreamPieceBytes / static_cast<int64_t>(sizeof(scalar_t));
  alignas(64) scalar_t piece[kPiece];
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
    const int64_t len = std::min(kPiece, n - i0);
    for (int64_t j = 0; j < len; ++j) piece[j] = value(i0 + j);
    stream_copy(dst + i0, piece, static_cast<size_t>(len) * sizeof(scalar_t));
  }
}

}  // namespace fused_hourglass
