// Whether the fused CPU forward's software prefetches can hide behind its arithmetic on this machine.
// Driven by benchmarks/cpu_read_bound.py --overlap (which compiles it); see
// benchmarks/results/cpu-amd-epyc-2t/gemm-rate.md, session 16.
//
//   prefetch_overlap NTOK HEADS FMAS ROUNDS
//
// Q, K, V: NTOK tokens x HEADS heads x 64 floats each, token-major (the contract's layout: a head's rows
// 2 KiB apart for 8 heads). Each thread takes heads in turn and walks their blocks of 16 tokens; per block
// and head it runs FMAS vector FMAs (twelve independent chains) and, two blocks ahead, prefetches
// (prefetcht1) the 192 lines of that block's Q, K and V rows, as lane_fwd_kernel does for a (1,3,3)
// window. The FMAs take their second operand either from registers or from a 4 KiB buffer that stays in
// L1 (one 512-bit load per FMA: the kernel's products issue about 0.8). The prefetches go either in one
// burst at the block's start (the kernel's way) or in chunks of 48, 24, 16, 8 or 4 lines spread evenly
// over the FMAs. All variants run interleaved, ROUNDS times (each the fastest of 5 sweeps); printed: one
// line per variant, "operands schedule median_ms", the median over rounds.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "stand_in.h"

enum { kBlock = 16, kDim = 64, kLines = 3 * kBlock * kDim / 16, kAhead = 2, kChains = 12 };

typedef struct {
  const char* base;  // Q, K, V one after the other, `tensor` bytes each
  size_t tensor;
  long ntok, heads;
  const float* l1;  // 64 vectors that stay in L1
} Data;

// The kLines lines of the rows of tokens [t0, t0 + 16) of head h (those in the grid; returns their count):
// Q's, K's, V's, each line by line across the rows (as prefetch_rows orders them).
static int lines_of(const Data* d, long t0, long h, const char** out) {
  int n = 0;
  for (int x = 0; x < 3; ++x)
    for (int o = 0; o < kDim * 4; o += 64)
      for (long t = t0; t < t0 + kBlock && t < d->ntok; ++t)
        out[n++] = d->base + (size_t)x * d->tensor + ((size_t)t * d->heads + h) * kDim * 4 + o;
  return n;
}

// Prefetches lines[*n, min(*n + count, total)).
static inline __attribute__((always_inline)) void issue(const char* const* lines, int* n, int count, int total) {
  for (int i = 0; i < count && *n < total; ++i, ++*n) __asm__ volatile("prefetcht1 %0" : : "m"(*lines[*n]));
}

// One block and head: `steps` steps of twelve FMAs, the block two ahead prefetched in chunks of `chunk`
// lines every `every` steps (chunk == kLines: one burst first; 0: none). Inlined with constant `loads` and
// `chunk` (the step loop then has neither branch).
static inline __attribute__((always_inline)) void block(const Data* d, long h, long b, long steps, int loads,
                                                        int chunk, long every, __m512* c) {
  const __m512 w = _mm512_set1_ps(0.9999f), e = _mm512_set1_ps(1e-6f);
  const long ahead = (b + kAhead) * kBlock;
  const char* lines[kLines];
  const int total = chunk && ahead < d->ntok ? lines_of(d, ahead, h, lines) : 0;
  int n = 0;
  if (chunk == kLines) issue(lines, &n, kLines, total);
  for (long s0 = 0; s0 < steps; s0 += every) {  // a chunk, then `every` steps
    if (chunk && chunk < kLines) issue(lines, &n, chunk, total);
    const long s1 = s0 + every < steps ? s0 + every : steps;
    for (long s = s0; s < s1; ++s)
      for (int j = 0; j < kChains; ++j)
        c[j] = _mm512_fmadd_ps(c[j], w, loads ? _mm512_load_ps(d->l1 + ((s * kChains + j) & 63) * 16) : e);
  }
  issue(lines, &n, kLines, total);  // what the chunks left (fewer steps than chunks)
}

