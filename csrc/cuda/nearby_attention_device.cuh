// Device code of the fused CUDA kernels of 3D nearby attention: element access, lane groups, the
// forward and backward kernels (templates on the element type and the lane-group size), and the
// host-side preparation shared by the launchers (nearby_attention_kernels.cu).
//
// Torch-free: includes only the CUDA fp16/bf16 headers, ../window.h and the host interface. The file
// is also valid host C++ once the CUDA keywords and intrinsics are shimmed, which is how
// tests/test_cuda_kernel.py runs these exact kernels on the CPU (lane groups emulated by threads).
//
// Semantics: docs/nearby_attention.md. The window maths is ../window.h, the same code the CPU kernel runs.
//
// Design (correctness first; a tiled tensor-core version is future work):
//
// * A "lane group" of G lanes (G = 1, 2, 4, 8, 16, 32 for head dims up to 8, 16, 32, 64, 128, 256)
//   owns one work item; each lane holds 8 consecutive elements of the head dim in float32 registers (one
//   16-byte load for fp16/bf16, two for fp32 when the head dim is contiguous and aligned; strided
//   scalar loads otherwise). Dot products are a lane-local FMA chain plus log2(G) xor-shuffles inside
//   the group. A CTA of 128 threads holds 128 / G groups; neighbouring groups take neighbouring
//   tokens of one head (raster order), whose windows overlap, so shared keys are served from L1.
// * Forward: item = (batch, head, query token). The group walks the query's window (window.h)
//   in raster order, kUnroll keys of a row per step (independent loads and shuffles in flight), with
//   an online softmax in the log2 domain, float32 throughout. With raster causality the walk stops
//   at the first key after the query.
// * Backward, dQ: item = (batch, head, query token); the same walk recomputes
//   P = exp(scale q.k - lse), dS = P (dO.v - delta), dQ = scale sum dS k.
// * Backward, dK/dV: item = (batch, kv head, key token). The group walks the key's inverse
//   neighbourhood (nuwa::inverse_window_on_axis per axis, which is exact because the window is a
//   product of per-axis intervals, then the raster filter) for every query head of the GQA group:
//   dV = sum P dO, dK = scale sum dS q. Each output element is written by one group: deterministic,
//   no atomics, no zero-fill.
// * Extra memory: none beyond the outputs. Offsets are int64 everywhere.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "nearby_attention_kernels.cuh"

