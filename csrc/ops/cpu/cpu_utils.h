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
// cold caches, with its input gradient (24 MiB touched) streamed; its forward alone (16 MiB, exactly half: input
// and output fit the L3 together when it runs back to back) ran 1.2-1.7x slower with its output streamed, hence
// "more than half" (a rule set at that boundary: on a machine whose cache is a little smaller, that forward
// streams). At C = 256 (32-48 MiB) streaming won in every case measured; at 32 px and below (at most 12 MiB) it
// made no difference, and smaller passes can only send to DRAM an output the next layer would read from cache.
//
// FH_NONTEMPORAL_STORES=0 never streams, =1 always does (the tests use it on small tensors); unset, the rule
// above applies. The variable is read at every call, so it can be changed at run time.

// The first line of a small sysfs file without surrounding blanks; false when the file cannot be opened.
inline bool read_sysfs_text(const std::string& path, std::string& text) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return false;
  char buf[64] = {};
  const bool read = std::fgets(buf, sizeof(buf), f) != nullptr;
  std::fclose(f);
  text = read ? buf : "";
  const size_t first = text.find_first_not_of(" \t\n");
  text = first == std::string::npos ? "" : text.substr(first, text.find_last_not_of(" \t\n") - first + 1);
  return true;
}

// Parses decimal digits, optionally followed by K, M or G when `suffix` ("32768K"); 0 for anything else (and for
// more than 2^32 before the suffix).
inline int64_t parse_sysfs_number(const std::string& text, bool suffix) {
  size_t i = 0;
  int64_t value = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    value = value * 10 + (text[i] - '0');
    if (value > (int64_t(1) << 32)) return 0;
  }
  if (i == 0) return 0;
  int shift = 0;
  if (suffix && i + 1 == text.size()) {
    shift = text[i] == 'K' ? 10 : text[i] == 'M' ? 20 : text[i] == 'G' ? 30 : -1;
    if (shift < 0) return 0;
    ++i;
  }
  return i == text.size() ? value << shift : 0;
}

// The size of the highest cache level in a sysfs cache directory (/sys/devices/system/cpu/cpuN/cache): entries
// index0, index1, ... up to the first without a `level` file; the last entry of the highest level wins; entries
// whose level or size do not parse are skipped. 0 when none does. fused_hourglass/benchmarking.py reads the same
// way (tests/test_cpu_info.py runs both on the same trees).
inline int64_t sysfs_cache_bytes(const std::string& cache_dir) {
  int64_t best = 0, best_level = 0;
  for (int index = 0;; ++index) {
    const std::string dir = cache_dir + "/index" + std::to_string(index) + "/";
    std::string level_text, size_text;
    if (!read_sysfs_text(dir + "level", level_text)) break;
    if (!read_sysfs_text(dir + "size", size_text)) continue;
    const int64_t level = parse_sysfs_number(level_text, false), size = parse_sysfs_number(size_text, true);
    if (level > 0 && size > 0 && level >= best_level) {
      best = size;
      best_level = level;
    }
  }
  return best;
}

// The size of CPU 0's highest cache level: from Linux's sysfs, else sysconf, else 32 MiB. Sysfs comes first
// because glibc's sysconf derives the L3 from CPUID, which virtual machines can misreport (a 2-vCPU EPYC guest
// whose sysfs and lscpu give 32 MiB has sysconf report 320 MiB).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    const int64_t from_sysfs = sysfs_cache_bytes("/sys/devices/system/cpu/cpu0/cache");
    if (from_sysfs > 0) return from_sysfs;
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

// dst[i] = value(i) for i in [0, n), a piece at a time: with ordinary stores, or (stream) through an L1 buffer
// copied out with streaming stores; the caller fences (stream_fence) before its output is read. Both modes run the
// same loop over the same pieces, only the destination differs, so they compute bit for bit the same values (two
// separate loops may contract a·b + c into fused multiply-adds differently: a float16 input gradient differed in
// the last bit). Inlined into the target_clones loops that call it, so value's loop is vectorised for each
// clone's ISA.
#if defined(__GNUC__)
#define FH_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FH_ALWAYS_INLINE inline
#endif
template <typename scalar_t, typename Value>
FH_ALWAYS_INLINE void write_out(bool stream, scalar_t* __restrict__ dst, int64_t n, const Value& value) {
  constexpr int64_t kPiece = kStreamPieceBytes / static_cast<int64_t>(sizeof(scalar_t));
  alignas(64) scalar_t piece[kPiece];
  for (int64_t i0 = 0; i0 < n; i0 += kPiece) {
    const int64_t len = std::min(kPiece, n - i0);
    scalar_t* __restrict__ out = stream ? piece : dst + i0;
    for (int64_t j = 0; j < len; ++j) out[j] = value(i0 + j);
    if (stream) stream_copy(dst + i0, piece, static_cast<size_t>(len) * sizeof(scalar_t));
  }
}

}  // namespace fused_hourglass
