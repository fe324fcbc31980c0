// Fused CPU kernels of 3D nearby attention: nuwa_kernels::na3d_fwd / na3d_bwd for the CPU key.
//
// Semantics: docs/nearby_attention.md; tensor conventions: docs/DESIGN.md; window maths: window.h.
//
// Two families of kernels. The lane kernels (lane_kernels.h: queries in vector lanes, keys at flat shifts,
// register-blocked small GEMMs over transposed rings of keys/values) run every problem whose key grid has
// the query grid's H and W and whose head dims are whole vectors (NUWA_CPU_LANES=0 turns them off); the
// row kernels below run the rest (cross grids of other H/W, odd head dims). Row kernels:
//
// Layout of the work:
// * Every query visits only the keys of its window (never a masked key). The (t, h) window of a query
//   row is shared by the whole row, so a block of neighbouring queries of one row walks the key rows
//   (kt, kh) of that window together; on each key row query w sees a contiguous w-segment of keys (its
//   w window, cut at flat(key) <= flat(query) under raster causality; key rows past the query are
//   empty; the walk stops at the first row past the block's last query). The union of the block's
//   segments is packed once (that head's slice, converted to the accumulation type) and reused by the
//   ~k queries that share each key; the forward reads the rows in place instead when the inputs are
//   already unit-stride in the accumulation type (float32, float64).
// * Forward: two passes over the key rows: scores of each query's whole window (then one softmax per
//   query, vectorised exp), then out = P V. Accumulation in float32 (float32/float16/bfloat16 inputs)
//   or float64 (float64 inputs).
// * Backward, deterministic, no atomics: dQ per query over its window (one pass: s, dP, dS, dQ per key
//   row); dK/dV per key over its inverse neighbourhood (window.h's inverse_window_on_axis per axis, then
//   the raster cut), summing the query heads of its group. P = exp(scale * q.k - lse),
//   dS = P * (dP - delta).
// * Inner loops are explicit vectors of one 512-bit register (GCC/Clang vector extension): dot products
//   four at a time with a shared lane reduction, axpys over four lane blocks at once. Inputs are read
//   with their strides only when packing; the unit-stride fast path (template flag kUnit) and the
//   strided path are the same code.
// * Parallel over (batch, head, t, h) rows of queries (forward, dQ) or (batch, kv head, kt, kh) rows of
//   keys (dK/dV), in contiguous chunks taken from a shared counter (see parallel_tasks).
// * Extra memory: per-axis window tables and per-thread scratch bounded by kScoreBudget plus a few rows
//   of W * D elements; no N x window buffers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifndef _WIN32
#include <pthread.h>
#endif

#include "block_pool.h"
#include "kernel_isa.h"
#include "pair_store.h"
#include "window_args.h"

// 64-byte vector types in internal functions: the ABI note GCC prints without AVX-512 does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace nuwa {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Scalar helpers
// ------------------------------------------------------------------------------------------------

template <typename S>
using acc_t = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

// Bytes of one vector register of the build: 64 (AVX-512), else 32 (AVX2: 64-byte vector types would be
// split into halves that GCC moves through the stack).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

// Lanes of one vector register: the block width of every inner loop over D.
template <typename A>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(A));

template <typename A, typename S>
inline A to_acc(S x) {
  return static_cast<A>(x);
}

// exp for softmax arguments (x <= ~0), vectorisable: Cephes' expf polynomial (about 1 ulp), rounding
// by the 1.5 * 2^23 trick (floorf blocks GCC's vectoriser), 0 below the float range. float64 uses
// std::exp.
// The shared core, for a float or a vector of floats (lane_kernels.h's exp_vec): n = round(xc / ln 2)
// and the polynomial of the reduced argument, so exp(xc) = poly * 2^n.
template <typename T>
__attribute__((always_inline)) inline T exp_poly(T xc, T& n) {
  n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // nearest integer
  T r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const T r2 = r * r;
  T y = T{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r2 + r + 1.0f;
}

__attribute__((always_inline)) inline float exp_acc(float x) {
  constexpr float kLo = -87.33654475f;
  constexpr float kHi = 88.0f;
  const float xc = std::min(std::max(x, kLo), kHi);
  float n;
  const float y = exp_poly(xc, n);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(float));
  return x < kLo ? 0.0f : y * pow2n;
}
__attribute__((always_inline)) inline double exp_acc(double x) { return std::exp(x); }

// One 512-bit register of lanes of the accumulation type (GCC/Clang vector extension; the compiler
// lowers it to one zmm with AVX-512, two ymm with AVX2, and so on).
template <typename A>
struct VecOf {
  typedef A type __attribute__((vector_size(kVecBytes)));
};
template <typename A>
using Vec = typename VecOf<A>::type;

// L lanes starting at p, element stride ds (ignored when kUnit), converted to the accumulation type.
template <bool kUnit, typename A, typename S>
inline Vec<A> vload(const S* __restrict p, int64_t ds) {
  constexpr int L = kLanes<A>;
  Vec<A> r;
  if constexpr (kUnit && std::is_same<S, A>::value) {
    std::memcpy(&r, p, sizeof(r));
  } else if constexpr (kUnit && std::is_same<S, c10::BFloat16>::value) {  // A is float
    typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));
    typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    const U32 bits = __builtin_convertvector(h, U32) << 16;
    std::memcpy(&r, &bits, sizeof(r));
#if defined(__F16C__) && defined(__AVX__)
  } else if constexpr (kUnit && std::is_same<S, c10::Half>::value) {
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&r, &lo, 32);
    if constexpr (L == 16) {
      const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
      std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
    }
#endif
  } else {
    for (int l = 0; l < L; ++l) r[l] = to_acc<A>(p[kUnit ? l : l * ds]);
  }
  return r;
}

// p[0, L) = the L lanes of v converted to S, each rounded as static_cast<S> rounds it (bfloat16: to
// nearest even, every NaN 0x7FC0, c10::BFloat16's rule; float16: F16C's nearest even). Vectorised: the
// half types' outputs were stored lane by lane, which made the bfloat16 and float16 calls twice as slow
// as float32 ones for half their bytes (NÜWA (1,3,3) forward, 10x21x21, 8 heads: 2.94 against 1.37 ms).
// kStream (AVX-512 builds, half types, p 32-byte aligned): a non-temporal store of the 32 bytes.
template <typename S, typename A, bool kStream = false>
__attribute__((always_inline)) inline void vstore(S* __restrict p, const Vec<A>& v) {
  constexpr int L = kLanes<A>;
  [[maybe_unused]] const auto put16 = [p](const auto& h) __attribute__((always_inline)) {  // L lanes of 2 bytes
#if defined(__AVX512F__)
    if constexpr (kStream && sizeof(h) == 32) {
      __m256i x;
      std::memcpy(&x, &h, 32);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
      return;
    }
#endif
    std::memcpy(p, &h, sizeof(h));
  };
  if constexpr (std::is_same<S, A>::value) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same<S, c10::BFloat16>::value && std::is_same<A, float>::value) {
    typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));
    typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
    U32 u;
    std::memcpy(&u, &v, sizeof(u));
    const U32 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    const U32 bits = v != v ? U32{} + 0x7FC0u : rounded;
    put16(__builtin_convertvector(bits, U16));
#if defined(__F16C__) && defined(__AVX__)
  } else if constexpr (std::is_same<S, c10::Half>::value && std::is_same<A, float>::value) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256 lo;
    std::memcpy(&lo, &v, 32);
    if constexpr (L == 16) {
      __m256 hi;
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
      put16(_mm256_set_m128i(_mm256_cvtps_ph(hi, kRound), _mm256_cvtps_ph(lo, kRound)));
    } else {
      put16(_mm256_cvtps_ph(lo, kRound));
    }
#endif
  } else {
    for (int l = 0; l < L; ++l) p[l] = static_cast<S>(v[l]);
  }
}

// Sum of the lanes in a fixed order (deterministic).
template <typename A>
inline A hsum(const Vec<A>& v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) return _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(v));
  if constexpr (std::is_same<A, double>::value) return _mm512_reduce_add_pd(reinterpret_cast<const __m512d&>(v));
#endif
  A s = v[0];
  for (int l = 1; l < kLanes<A>; ++l) s += v[l];
  return s;
}

// The lane sums of four vectors at once: out[m] = hsum(v[m]) (float, AVX-512: a transposing reduction,
// three shuffle levels for four sums instead of four full reductions).
template <typename A>
inline void hsum4(const Vec<A>& v0, const Vec<A>& v1, const Vec<A>& v2, const Vec<A>& v3, A* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) {
    const __m512 a = reinterpret_cast<const __m512&>(v0), b = reinterpret_cast<const __m512&>(v1);
    const __m512 c = reinterpret_cast<const __m512&>(v2), d = reinterpret_cast<const __m512&>(v3);
    // per 128-bit block: (a0+a2, b0+b2, a1+a3, b1+b3)
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // per 128-bit block: (a, b, c, d) partial sums
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 lo = _mm512_castps512_ps256(abcd);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)));
    return;
  }
#endif
  out[0] = hsum<A>(v0);
  out[1] = hsum<A>(v1);
  out[2] = hsum<A>(v2);
  out[3] = hsum<A>(v3);
}

