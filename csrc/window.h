// The window maths of 3D nearby attention, for host and device code alike.
//
// This header is the single C++ source of truth for which keys a query may see. It is included
// by the fused CPU kernel (csrc/cpu/) and by the CUDA kernels (csrc/cuda/), so the CPU tests
// exercise the exact code the GPU runs. It mirrors nuwa_kernels/window.py rule for rule; the tests
// compare the two on every axis setting. It includes no torch or CUDA headers.
//
// Semantics: ../shared/spec/nearby_attention.md, sections 3, 3a and 4. Dilation is not here: the
// Python layer runs each dilation group as its own call on strided views (docs/DESIGN.md).
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
//
// Slabs: the query and key tensors of a call may be slabs of larger global grids (context
// parallelism, tiled inference). Windows follow the global grids q_full / k_full; the local
// query element 0 sits at global coordinate q_org, the local key element 0 at k_org, and keys
// outside the local key slab are absent. Without a slab, q_full == q_len, k_full == k_len and
// the origins are 0.
struct WindowParams {
  int64_t q_len[3];    // local query extents (T, H, W)
  int64_t k_len[3];    // local key extents (Tk, Hk, Wk)
  int64_t kernel[3];   // (kt, kh, kw)
  int64_t stride[3];   // query blocks sharing their leader's window (1 = every query its own)
  bool causal[3];      // per-axis causal flags
  bool raster;         // raster-order causality: flat(key) <= flat(query), global flat indices
  bool shift;          // border="shift" (NATTEN) instead of "truncate" (NUWA)
  int64_t q_org[3];    // global coordinate of local query element 0
  int64_t k_org[3];    // global coordinate of local key element 0
  int64_t q_full[3];   // global query grid the windows follow
  int64_t k_full[3];   // global key grid
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

// The query whose window every query of i's stride block uses (section 3a): the block's middle on
// a non-causal axis, its last position on a causal one, clamped to the axis.
NUWA_HD int64_t stride_leader(int64_t i, int64_t lq, int64_t s, bool causal) {
  return imin((i / s) * s + (causal ? s - 1 : s / 2), lq - 1);
}

// Inclusive key interval seen by query coordinate i on one (global) axis.
NUWA_HD Interval axis_window(int64_t i, int64_t lq, int64_t lk, int64_t k, bool causal, bool shift, int64_t s = 1) {
  const int64_t c = map_centre(stride_leader(i, lq, s, causal), lq, lk);
  if (causal) return {imax(c - k + 1, 0), map_centre(i, lq, lk)};
  const int64_t left = k / 2;
  const int64_t right = k - 1 - left;
  if (shift) {
    if (k >= lk) return {0, lk - 1};
    const int64_t start = imin(imax(c - left, 0), lk - k);
    return {start, start + k - 1};
  }
  return {imax(c - left, 0), imin(c + right, lk - 1)};
}

// Local key interval of local query coordinate i: the global window, moved into the key slab and
// cut at its ends.
NUWA_HD Interval window_on_axis(const WindowParams& p, int axis, int64_t i) {
  const Interval g = axis_window(i + p.q_org[axis], p.q_full[axis], p.k_full[axis], p.kernel[axis], p.causal[axis],
                                 p.shift, p.stride[axis]);
  return {imax(g.lo - p.k_org[axis], 0), imin(g.hi - p.k_org[axis], p.k_len[axis] - 1)};
}

// Local query interval whose windows contain local key coordinate j on one axis (the inverse
// neighbourhood, for dK/dV without atomics). lo(i) and hi(i) are non-decreasing in i (strides and
// slabs included), so the set is an interval, found by two binary searches over window_on_axis
// (no second derivation).
NUWA_HD Interval inverse_window_on_axis(const WindowParams& p, int axis, int64_t j) {
  int64_t a = 0, b = p.q_len[axis];  // first i with hi(i) >= j
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (window_on_axis(p, axis, m).hi >= j) b = m; else a = m + 1;
  }
  const int64_t first = a;
  a = 0; b = p.q_len[axis];  // first i with lo(i) > j
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (window_on_axis(p, axis, m).lo <= j) a = m + 1; else b = m;
  }
  return {first, a - 1};
}

// Flat raster index of (t, h, w) on a grid of extents len[3].
NUWA_HD int64_t raster_index(int64_t t, int64_t h, int64_t w, const int64_t* len) {
  return (t * len[1] + h) * len[2] + w;
}

// Global flat raster index of local query (t, h, 0) / local key (t, h, 0); local column w adds w.
// Raster causality compares these (flat(key) <= flat(query)), so slabs keep the global order.
NUWA_HD int64_t query_row_flat(const WindowParams& p, int64_t t, int64_t h) {
  return raster_index(t + p.q_org[0], h + p.q_org[1], p.q_org[2], p.q_full);
}
NUWA_HD int64_t key_row_flat(const WindowParams& p, int64_t t, int64_t h) {
  return raster_index(t + p.k_org[0], h + p.k_org[1], p.k_org[2], p.k_full);
}

}  // namespace nuwa
