#pragma once
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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
// Non-temporal output. An element-wise pass whose inputs and output together exceed the last-level cache gains
// nothing from caching its output: the lines are evicted before anything reads them, and ordinary stores first
// read every output line (write-allocate) and push out the input lines that the next pass over the same data
// would have found. Such passes write through a small L1 buffer copied out with streaming stores.
//
// FH_NONTEMPORAL_STORES=0 never streams, =1 always does (the tests use it on small tensors); unset, a pass
// streams when it touches at least the last-level cache's size (sysconf, 32 MiB when unknown). The variable is
// read at every call, so it can be changed at run time.

inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
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
  return bytes_touched >= last_level_cache_bytes();
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

// One thread's writes to an output: straight to it, or (streaming) into an L1 buffer of `chunk` elements that
// commit() copies out with streaming stores. The destructor fences the streaming stores, so they are complete
// when the thread's share of the work is.
//
//   OutputWriter<float> w(stream, chunk);
//   for (...) { fill(w.target(dst + i), n); w.commit(dst + i, n); }  // n ≤ chunk when streaming
template <typename scalar_t>
class OutputWriter {
 public:
  // Bytes per streamed chunk: a quarter of L1.
  static constexpr int64_t kChunkBytes = 8192;

  OutputWriter(bool stream, int64_t chunk) : stream_(stream) {
    if (stream_) buf_.resize(static_cast<size_t>(chunk));
  }
  OutputWriter(const OutputWriter&) = delete;
  OutputWriter& operator=(const OutputWriter&) = delete;
  ~OutputWriter() {
#if defined(__SSE2__)
    if (stream_) _mm_sfence();
#endif
  }

  bool streaming() const { return stream_; }
  scalar_t* target(scalar_t* dst) { return stream_ ? buf_.data() : dst; }
  // Copies n elements from the buffer (from element `from` on) to dst when streaming; nothing otherwise.
  void commit(scalar_t* dst, int64_t n, int64_t from = 0) {
    if (stream_) stream_copy(dst, buf_.data() + from, static_cast<size_t>(n) * sizeof(scalar_t));
  }

 private:
  bool stream_;
  std::vector<scalar_t> buf_;
};

// Elements of one streamed chunk, and whole channels_last rows of c elements per chunk (at least one).
template <typename scalar_t>
constexpr int64_t stream_chunk() {
  return OutputWriter<scalar_t>::kChunkBytes / static_cast<int64_t>(sizeof(scalar_t));
}
template <typename scalar_t>
inline int64_t stream_chunk_rows(int64_t c) {
  return std::max<int64_t>(1, stream_chunk<scalar_t>() / std::max<int64_t>(c, 1));
}

}  // namespace fused_hourglass