// M (1 to 4) dot products out[m] = a . x_m (a, x_m: contiguous, length D), each lane block of `a` loaded
// once for all M and the lane reductions shared (hsum4; unused slots alias x_0 and are dropped).
template <int M, typename A>
__attribute__((always_inline)) inline void dot_block(A* __restrict out, const A* __restrict a, const A* __restrict x0,
                                                     const A* __restrict x1, const A* __restrict x2,
                                                     const A* __restrict x3, int64_t D) {
  constexpr int L = kLanes<A>;
  const int64_t Dm = D - D % L;
  Vec<A> p0 = {}, p1 = {}, p2 = {}, p3 = {};
  for (int64_t d = 0; d < Dm; d += L) {
    const Vec<A> ad = vload<true, A>(a + d, 1);
    p0 += ad * vload<true, A>(x0 + d, 1);
    if constexpr (M > 1) p1 += ad * vload<true, A>(x1 + d, 1);
    if constexpr (M > 2) p2 += ad * vload<true, A>(x2 + d, 1);
    if constexpr (M > 3) p3 += ad * vload<true, A>(x3 + d, 1);
  }
  A r[4];
  hsum4<A>(p0, p1, p2, p3, r);
  for (int64_t d = Dm; d < D; ++d) {
    r[0] += a[d] * x0[d];
    if constexpr (M > 1) r[1] += a[d] * x1[d];
    if constexpr (M > 2) r[2] += a[d] * x2[d];
    if constexpr (M > 3) r[3] += a[d] * x3[d];
  }
  for (int m = 0; m < M; ++m) out[m] = r[m];
}

// out[j] = a . X[j] for the n rows X[j] = X + j * xs (contiguous, xs = D unless given; a: length D). Keys are
// taken four at a time (the tail: one to three, without work on absent rows): each lane block of `a`
// is loaded once for the group, and the lane reductions share one transposing reduction (hsum4).
template <typename A>
inline void dot_rows(A* __restrict out, const A* __restrict a, const A* __restrict X, int64_t n, int64_t D,
                     int64_t xs = -1) {
  if (xs < 0) xs = D;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const A* x = X + j * xs;
    dot_block<4, A>(out + j, a, x, x + xs, x + 2 * xs, x + 3 * xs, D);
  }
  const A* x = X + j * xs;
  switch (n - j) {
    case 3: dot_block<3, A>(out + j, a, x, x + xs, x + 2 * xs, x, D); break;
    case 2: dot_block<2, A>(out + j, a, x, x + xs, x, x, D); break;
    case 1: dot_block<1, A>(out + j, a, x, x, x, x, D); break;
    default: break;
  }
}

// acc[d] += sum_j c[j] * X[j * xs + d] for d < D (X: n rows of length D, xs = D unless given). Four lane blocks
// of D are accumulated side by side so that the FMA chains over j run in parallel.
template <typename A>
inline void axpy_rows(A* __restrict acc, const A* __restrict c, const A* __restrict X, int64_t n, int64_t D,
                      int64_t xs = -1) {
  constexpr int L = kLanes<A>;
  if (xs < 0) xs = D;
  int64_t d = 0;
  for (; d + 4 * L <= D; d += 4 * L) {
    Vec<A> a0 = vload<true, A>(acc + d, 1), a1 = vload<true, A>(acc + d + L, 1);
    Vec<A> a2 = vload<true, A>(acc + d + 2 * L, 1), a3 = vload<true, A>(acc + d + 3 * L, 1);
    for (int64_t j = 0; j < n; ++j) {
      const A cj = c[j];
      const A* x = X + j * xs + d;
      a0 += cj * vload<true, A>(x, 1);
      a1 += cj * vload<true, A>(x + L, 1);
      a2 += cj * vload<true, A>(x + 2 * L, 1);
      a3 += cj * vload<true, A>(x + 3 * L, 1);
    }
    std::memcpy(acc + d, &a0, sizeof(a0));
    std::memcpy(acc + d + L, &a1, sizeof(a1));
    std::memcpy(acc + d + 2 * L, &a2, sizeof(a2));
    std::memcpy(acc + d + 3 * L, &a3, sizeof(a3));
  }
  for (; d + L <= D; d += L) {
    Vec<A> a0 = vload<true, A>(acc + d, 1), a1 = {};
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      a0 += c[j] * vload<true, A>(X + j * xs + d, 1);
      a1 += c[j + 1] * vload<true, A>(X + (j + 1) * xs + d, 1);
    }
    if (j < n) a0 += c[j] * vload<true, A>(X + j * xs + d, 1);
    a0 += a1;
    std::memcpy(acc + d, &a0, sizeof(a0));
  }
  for (; d < D; ++d) {
    A a = acc[d];
    for (int64_t j = 0; j < n; ++j) a += c[j] * X[j * xs + d];
    acc[d] = a;
  }
}

// Packs n tokens of one head, src[j * xs + d * ds], into rows dst[j * ys + d] of the accumulation type
// (ys >= D; elements [D, ys) of each row zero: rows padded to whole vectors). Inputs keep their strides
// (no copy of whole tensors): only the rows a block of work needs are packed, which also keeps the
// kernels clear of the cache-set conflicts of power-of-two token strides and converts half types once per
// row instead of once per use.
template <bool kUnit, typename A, typename S>
inline void pack_rows(A* __restrict dst, const S* __restrict src, int64_t n, int64_t xs, int64_t ds, int64_t D,
                      int64_t ys) {
  constexpr int L = kLanes<A>;
  const int64_t Dm = D - D % L;
  for (int64_t j = 0; j < n; ++j) {
    const S* x = src + j * xs;
    A* y = dst + j * ys;
    for (int64_t d = 0; d < Dm; d += L) {
      const Vec<A> v = vload<kUnit, A>(x + (kUnit ? d : d * ds), ds);
      std::memcpy(y + d, &v, sizeof(v));
    }
#if defined(__AVX512F__)
    if constexpr (kUnit && std::is_same<S, float>::value && std::is_same<A, float>::value) {
      if (Dm < D && ys == Dm + L) {  // the tail and its zeros: one masked load
        _mm512_storeu_ps(y + Dm, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (D - Dm)) - 1), x + Dm));
        continue;
      }
    }
#endif
    for (int64_t d = Dm; d < D; ++d) y[d] = to_acc<A>(x[kUnit ? d : d * ds]);
    for (int64_t d = D; d < ys; ++d) y[d] = A(0);
  }
}

// Software prefetch of the cache line at p, into L2 (prefetcht1): the kernels prefetch whole blocks of
// rows, which in L1 would evict the block's working set. Inline assembly, not __builtin_prefetch: GCC 12
// deletes a loop nest whose only statements are __builtin_prefetch calls (the CPU kernels ran with no
// prefetch at all until this was found; NÜWA (3,3,3) forward 4.1 -> 3.4 ms on the AMD EPYC).
inline void prefetch_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Calls whose query, key and value hold at most this many bytes together count as cache-resident: their
// inputs stay in the caches between calls (or arrive there from the layer that wrote them). For them the
// kernels issue no software prefetch (prefetch_wanted) and parallel_tasks keeps each thread on the same
// tasks every call (its ranges per thread). Measured on the 2-core EPYC, float32, 8 heads, D = 64, two
// threads, in-process alternation, medians of forward + backward ops (before -> after).
// Prefetches off: (1,3,3) on 1x21x21 (NÜWA's image grid, 2.7 MB) 353 -> 341 us and 407 -> 370, 1x24x24
// (3.5 MB) 479 -> 443, 2x16x16 (3.1 MB) 429 -> 434, (3,3,3) there 833 -> 802; past the bound, 1x28x28
// (4.8 MB) 779 -> 785, and they pay: 2x21x21 (5.4 MB) 964 -> 1035 without them, 1x32x32 (6.3 MB) 1945 ->
// 2144. Owner first: 1x21x21 337 -> 314 and 343 -> 312, 2x16x16 456 -> 431; past the bound, 2x21x21 1064
// -> 1095, 1x32x32 1438 -> 1409, NÜWA's video grid (27 MB) within the noise either way (public training
// step 4.81 -> 5.11, 4.61 -> 4.69, 4.20 -> 4.25 ms): no input survives there in a core's L2 from one call
// to the next.
constexpr int64_t kCachedInputBytes = int64_t(4) << 20;

// Whether a call issues software prefetches: NUWA_CPU_PREFETCH=1 always, 0 never, unset (or anything
// else) unless its inputs are cache-resident (kCachedInputBytes). Read at every call.
inline bool prefetch_wanted(bool in_cache) {
  const char* e = std::getenv("NUWA_CPU_PREFETCH");
  if (e && (e[0] == '0' || e[0] == '1') && e[1] == '\0') return e[0] == '1';
  return !in_cache;
}

// Prefetches n tokens of one head (stride xs, D elements of stride ds) ahead of their pack_rows, so
// that the next row's loads overlap the current row's arithmetic.
template <typename S>
inline void prefetch_rows(const S* src, int64_t n, int64_t xs, int64_t ds, int64_t D) {
  const int64_t span = static_cast<int64_t>(sizeof(S)) * ((D - 1) * ds + 1);
  if (span > 4096) return;
  // Line by line across the rows (one constant stride per pass, which the hardware's stride prefetcher
  // follows further), not row by row: NÜWA 10x21x21, 8 heads, one thread, alternating runs: (1,3,3)
  // forward 2.85 -> 2.57 ms, (3,3,3) 5.03 -> 4.75, (7,7,7) 40.3 -> 38.4; backward with probabilities
  // (1,3,3) 5.34 -> 4.92, (3,3,3) 10.3 -> 9.3.
  for (int64_t o = 0; o < span; o += 64)
    for (int64_t j = 0; j < n; ++j) prefetch_l2(reinterpret_cast<const char*>(src + j * xs) + o);
}

