// The memory side of the fused CPU forward for small windows, without its arithmetic: how fast can a core
// stream a head's rows the way lane_fwd_kernel does, and how much of a stand-in for the in-core work hides
// behind it? Driven by benchmarks/cpu_read_bound.py (which compiles it); see
// benchmarks/results/cpu-amd-epyc-2t/gemm-rate.md, sessions 9 and 12.
//
//   read_pattern NTOK HEADS D REACH LAYOUT FMAS REPS PREFETCH [ORDER]
//
// Q, K, V: NTOK tokens x HEADS heads x D floats each; LAYOUT 0 token-major (the contract's
// (B, T, H, W, heads, D): a head's rows HEADS * D floats apart), 1 heads-contiguous (each head's rows
// adjacent). ORDER 0 (default): tasks are heads (OpenMP, dynamic), as in the kernel when B * heads covers
// the threads; 1: each thread a contiguous range of blocks, all heads of a block in turn. Per
// block of 16 queries and head, as the kernel does for windows read in place: prefetch (prefetcht1, line
// by line across the rows) Q's rows two blocks ahead and K's and V's newest rows two blocks ahead (keys up
// to REACH tokens past the queries: W + 1 for a (1, 3, 3) window on a W-wide grid), unless PREFETCH is 0;
// load the block's 16 query rows and 16 newest key and value rows; FMAS vector FMAs (8 independent chains,
// a multiple of 8: at the core's FMA rate, one 512-bit FMA per cycle on Zen 4) in place of the scores,
// softmax and P V; 16 output rows stored non-temporally.
// Prints "min_ms median_ms" over REPS sweeps.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "stand_in.h"

enum { kBlock = 16, kAhead = 2 };

static void prefetch_l2(const void* p) { __asm__ volatile("prefetcht1 %0" : : "m"(*(const char*)p)); }

typedef struct {
  long ntok, heads, d, layout;
} Shape;

// Row of token t, head h.
static const float* row(const float* x, const Shape* s, long t, long h) {
  return s->layout == 0 ? x + (t * s->heads + h) * s->d : x + (h * s->ntok + t) * s->d;
}

// Prefetches the rows of tokens [t0, t0 + kBlock) of head h that lie in the grid, line by line.
static void prefetch_block(const float* x, const Shape* s, long t0, long h) {
  for (long o = 0; o < s->d; o += 16)
    for (long j = 0; j < kBlock && t0 + j < s->ntok; ++j) prefetch_l2(row(x, s, t0 + j, h) + o);
}

// One block of 16 queries of head h: returns a checksum so that nothing is optimised away. The block's rows
// are summed into twelve independent accumulators (the kernel's loads feed independent products; one
// chain of adds, until session 12, made the stand-in wait on every load in turn).
static float sweep_block(const float* q, const float* k, const float* v, float* out, const Shape* s, long h,
                         long q0, long reach, long fmas, int prefetch) {
  const long nb = q0 + kBlock <= s->ntok ? kBlock : s->ntok - q0;
  if (prefetch) {
    prefetch_block(q, s, q0 + kAhead * kBlock, h);
    prefetch_block(k, s, q0 + kAhead * kBlock + reach, h);
    prefetch_block(v, s, q0 + kAhead * kBlock + reach, h);
  }
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_setzero_ps();
  for (long j = 0; j < nb; ++j) {
    const long kt = q0 + j + reach < s->ntok ? q0 + j + reach : s->ntok - 1;
    for (long o = 0; o < s->d; o += 16) {
      const int i = (int)(o / 16) & 3;
      a[i] = _mm512_add_ps(a[i], _mm512_loadu_ps(row(q, s, q0 + j, h) + o));
      a[4 + i] = _mm512_add_ps(a[4 + i], _mm512_loadu_ps(row(k, s, kt, h) + o));
      a[8 + i] = _mm512_add_ps(a[8 + i], _mm512_loadu_ps(row(v, s, kt, h) + o));
    }
  }
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < 12; ++i) acc = _mm512_add_ps(acc, a[i]);
  const __m512 w = _mm512_set1_ps(0.999f), e = _mm512_set1_ps(1e-7f);
  // Eight chains from eight different values, hidden from the optimiser: started equal (until session 13)
  // GCC folded them into one chain of fmas / 8 dependent FMAs, a delay of fmas / 2 cycles instead of
  // fmas FMAs at the core's rate.
  __m512 c0 = acc, c1 = _mm512_add_ps(acc, e), c2 = _mm512_sub_ps(acc, e), c3 = _mm512_mul_ps(acc, w);
  __m512 c4 = _mm512_add_ps(c1, e), c5 = _mm512_sub_ps(c2, e), c6 = _mm512_mul_ps(c3, w), c7 = _mm512_add_ps(c4, e);
  __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7));
  for (long i = 0; i < fmas / 8; ++i) {
    c0 = _mm512_fmadd_ps(c0, w, acc), c1 = _mm512_fmadd_ps(c1, w, acc), c2 = _mm512_fmadd_ps(c2, w, acc);
    c3 = _mm512_fmadd_ps(c3, w, acc), c4 = _mm512_fmadd_ps(c4, w, acc), c5 = _mm512_fmadd_ps(c5, w, acc);
    c6 = _mm512_fmadd_ps(c6, w, acc), c7 = _mm512_fmadd_ps(c7, w, acc);
  }
  const __m512 c = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                                 _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
  const __m512 y = _mm512_mul_ps(c, _mm512_set1_ps(1e-9f));
  for (long j = 0; j < nb; ++j)  // the output is token-major in both layouts, as the kernel's
    for (long o = 0; o < s->d; o += 16) _mm512_stream_ps(out + ((q0 + j) * s->heads + h) * s->d + o, y);
  return _mm512_reduce_add_ps(c);
}

