// Helpers shared by the CPU stand-ins (read_pattern.c, prefetch_overlap.c): a monotonic clock and the
// comparison qsort needs for medians and minima.
#pragma once
#include <time.h>

static inline double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}