// The row after (kt, kh) in a walk over the rows [wt] x [wh] (key rows of a window, or query rows of
// an inverse window), if any.
inline bool next_key_row(const Interval& wt, const Interval& wh, int64_t kt, int64_t kh, int64_t* nkt, int64_t* nkh) {
  if (kh < wh.hi) {
    *nkt = kt;
    *nkh = kh + 1;
    return true;
  }
  *nkt = kt + 1;
  *nkh = wh.lo;
  return kt < wt.hi;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// s[0, n) *= scale; s[n, round_up(n, L)) = -inf; returns max(s[0, n)).
template <typename A>
inline A scale_pad_max(A* __restrict s, int64_t n, A scale) {
  constexpr int L = kLanes<A>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t np = round_up(n, L);
  for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  for (int64_t j = n; j < np; ++j) s[j] = kNegInf;
  Vec<A> mx = Vec<A>{} + kNegInf;
  for (int64_t j = 0; j < np; j += L) {
    const Vec<A> x = vload<true, A>(s + j, 1);
    mx = x > mx ? x : mx;
  }
  A m = kNegInf;
  for (int l = 0; l < L; ++l) m = std::max(m, mx[l]);
  return m;
}

// Sum of s[0, n) with n a multiple of L (fixed order).
template <typename A>
inline A vsum(const A* __restrict s, int64_t n) {
  constexpr int L = kLanes<A>;
  Vec<A> acc = {};
  for (int64_t j = 0; j < n; j += L) acc += vload<true, A>(s + j, 1);
  return hsum<A>(acc);
}

// p[j] = exp(scale * s[j] - lse[j]); ds[j] = p[j] * (dp[j] - delta[j]) for j < n (in place: s becomes
// p, dp becomes ds). Vectorised.
template <typename A>
inline void probs_and_dscores(A* __restrict s, A* __restrict dp, const A* __restrict lse, const A* __restrict delta,
                              int64_t n, A scale) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_acc(scale * s[j] - lse[j]);
  for (int64_t j = 0; j < n; ++j) dp[j] = s[j] * (dp[j] - delta[j]);
}

// ------------------------------------------------------------------------------------------------
// Problem description shared by the three kernels
// ------------------------------------------------------------------------------------------------

struct Strides {
  int64_t s[6];
};

inline Strides strides_of(const at::Tensor& t) {
  Strides r{};
  for (int i = 0; i < t.dim() && i < 6; ++i) r.s[i] = t.stride(i);
  return r;
}

// Elements of score scratch per thread that set the size of query (or key) blocks along w.
constexpr int64_t kScoreBudget = int64_t(1) << 15;

struct Problem {
  WindowParams p{};
  int64_t B = 0, heads = 0, heads_kv = 0, group = 1, D = 0, Dv = 0;
  double scale = 1.0;
  // Per-axis tables from window.h: the key window of every query coordinate and the query interval
  // (inverse window) of every key coordinate.
  std::vector<Interval> win[3];
  std::vector<Interval> inv[3];
  int64_t win_max = 1;    // bound on the keys of one query: product of the widest window per axis
  int64_t win_w_max = 1;  // widest window on the w axis
  int64_t inv_w_max = 1;  // widest inverse window on the w axis
  bool in_cache = false;  // inputs of at most kCachedInputBytes
  bool prefetch = true;   // software prefetches on (prefetch_wanted)
  bool poison_scratch = false;  // NUWA_CPU_SCRATCH_POISON=1: the threads' scratch filled with NaN (Scratch)
};

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  at::IntArrayRef kernel_size, const c10::List<bool>& causal_axes) {
  TORCH_CHECK(query.dim() == 6, "na3d: query must be (B, T, H, W, heads, D), got ", query.dim(), " dims");
  TORCH_CHECK(key.dim() == 6, "na3d: key must be (B, Tk, Hk, Wk, heads_kv, D), got ", key.dim(), " dims");
  TORCH_CHECK(value.dim() == 6, "na3d: value must be (B, Tk, Hk, Wk, heads_kv, Dv), got ", value.dim(), " dims");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == value.scalar_type(),
              "na3d: query, key and value must have the same dtype, got ", query.scalar_type(), ", ",
              key.scalar_type(), ", ", value.scalar_type());
  TORCH_CHECK(query.device() == key.device() && query.device() == value.device(),
              "na3d: query, key and value must be on the same device");
  TORCH_CHECK(query.size(0) == key.size(0) && query.size(0) == value.size(0),
              "na3d: batch sizes of query, key and value differ");
  for (int i = 1; i < 5; ++i)
    TORCH_CHECK(key.size(i) == value.size(i), "na3d: key and value shapes differ in dim ", i, ": ", key.sizes(),
                " vs ", value.sizes());
  TORCH_CHECK(query.size(5) == key.size(5), "na3d: query and key head_dim differ: ", query.size(5), " vs ",
              key.size(5));
  TORCH_CHECK(key.size(4) > 0 ? query.size(4) % key.size(4) == 0 : query.size(4) == 0,
              "na3d: heads (", query.size(4), ") must be a multiple of heads_kv (", key.size(4), ")");
  TORCH_CHECK(kernel_size.size() == 3, "na3d: kernel_size must have 3 entries, got ", kernel_size.size());
  for (int i = 0; i < 3; ++i) TORCH_CHECK(kernel_size[i] >= 1, "na3d: kernel_size[", i, "] must be >= 1");
  TORCH_CHECK(causal_axes.size() == 3, "na3d: causal_axes must have 3 entries, got ", causal_axes.size());
}

Problem make_problem(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     at::IntArrayRef kernel_size, const c10::List<bool>& causal_axes, bool raster, bool shift,
                     at::IntArrayRef stride, at::IntArrayRef slab, double scale) {
  Problem pr;
  pr.p = nuwa::window_params(query, key, kernel_size, causal_axes, raster, shift, stride, slab);
  pr.B = query.size(0);
  pr.heads = query.size(4);
  pr.heads_kv = key.size(4);
  pr.group = pr.heads_kv > 0 ? pr.heads / pr.heads_kv : 1;
  pr.D = query.size(5);
  pr.Dv = value.size(5);
  pr.scale = scale;
  pr.in_cache = int64_t(query.numel()) * query.element_size() + int64_t(key.numel()) * key.element_size() +
                    int64_t(value.numel()) * value.element_size() <= kCachedInputBytes;
  pr.prefetch = prefetch_wanted(pr.in_cache);
  const char* poison = std::getenv("NUWA_CPU_SCRATCH_POISON");
  pr.poison_scratch = poison && poison[0] == '1';
  pr.win_max = 1;
  for (int a = 0; a < 3; ++a) {
    int64_t widest = 1;
    pr.win[a].resize(pr.p.q_len[a]);
    for (int64_t i = 0; i < pr.p.q_len[a]; ++i) {
      pr.win[a][i] = window_on_axis(pr.p, a, i);
      widest = std::max(widest, pr.win[a][i].hi - pr.win[a][i].lo + 1);
    }
    pr.win_max *= widest;
    if (a == 2) pr.win_w_max = widest;
    pr.inv[a].resize(pr.p.k_len[a]);
    for (int64_t j = 0; j < pr.p.k_len[a]; ++j) {
      pr.inv[a][j] = inverse_window_on_axis(pr.p, a, j);
      if (a == 2) pr.inv_w_max = std::max(pr.inv_w_max, pr.inv[a][j].hi - pr.inv[a][j].lo + 1);
    }
  }
  return pr;
}

inline bool unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

// Allocator of cache-line (64-byte) aligned storage: whole-register loads and stores of the scratch
// buffers then never straddle two cache lines.
template <typename T>
struct CacheAligned {
  typedef T value_type;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(pool_alloc(n * sizeof(T))); }  // block_pool.h
  void deallocate(T* p, std::size_t) { pool_free(p); }
  // resize() default-initialises: elements of arithmetic types are left as they are (not zeroed)
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};

// Per-thread scratch: `a` in the accumulation type (64-byte aligned), `idx` for segment bounds and offsets.
// `a` is not initialised (prepare): every kernel writes the scratch it reads, rings' rows outside the grid
// included; zeroing it cost each parallel region a memset of up to a megabyte ((3,3,3) on NÜWA's grid:
// 0.5 MB of rings per thread). With `poison` (Problem::poison_scratch, NUWA_CPU_SCRATCH_POISON=1, read at
// every call) it is filled with NaN instead, for the tests that check that nothing reads it unwritten.
template <typename A>
struct Scratch {
  std::vector<A, CacheAligned<A>> a;
  std::vector<int64_t> idx;

  void prepare(int64_t na, int64_t nidx, bool poison) {
    a.resize(na);
    if (poison) std::fill(a.begin(), a.end(), std::numeric_limits<A>::quiet_NaN());
    idx.assign(nidx, 0);
  }
};