namespace nuwa {
namespace cuda {
namespace detail {

constexpr int kThreads = 128;  // threads per CTA
constexpr int kChunk = 8;      // head-dim elements per lane
constexpr int kMinBlocks = 4;  // resident CTAs per SM to aim for (caps registers at 128 per thread)
constexpr int kMinBlocksDkv = 3;  // the dK/dV kernel holds k, v, dk, dv and two queries: 168 registers
constexpr int kUnroll = 2;     // keys (forward, dQ) or queries (dK/dV) processed per step of a row walk
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------------
// Element access: 8 consecutive head-dim elements <-> float[8].
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void store1(float* p, float x) { *p = x; }
  // p is 16-byte aligned.
  static __device__ __forceinline__ void load8(const float* p, float (&x)[kChunk]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
  static __device__ __forceinline__ void store8(float* p, const float (&x)[kChunk]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
};

// fp16 and bf16: scalar conversions and the packed pair type (two elements in 32 bits).
template <typename T>
struct Half16;

template <>
struct Half16<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float2 pair_to_float2(Pair h) { return __half22float2(h); }
  static __device__ __forceinline__ Pair pair_from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};

template <>
struct Half16<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float2 pair_to_float2(Pair h) { return __bfloat1622float2(h); }
  static __device__ __forceinline__ Pair pair_from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// 16-bit elements: 8 of them are one 16-byte word of four packed pairs.
template <typename T>
struct Elem16 {
  using H = Half16<T>;
  using Pair = typename H::Pair;
  static __device__ __forceinline__ float load1(const T* p) { return H::to_float(__ldg(p)); }
  static __device__ __forceinline__ void store1(T* p, float x) { *p = H::from_float(x); }
  static __device__ __forceinline__ void load8(const T* p, float (&x)[kChunk]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      Pair h;
      *reinterpret_cast<unsigned int*>(&h) = w[i];
      const float2 f = H::pair_to_float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store8(T* p, const float (&x)[kChunk]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Pair h = H::pair_from_floats(x[2 * i], x[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned int*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Elem<__half> : Elem16<__half> {};

template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat16> {};

// Loads this lane's 8 elements starting at p (element stride sd); vec: contiguous and 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, int64_t sd, bool vec, float (&x)[kChunk]) {
  if (vec) {
    Elem<T>::load8(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) x[i] = Elem<T>::load1(p + i * sd);
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, int64_t sd, bool vec, const float (&x)[kChunk]) {
  if (vec) {
    Elem<T>::store8(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) Elem<T>::store1(p + i * sd, x[i]);
  }
}

__device__ __forceinline__ float dot_chunk(const float (&a)[kChunk], const float (&b)[kChunk]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) s = fmaf(a[i], b[i], s);
  return s;
}

// ------------------------------------------------------------------------------------------------
// Lane groups.
// ------------------------------------------------------------------------------------------------

// Mask of the G lanes of the calling lane's group (groups are aligned to multiples of G).
template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if (G == 32) return 0xffffffffu;
  const int lane = threadIdx.x & 31;
  return ((1u << (G & 31)) - 1u) << (lane & ~(G - 1));
}

// Sum over the group; every lane of the group gets the total.
template <int G>
__device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) x += __shfl_xor_sync(mask, x, o, G);
  return x;
}

template <int G>
__device__ __forceinline__ void group_sum2(float& x, float& y, unsigned mask) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) {
    x += __shfl_xor_sync(mask, x, o, G);
    y += __shfl_xor_sync(mask, y, o, G);
  }
}

// Sums every entry of x over the group (one xor-butterfly, N independent chains for ILP).
template <int G, int N>
__device__ __forceinline__ void group_sum_n(float (&x)[N], unsigned mask) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] += __shfl_xor_sync(mask, x[j], o, G);
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel arguments (built on the host from the public structs).
// ------------------------------------------------------------------------------------------------

// Vectorisation flags (bit i: view i may use 16-byte loads/stores).
enum VecBit : unsigned {
  kVecQ = 1u << 0, kVecK = 1u << 1, kVecV = 1u << 2, kVecO = 1u << 3,
  kVecDO = 1u << 4, kVecDQ = 1u << 5, kVecDK = 1u << 6, kVecDV = 1u << 7,
};

struct FwdParams {
  Na3dFwdArgs a;
  unsigned vec;
};

struct BwdParams {
  Na3dBwdArgs a;
  unsigned vec;
};

__device__ __forceinline__ int64_t off5(const int64_t* s, int64_t b, int64_t t, int64_t h, int64_t w,
                                        int64_t head) {
  return b * s[0] + t * s[1] + h * s[2] + w * s[3] + head * s[4];
}

// ------------------------------------------------------------------------------------------------
// Kernel building blocks: the lane's place in its group, work-item decode, row loads/stores and the
// window walks (../window.h). Every kernel reads: decode the item -> load -> walk -> store.
// ------------------------------------------------------------------------------------------------

template <int N>
struct IntTag {
  static constexpr int value = N;
};

__device__ __forceinline__ void zero_chunk(float (&x)[kChunk]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) x[i] = 0.f;
}

__device__ __forceinline__ void scale_chunk(float (&x)[kChunk], float s) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) x[i] *= s;
}

// The calling lane within its group of G lanes: it owns head-dim elements [d0, d0 + kChunk) when lane_on.
struct GroupLane {
  unsigned gmask;
  int glane;
  int64_t d0;
  bool lane_on;
};

template <int G>
__device__ __forceinline__ GroupLane group_lane(int64_t head_dim) {
  GroupLane g;
  g.gmask = group_mask<G>();
  g.glane = threadIdx.x & (G - 1);
  g.d0 = static_cast<int64_t>(g.glane) * kChunk;
  g.lane_on = g.d0 < head_dim;
  return g;
}

// Grid-stride loop over `total` work items, one per group of G lanes: f(item).
template <int G, typename F>
__device__ __forceinline__ void for_each_item(int64_t total, F&& f) {
  constexpr int kGroups = kThreads / G;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; item < total;
       item += static_cast<int64_t>(gridDim.x) * kGroups) {
    f(item);
  }
}

// A token grid (T, H, W): n = T * H * W tokens.
struct TokenGrid {
  int64_t H, W, n;
};

__device__ __forceinline__ TokenGrid token_grid(const int64_t (&len)[3]) {
  TokenGrid g;
  g.H = len[1];
  g.W = len[2];
  g.n = len[0] * g.H * g.W;
  return g;
}

// One work item: token (t, h, w) (raster index n) of head `head` (a query head, or a kv head in the
// dK/dV kernel) of batch b.
struct Token {
  int64_t b, head, t, h, w, n;
};

