// The window maths of 3D nearby attention, for host and device code alike.
//
// This header is the single C++ source of truth for which keys a query may see. It is included
// by the fused CPU kernel (csrc/cpu/) and by the CUDA kernels (csrc/cuda/), so the CPU tests
// exercise the exact code the GPU runs. It mirrors nuwa_kernels/window.py rule for rule; the tests
// compare the two on every axis setting. It includes no torch or CUDA headers.
//
// Semantics: ../shared/spec/nearby_attention.md, sections 3 and 4.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NUWA_HD __host__ __device__ __forceinline__
#else
#define NUWA_HD inline
#endif

namespace nuwa {

// Normalised semantic arguments of one call. Kernel sizes are positive ints: the Python layer
// replaces None (the whole axis) by 2 * Lk - 1, which covers the whole axis in every mode.
struct WindowParams {
  int64_t q_len[3];    // query grid (T, H, W)
  int64_t k_len[3];    // key grid (Tk, Hk, Wk)
  int64_t kernel[3];   // (kt, kh, kw)
  bool causal[3];      // per-axis causal flags
  bool raster;         // raster-order causality: flat(key) <= flat(query)
  bool shift;          // border="shift" (NATTEN) instead of "truncate" (NUWA)
};

// An inclusive interval [lo, hi]; empty when lo > hi.
struct Interval {
  int64_t lo;
  int64_t hi;
};

// Key-axis centre of query coordinate i: floor(i * Lk / Lq).
NUWA_HD int64_t map_centre(int64_t i, int64_t lq, int64_t lk) { return (i * lk) / lq; }

NUWA_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
NUWA_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Inclusive key interval seen by query coordinate i on one axis.
NUWA_HD Interval axis_window(int64_t i, int64_t lq, int64_t lk, int64_t k, bool causal, bool shift) {
  const int64_t c = map_centre(i, lq, lk);
  if (causal) return {imax(c - k + 1, 0), c};
  const int64_t left = k / 2;
  const int64_t right = k - 1 - left;
  if (shift) {
    if (k >= lk) return {0, lk - 1};
    const int64_t start = imin(imax(c - left, 0), lk - k);
    return {start, start + k - 1};
  }
  return {imax(c - left, 0), imin(c + right, lk - 1)};
}

// Inclusive query interval whose windows contain key coordinate j on one axis (the inverse
// neighbourhood, for dK/dV without atomics). lo(i) and hi(i) are non-decreasing in i, so the set
// is an interval, found by two binary searches over axis_window (no second derivation).
NUWA_HD Interval axis_inverse_window(int64_t j, int64_t lq, int64_t lk, int64_t k, bool causal, bool shift) {
  int64_t a = 0, b = lq;  // first i with hi(i) >= j
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (axis_window(m, lq, lk, k, causal, shift).hi >= j) b = m; else a = m + 1;
  }
  const int64_t first = a;
  a = 0; b = lq;  // first i with lo(i) > j
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (axis_window(m, lq, lk, k, causal, shift).lo <= j) a = m + 1; else b = m;
  }
  return {first, a - 1};
}

NUWA_HD Interval window_on_axis(const WindowParams& p, int axis, int64_t i) {
  return axis_window(i, p.q_len[axis], p.k_len[axis], p.kernel[axis], p.causal[axis], p.shift);
}

NUWA_HD Interval inverse_window_on_axis(const WindowParams& p, int axis, int64_t j) {
  return axis_inverse_window(j, p.q_len[axis], p.k_len[axis], p.kernel[axis], p.causal[axis], p.shift);
}

// Flat raster index of (t, h, w) on a grid of extents len[3].
NUWA_HD int64_t raster_index(int64_t t, int64_t h, int64_t w, const int64_t* len) {
  return (t * len[1] + h) * len[2] + w;
}

}  // namespace nuwa