// Runs body(scratch, task) for task in [0, n) on at::get_num_threads() threads. The tasks are cut into
// about 32 contiguous chunks per thread, consecutive tasks of a chunk being grid neighbours that share most
// of their key rows (cache reuse), which the threads take from counters until none is left: a thread
// slowed down (by causal windows with less work elsewhere, or by a busy machine) simply takes fewer chunks.
// The counters: one shared by all threads, or, for cache-resident problems (Problem::in_cache), one range
// of chunks per thread that its thread takes first, the same every call (it then runs the tasks, heads,
// whose rows the previous call left in its core's L2), then the others'. Deterministic all the same: every
// output element is written by exactly one task, whose arithmetic does not depend on the thread that runs
// it. `work` (about the multiply-adds of the call) keeps small calls on the calling thread, where starting
// a thread team would cost more. The threads' scratch: Scratch::prepare.
template <typename A, typename Body>
void parallel_tasks(const Problem& pr, int64_t n, double work, int64_t scratch_a, int64_t scratch_idx,
                    const Body& body) {
  if (n <= 0) return;
  constexpr double kMinWorkPerThread = double(1 << 17);
  const int64_t by_work = static_cast<int64_t>(std::min(work / kMinWorkPerThread, 1e9));
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n, by_work}));
  const int64_t chunk = std::max<int64_t>(1, (n + 32 * nt - 1) / (32 * nt));
  const int64_t nchunks = (n + chunk - 1) / chunk;
  struct alignas(64) Range {  // a counter per cache line: the threads' counters share no line
    std::atomic<int64_t> next;
    int64_t end;
  };
  // one range of every chunk, or (cache-resident) nt equal ranges, range t thread t's
  const int64_t nr = pr.in_cache ? nt : 1;
  std::unique_ptr<Range[]> ranges(new Range[nr]);
  for (int64_t r = 0; r < nr; ++r) {
    ranges[r].next.store(nchunks * r / nr, std::memory_order_relaxed);
    ranges[r].end = nchunks * (r + 1) / nr;
  }
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    Scratch<A> sc;
    sc.prepare(scratch_a, scratch_idx, pr.poison_scratch);
    for (int64_t i = 0; i < nr; ++i) {  // its own range first (thread `begin` owns range `begin`)
      Range& r = ranges[(begin + i) % nr];
      for (int64_t c = r.next.fetch_add(1); c < r.end; c = r.next.fetch_add(1))
        for (int64_t task = c * chunk; task < std::min(n, (c + 1) * chunk); ++task) body(sc, task);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Query-row kernels (forward, dQ). One task = one query row (b, head, t, h); its queries are taken in
// blocks of `nb` consecutive w. The block walks the key rows (kt, kh) of the row's (t, h) window once;
// on key row (kt, kh), query w sees the contiguous key segment of its w window (cut by raster
// causality). The union of the block's segments is packed once per key row and shared by the block.
// ------------------------------------------------------------------------------------------------

// A row task of a (B, heads, T, H) grid of rows: task = ((b * heads + head) * T + t) * H + h.
struct RowTask {
  int64_t b, head, t, h;
};

inline RowTask row_task(int64_t task, int64_t heads, int64_t T, int64_t H) {
  RowTask r;
  r.h = task % H;
  r.t = (task / H) % T;
  r.head = (task / (H * T)) % heads;
  r.b = task / (H * T * heads);
  return r;
}

struct QueryRow {
  int64_t b, head, t, h, g;
};

inline QueryRow query_row(const Problem& pr, int64_t task) {
  const RowTask x = row_task(task, pr.heads, pr.p.q_len[0], pr.p.q_len[1]);
  return QueryRow{x.b, x.head, x.t, x.h, x.head / pr.group};
}

// Key segments [lo[i], lo[i] + n[i]) of queries w0 + i (i < nb) on a key row whose first key has flat
// index flat_row_k: the w window, cut by raster causality flat(key) <= flat(query) when `raster`.
// Returns the union [*ulo, *uhi] (empty: uhi < ulo).
inline void query_segments(const Problem& pr, bool raster, int64_t flat_row_q, int64_t w0, int64_t nb,
                           int64_t flat_row_k, int64_t* lo, int64_t* n, int64_t* ulo, int64_t* uhi) {
  *ulo = std::numeric_limits<int64_t>::max();
  *uhi = -1;
  for (int64_t i = 0; i < nb; ++i) {
    const Interval ww = pr.win[2][w0 + i];
    int64_t hi = ww.hi;
    if (raster) hi = std::min(hi, flat_row_q + w0 + i - flat_row_k);
    lo[i] = ww.lo;
    n[i] = std::max<int64_t>(hi - ww.lo + 1, 0);
    if (n[i] > 0) {
      *ulo = std::min(*ulo, ww.lo);
      *uhi = std::max(*uhi, hi);
    }
  }
}

// The key segments of a block of queries on every key row of its window. They are the same on every
// key row unless raster causality cuts that row (only rows reaching past the first query of the
// block), so the uncut segments are computed once per block.
struct BlockSegments {
  const Problem& pr;
  int64_t flat_row_q, w0, nb;
  int64_t *base_lo, *base_n, *cut_lo, *cut_n;  // [nb] each
  int64_t base_ulo = 0, base_uhi = -1;

  BlockSegments(const Problem& pr_, int64_t flat_row_q_, int64_t w0_, int64_t nb_, int64_t* scratch)
      : pr(pr_), flat_row_q(flat_row_q_), w0(w0_), nb(nb_), base_lo(scratch), base_n(scratch + nb_),
        cut_lo(scratch + 2 * nb_), cut_n(scratch + 3 * nb_) {
    query_segments(pr, false, flat_row_q, w0, nb, 0, base_lo, base_n, &base_ulo, &base_uhi);
  }

  // Whether raster causality empties key row (kt, kh) and every later row of the raster walk for the
  // whole block: its first candidate key (column base_ulo) is past the block's last query.
  bool past(int64_t kt, int64_t kh) const {
    const int64_t flat_row_k = key_row_flat(pr.p, kt, kh);
    return pr.p.raster && flat_row_k + base_ulo > flat_row_q + w0 + nb - 1;
  }

  // Segments on key row (kt, kh): sets *lo, *n (arrays of nb) and the union [*ulo, *uhi].
  void row(int64_t kt, int64_t kh, const int64_t** lo, const int64_t** n, int64_t* ulo, int64_t* uhi) {
    const int64_t flat_row_k = key_row_flat(pr.p, kt, kh);
    if (!pr.p.raster || flat_row_k + base_uhi <= flat_row_q + w0) {
      *lo = base_lo;
      *n = base_n;
      *ulo = base_ulo;
      *uhi = base_uhi;
      return;
    }
    query_segments(pr, true, flat_row_q, w0, nb, flat_row_k, cut_lo, cut_n, ulo, uhi);
    *lo = cut_lo;
    *n = cut_n;
  }
};

// ------------------------------------------------------------------------------------------------
// Shared steps of the kernels: gather (pack) rows of one head, walk the key rows of a block, block
// maths on packed segments, store
// ------------------------------------------------------------------------------------------------

// One head of a (B, T, H, W, heads, X) tensor at one batch index: token (t, h, w) starts at
// at(t, h, w) = base + t * s[1] + h * s[2] + w * s[3], its X elements s[5] apart (64-bit offsets).
template <typename T>
struct HeadRows {
  const T* base;
  Strides st;
  int64_t X;
  int64_t Xp;  // packed rows' length: X, or X padded with zeros to whole vectors (lane_run_ok's head dims)

  const T* at(int64_t t, int64_t h, int64_t w) const { return base + t * st.s[1] + h * st.s[2] + w * st.s[3]; }
  // Packs the n tokens (t, h, w), (t, h, w + 1), ... into rows of Xp elements of dst (pack_rows).
  template <bool kUnit, typename A>
  void gather(A* dst, int64_t t, int64_t h, int64_t w, int64_t n) const {
    pack_rows<kUnit>(dst, at(t, h, w), n, st.s[3], st.s[5], X, Xp);
  }
  void prefetch(int64_t t, int64_t h, int64_t w, int64_t n) const { prefetch_rows(at(t, h, w), n, st.s[3], st.s[5], X); }
  // dst[j] = element 0 of token (t, h, w + j) for j < n (lse / delta rows).
  void gather_scalars(T* dst, int64_t t, int64_t h, int64_t w, int64_t n) const {
    const T* p = at(t, h, w);
    for (int64_t j = 0; j < n; ++j) dst[j] = p[j * st.s[3]];
  }
};

template <typename T>
inline HeadRows<T> head_rows(const T* p, const Strides& st, int64_t b, int64_t head, int64_t X,
                             int64_t Xp = 0) {
  return HeadRows<T>{p + b * st.s[0] + head * st.s[4], st, X, Xp ? Xp : X};
}

// Stores the nb rows of X elements of src into a contiguous (..., heads, X) output at tokens tok0 + i
// (flat token index), head `head`: out = S(src * factor(i)).
template <typename S, typename A, typename F>
inline void store_rows(S* out, int64_t tok0, int64_t heads, int64_t head, const A* src, int64_t nb, int64_t X,
                       const F& factor) {
  constexpr int L = kLanes<A>;
  const int64_t Xm = X - X % L;
  for (int64_t i = 0; i < nb; ++i) {
    S* op = out + ((tok0 + i) * heads + head) * X;
    const A* s = src + i * X;
    const A f = factor(i);
    for (int64_t d = 0; d < Xm; d += L) vstore<S, A>(op + d, vload<true, A>(s + d, 1) * f);
    for (int64_t d = Xm; d < X; ++d) op[d] = static_cast<S>(s[d] * f);
  }
}

// One key row (kt, kh) of a block's walk: the segment of each query i of the block is the keys
// [lo[i], lo[i] + n[i]), their union [ulo, ulo + nk) (nk > 0); (next_kt, next_kh) is the next row of the
// walk when has_next.
struct KeyRowSegs {
  int64_t kt, kh, next_kt, next_kh;
  bool has_next;
  const int64_t *lo, *n;
  int64_t ulo, nk;
};

// body(KeyRowSegs) for every key row of the window [wt] x [wh] on which the block has keys, in order.
// Under raster causality the walk stops at the first row past the block (BlockSegments::past), and
// that row is not announced as the next one (nothing to prefetch there).
template <typename Body>
inline void for_each_key_row(const Interval& wt, const Interval& wh, BlockSegments& segs, const Body& body) {
  for (int64_t kt = wt.lo; kt <= wt.hi; ++kt) {
    for (int64_t kh = wh.lo; kh <= wh.hi; ++kh) {
      if (segs.past(kt, kh)) return;
      KeyRowSegs r;
      int64_t uhi;
      segs.row(kt, kh, &r.lo, &r.n, &r.ulo, &uhi);
      if (uhi < r.ulo) continue;
      r.kt = kt;
      r.kh = kh;
      r.nk = uhi - r.ulo + 1;
      r.has_next = next_key_row(wt, wh, kt, kh, &r.next_kt, &r.next_kh) && !segs.past(r.next_kt, r.next_kh);
      body(static_cast<const KeyRowSegs&>(r));
    }
  }
}

// Backward scores of a block on one row of its walk, the entries of member i side by side at off[i]
// (set here; n[i] entries): against the n[i] packed rows of its segment (starting at row lo[i] - ulo of
// X and Y), s = a_i . X_j and dP = g_i . Y_j; stats(i, j0, n, Lr + off[i], Dr + off[i]) writes the lse
// and delta of each entry's query. Then s becomes P and dP becomes dS (probs_and_dscores).
template <typename A, typename Stats>
inline void block_dscores(A* Sr, A* Pr, A* Lr, A* Dr, int64_t* off, const int64_t* lo, const int64_t* n, int64_t nb,
                          int64_t ulo, const A* a, const A* X, int64_t D, const A* g, const A* Y, int64_t Dv, A scale,
                          const Stats& stats) {
  int64_t tot = 0;
  for (int64_t i = 0; i < nb; ++i) {
    off[i] = tot;
    if (n[i] == 0) continue;
    const int64_t j0 = lo[i] - ulo;
    dot_rows(Sr + tot, a + i * D, X + j0 * D, n[i], D);
    dot_rows(Pr + tot, g + i * Dv, Y + j0 * Dv, n[i], Dv);
    stats(i, j0, n[i], Lr + tot, Dr + tot);
    tot += n[i];
  }
  probs_and_dscores(Sr, Pr, Lr, Dr, tot, scale);
}

// acc_i += sum_j c[off[i] + j] * X_(lo[i] - ulo + j) over the segment of every member i of the block.
template <typename A>
inline void block_axpy(A* acc, const A* c, const int64_t* off, const int64_t* lo, const int64_t* n, int64_t nb,
                       int64_t ulo, const A* X, int64_t D) {
  for (int64_t i = 0; i < nb; ++i) {
    if (n[i] == 0) continue;
    axpy_rows(acc + i * D, c + off[i], X + (lo[i] - ulo) * D, n[i], D);
  }
}

template <typename S, bool kUnit>
void fwd_kernel(const Problem& pr, const S* q, Strides qs, const S* k, Strides ks, const S* v, Strides vs, S* out,
                acc_t<S>* lse) {
  using A = acc_t<S>;
  constexpr int L = kLanes<A>;
  const int64_t T = pr.p.q_len[0], H = pr.p.q_len[1], W = pr.p.q_len[2], Wk = pr.p.k_len[2];
  const int64_t D = pr.D, Dv = pr.Dv, heads = pr.heads;
  const A scale = static_cast<A>(pr.scale);
  const int64_t wpad = round_up(pr.win_max, L);
  const int64_t Wb = std::max<int64_t>(1, std::min<int64_t>(W, kScoreBudget / wpad));
  const int64_t ntask = pr.B * heads * T * H;
  const int64_t scratch = Wb * (D + Dv + wpad + 1) + Wk * std::max(D, Dv);
  const double work = double(ntask) * W * pr.win_max * (D + Dv);
  // Inputs already in the accumulation type with unit element stride: key and value rows are read in
  // place (token stride apart) instead of being packed; a query's segment is a short sliding window
  // of tokens, so the rows stay in L1 between neighbouring queries without the copy.
  constexpr bool kDirect = kUnit && std::is_same<S, A>::value;
  parallel_tasks<A>(pr, ntask, work, scratch, 5 * Wb, [&](Scratch<A>& sc, int64_t task) {
    const QueryRow r = query_row(pr, task);
    A* Qb = sc.a.data();        // [Wb, D]    queries of the block
    A* Ob = Qb + Wb * D;        // [Wb, Dv]   output accumulators
    A* Sb = Ob + Wb * Dv;       // [Wb, wpad] scores over each query's whole window, then probabilities
    A* inv_l = Sb + Wb * wpad;  // [Wb]       1 / softmax denominators
    A* Xp = inv_l + Wb;         // [Wk, max(D, Dv)] packed key or value row
    int64_t* cnt = sc.idx.data();  // [Wb], then 4 * Wb for BlockSegments
    const Interval wt = pr.win[0][r.t], wh = pr.win[1][r.h];
    const int64_t flat_row_q = query_row_flat(pr.p, r.t, r.h);
    const int64_t row_out = ((r.b * T + r.t) * H + r.h) * W;  // flat (b, t, h, 0) of the outputs
    const HeadRows<S> qh = head_rows(q, qs, r.b, r.head, D);
    const HeadRows<S> kh_ = head_rows(k, ks, r.b, r.g, D);
    const HeadRows<S> vh = head_rows(v, vs, r.b, r.g, Dv);
    for (int64_t w0 = 0; w0 < W; w0 += Wb) {
      const int64_t nb = std::min(Wb, W - w0);
      qh.template gather<kUnit>(Qb, r.t, r.h, w0, nb);
      std::fill(cnt, cnt + nb, int64_t(0));
      BlockSegments segs(pr, flat_row_q, w0, nb, cnt + Wb);
      // Pass 1: scores, key row by key row.
      for_each_key_row(wt, wh, segs, [&](const KeyRowSegs& kr) {
        if (pr.prefetch) {
          if (kr.has_next)
            kh_.prefetch(kr.next_kt, kr.next_kh, kr.ulo, kr.nk);
          else  // pass 2 starts with the first value row
            vh.prefetch(wt.lo, wh.lo, kr.ulo, kr.nk);
        }
        const A* Xr = Xp;
        int64_t xs = D;
        if (kDirect) {
          Xr = reinterpret_cast<const A*>(kh_.at(kr.kt, kr.kh, kr.ulo));
          xs = kh_.st.s[3];
        } else {
          kh_.template gather<kUnit>(Xp, kr.kt, kr.kh, kr.ulo, kr.nk);
        }
        for (int64_t i = 0; i < nb; ++i) {
          if (kr.n[i] == 0) continue;
          dot_rows(Sb + i * wpad + cnt[i], Qb + i * D, Xr + (kr.lo[i] - kr.ulo) * xs, kr.n[i], D, xs);
          cnt[i] += kr.n[i];
        }
      });
      // Softmax of each query over its whole window.
      for (int64_t i = 0; i < nb; ++i) {
        A* s = Sb + i * wpad;
        const int64_t oi = (row_out + w0 + i) * heads + r.head;
        if (cnt[i] == 0) {  // no key (only with an empty key grid)
          inv_l[i] = 0;
          lse[oi] = -std::numeric_limits<A>::infinity();
          continue;
        }
        const A m = scale_pad_max(s, cnt[i], scale);
        const int64_t np = round_up(cnt[i], L);
        for (int64_t j = 0; j < np; ++j) s[j] = exp_acc(s[j] - m);  // vectorised; the padding gives 0
        const A l = vsum(s, np);
        inv_l[i] = A(1) / l;
        lse[oi] = m + std::log(l);
        cnt[i] = 0;
      }
      // Pass 2: out = P V, key row by key row.
      std::fill(Ob, Ob + nb * Dv, A(0));
      for_each_key_row(wt, wh, segs, [&](const KeyRowSegs& kr) {
        if (pr.prefetch && kr.has_next) vh.prefetch(kr.next_kt, kr.next_kh, kr.ulo, kr.nk);
        const A* Xr = Xp;
        int64_t xs = Dv;
        if (kDirect) {
          Xr = reinterpret_cast<const A*>(vh.at(kr.kt, kr.kh, kr.ulo));
          xs = vh.st.s[3];
        } else {
          vh.template gather<kUnit>(Xp, kr.kt, kr.kh, kr.ulo, kr.nk);
        }
        for (int64_t i = 0; i < nb; ++i) {
          if (kr.n[i] == 0) continue;
          axpy_rows(Ob + i * Dv, Sb + i * wpad + cnt[i], Xr + (kr.lo[i] - kr.ulo) * xs, kr.n[i], Dv, xs);
          cnt[i] += kr.n[i];
        }
      });
      store_rows(out, row_out + w0, heads, r.head, Ob, nb, Dv, [&](int64_t i) { return inv_l[i]; });
    }
  });
}

template <typename S, bool kUnit>
void bwd_dq_kernel(const Problem& pr, const S* go, Strides gs, const S* q, Strides qs, const S* k, Strides ks,
                   const S* v, Strides vs, const acc_t<S>* lse, Strides ls, const acc_t<S>* delta, Strides dls,
                   S* dq) {
  using A = acc_t<S>;
  const int64_t T = pr.p.q_len[0], H = pr.p.q_len[1], W = pr.p.q_len[2], Wk = pr.p.k_len[2];
  const int64_t D = pr.D, Dv = pr.Dv, heads = pr.heads;
  const A scale = static_cast<A>(pr.scale);
  const int64_t Wb = std::max<int64_t>(1, std::min<int64_t>(W, kScoreBudget / pr.win_w_max));
  const int64_t rb = Wb * pr.win_w_max;  // entries of one key row's segments for a block
  const int64_t ntask = pr.B * heads * T * H;
  const int64_t scratch = Wb * (2 * D + Dv + 2) + Wk * (D + Dv) + 4 * rb;
  const double work = double(ntask) * W * pr.win_max * (2 * D + Dv);
  parallel_tasks<A>(pr, ntask, work, scratch, 5 * Wb, [&](Scratch<A>& sc, int64_t task) {
    const QueryRow r = query_row(pr, task);
    A* Qb = sc.a.data();        // [Wb, D]   queries
    A* Gb = Qb + Wb * D;        // [Wb, Dv]  output gradients
    A* dQb = Gb + Wb * Dv;      // [Wb, D]   dQ accumulators
    A* lse_b = dQb + Wb * D;    // [Wb]
    A* delta_b = lse_b + Wb;    // [Wb]
    A* Kp = delta_b + Wb;       // [Wk, D]   packed key row
    A* Vp = Kp + Wk * D;        // [Wk, Dv]  packed value row
    A* Sr = Vp + Wk * Dv;       // [rb] scores, then P       (the block's segments on one key row)
    A* Pr = Sr + rb;            // [rb] dP, then dS
    A* Lr = Pr + rb;            // [rb] lse of each entry's query
    A* Dr = Lr + rb;            // [rb] delta of each entry's query
    int64_t* off = sc.idx.data();  // [Wb], then 4 * Wb for BlockSegments
    const Interval wt = pr.win[0][r.t], wh = pr.win[1][r.h];
    const int64_t flat_row_q = query_row_flat(pr.p, r.t, r.h);
    const HeadRows<S> qh = head_rows(q, qs, r.b, r.head, D);
    const HeadRows<S> gh = head_rows(go, gs, r.b, r.head, Dv);
    const HeadRows<A> lh = head_rows(lse, ls, r.b, r.head, 1);
    const HeadRows<A> dh = head_rows(delta, dls, r.b, r.head, 1);
    const HeadRows<S> kh_ = head_rows(k, ks, r.b, r.g, D);
    const HeadRows<S> vh = head_rows(v, vs, r.b, r.g, Dv);
    for (int64_t w0 = 0; w0 < W; w0 += Wb) {
      const int64_t nb = std::min(Wb, W - w0);
      qh.template gather<kUnit>(Qb, r.t, r.h, w0, nb);
      gh.template gather<kUnit>(Gb, r.t, r.h, w0, nb);
      lh.gather_scalars(lse_b, r.t, r.h, w0, nb);
      dh.gather_scalars(delta_b, r.t, r.h, w0, nb);
      std::fill(dQb, dQb + nb * D, A(0));
      BlockSegments segs(pr, flat_row_q, w0, nb, off + Wb);
      // One pass over the key rows: s = q.k and dP = dO.v, then dS, then dQ += dS k.
      for_each_key_row(wt, wh, segs, [&](const KeyRowSegs& kr) {
        if (pr.prefetch && kr.has_next) {
          kh_.prefetch(kr.next_kt, kr.next_kh, kr.ulo, kr.nk);
          vh.prefetch(kr.next_kt, kr.next_kh, kr.ulo, kr.nk);
        }
        kh_.template gather<kUnit>(Kp, kr.kt, kr.kh, kr.ulo, kr.nk);
        vh.template gather<kUnit>(Vp, kr.kt, kr.kh, kr.ulo, kr.nk);
        block_dscores(Sr, Pr, Lr, Dr, off, kr.lo, kr.n, nb, kr.ulo, Qb, Kp, D, Gb, Vp, Dv, scale,
                      [&](int64_t i, int64_t, int64_t m, A* l, A* dl) {
                        std::fill(l, l + m, lse_b[i]);
                        std::fill(dl, dl + m, delta_b[i]);
                      });
        block_axpy(dQb, Pr, off, kr.lo, kr.n, nb, kr.ulo, Kp, D);
      });
      store_rows(dq, ((r.b * T + r.t) * H + r.h) * W + w0, heads, r.head, dQb, nb, D, [&](int64_t) { return scale; });
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Key-row kernel (dK, dV). One task = one key row (b, kv head g, kt, kh); its keys are taken in blocks
// of `nb` consecutive kw. Each key walks its inverse neighbourhood: the query rows (t, h) of
// inverse_window_on_axis on t and h, on each the query segment of the w inverse window (cut by raster
// causality flat(key) <= flat(query)), for every query head of its group. No atomics: each key's
// gradients are summed by the one task that owns the key, in a fixed order.
// ------------------------------------------------------------------------------------------------

template <typename S, bool kUnit>
void bwd_dkv_kernel(const Problem& pr, const S* go, Strides gs, const S* q, Strides qs, const S* k, Strides ks,
                    const S* v, Strides vs, const acc_t<S>* lse, Strides ls, const acc_t<S>* delta, Strides dls,
                    S* dk, S* dv) {
  using A = acc_t<S>;
  const int64_t W = pr.p.q_len[2];
  const int64_t Tk = pr.p.k_len[0], Hk = pr.p.k_len[1], Wk = pr.p.k_len[2];
  const int64_t D = pr.D, Dv = pr.Dv, heads_kv = pr.heads_kv, group = pr.group;
  const A scale = static_cast<A>(pr.scale);
  const int64_t Kb_n = std::max<int64_t>(1, std::min<int64_t>(Wk, kScoreBudget / pr.inv_w_max));
  const int64_t rb = Kb_n * pr.inv_w_max;
  const int64_t ntask = pr.B * heads_kv * Tk * Hk;
  const int64_t scratch = Kb_n * 2 * (D + Dv) + W * (D + Dv + 2) + 4 * rb;
  const double work = double(ntask) * Wk * pr.win_max * 2 * (D + Dv);  // inverse windows ~ windows
  parallel_tasks<A>(pr, ntask, work, scratch, 3 * Kb_n, [&](Scratch<A>& sc, int64_t task) {
    const RowTask r = row_task(task, heads_kv, Tk, Hk);  // (b, kv head g, kt, kh)
    const int64_t b = r.b, g = r.head, kt = r.t, kh = r.h;
    A* Kb = sc.a.data();       // [nb, D]   keys of the block
    A* Vb = Kb + Kb_n * D;     // [nb, Dv]  values
    A* dKb = Vb + Kb_n * Dv;   // [nb, D]   dK accumulators
    A* dVb = dKb + Kb_n * D;   // [nb, Dv]  dV accumulators
    A* Qp = dVb + Kb_n * Dv;   // [W, D]    packed query row
    A* Gp = Qp + W * D;        // [W, Dv]   packed output-gradient row
    A* Lp = Gp + W * Dv;       // [W]       lse of the query row
    A* Dp = Lp + W;            // [W]       delta of the query row
    A* Sr = Dp + W;            // [rb] scores, then P    (the block's query segments on one query row)
    A* Pr = Sr + rb;           // [rb] dP, then dS
    A* Lr = Pr + rb;           // [rb] lse of each entry's query
    A* Dr = Lr + rb;           // [rb] delta of each entry's query
    int64_t* lo = sc.idx.data();
    int64_t* n = lo + Kb_n;
    int64_t* off = n + Kb_n;
    const Interval it = pr.inv[0][kt], ih = pr.inv[1][kh];
    const HeadRows<S> kh_ = head_rows(k, ks, b, g, D);
    const HeadRows<S> vh = head_rows(v, vs, b, g, Dv);
    const int64_t flat_row_k = key_row_flat(pr.p, kt, kh);
    for (int64_t k0 = 0; k0 < Wk; k0 += Kb_n) {
      const int64_t nb = std::min(Kb_n, Wk - k0);
      kh_.template gather<kUnit>(Kb, kt, kh, k0, nb);
      vh.template gather<kUnit>(Vb, kt, kh, k0, nb);
      std::fill(dKb, dKb + nb * (D + Dv), A(0));  // dKb and dVb are adjacent
      for (int64_t t = it.lo; t <= it.hi; ++t) {
        for (int64_t h = ih.lo; h <= ih.hi; ++h) {
          const int64_t flat_row_q = query_row_flat(pr.p, t, h);
          // Query segments of the block's keys on this query row, and their union.
          int64_t ulo = std::numeric_limits<int64_t>::max(), uhi = -1;
          for (int64_t i = 0; i < nb; ++i) {
            const Interval iw = pr.inv[2][k0 + i];
            lo[i] = iw.lo;
            if (pr.p.raster) lo[i] = std::max(lo[i], flat_row_k + k0 + i - flat_row_q);
            n[i] = std::max<int64_t>(iw.hi - lo[i] + 1, 0);
            if (n[i] > 0) {
              ulo = std::min(ulo, lo[i]);
              uhi = std::max(uhi, iw.hi);
            }
          }
          if (uhi < ulo) continue;
          const int64_t nq = uhi - ulo + 1;
          for (int64_t head = g * group; head < (g + 1) * group; ++head) {
            {  // prefetch the next query row of the walk: the next head here, else the next (t, h)
              int64_t pt = t, ph = h, phead = head + 1;
              if (phead == (g + 1) * group) {
                phead = g * group;
                if (!next_key_row(it, ih, t, h, &pt, &ph)) pt = -1;
              }
              if (pr.prefetch && pt >= 0) {
                head_rows(q, qs, b, phead, D).prefetch(pt, ph, ulo, nq);
                head_rows(go, gs, b, phead, Dv).prefetch(pt, ph, ulo, nq);
              }
            }
            head_rows(q, qs, b, head, D).template gather<kUnit>(Qp, t, h, ulo, nq);
            head_rows(go, gs, b, head, Dv).template gather<kUnit>(Gp, t, h, ulo, nq);
            head_rows(lse, ls, b, head, 1).gather_scalars(Lp, t, h, ulo, nq);
            head_rows(delta, dls, b, head, 1).gather_scalars(Dp, t, h, ulo, nq);
            block_dscores(Sr, Pr, Lr, Dr, off, lo, n, nb, ulo, Kb, Qp, D, Vb, Gp, Dv, scale,
                          [&](int64_t, int64_t j0, int64_t m, A* l, A* dl) {
                            std::copy(Lp + j0, Lp + j0 + m, l);
                            std::copy(Dp + j0, Dp + j0 + m, dl);
                          });
            // dV += P^T dO, dK += dS^T Q (scaled at the end).
            block_axpy(dVb, Sr, off, lo, n, nb, ulo, Gp, Dv);
            block_axpy(dKb, Pr, off, lo, n, nb, ulo, Qp, D);
          }
        }
      }
      const int64_t tok0 = ((b * Tk + kt) * Hk + kh) * Wk + k0;
      store_rows(dk, tok0, heads_kv, g, dKb, nb, D, [&](int64_t) { return scale; });
      store_rows(dv, tok0, heads_kv, g, dVb, nb, Dv, [&](int64_t) { return A(1); });
    }
  });
}

#include "lane_kernels.h"
#include "lane_bwd_probs.h"

// Largest pair store (lane_kernels.h's DsStore: the backward's dS, the forward's saved probabilities).
// NATTEN's shifted borders widen the key side's box: (3,3,3) 2x the query's elements, (7,7,7) 34x.
constexpr int64_t kDsStoreBytes = int64_t(256) << 20;

// Whether the lane kernels may run (NUWA_CPU_LANES=0 turns them off: the row kernels then run every
// problem; for comparisons and tests).
inline bool lanes_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("NUWA_CPU_LANES");
    return !(e && e[0] == '0');
  }();
  return on;
}

// Pair stores (DsStore layout) per query element. The dS store lives within one backward call; the
// probabilities of na3d_fwd_probs are kept from the forward to the backward (activation memory: on
// 10x21x21 with D=64 and truncated borders, (3,3,3) keeps 0.43x the query's elements, (1,3,3) 0.15x,
// (7,7,7) 5.4x), at most NUWA_CPU_PROBS times the query's elements (default 1, read once; 0: never, the
// backward then recomputes the scores; at most kDsPerQuery: the key pass reads them on the dS store's
// path). (7,7,7) is left out by default: keeping its probabilities (NUWA_CPU_PROBS=8) measured no faster
// on the 2-core EPYC (fwd+bwd 84-91 ms either way: reading 48 MB back costs what the scores' product
// does), for 5.4x the query's size of activation memory.
constexpr int64_t kDsPerQuery = 8;
inline int64_t probs_per_query() {
  static const int64_t n = [] {
    const char* e = std::getenv("NUWA_CPU_PROBS");
    return e && *e ? std::clamp<int64_t>(std::atoll(e), 0, kDsPerQuery) : int64_t(1);
  }();
  return n;
}

// The elements of a pair store of this problem in the lane kernels (accumulation type A) when the lanes
// run it, its offsets decompose, both entry tables are built, and it holds at most per_query times the
// query's elements and kDsStoreBytes; 0 otherwise. Shapes only: the same answer for every call.
// With `sweep`, also 0 when the backward's sweep over the store (lane_bwd_probs.h) would pass its scratch
// bound.
template <typename A>
int64_t lane_pair_store_elems(const Problem& pr, int64_t per_query, bool sweep = false) {
  constexpr int L = kLanes<A>;
  if (!lanes_enabled() || !lane_run_ok<A>(pr)) return 0;
  const LaneGeom gq = lane_geom(pr), gk = lane_geom(pr, /*key_side=*/true);
  if (!EntryTable::fits<L>(gq) || !EntryTable::fits<L>(gk)) return 0;
  if (sweep && !probs_sweep_fits<A>(pr, gq, gk)) return 0;
  const int64_t n = DsStore::elems<L>(pr, gq, gk);
  const int64_t q_elems = pr.B * gq.Nq * pr.heads * pr.D;
  return n * int64_t(sizeof(A)) <= kDsStoreBytes && n <= per_query * q_elems ? n : 0;
}

// The elements of na3d_fwd_probs's probabilities: a pair store the backward's sweep can take; 0: none kept.
template <typename A>
int64_t lane_probs_elems(const Problem& pr, int64_t per_query) {
  return lane_pair_store_elems<A>(pr, per_query, /*sweep=*/true);
}

// ------------------------------------------------------------------------------------------------
// Op entry points (CPU dispatch key)
// ------------------------------------------------------------------------------------------------

inline at::ScalarType acc_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Shape of the attention output: the query's, with value's head dim.
inline std::vector<int64_t> out_shape_of(const at::Tensor& query, const at::Tensor& value) {
  std::vector<int64_t> s(query.sizes().begin(), query.sizes().end());
  s.back() = value.size(5);
  return s;
}

// f(std::integral_constant<bool, unit>): the unit-stride or the strided instantiation.
template <typename F>
inline void with_unit(bool unit, const F& f) {
  if (unit)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// (out, lse, probs): probs, with want_probs, every pair's probability for the backward's key pass (a
// DsStore of probs_per_query() at most; pairs outside the windows 0), else (and when there is none) empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> na3d_fwd_impl(const at::Tensor& query, const at::Tensor& key,
                                                             const at::Tensor& value, at::IntArrayRef kernel_size,
                                                             c10::List<bool> causal_axes, bool raster_causal,
                                                             bool shift_border, at::IntArrayRef stride,
                                                             at::IntArrayRef slab, double scale, bool want_probs) {
  check_inputs(query, key, value, kernel_size, causal_axes);
  TORCH_CHECK(query.device().is_cpu(), "na3d_fwd (CPU kernel): tensors must be on the CPU");
  const auto dtype = query.scalar_type();
  at::Tensor out = pooled_empty(out_shape_of(query, value), query.options());
  at::Tensor lse = pooled_empty(query.sizes().slice(0, 5), query.options().dtype(acc_type(dtype)));
  at::Tensor probs = at::empty({0}, query.options().dtype(acc_type(dtype)));
  if (lse.numel() == 0) {  // no query (B = 0, an empty grid or no heads)
    out.zero_();
    return {out, lse, probs};
  }
  if (key.size(1) * key.size(2) * key.size(3) == 0) {  // an empty key grid: no key for any query
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse, probs};
  }
  const Problem pr = make_problem(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale);
  const bool unit = unit_last(query) && unit_last(key) && unit_last(value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "na3d_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* qp = query.const_data_ptr<scalar_t>();
    const scalar_t* kp = key.const_data_ptr<scalar_t>();
    const scalar_t* vp = value.const_data_ptr<scalar_t>();
    const bool lanes = lanes_enabled() && lane_run_ok<A>(pr);
    const int64_t np = want_probs ? lane_probs_elems<A>(pr, probs_per_query()) : 0;
    DsStore ps;
    if (np > 0) {
      constexpr int L = kLanes<A>;
      ps.init<L>(lane_geom(pr), lane_geom(pr, /*key_side=*/true));
      probs = pooled_empty({np}, query.options().dtype(acc_type(dtype)));  // zeroed by the kernel
    }
    A* pp = np > 0 ? probs.data_ptr<A>() : nullptr;
    with_unit(unit, [&](auto u) {
      if (lanes)
        lane_fwd_kernel<scalar_t, decltype(u)::value>(pr, qp, strides_of(query), kp, strides_of(key), vp,
                                                      strides_of(value), out.data_ptr<scalar_t>(), lse.data_ptr<A>(),
                                                      pp, np > 0 ? &ps : nullptr);
      else
        fwd_kernel<scalar_t, decltype(u)::value>(pr, qp, strides_of(query), kp, strides_of(key), vp, strides_of(value),
                                                 out.data_ptr<scalar_t>(), lse.data_ptr<A>());
    });
  });
  return {out, lse, probs};
}

std::tuple<at::Tensor, at::Tensor> na3d_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, at::IntArrayRef kernel_size,
                                                c10::List<bool> causal_axes, bool raster_causal, bool shift_border,
                                                at::IntArrayRef stride, at::IntArrayRef slab, double scale) {
  auto [out, lse, probs] = na3d_fwd_impl(query, key, value, kernel_size, causal_axes, raster_causal, shift_border,
                                         stride, slab, scale, /*want_probs=*/false);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> na3d_fwd_probs_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::IntArrayRef kernel_size,
    c10::List<bool> causal_axes, bool raster_causal, bool shift_border, at::IntArrayRef stride, at::IntArrayRef slab,
    double scale) {
  return na3d_fwd_impl(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale,
                       /*want_probs=*/true);
}