// Items in (batch, head, token) order, token fastest: the groups of a CTA take consecutive tokens of
// one head, whose windows overlap, so their loads hit L1.
__device__ __forceinline__ Token decode_item(int64_t item, const TokenGrid& g, int64_t heads) {
  Token k;
  k.n = item % g.n;
  const int64_t bh = item / g.n;
  k.head = bh % heads;
  k.b = bh / heads;
  k.w = k.n % g.W;
  k.h = (k.n / g.W) % g.H;
  k.t = k.n / (g.W * g.H);
  return k;
}

// Offset of token k's row in a view with strides s (first five dims).
__device__ __forceinline__ int64_t token_off(const int64_t* s, const Token& k) {
  return off5(s, k.b, k.t, k.h, k.w, k.head);
}

// A view as the kernels use it: typed data pointer, strides in elements, 16-byte access flag.
template <typename P>
struct DView {
  P* data;
  const int64_t* s;
  bool vec;
};

template <typename P, typename V>
__device__ __forceinline__ DView<P> dview(const V& v, unsigned vec_flags, unsigned bit) {
  return {static_cast<P*>(v.data), v.stride, (vec_flags & bit) != 0};
}

template <typename T>
struct FwdViews {
  DView<const T> q, k, v;
  DView<T> out;
  DView<float> lse;
};

template <typename T>
__device__ __forceinline__ FwdViews<T> fwd_views(const FwdParams& p) {
  return {dview<const T>(p.a.query, p.vec, kVecQ), dview<const T>(p.a.key, p.vec, kVecK),
          dview<const T>(p.a.value, p.vec, kVecV), dview<T>(p.a.out, p.vec, kVecO), dview<float>(p.a.lse, 0u, 0u)};
}

template <typename T>
struct BwdViews {
  DView<const T> q, k, v, dout;
  DView<const float> lse, delta;
  DView<T> dq, dk, dv;
};

template <typename T>
__device__ __forceinline__ BwdViews<T> bwd_views(const BwdParams& p) {
  return {dview<const T>(p.a.query, p.vec, kVecQ),       dview<const T>(p.a.key, p.vec, kVecK),
          dview<const T>(p.a.value, p.vec, kVecV),       dview<const T>(p.a.grad_out, p.vec, kVecDO),
          dview<const float>(p.a.lse, 0u, 0u),           dview<const float>(p.a.delta, 0u, 0u),
          dview<T>(p.a.grad_query, p.vec, kVecDQ),       dview<T>(p.a.grad_key, p.vec, kVecDK),
          dview<T>(p.a.grad_value, p.vec, kVecDV)};
}

// Element of token k's row in a five-dim (row) view such as lse / delta.
template <typename P>
__device__ __forceinline__ P& row_elem(const DView<P>& v, const Token& k) {
  return v.data[token_off(v.s, k)];
}

// Loads / stores this lane's chunk (from element d0) of token k's row.
template <typename T>
__device__ __forceinline__ void load_row(const DView<const T>& v, const Token& k, int64_t d0, float (&x)[kChunk]) {
  load_chunk(v.data + token_off(v.s, k) + d0 * v.s[5], v.s[5], v.vec, x);
}

template <typename T>
__device__ __forceinline__ void store_row(const DView<T>& v, const Token& k, int64_t d0, const float (&x)[kChunk]) {
  store_chunk(v.data + token_off(v.s, k) + d0 * v.s[5], v.s[5], v.vec, x);
}

// The (batch b, head) slice of a view (from head-dim element d0 for grid views); its grid rows:
// grid_row(slice, v.s, t, h).
template <typename P>
__device__ __forceinline__ P* head_slice(const DView<P>& v, int64_t b, int64_t head) {
  return v.data + b * v.s[0] + head * v.s[4];
}

template <typename P>
__device__ __forceinline__ P* chunk_slice(const DView<P>& v, int64_t b, int64_t head, int64_t d0) {
  return head_slice(v, b, head) + d0 * v.s[5];
}

template <typename P>
__device__ __forceinline__ P* grid_row(P* slice, const int64_t* s, int64_t t, int64_t h) {
  return slice + t * s[1] + h * s[2];
}

// Walks one row [lo, hi] in steps of kUnroll entries, then one at a time: step(x, IntTag<U>{}).
template <typename StepFn>
__device__ __forceinline__ void walk_row(int64_t lo, int64_t hi, StepFn&& step) {
  int64_t x = lo;
  for (; x + kUnroll - 1 <= hi; x += kUnroll) step(x, IntTag<kUnroll>{});
  for (; x <= hi; ++x) step(x, IntTag<1>{});
}

