// Small-row matmul for XLA:CPU, called from jitted JAX through the XLA FFI.
//
//   y[T, N] = x[T, K] @ W[K, N]
//
// W arrives pre-packed (flexdraft_jax/cpu_matmul.py: `pack`) as panels of 16
// columns, w[P, K, 16] with P = ceil(N / 16), columns past N zero. One panel
// is one contiguous K x 64-byte stream, so each thread reads its share of the
// weights front to back exactly once. For each panel the rows of x are taken
// in groups of at most 6; a group's 6 x 16 outputs live in 12 AVX2 registers
// for the whole K loop, and later groups re-read the panel from L1/L2. At
// small T the pass is bound by memory bandwidth, so its cost barely grows
// with T (the point of the kernel: see docs/ARCHITECTURE.md).
//
// Weights are f32 or f16 (widened to f32 in the kernel; f32 math either way).
// AVX2 + FMA (+ F16C for f16 weights) when the CPU has them, AVX-512F where
// present for more than 6 rows (one pass per panel up to 24 rows, over a copy
// of x interleaved per row group so that one step's row values share a cache
// line), a portable scalar loop otherwise. Two threads by default: the calling XLA
// thread and a helper task on XLA's intra-op thread pool (see `Run`).
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLEXDRAFT_X86 1
#else
#define FLEXDRAFT_X86 0
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // columns per packed panel
constexpr int kMaxRows = 6;     // rows per register tile (12 accumulators)

enum class WeightType { kF32, kF16 };

struct Job {
  const float* x;   // [T, K]
  const void* w;    // [P, K, 16], f32 or f16
  float* y;         // [T, N]
  int64_t t, k, n, panels;
  WeightType wtype;
  // x interleaved for the AVX-512 path (`InterleaveRows`; null: not that path): each group
  // of rows [r0, r0 + rows) as [K, rows], so that the rows' values at one i share a line.
  const float* xi = nullptr;
};

// ----------------------------------------------------------------------------
// Configuration (set from Python through `flexdraft_matmul_configure`)
// ----------------------------------------------------------------------------
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
std::atomic<int> g_isa{kAvx2};
std::atomic<int> g_threads{2};
constexpr int64_t kMinParallelMacs = 1 << 16;  // below this, threads cost more than they give
// One row is memory-bound, and whether a second core streams it faster depends on the
// machine: on the 2-vCPU Zen 3 dev machine (2026-12-02) one thread was faster (30 SmolLM2
// layers: 14 ms against 17 ms on two); on the 2-vCPU AVX-512 EPYC of 2026-12-04 two were
// (13.6 against 11.6 ms; an AR step 21.8 against 19.0 ms, interleaved in one process).
// FLEXDRAFT_MATMUL_THREADS=1 gives one thread for every row count.
constexpr int64_t kMinParallelRows = 1;

// The best instruction set this CPU runs: AVX-512F (+ AVX2/FMA/F16C), AVX2 +
// FMA + F16C, or none.
int CpuIsa() {
#if FLEXDRAFT_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))) {
    return kScalar;
  }
  return __builtin_cpu_supports("avx512f") ? kAvx512 : kAvx2;
#else
  return kScalar;
#endif
}

// ----------------------------------------------------------------------------
// Scalar fallback
// ----------------------------------------------------------------------------
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename W>
float Widen(W v);
template <>
float Widen<float>(float v) { return v; }
template <>
float Widen<uint16_t>(uint16_t v) { return HalfToFloat(v); }

template <typename W>
void PanelsScalar(const Job& j, int64_t p0, int64_t p1) {
  const W* w = static_cast<const W*>(j.w);
  for (int64_t p = p0; p < p1; ++p) {
    const W* wp = w + p * j.k * kPanel;
    const int64_t c0 = p * kPanel, nc = std::min(kPanel, j.n - c0);
    for (int64_t r = 0; r < j.t; ++r) {
      float acc[kPanel] = {};
      const float* xr = j.x + r * j.k;
      for (int64_t i = 0; i < j.k; ++i) {
        for (int64_t c = 0; c < kPanel; ++c) acc[c] += xr[i] * Widen<W>(wp[i * kPanel + c]);
      }
      std::memcpy(j.y + r * j.n + c0, acc, nc * sizeof(float));
    }
  }
}

// ----------------------------------------------------------------------------
// AVX2 + FMA
// ----------------------------------------------------------------------------
#if FLEXDRAFT_X86
#define FLEXDRAFT_SIMD __attribute__((target("avx2,fma,f16c")))