// probs: na3d_fwd_probs's third output (undefined: none, the na3d_bwd op), read by both passes instead of
// recomputing S. Without probs, delta_in is the backward's delta = rowsum(dO * O) - dLSE; with probs, it is
// dLSE alone (undefined: none), and the query pass forms delta = sum over the window of P dP - dLSE itself
// (the same quantity: O = sum P V), so the backward needs neither O nor a pass over it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> na3d_bwd_impl(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& lse_in, const at::Tensor& delta_in, const at::Tensor& probs, at::IntArrayRef kernel_size,
    c10::List<bool> causal_axes, bool raster_causal, bool shift_border, at::IntArrayRef stride, at::IntArrayRef slab,
    double scale) {
  check_inputs(query, key, value, kernel_size, causal_axes);
  TORCH_CHECK(query.device().is_cpu(), "na3d_bwd (CPU kernel): tensors must be on the CPU");
  const auto dtype = query.scalar_type();
  const auto acc = acc_type(dtype);
  const std::vector<int64_t> out_shape = out_shape_of(query, value);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "na3d_bwd: grad_out must have shape ", out_shape,
              ", got ", grad_out.sizes());
  TORCH_CHECK(lse_in.sizes() == query.sizes().slice(0, 5), "na3d_bwd: lse must have shape ",
              query.sizes().slice(0, 5), ", got ", lse_in.sizes());
  const bool with_probs = probs.defined();
  const char* delta_name = with_probs ? "grad_lse" : "delta";
  if (!with_probs || delta_in.defined()) {
    TORCH_CHECK(delta_in.sizes() == query.sizes().slice(0, 5), "na3d_bwd: ", delta_name, " must have shape ",
                query.sizes().slice(0, 5), ", got ", delta_in.sizes());
    TORCH_CHECK(delta_in.device() == query.device(), "na3d_bwd: all tensors must be on the same device");
  }
  TORCH_CHECK(grad_out.device() == query.device() && lse_in.device() == query.device(),
              "na3d_bwd: all tensors must be on the same device");
  // grad_out in the input dtype, lse/delta in the accumulation dtype: converted only if they differ
  // (O(B * N * heads) for lse/delta).
  const at::Tensor go = grad_out.scalar_type() == dtype ? grad_out : grad_out.to(dtype);
  const at::Tensor lse = lse_in.scalar_type() == acc ? lse_in : lse_in.to(acc);
  const at::Tensor delta =
      !delta_in.defined() ? at::Tensor() : delta_in.scalar_type() == acc ? delta_in : delta_in.to(acc);

  at::Tensor dq = pooled_empty(query.sizes(), query.options());
  at::Tensor dk = pooled_empty(key.sizes(), key.options());
  at::Tensor dv = pooled_empty(value.sizes(), value.options());
  if (lse.numel() == 0 || key.size(1) * key.size(2) * key.size(3) == 0) {  // no query, or no key
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const Problem pr = make_problem(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale);
  const bool unit = unit_last(query) && unit_last(key) && unit_last(value) && unit_last(go);
  if (with_probs) {  // the layout of the dS store (probs_per_query() <= kDsPerQuery), whose size it has
    const int64_t want = dtype == at::kDouble ? lane_probs_elems<double>(pr, kDsPerQuery)
                                              : lane_probs_elems<float>(pr, kDsPerQuery);
    TORCH_CHECK(want > 0 && probs.numel() == want && probs.scalar_type() == acc && probs.is_contiguous() &&
                    probs.device().is_cpu(),
                "na3d_bwd_probs: probs must be na3d_fwd_probs's third output for these arguments (non-empty: "
                "without probabilities, call na3d_bwd)");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "na3d_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const scalar_t* qp = query.const_data_ptr<scalar_t>();
    const scalar_t* kp = key.const_data_ptr<scalar_t>();
    const scalar_t* vp = value.const_data_ptr<scalar_t>();
    const A* lp = lse.const_data_ptr<A>();
    const A* dlp = delta.defined() ? delta.const_data_ptr<A>() : nullptr;  // with probs: dLSE, or none
    const Strides gs = strides_of(go), qs = strides_of(query), ks = strides_of(key), vs = strides_of(value);
    const Strides ls = strides_of(lse), dls = delta.defined() ? strides_of(delta) : ls;
    const bool lanes = lanes_enabled() && lane_run_ok<A>(pr);  // head dims padded to whole vectors too
    with_unit(unit, [&](auto u) {
      constexpr bool kUnit = decltype(u)::value;
      if (lanes) {
        // Small windows, when the store is small: one pass stores dS for the other (DsStore): the query
        // pass for the key pass with the forward's probabilities, else the key pass for the query pass.
        constexpr int L = kLanes<A>;
        const int64_t ds_elems = lane_pair_store_elems<A>(pr, kDsPerQuery);
        if (ds_elems > 0) {
          DsStore st;
          st.init<L>(lane_geom(pr), lane_geom(pr, /*key_side=*/true));
          if (with_probs) {  // one sweep: dS in each task's ring (lane_bwd_probs.h)
            lane_bwd_probs_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, dlp, dls,
                                                   dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                                   dv.data_ptr<scalar_t>(), st, probs.const_data_ptr<A>());
            return;
          }
          A* buf = static_cast<A*>(pool_alloc(ds_elems * sizeof(A)));
          struct Free {
            A* p;
            ~Free() { pool_free(p); }
          } free_buf{buf};
          lane_bwd_dkv_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, lp, ls, dlp, dls,
                                               dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), buf, &st);
          lane_bwd_dq_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, lp, ls, dlp, dls,
                                              dq.data_ptr<scalar_t>(), buf, &st);
          return;
        }
        lane_bwd_dq_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, lp, ls, dlp, dls,
                                            dq.data_ptr<scalar_t>());
        lane_bwd_dkv_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, lp, ls, dlp, dls,
                                             dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
        return;
      }
      bwd_dq_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, lp, ls, dlp, dls, dq.data_ptr<scalar_t>());
      bwd_dkv_kernel<scalar_t, kUnit>(pr, gp, gs, qp, qs, kp, ks, vp, vs, lp, ls, dlp, dls, dk.data_ptr<scalar_t>(),
                                      dv.data_ptr<scalar_t>());
    });
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> na3d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& lse, const at::Tensor& delta, at::IntArrayRef kernel_size, c10::List<bool> causal_axes,
    bool raster_causal, bool shift_border, at::IntArrayRef stride, at::IntArrayRef slab, double scale) {
  return na3d_bwd_impl(grad_out, query, key, value, lse, delta, at::Tensor(), kernel_size, causal_axes, raster_causal,
                       shift_border, stride, slab, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> na3d_bwd_probs_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const at::Tensor& probs,
    at::IntArrayRef kernel_size, c10::List<bool> causal_axes, bool raster_causal, bool shift_border,
    at::IntArrayRef stride, at::IntArrayRef slab, double scale) {
  const at::Tensor glse = grad_lse.has_value() ? *grad_lse : at::Tensor();
  return na3d_bwd_impl(grad_out, query, key, value, lse, glse, probs, kernel_size, causal_axes, raster_causal,
                       shift_border, stride, slab, scale);
}

}  // namespace