// Walks the window of query token q in raster order, one key row at a time: row(kt, kh, kw_lo, kw_hi).
// With raster causality the first row past the query ends the walk.
template <typename RowFn>
__device__ __forceinline__ void walk_window(const WindowParams& win, const Token& q, RowFn&& row) {
  const Interval wt = window_on_axis(win, 0, q.t);
  const Interval wh = window_on_axis(win, 1, q.h);
  const Interval ww = window_on_axis(win, 2, q.w);
  const int64_t q_flat = query_row_flat(win, q.t, q.h) + q.w;  // global raster index (slabs keep the order)
  for (int64_t kt = wt.lo; kt <= wt.hi; ++kt) {
    for (int64_t kh = wh.lo; kh <= wh.hi; ++kh) {
      int64_t kw_hi = ww.hi;
      if (win.raster) {
        kw_hi = imin(kw_hi, q_flat - key_row_flat(win, kt, kh));
        if (kw_hi < ww.lo) return;
      }
      row(kt, kh, ww.lo, kw_hi);
    }
  }
}

// Queries whose window contains key token k: a box (product of per-axis inverse intervals).
struct InverseBox {
  Interval t, h, w;
};

__device__ __forceinline__ InverseBox inverse_box(const WindowParams& win, const Token& k) {
  InverseBox x;
  x.t = inverse_window_on_axis(win, 0, k.t);
  x.h = inverse_window_on_axis(win, 1, k.h);
  x.w = inverse_window_on_axis(win, 2, k.w);
  return x;
}

// Walks the box one query row at a time, with the raster filter flat(q) >= flat(k) (k_flat: the key's
// global raster index, key_row_flat + kw): row(qt, qh, qw_lo, qw_hi).
template <typename RowFn>
__device__ __forceinline__ void walk_inverse_window(const WindowParams& win, const InverseBox& box, int64_t k_flat,
                                                    RowFn&& row) {
  for (int64_t qt = box.t.lo; qt <= box.t.hi; ++qt) {
    for (int64_t qh = box.h.lo; qh <= box.h.hi; ++qh) {
      int64_t qw_lo = box.w.lo;
      if (win.raster) qw_lo = imax(qw_lo, k_flat - query_row_flat(win, qt, qh));
      row(qt, qh, qw_lo, box.w.hi);
    }
  }
}

// Per-launch constants of every kernel: the lane, the GQA group size (query heads per kv head) and the
// softmax scale (qk_scale = scale * log2(e): scores in the log2 domain).
struct KernelConsts {
  GroupLane gl;
  int64_t group;
  float scale, qk_scale;
};

template <int G>
__device__ __forceinline__ KernelConsts kernel_consts(const Na3dProblem& pr) {
  KernelConsts c;
  c.gl = group_lane<G>(pr.head_dim);
  c.group = pr.heads / pr.heads_kv;
  c.scale = static_cast<float>(pr.scale);
  c.qk_scale = c.scale * kLog2e;
  return c;
}

// Walks the keys of query token q's window (walk_window, walk_row): step(k, v, IntTag<U>{}) for the U
// consecutive keys k[u * ks[3]] and values v[u * vs[3]] of a row; kb, vb: the (batch, kv head) slices.
template <typename T, typename StepFn>
__device__ __forceinline__ void walk_window_keys(const WindowParams& win, const Token& q, const T* kb,
                                                 const int64_t* ks, const T* vb, const int64_t* vs, StepFn&& step) {
  walk_window(win, q, [&](int64_t kt, int64_t kh, int64_t kw_lo, int64_t kw_hi) {
    const T* krow = grid_row(kb, ks, kt, kh);
    const T* vrow = grid_row(vb, vs, kt, kh);
    walk_row(kw_lo, kw_hi, [&](int64_t kw, auto u) { step(krow + kw * ks[3], vrow + kw * vs[3], u); });
  });
}

// ------------------------------------------------------------------------------------------------
// Steps of the row walks: U consecutive keys (or queries) of one row at a time, with U independent
// loads and reductions in flight and, in the forward, one online-softmax rescale per step.
// ------------------------------------------------------------------------------------------------

// Forward: keys k = krow[u * ks3], u < U. q is pre-scaled by scale * log2(e); m, l, acc: the running
// max (log2 domain), sum and unnormalised output of the online softmax.
template <typename T, int G, int U>
__device__ __forceinline__ void fwd_keys(const T* krow, const T* vrow, int64_t ks3, int64_t ks5, int64_t vs3,
                                         int64_t vs5, bool vk, bool vv, bool lane_on, unsigned gmask,
                                         const float (&q)[kChunk], float& m, float& l, float (&acc)[kChunk]) {
  float vx[U][kChunk];
  float sc[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    sc[u] = 0.f;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) vx[u][i] = 0.f;
    if (lane_on) {
      float kx[kChunk];
      load_chunk(krow + u * ks3, ks5, vk, kx);
      load_chunk(vrow + u * vs3, vs5, vv, vx[u]);
      sc[u] = dot_chunk(q, kx);
    }
  }
  group_sum_n<G, U>(sc, gmask);
  float s_max = sc[0];