// One sweep; fmas: FMAs per block and head (a multiple of 12); loads: FMAs read the L1 buffer; chunk: 0 no
// prefetches, else the chunk size (kLines: one burst at the block's start).
static float sweep(const Data* d, long fmas, int loads, int chunk) {
  float sink = 0.f;
  const long nblk = (d->ntok + kBlock - 1) / kBlock, steps = fmas / kChains;
  const long chunks = chunk ? kLines / chunk : 0;
  const long every = chunks > 1 && steps >= chunks ? steps / chunks : 1;
#pragma omp parallel reduction(+ : sink)
  {
    const long nt = omp_get_num_threads(), tid = omp_get_thread_num();
    __m512 c[kChains];
    for (int j = 0; j < kChains; ++j) c[j] = _mm512_set1_ps(1e-3f * (float)(j + 1 + tid));
    for (long h = tid; h < d->heads; h += nt)
      for (long b = 0; b < nblk; ++b) {
#define CASE(L, C) \
  case (L) * 1000 + (C): block(d, h, b, steps, L, C, every, c); break;
        switch (loads * 1000 + chunk) {
          CASE(0, 0) CASE(0, 4) CASE(0, 8) CASE(0, 16) CASE(0, 24) CASE(0, 48) CASE(0, kLines)
          CASE(1, 0) CASE(1, 4) CASE(1, 8) CASE(1, 16) CASE(1, 24) CASE(1, 48) CASE(1, kLines)
          default: break;
        }
#undef CASE
      }
    __m512 acc = c[0];
    for (int j = 1; j < kChains; ++j) acc = _mm512_add_ps(acc, c[j]);
    sink += _mm512_reduce_add_ps(acc);
  }
  return sink;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s NTOK HEADS FMAS ROUNDS\n", argv[0]);
    return 2;
  }
  const long ntok = atol(argv[1]), heads = atol(argv[2]), fmas = atol(argv[3]) / kChains * kChains;
  const long rounds = atol(argv[4]);
  if (ntok < 1 || heads < 1 || fmas < 0 || rounds < 1) {
    fprintf(stderr, "prefetch_overlap: bad arguments\n");
    return 2;
  }
  Data d = {NULL, (size_t)ntok * heads * kDim * 4, ntok, heads, NULL};
  char* base = aligned_alloc(4096, (3 * d.tensor + 4095) / 4096 * 4096);
  float* l1 = aligned_alloc(64, 64 * 16 * sizeof(float));
  if (!base || !l1) return 1;
  memset(base, 1, 3 * d.tensor);
  for (int i = 0; i < 64 * 16; ++i) l1[i] = 1e-3f * (float)(i % 97);
  d.base = base, d.l1 = l1;
  // variants: operands (0 registers, 1 L1 loads) x schedule (-1 FMAs only, 0 prefetches only, chunk size)
  static const int schedules[] = {-1, 0, kLines, 48, 24, 16, 8, 4};
  enum { kSchedules = sizeof(schedules) / sizeof(schedules[0]) };
  double* t = malloc(sizeof(double) * 2 * kSchedules * rounds);
  if (!t) return 1;
  float sink = 0.f;
  for (long r = 0; r < rounds; ++r)
    for (int v = 0; v < 2 * kSchedules; ++v) {
      const int vv = r % 2 ? 2 * kSchedules - 1 - v : v;  // alternate the order between rounds
      const int loads = vv / kSchedules, sched = schedules[vv % kSchedules];
      double best = 1e30;
      for (int k = 0; k < 5; ++k) {
        const double t0 = now_s();
        sink += sweep(&d, sched == 0 ? 0 : fmas, loads, sched < 0 ? 0 : (sched == 0 ? kLines : sched));
        const double dt = now_s() - t0;
        if (dt < best) best = dt;
      }
      t[vv * rounds + r] = best;
    }
  for (int v = 0; v < 2 * kSchedules; ++v) {
    qsort(t + v * rounds, rounds, sizeof(double), cmp_double);
    const int sched = schedules[v % kSchedules];
    char name[32];
    if (sched < 0)
      snprintf(name, sizeof name, "fmas-only");
    else if (sched == 0)
      snprintf(name, sizeof name, "prefetch-only");
    else if (sched == kLines)
      snprintf(name, sizeof name, "burst");
    else
      snprintf(name, sizeof name, "chunks-%d", sched);
    printf("%s %s %.4f\n", v / kSchedules ? "l1-loads" : "registers", name, t[v * rounds + rounds / 2] * 1e3);
  }
  fprintf(stderr, "checksum %g\n", (double)sink);
  free(t);
  free(l1);
  free(base);
  return 0;
}