FLEXDRAFT_SIMD inline void LoadRow(const float* wp, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(wp);
  w1 = _mm256_loadu_ps(wp + 8);
}

FLEXDRAFT_SIMD inline void LoadRow(const uint16_t* wp, __m256& w0, __m256& w1) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// y[0:R, 0:nc] = x[0:R, :] @ panel, x rows ldx apart, y rows ldy apart.
// `pf` (or null) is prefetched alongside: row i of pf with row i of the panel.
template <int R, typename W>
FLEXDRAFT_SIMD void Tile(const float* x, int64_t ldx, const W* wp, int64_t k, float* y,
                         int64_t ldy, int64_t nc, const W* pf) {
  // Fully unrolled loops over r keep the 2R accumulators in registers.
  __m256 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    if (pf != nullptr) _mm_prefetch(reinterpret_cast<const char*>(pf + i * kPanel), _MM_HINT_T0);
    __m256 w0, w1;
    LoadRow(wp + i * kPanel, w0, w1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * ldx + i);
      a0[r] = _mm256_fmadd_ps(b, w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(b, w1, a1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * ldy;
    if (nc == kPanel) {
      _mm256_storeu_ps(yr, a0[r]);
      _mm256_storeu_ps(yr + 8, a1[r]);
    } else {
      alignas(32) float tmp[kPanel];
      _mm256_store_ps(tmp, a0[r]);
      _mm256_store_ps(tmp + 8, a1[r]);
      std::memcpy(yr, tmp, nc * sizeof(float));
    }
  }
}

template <typename W>
FLEXDRAFT_SIMD void TileRows(int rows, const float* x, int64_t ldx, const W* wp, int64_t k,
                             float* y, int64_t ldy, int64_t nc, const W* pf) {
  switch (rows) {
    case 1: return Tile<1>(x, ldx, wp, k, y, ldy, nc, pf);
    case 2: return Tile<2>(x, ldx, wp, k, y, ldy, nc, pf);
    case 3: return Tile<3>(x, ldx, wp, k, y, ldy, nc, pf);
    case 4: return Tile<4>(x, ldx, wp, k, y, ldy, nc, pf);
    case 5: return Tile<5>(x, ldx, wp, k, y, ldy, nc, pf);
    default: return Tile<6>(x, ldx, wp, k, y, ldy, nc, pf);
  }
}

template <typename W>
FLEXDRAFT_SIMD void PanelsSimd(const Job& j, int64_t p0, int64_t p1) {
  const W* w = static_cast<const W*>(j.w);
  // Balanced row groups of at most kMaxRows (16 rows -> 6, 5, 5; 8 -> 4, 4).
  const int64_t groups = (j.t + kMaxRows - 1) / kMaxRows;
  const int64_t per = (j.t + groups - 1) / groups;
  for (int64_t p = p0; p < p1; ++p) {
    const W* wp = w + p * j.k * kPanel;
    const int64_t c0 = p * kPanel, nc = std::min(kPanel, j.n - c0);
    for (int64_t r0 = 0; r0 < j.t; r0 += per) {
      const int rows = static_cast<int>(std::min(per, j.t - r0));
      // The first pass streams the panel from memory (prefetching 16 rows
      // ahead); later passes read it from cache, and meanwhile fetch the next
      // panel, so that memory and the FMA units stay busy together.
      const W* pf = r0 == 0 ? wp + 16 * kPanel : p + 1 < p1 ? wp + j.k * kPanel : nullptr;
      TileRows<W>(rows, j.x + r0 * j.k, j.k, wp, j.k, j.y + r0 * j.n + c0, j.n, nc, pf);
    }
  }
}
// AVX-512F (where present): a panel row is one 16-lane register, so up to
// kMaxRows512 rows keep one accumulator each and T <= 24 takes one pass over
// each panel (no re-reads; memory and FMAs overlap). Same panels as AVX2.
#define FLEXDRAFT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // inside GCC 12's _mm512_cvtph_ps
constexpr int kMaxRows512 = 24;

FLEXDRAFT_AVX512 inline __m512 LoadRow512(const float* wp) { return _mm512_loadu_ps(wp); }

FLEXDRAFT_AVX512 inline __m512 LoadRow512(const uint16_t* wp) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)));
}