#pragma unroll
  for (int u = 1; u < U; ++u) s_max = fmaxf(s_max, sc[u]);
  const float m_new = fmaxf(m, s_max);
  const float alpha = exp2f(m - m_new);  // 0 on the first step (m = -inf)
  float pe[U];
  float psum = 0.f;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    pe[u] = exp2f(sc[u] - m_new);
    psum += pe[u];
  }
  l = fmaf(l, alpha, psum);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    float a = acc[i] * alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) a = fmaf(pe[u], vx[u][i], a);
    acc[i] = a;
  }
  m = m_new;
}

// dQ: keys krow[u * ks3]; dq += dS * k with P = exp2(q.k - lse2), dS = P (dO.v - delta).
template <typename T, int G, int U>
__device__ __forceinline__ void dq_keys(const T* krow, const T* vrow, int64_t ks3, int64_t ks5, int64_t vs3,
                                        int64_t vs5, bool vk, bool vv, bool lane_on, unsigned gmask,
                                        const float (&q)[kChunk], const float (&dout)[kChunk], float lse2,
                                        float dlt, float (&dq)[kChunk]) {
  float kx[U][kChunk];
  float r[2 * U];  // r[u]: score of key u; r[U + u]: dO . v_u
#pragma unroll
  for (int u = 0; u < U; ++u) {
    r[u] = 0.f;
    r[U + u] = 0.f;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) kx[u][i] = 0.f;
    if (lane_on) {
      float vx[kChunk];
      load_chunk(krow + u * ks3, ks5, vk, kx[u]);
      load_chunk(vrow + u * vs3, vs5, vv, vx);
      r[u] = dot_chunk(q, kx[u]);
      r[U + u] = dot_chunk(dout, vx);
    }
  }
  group_sum_n<G, 2 * U>(r, gmask);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const float pr = exp2f(r[u] - lse2);
    const float ds = pr * (r[U + u] - dlt);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) dq[i] = fmaf(ds, kx[u][i], dq[i]);
  }
}

// dK/dV: queries qrow[u * qs3] (with their dO, lse, delta); k is pre-scaled by scale * log2(e).
template <typename T, int G, int U>
__device__ __forceinline__ void dkv_queries(const T* qrow, const T* dorow, const float* lrow, const float* dlrow,
                                            int64_t qs3, int64_t qs5, int64_t dos3, int64_t dos5, int64_t ls3,
                                            int64_t dls3, bool vq, bool vdo, bool lane_on, unsigned gmask,
                                            const float (&kx)[kChunk], const float (&vx)[kChunk],
                                            float (&dk)[kChunk], float (&dv)[kChunk]) {
  float qx[U][kChunk], dox[U][kChunk];
  float r[2 * U];  // r[u]: score of query u; r[U + u]: dO_u . v
  float lse2[U], dlt[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    r[u] = 0.f;
    r[U + u] = 0.f;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      qx[u][i] = 0.f;
      dox[u][i] = 0.f;
    }
    if (lane_on) {
      load_chunk(qrow + u * qs3, qs5, vq, qx[u]);
      load_chunk(dorow + u * dos3, dos5, vdo, dox[u]);
      r[u] = dot_chunk(qx[u], kx);
      r[U + u] = dot_chunk(dox[u], vx);
    }
    lse2[u] = __ldg(lrow + u * ls3) * kLog2e;
    dlt[u] = __ldg(dlrow + u * dls3);
  }
  group_sum_n<G, 2 * U>(r, gmask);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const float pr = exp2f(r[u] - lse2[u]);
    const float ds = pr * (r[U + u] - dlt[u]);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      dv[i] = fmaf(pr, dox[u][i], dv[i]);
      dk[i] = fmaf(ds, qx[u][i], dk[i]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------------

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocks) na3d_fwd_kernel(const FwdParams p) {
  const Na3dProblem& pr = p.a.prob;
  const KernelConsts c = kernel_consts<G>(pr);
  const GroupLane& gl = c.gl;
  const TokenGrid qg = token_grid(pr.win.q_len);
  const FwdViews<T> V = fwd_views<T>(p);
  const int64_t *ks = V.k.s, *vs = V.v.s;

  for_each_item<G>(pr.batch * qg.n * pr.heads, [&](int64_t item) {
    const Token tok = decode_item(item, qg, pr.heads);
    const int64_t hk = tok.head / c.group;

    float q[kChunk], acc[kChunk];
    zero_chunk(q);
    zero_chunk(acc);
    if (gl.lane_on) {
      load_row(V.q, tok, gl.d0, q);
      scale_chunk(q, c.qk_scale);  // scores in the log2 domain
    }
    float m = -INFINITY;
    float l = 0.f;

    const T* kb = chunk_slice(V.k, tok.b, hk, gl.d0);
    const T* vb = chunk_slice(V.v, tok.b, hk, gl.d0);
    walk_window_keys(pr.win, tok, kb, ks, vb, vs, [&](const T* k, const T* v, auto u) {
      fwd_keys<T, G, decltype(u)::value>(k, v, ks[3], ks[5], vs[3], vs[5], V.k.vec, V.v.vec, gl.lane_on, gl.gmask, q,
                                         m, l, acc);
    });

    // Every query sees at least one key (contract section 4); l > 0 is a guard only.
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    if (gl.lane_on) {
      scale_chunk(acc, inv_l);
      store_row(V.out, tok, gl.d0, acc);
    }
    if (gl.glane == 0) row_elem(V.lse, tok) = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  });
}