std::string cpu_kernel_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

int64_t na3d_probs_numel(at::IntArrayRef query_shape, at::IntArrayRef key_shape, at::IntArrayRef value_shape,
                         at::ScalarType dtype, at::IntArrayRef kernel_size, c10::List<bool> causal_axes,
                         bool raster_causal, bool shift_border, at::IntArrayRef stride, at::IntArrayRef slab) {
  const auto meta = [&](at::IntArrayRef shape) {
    return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
  };
  const at::Tensor query = meta(query_shape), key = meta(key_shape), value = meta(value_shape);
  check_inputs(query, key, value, kernel_size, causal_axes);
  if (query.numel() == 0 || key.numel() == 0 || value.numel() == 0) return 0;
  const Problem pr = make_problem(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride,
                                  slab, 1.0);
  return dtype == at::kDouble ? lane_probs_elems<double>(pr, probs_per_query())
                              : lane_probs_elems<float>(pr, probs_per_query());
}

}  // namespace cpu
}  // namespace nuwa

TORCH_LIBRARY_IMPL(nuwa_kernels, CPU, m) {
  m.impl("na3d_fwd", &nuwa::cpu::na3d_fwd_cpu);
  m.impl("na3d_bwd", &nuwa::cpu::na3d_bwd_cpu);
  m.impl("na3d_fwd_probs", &nuwa::cpu::na3d_fwd_probs_cpu);
  m.impl("na3d_bwd_probs", &nuwa::cpu::na3d_bwd_probs_cpu);
}