// x is one row group interleaved, [k, R] (`InterleaveRows`): the R values of step i are one
// contiguous run. (Broadcasting them from row-major x, R strided streams, held the path to
// ~75 GFLOP/s at K = 1,536 and 16 rows, where x is 96 KB and leaves L1; 2026-12-06.)
template <int R, typename W>
FLEXDRAFT_AVX512 void Tile512(const float* x, const W* wp, int64_t k, float* y, int64_t ldy,
                              int64_t nc, const W* pf) {
  __m512 a[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    if (pf != nullptr) _mm_prefetch(reinterpret_cast<const char*>(pf + i * kPanel), _MM_HINT_T0);
    const __m512 w = LoadRow512(wp + i * kPanel);
    const float* xi = x + i * R;
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(xi[r]), w, a[r]);
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << nc) - 1);
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy, mask, a[r]);
}

template <typename W>
using TileFn = void (*)(const float*, const W*, int64_t, float*, int64_t, int64_t, const W*);

template <typename W, std::size_t... I>
constexpr std::array<TileFn<W>, sizeof...(I)> Tiles512(std::index_sequence<I...>) {
  return {&Tile512<static_cast<int>(I) + 1, W>...};
}

// The row groups of the AVX-512 path: balanced, at most kMaxRows512 rows each.
inline int64_t RowsPerGroup512(int64_t t) {
  const int64_t groups = (t + kMaxRows512 - 1) / kMaxRows512;
  return (t + groups - 1) / groups;
}

// x [T, K] -> out, each row group [r0, r0 + rows) as [K, rows] at offset r0 * K.
void InterleaveRows(const float* x, int64_t t, int64_t k, float* out) {
  const int64_t per = RowsPerGroup512(t);
  for (int64_t r0 = 0; r0 < t; r0 += per) {
    const int64_t rows = std::min(per, t - r0);
    float* g = out + r0 * k;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + (r0 + r) * k;
      for (int64_t i = 0; i < k; ++i) g[i * rows + r] = xr[i];
    }
  }
}

template <typename W>
FLEXDRAFT_AVX512 void PanelsAvx512(const Job& j, int64_t p0, int64_t p1) {
  static constexpr auto kTiles = Tiles512<W>(std::make_index_sequence<kMaxRows512>());
  const W* w = static_cast<const W*>(j.w);
  const int64_t per = RowsPerGroup512(j.t);
  for (int64_t p = p0; p < p1; ++p) {
    const W* wp = w + p * j.k * kPanel;
    const int64_t c0 = p * kPanel, nc = std::min(kPanel, j.n - c0);
    for (int64_t r0 = 0; r0 < j.t; r0 += per) {
      const int64_t rows = std::min(per, j.t - r0);
      const W* pf = r0 == 0 ? wp + 16 * kPanel : p + 1 < p1 ? wp + j.k * kPanel : nullptr;
      kTiles[rows - 1](j.xi + r0 * j.k, wp, j.k, j.y + r0 * j.n + c0, j.n, nc, pf);
    }
  }
}
#pragma GCC diagnostic pop
#endif  // FLEXDRAFT_X86

void RunPanels(const Job& j, int64_t p0, int64_t p1) {
#if FLEXDRAFT_X86
  if (j.xi != nullptr) {  // the AVX-512 path, chosen by `Matmul`
    if (j.wtype == WeightType::kF32) return PanelsAvx512<float>(j, p0, p1);
    return PanelsAvx512<uint16_t>(j, p0, p1);
  }
  if (g_isa.load(std::memory_order_relaxed) >= kAvx2) {
    if (j.wtype == WeightType::kF32) return PanelsSimd<float>(j, p0, p1);
    return PanelsSimd<uint16_t>(j, p0, p1);
  }
#endif
  if (j.wtype == WeightType::kF32) return PanelsScalar<float>(j, p0, p1);
  return PanelsScalar<uint16_t>(j, p0, p1);
}

inline void CpuRelax() {
#if FLEXDRAFT_X86
  _mm_pause();
#endif
}