// ------------------------------------------------------------------------------------------------
// Backward: dQ.
// ------------------------------------------------------------------------------------------------

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocks) na3d_bwd_dq_kernel(const BwdParams p) {
  const Na3dProblem& pr = p.a.prob;
  const KernelConsts c = kernel_consts<G>(pr);
  const GroupLane& gl = c.gl;
  const TokenGrid qg = token_grid(pr.win.q_len);
  const BwdViews<T> V = bwd_views<T>(p);
  const int64_t *ks = V.k.s, *vs = V.v.s;

  for_each_item<G>(pr.batch * qg.n * pr.heads, [&](int64_t item) {
    const Token tok = decode_item(item, qg, pr.heads);  // (batch, head, token) order, as in the forward
    const int64_t hk = tok.head / c.group;

    float q[kChunk], dout[kChunk], dq[kChunk];
    zero_chunk(q);
    zero_chunk(dout);
    zero_chunk(dq);
    if (gl.lane_on) {
      load_row(V.q, tok, gl.d0, q);
      load_row(V.dout, tok, gl.d0, dout);
      scale_chunk(q, c.qk_scale);
    }
    const float lse2 = row_elem(V.lse, tok) * kLog2e;
    const float dlt = row_elem(V.delta, tok);

    const T* kb = chunk_slice(V.k, tok.b, hk, gl.d0);
    const T* vb = chunk_slice(V.v, tok.b, hk, gl.d0);
    walk_window_keys(pr.win, tok, kb, ks, vb, vs, [&](const T* k, const T* v, auto u) {
      dq_keys<T, G, decltype(u)::value>(k, v, ks[3], ks[5], vs[3], vs[5], V.k.vec, V.v.vec, gl.lane_on, gl.gmask, q,
                                        dout, lse2, dlt, dq);
    });

    if (gl.lane_on) {
      scale_chunk(dq, c.scale);
      store_row(V.dq, tok, gl.d0, dq);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward: dK and dV, by the inverse neighbourhood of each key.
// ------------------------------------------------------------------------------------------------

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocksDkv) na3d_bwd_dkv_kernel(const BwdParams p) {
  const Na3dProblem& pr = p.a.prob;
  const WindowParams& win = pr.win;
  const KernelConsts c = kernel_consts<G>(pr);
  const GroupLane& gl = c.gl;
  const TokenGrid kg = token_grid(win.k_len);
  const BwdViews<T> V = bwd_views<T>(p);
  const int64_t *qs = V.q.s, *dos = V.dout.s, *ls = V.lse.s, *dls = V.delta.s;

  for_each_item<G>(pr.batch * kg.n * pr.heads_kv, [&](int64_t item) {
    const Token key = decode_item(item, kg, pr.heads_kv);  // (batch, kv head, token) order; key.head = kv head

    float kx[kChunk], vx[kChunk], dk[kChunk], dv[kChunk];
    zero_chunk(kx);
    zero_chunk(vx);
    zero_chunk(dk);
    zero_chunk(dv);
    if (gl.lane_on) {
      load_row(V.k, key, gl.d0, kx);
      load_row(V.v, key, gl.d0, vx);
      scale_chunk(kx, c.qk_scale);
    }

    const InverseBox box = inverse_box(win, key);
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t head = key.head * c.group + g;
      const T* qb = chunk_slice(V.q, key.b, head, gl.d0);
      const T* dob = chunk_slice(V.dout, key.b, head, gl.d0);
      const float* lb = head_slice(V.lse, key.b, head);
      const float* dlb = head_slice(V.delta, key.b, head);
      walk_inverse_window(win, box, key_row_flat(win, key.t, key.h) + key.w, [&](int64_t qt, int64_t qh, int64_t qw_lo, int64_t qw_hi) {
        const T* qrow = grid_row(qb, qs, qt, qh);
        const T* dorow = grid_row(dob, dos, qt, qh);
        const float* lrow = grid_row(lb, ls, qt, qh);
        const float* dlrow = grid_row(dlb, dls, qt, qh);
        walk_row(qw_lo, qw_hi, [&](int64_t qw, auto u) {
          dkv_queries<T, G, decltype(u)::value>(qrow + qw * qs[3], dorow + qw * dos[3], lrow + qw * ls[3],
                                                dlrow + qw * dls[3], qs[3], qs[5], dos[3], dos[5], ls[3], dls[3],
                                                V.q.vec, V.dout.vec, gl.lane_on, gl.gmask, kx, vx, dk, dv);
        });
      });
    }

    if (gl.lane_on) {
      scale_chunk(dk, c.scale);
      store_row(V.dk, key, gl.d0, dk);
      store_row(V.dv, key, gl.d0, dv);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

template <int G>
struct GroupTag {
  static constexpr int value = G;
};

// Calls f(TypeTag<T>{}, GroupTag<G>{}) for the problem's dtype and head-dim bucket.
template <typename F>
cudaError_t dispatch(const Na3dProblem& pr, F&& f) {
  const int64_t d = pr.head_dim;
  auto by_group = [&](auto type_tag) -> cudaError_t {
    if (d <= 8) return f(type_tag, GroupTag<1>{});
    if (d <= 16) return f(type_tag, GroupTag<2>{});
    if (d <= 32) return f(type_tag, GroupTag<4>{});
    if (d <= 64) return f(type_tag, GroupTag<8>{});
    if (d <= 128) return f(type_tag, GroupTag<16>{});
    return f(type_tag, GroupTag<32>{});
  };
  switch (pr.dtype) {
    case kFloat32: return by_group(TypeTag<float>{});
    case kFloat16: return by_group(TypeTag<__half>{});
    case kBFloat16: return by_group(TypeTag<__nv_bfloat16>{});
    default: return cudaErrorInvalidValue;
  }
}

inline size_t elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Whether a grid-layout view may use 16-byte accesses: contiguous head dim, 16-byte aligned base,
// and every other stride (of a dim longer than 1) a multiple of 16 bytes.
inline bool vec_ok(const void* data, const int64_t* stride, const int64_t* size, size_t elem) {
  if (stride[5] != 1) return false;
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int i = 0; i < 5; ++i) {
    if (size[i] > 1 && (stride[i] * static_cast<int64_t>(elem)) % 16 != 0) return false;
  }
  return true;
}

inline void q_sizes(const Na3dProblem& pr, int64_t (&s)[6]) {
  s[0] = pr.batch; s[1] = pr.win.q_len[0]; s[2] = pr.win.q_len[1]; s[3] = pr.win.q_len[2];
  s[4] = pr.heads; s[5] = pr.head_dim;
}

inline void k_sizes(const Na3dProblem& pr, int64_t (&s)[6]) {
  s[0] = pr.batch; s[1] = pr.win.k_len[0]; s[2] = pr.win.k_len[1]; s[3] = pr.win.k_len[2];
  s[4] = pr.heads_kv; s[5] = pr.head_dim;
}

// Blocks for `items` work items at kThreads / G items per block (grid-stride loops cover the rest).
template <int G>
inline unsigned grid_for(int64_t items) {
  constexpr int64_t per_block = kThreads / G;
  int64_t blocks = (items + per_block - 1) / per_block;
  const int64_t cap = int64_t(1) << 30;  // gridDim.x limit is 2^31 - 1
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks);
}

inline const char* check_problem(const Na3dProblem& pr) {
  if (pr.dtype != kFloat32 && pr.dtype != kFloat16 && pr.dtype != kBFloat16)
    return "dtype must be float32, float16 or bfloat16";
  if (pr.head_dim < kMinHeadDim || pr.head_dim > kMaxHeadDim || pr.head_dim % 8 != 0)
    return "head_dim must be a multiple of 8 in [8, 256]";
  if (pr.heads <= 0 || pr.heads_kv <= 0 || pr.heads % pr.heads_kv != 0)
    return "heads must be a positive multiple of heads_kv";
  if (pr.batch < 0) return "batch must be non-negative";
  for (int a = 0; a < 3; ++a) {
    if (pr.win.q_len[a] < 0 || pr.win.k_len[a] < 0) return "grid extents must be non-negative";
    if (pr.win.kernel[a] < 1) return "kernel sizes must be positive";
  }
  return nullptr;
}


// Token counts of the query and key grids.
inline int64_t n_tokens(const int64_t (&len)[3]) { return len[0] * len[1] * len[2]; }

// Element size and view sizes of a call, for the vectorisation flags.
struct ViewShapes {
  size_t es;
  int64_t q[6], k[6];
};

inline ViewShapes view_shapes(const Na3dProblem& pr) {
  ViewShapes v;
  v.es = elem_size(pr.dtype);
  q_sizes(pr, v.q);
  k_sizes(pr, v.k);
  return v;
}

// `bit` when the view may use 16-byte accesses (vec_ok), else 0.
template <typename View>
inline unsigned vec_bit(const View& v, const int64_t* size, size_t es, unsigned bit) {
  return vec_ok(v.data, v.stride, size, es) ? bit : 0u;
}

// Flags of query, key and value (both argument structs have them).
template <typename Args>
inline unsigned qkv_vec_bits(const Args& args, const ViewShapes& sh) {
  return vec_bit(args.query, sh.q, sh.es, kVecQ) | vec_bit(args.key, sh.k, sh.es, kVecK) |
         vec_bit(args.value, sh.k, sh.es, kVecV);
}

// Validates a forward call and builds the kernel parameters; total = work items (0: nothing to do).
inline cudaError_t prepare_fwd(const Na3dFwdArgs& args, FwdParams& p, int64_t& total) {
  const Na3dProblem& pr = args.prob;
  total = 0;
  if (check_problem(pr) != nullptr) return cudaErrorInvalidValue;
  const int64_t n_q = n_tokens(pr.win.q_len), n_k = n_tokens(pr.win.k_len);
  const int64_t items = pr.batch * n_q * pr.heads;
  if (items == 0) return cudaSuccess;
  if (n_k == 0) return cudaErrorInvalidValue;  // queries without keys: nothing to attend to
  if (args.query.data == nullptr || args.key.data == nullptr || args.value.data == nullptr ||
      args.out.data == nullptr || args.lse.data == nullptr)
    return cudaErrorInvalidValue;
  p.a = args;
  const ViewShapes sh = view_shapes(pr);
  p.vec = qkv_vec_bits(args, sh) | vec_bit(args.out, sh.q, sh.es, kVecO);
  total = items;
  return cudaSuccess;
}

// Validates a backward call and builds the kernel parameters; total_q / total_k = work items of the
// dQ and dK/dV kernels (0: that kernel has nothing to do).
inline cudaError_t prepare_bwd(const Na3dBwdArgs& args, BwdParams& p, int64_t& total_q, int64_t& total_k) {
  const Na3dProblem& pr = args.prob;
  total_q = total_k = 0;
  if (check_problem(pr) != nullptr) return cudaErrorInvalidValue;
  const int64_t n_q = n_tokens(pr.win.q_len), n_k = n_tokens(pr.win.k_len);
  const int64_t items_q = pr.batch * n_q * pr.heads;
  const int64_t items_k = pr.batch * n_k * pr.heads_kv;
  if (items_q == 0 && items_k == 0) return cudaSuccess;
  if (items_q > 0 && n_k == 0) return cudaErrorInvalidValue;  // queries without keys
  if (items_k > 0 && (args.grad_key.data == nullptr || args.grad_value.data == nullptr))
    return cudaErrorInvalidValue;
  if (items_q > 0 && (args.grad_query.data == nullptr || args.query.data == nullptr ||
                      args.grad_out.data == nullptr || args.lse.data == nullptr || args.delta.data == nullptr))
    return cudaErrorInvalidValue;
  if (items_k > 0 && n_q > 0 && (args.key.data == nullptr || args.value.data == nullptr))
    return cudaErrorInvalidValue;
  p.a = args;
  const ViewShapes sh = view_shapes(pr);
  p.vec = qkv_vec_bits(args, sh) | vec_bit(args.grad_out, sh.q, sh.es, kVecDO) |
          vec_bit(args.grad_query, sh.q, sh.es, kVecDQ) | vec_bit(args.grad_key, sh.k, sh.es, kVecDK) |
          vec_bit(args.grad_value, sh.k, sh.es, kVecDV);
  total_q = items_q;
  total_k = items_k;
  return cudaSuccess;
}

}  // namespace detail
}  // namespace cuda
}  // namespace nuwa