// One sweep over all heads, in ORDER 0 (tasks are heads, the kernel's) or 1 (each thread a contiguous
// range of blocks, every head of a block in turn: whole tokens read close together).
static float sweep(const float* q, const float* k, const float* v, float* out, const Shape* s, long reach,
                   long fmas, int prefetch, int order) {
  float sink = 0.f;
  const long nblk = (s->ntok + kBlock - 1) / kBlock;
  if (order == 0) {
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
    for (long h = 0; h < s->heads; ++h)
      for (long b = 0; b < nblk; ++b) sink += sweep_block(q, k, v, out, s, h, b * kBlock, reach, fmas, prefetch);
  } else {
#pragma omp parallel reduction(+ : sink)
    {
      const long nt = omp_get_num_threads(), tid = omp_get_thread_num();
      for (long b = tid * nblk / nt; b < (tid + 1) * nblk / nt; ++b)
        for (long h = 0; h < s->heads; ++h) sink += sweep_block(q, k, v, out, s, h, b * kBlock, reach, fmas, prefetch);
    }
  }
  _mm_sfence();
  return sink;
}

int main(int argc, char** argv) {
  if (argc != 9 && argc != 10) {
    fprintf(stderr, "usage: %s NTOK HEADS D REACH LAYOUT FMAS REPS PREFETCH [ORDER]\n", argv[0]);
    return 2;
  }
  Shape s = {atol(argv[1]), atol(argv[2]), atol(argv[3]), atol(argv[5])};
  const long reach = atol(argv[4]), fmas = atol(argv[6]), reps = atol(argv[7]);
  const int prefetch = atoi(argv[8]), order = argc == 10 ? atoi(argv[9]) : 0;
  if (s.ntok < 1 || s.heads < 1 || s.d < 16 || s.d % 16 || reach < 0 || fmas < 0 || reps < 1 ||
      s.layout < 0 || s.layout > 1 || order < 0 || order > 1) {
    fprintf(stderr, "read_pattern: bad arguments\n");
    return 2;
  }
  const size_t n = (size_t)s.ntok * s.heads * s.d, bytes = (n * sizeof(float) + 63) / 64 * 64;
  float* q = aligned_alloc(64, bytes);
  float* k = aligned_alloc(64, bytes);
  float* v = aligned_alloc(64, bytes);
  float* out = aligned_alloc(64, bytes);
  double* ts = malloc(sizeof(double) * reps);
  if (!q || !k || !v || !out || !ts) return 1;
  for (size_t i = 0; i < n; ++i) q[i] = k[i] = v[i] = 1e-3f * (float)(i % 97), out[i] = 0.f;
  float sink = 0.f;
  for (long r = 0; r < reps; ++r) {
    const double t0 = now_s();
    sink += sweep(q, k, v, out, &s, reach, fmas, prefetch, order);
    ts[r] = now_s() - t0;
  }
  qsort(ts, reps, sizeof(double), cmp_double);
  printf("%.4f %.4f\n", ts[0] * 1e3, ts[reps / 2] * 1e3);
  fprintf(stderr, "checksum %g\n", (double)sink);
  return 0;
}