// ----------------------------------------------------------------------------
// Threads: chunks of panels claimed from a counter by the calling thread and
// by helper tasks on XLA's own intra-op pool. The caller waits only for chunks
// someone has claimed, so a helper that starts late (its pool thread busy) or
// never finds work costs nothing, and nothing can deadlock. (A private pool
// was tried first: its worker fought XLA's spinning pool threads for the two
// CPUs and a call took ~10x longer.)
// ----------------------------------------------------------------------------
struct Shared {
  Job job;
  int64_t chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Shared& s) {
  for (;;) {
    const int64_t c = s.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= s.chunks) return;
    // Contiguous panel ranges, so each chunk is one stream through memory.
    RunPanels(s.job, s.job.panels * c / s.chunks, s.job.panels * (c + 1) / s.chunks);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

void Run(const Job& j, ffi::ThreadPool& pool) {
  const int threads = g_threads.load(std::memory_order_relaxed);
  if (threads <= 1 || j.t < kMinParallelRows || j.t * j.k * j.n < kMinParallelMacs ||
      j.panels < 2) {
    return RunPanels(j, 0, j.panels);
  }
  auto s = std::make_shared<Shared>();
  s->job = j;
  s->chunks = std::min<int64_t>(j.panels, 4 * threads);
  for (int i = 1; i < threads; ++i) pool.Schedule([s] { Drain(*s); });
  Drain(*s);
  for (int64_t spins = 0; s->done.load(std::memory_order_acquire) < s->chunks; ++spins) {
    if (spins < 4096) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

// ----------------------------------------------------------------------------
// FFI handlers
// ----------------------------------------------------------------------------
template <ffi::DataType WD>
// w is one packed weight [P, K, 16] or a stack of them [L, P, K, 16] (the layers of a
// `lax.scan`); `layer` (a scalar, 0 for one weight) picks the stack entry, so a scan
// body reads its layer's panels in place instead of slicing out a copy.
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<WD> w,
                  ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions(), wdims = w.dimensions();
  if (xd.size() != 2 || (wdims.size() != 3 && wdims.size() != 4) || yd.size() != 2 ||
      layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "flexdraft_matmul: want x [T, K], w [P, K, 16] or [L, P, K, 16], a scalar layer, y [T, N]");
  }
  const size_t lead = wdims.size() - 3;  // the stack axis, if any
  const int64_t stack = lead ? wdims[0] : 1;
  const int64_t wd[3] = {wdims[lead], wdims[lead + 1], wdims[lead + 2]};
  const int64_t index = layer.typed_data()[0];
  if (index < 0 || index >= stack) {
    return ffi::Error::InvalidArgument("flexdraft_matmul: layer " + std::to_string(index) +
                                       " outside a stack of " + std::to_string(stack));
  }
  const int64_t t = xd[0], k = xd[1], p = wd[0], n = yd[1];
  if (wd[1] != k || wd[2] != kPanel || yd[0] != t || n > p * kPanel || n <= (p - 1) * kPanel) {
    return ffi::Error::InvalidArgument(
        "flexdraft_matmul: shapes do not match: x [" + std::to_string(t) + ", " +
        std::to_string(k) + "], w [" + std::to_string(p) + ", " + std::to_string(wd[1]) + ", " +
        std::to_string(wd[2]) + "], y [" + std::to_string(yd[0]) + ", " + std::to_string(n) + "]");
  }
  if (t == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(y->typed_data(), 0, t * n * sizeof(float));
    return ffi::Error::Success();
  }
  const size_t entry = static_cast<size_t>(p) * k * kPanel * (WD == ffi::F32 ? 4 : 2);
  const void* panels = static_cast<const char*>(w.untyped_data()) + index * entry;
  Job job{x.typed_data(), panels, y->typed_data(), t, k, n, p,
          WD == ffi::F32 ? WeightType::kF32 : WeightType::kF16};
#if FLEXDRAFT_X86
  // AVX-512 where present for more than kMaxRows rows (up to 6 rows AVX2 is one pass
  // already), over x interleaved (`job.xi` set picks the path). The buffer is this thread's
  // and outlives `Run`, which returns once every chunk is done.
  thread_local std::unique_ptr<float[]> interleaved;
  thread_local int64_t capacity = 0;
  if (g_isa.load(std::memory_order_relaxed) == kAvx512 && t > kMaxRows) {
    if (capacity < t * k) {
      interleaved.reset(new float[t * k]);
      capacity = t * k;
    }
    InterleaveRows(job.x, t, k, interleaved.get());
    job.xi = interleaved.get();
  }
#endif
  Run(job, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexdraftMatmulF32, Matmul<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlexdraftMatmulF16, Matmul<ffi::F16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" {

// The handlers' operand list (cpu_matmul.py checks it: a library built from older
// source is not used). 2: x, w, layer.
int flexdraft_matmul_abi() { return 2; }

// The best path this CPU runs: 0 scalar, 1 AVX2 + FMA + F16C, 2 AVX-512F.
int flexdraft_matmul_cpu_isa() { return CpuIsa(); }

// max_isa caps the path (0 scalar, 1 AVX2, 2 AVX-512; the CPU's best when
// higher); threads >= 1. Returns the path in use afterwards.
int flexdraft_matmul_configure(int max_isa, int threads) {
  g_isa.store(std::max(0, std::min(max_isa, CpuIsa())));
  g_threads.store(std::max(1, threads));
  return g_isa.load();
}

}  // extern "C"
