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

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load1(const __half* p) { return __half2float(__ldg(p)); }
  static __device__ __forceinline__ void store1(__half* p, float x) { *p = __float2half_rn(x); }
  static __device__ __forceinline__ void load8(const __half* p, float (&x)[kChunk]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      *reinterpret_cast<unsigned int*>(&h) = w[i];
      const float2 f = __half22float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store8(__half* p, const float (&x)[kChunk]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned int*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&x)[kChunk]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 h;
      *reinterpret_cast<unsigned int*>(&h) = w[i];
      const float2 f = __bfloat1622float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&x)[kChunk]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned int*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

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
  constexpr int kGroups = kThreads / G;
  const Na3dProblem& pr = p.a.prob;
  const WindowParams& win = pr.win;
  const unsigned gmask = group_mask<G>();
  const int glane = threadIdx.x & (G - 1);
  const int64_t d0 = static_cast<int64_t>(glane) * kChunk;
  const bool lane_on = d0 < pr.head_dim;

  const int64_t Hq = win.q_len[1], Wq = win.q_len[2];
  const int64_t n_q = win.q_len[0] * Hq * Wq;
  const int64_t heads = pr.heads;
  const int64_t group = pr.heads / pr.heads_kv;
  const int64_t total = pr.batch * n_q * heads;
  const float qk_scale = static_cast<float>(pr.scale) * kLog2e;

  const T* __restrict__ qp = static_cast<const T*>(p.a.query.data);
  const T* __restrict__ kp = static_cast<const T*>(p.a.key.data);
  const T* __restrict__ vp = static_cast<const T*>(p.a.value.data);
  T* __restrict__ op = static_cast<T*>(p.a.out.data);
  float* __restrict__ lp = static_cast<float*>(p.a.lse.data);
  const int64_t* qs = p.a.query.stride;
  const int64_t* ks = p.a.key.stride;
  const int64_t* vs = p.a.value.stride;
  const int64_t* os = p.a.out.stride;
  const bool vq = p.vec & kVecQ, vk = p.vec & kVecK, vv = p.vec & kVecV, vo = p.vec & kVecO;

  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; item < total;
       item += static_cast<int64_t>(gridDim.x) * kGroups) {
    // Items in (batch, head, token) order, token fastest: the groups of a CTA take consecutive
    // queries of one head, whose windows overlap, so their key/value loads hit L1.
    const int64_t n = item % n_q;  // raster index of the query
    const int64_t bh = item / n_q;
    const int64_t head = bh % heads;
    const int64_t b = bh / heads;
    const int64_t w = n % Wq;
    const int64_t h = (n / Wq) % Hq;
    const int64_t t = n / (Wq * Hq);
    const int64_t hk = head / group;

    float q[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) q[i] = 0.f;
    if (lane_on) {
      load_chunk(qp + off5(qs, b, t, h, w, head) + d0 * qs[5], qs[5], vq, q);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) q[i] *= qk_scale;  // scores in the log2 domain
    }
    float acc[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc[i] = 0.f;
    float m = -INFINITY;
    float l = 0.f;

    const Interval wt = window_on_axis(win, 0, t);
    const Interval wh = window_on_axis(win, 1, h);
    const Interval ww = window_on_axis(win, 2, w);
    const T* kb = kp + b * ks[0] + hk * ks[4] + d0 * ks[5];
    const T* vb = vp + b * vs[0] + hk * vs[4] + d0 * vs[5];
    bool done = false;
    for (int64_t kt = wt.lo; kt <= wt.hi && !done; ++kt) {
      for (int64_t kh = wh.lo; kh <= wh.hi; ++kh) {
        int64_t kw_hi = ww.hi;
        if (win.raster) {
          // Keys are walked in raster order: the first row past the query ends the walk.
          kw_hi = imin(kw_hi, n - raster_index(kt, kh, 0, win.k_len));
          if (kw_hi < ww.lo) {
            done = true;
            break;
          }
        }
        const T* krow = kb + kt * ks[1] + kh * ks[2];
        const T* vrow = vb + kt * vs[1] + kh * vs[2];
        int64_t kw = ww.lo;
        for (; kw + kUnroll - 1 <= kw_hi; kw += kUnroll) {
          fwd_keys<T, G, kUnroll>(krow + kw * ks[3], vrow + kw * vs[3], ks[3], ks[5], vs[3], vs[5], vk, vv,
                                  lane_on, gmask, q, m, l, acc);
        }
        for (; kw <= kw_hi; ++kw) {
          fwd_keys<T, G, 1>(krow + kw * ks[3], vrow + kw * vs[3], ks[3], ks[5], vs[3], vs[5], vk, vv, lane_on,
                            gmask, q, m, l, acc);
        }
      }
    }

    // Every query sees at least one key (contract section 4); l > 0 is a guard only.
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    if (lane_on) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc[i] *= inv_l;
      store_chunk(op + off5(os, b, t, h, w, head) + d0 * os[5], os[5], vo, acc);
    }
    if (glane == 0) {
      lp[off5(p.a.lse.stride, b, t, h, w, head)] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: dQ.
// ------------------------------------------------------------------------------------------------

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocks) na3d_bwd_dq_kernel(const BwdParams p) {
  constexpr int kGroups = kThreads / G;
  const Na3dProblem& pr = p.a.prob;
  const WindowParams& win = pr.win;
  const unsigned gmask = group_mask<G>();
  const int glane = threadIdx.x & (G - 1);
  const int64_t d0 = static_cast<int64_t>(glane) * kChunk;
  const bool lane_on = d0 < pr.head_dim;

  const int64_t Hq = win.q_len[1], Wq = win.q_len[2];
  const int64_t n_q = win.q_len[0] * Hq * Wq;
  const int64_t heads = pr.heads;
  const int64_t group = pr.heads / pr.heads_kv;
  const int64_t total = pr.batch * n_q * heads;
  const float scale = static_cast<float>(pr.scale);
  const float qk_scale = scale * kLog2e;

  const T* __restrict__ qp = static_cast<const T*>(p.a.query.data);
  const T* __restrict__ kp = static_cast<const T*>(p.a.key.data);
  const T* __restrict__ vp = static_cast<const T*>(p.a.value.data);
  const T* __restrict__ dop = static_cast<const T*>(p.a.grad_out.data);
  const float* __restrict__ lp = static_cast<const float*>(p.a.lse.data);
  const float* __restrict__ dlp = static_cast<const float*>(p.a.delta.data);
  T* __restrict__ dqp = static_cast<T*>(p.a.grad_query.data);
  const int64_t* qs = p.a.query.stride;
  const int64_t* ks = p.a.key.stride;
  const int64_t* vs = p.a.value.stride;
  const int64_t* dos = p.a.grad_out.stride;
  const int64_t* dqs = p.a.grad_query.stride;
  const bool vq = p.vec & kVecQ, vk = p.vec & kVecK, vv = p.vec & kVecV;
  const bool vdo = p.vec & kVecDO, vdq = p.vec & kVecDQ;

  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; item < total;
       item += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t n = item % n_q;  // (batch, head, token) order, as in the forward
    const int64_t bh = item / n_q;
    const int64_t head = bh % heads;
    const int64_t b = bh / heads;
    const int64_t w = n % Wq;
    const int64_t h = (n / Wq) % Hq;
    const int64_t t = n / (Wq * Hq);
    const int64_t hk = head / group;

    float q[kChunk], dout[kChunk], dq[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      q[i] = 0.f;
      dout[i] = 0.f;
      dq[i] = 0.f;
    }
    if (lane_on) {
      load_chunk(qp + off5(qs, b, t, h, w, head) + d0 * qs[5], qs[5], vq, q);
      load_chunk(dop + off5(dos, b, t, h, w, head) + d0 * dos[5], dos[5], vdo, dout);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) q[i] *= qk_scale;
    }
    const float lse2 = lp[off5(p.a.lse.stride, b, t, h, w, head)] * kLog2e;
    const float dlt = dlp[off5(p.a.delta.stride, b, t, h, w, head)];

    const Interval wt = window_on_axis(win, 0, t);
    const Interval wh = window_on_axis(win, 1, h);
    const Interval ww = window_on_axis(win, 2, w);
    const T* kb = kp + b * ks[0] + hk * ks[4] + d0 * ks[5];
    const T* vb = vp + b * vs[0] + hk * vs[4] + d0 * vs[5];
    bool done = false;
    for (int64_t kt = wt.lo; kt <= wt.hi && !done; ++kt) {
      for (int64_t kh = wh.lo; kh <= wh.hi; ++kh) {
        int64_t kw_hi = ww.hi;
        if (win.raster) {
          kw_hi = imin(kw_hi, n - raster_index(kt, kh, 0, win.k_len));
          if (kw_hi < ww.lo) {
            done = true;
            break;
          }
        }
        const T* krow = kb + kt * ks[1] + kh * ks[2];
        const T* vrow = vb + kt * vs[1] + kh * vs[2];
        int64_t kw = ww.lo;
        for (; kw + kUnroll - 1 <= kw_hi; kw += kUnroll) {
          dq_keys<T, G, kUnroll>(krow + kw * ks[3], vrow + kw * vs[3], ks[3], ks[5], vs[3], vs[5], vk, vv,
                                 lane_on, gmask, q, dout, lse2, dlt, dq);
        }
        for (; kw <= kw_hi; ++kw) {
          dq_keys<T, G, 1>(krow + kw * ks[3], vrow + kw * vs[3], ks[3], ks[5], vs[3], vs[5], vk, vv, lane_on,
                           gmask, q, dout, lse2, dlt, dq);
        }
      }
    }
    if (lane_on) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) dq[i] *= scale;
      store_chunk(dqp + off5(dqs, b, t, h, w, head) + d0 * dqs[5], dqs[5], vdq, dq);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: dK and dV, by the inverse neighbourhood of each key.
// ------------------------------------------------------------------------------------------------

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocksDkv) na3d_bwd_dkv_kernel(const BwdParams p) {
  constexpr int kGroups = kThreads / G;
  const Na3dProblem& pr = p.a.prob;
  const WindowParams& win = pr.win;
  const unsigned gmask = group_mask<G>();
  const int glane = threadIdx.x & (G - 1);
  const int64_t d0 = static_cast<int64_t>(glane) * kChunk;
  const bool lane_on = d0 < pr.head_dim;

  const int64_t Hk = win.k_len[1], Wk = win.k_len[2];
  const int64_t n_k = win.k_len[0] * Hk * Wk;
  const int64_t heads_kv = pr.heads_kv;
  const int64_t group = pr.heads / pr.heads_kv;
  const int64_t total = pr.batch * n_k * heads_kv;
  const float scale = static_cast<float>(pr.scale);
  const float qk_scale = scale * kLog2e;

  const T* __restrict__ qp = static_cast<const T*>(p.a.query.data);
  const T* __restrict__ kp = static_cast<const T*>(p.a.key.data);
  const T* __restrict__ vp = static_cast<const T*>(p.a.value.data);
  const T* __restrict__ dop = static_cast<const T*>(p.a.grad_out.data);
  const float* __restrict__ lp = static_cast<const float*>(p.a.lse.data);
  const float* __restrict__ dlp = static_cast<const float*>(p.a.delta.data);
  T* __restrict__ dkp = static_cast<T*>(p.a.grad_key.data);
  T* __restrict__ dvp = static_cast<T*>(p.a.grad_value.data);
  const int64_t* qs = p.a.query.stride;
  const int64_t* ks = p.a.key.stride;
  const int64_t* vs = p.a.value.stride;
  const int64_t* dos = p.a.grad_out.stride;
  const int64_t* ls = p.a.lse.stride;
  const int64_t* dls = p.a.delta.stride;
  const int64_t* dks = p.a.grad_key.stride;
  const int64_t* dvs = p.a.grad_value.stride;
  const bool vq = p.vec & kVecQ, vk = p.vec & kVecK, vv = p.vec & kVecV;
  const bool vdo = p.vec & kVecDO, vdk = p.vec & kVecDK, vdv = p.vec & kVecDV;

  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; item < total;
       item += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t nk = item % n_k;  // raster index of the key; (batch, kv head, token) order
    const int64_t bh = item / n_k;
    const int64_t hk = bh % heads_kv;
    const int64_t b = bh / heads_kv;
    const int64_t kw = nk % Wk;
    const int64_t kh = (nk / Wk) % Hk;
    const int64_t kt = nk / (Wk * Hk);

    float kx[kChunk], vx[kChunk], dk[kChunk], dv[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      kx[i] = 0.f;
      vx[i] = 0.f;
      dk[i] = 0.f;
      dv[i] = 0.f;
    }
    if (lane_on) {
      load_chunk(kp + off5(ks, b, kt, kh, kw, hk) + d0 * ks[5], ks[5], vk, kx);
      load_chunk(vp + off5(vs, b, kt, kh, kw, hk) + d0 * vs[5], vs[5], vv, vx);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) kx[i] *= qk_scale;
    }

    // Queries whose window contains this key: a box (product of per-axis inverse intervals).
    const Interval it = inverse_window_on_axis(win, 0, kt);
    const Interval ih = inverse_window_on_axis(win, 1, kh);
    const Interval iw = inverse_window_on_axis(win, 2, kw);

    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = hk * group + g;
      const T* qb = qp + b * qs[0] + head * qs[4] + d0 * qs[5];
      const T* dob = dop + b * dos[0] + head * dos[4] + d0 * dos[5];
      const float* lb = lp + b * ls[0] + head * ls[4];
      const float* dlb = dlp + b * dls[0] + head * dls[4];
      for (int64_t qt = it.lo; qt <= it.hi; ++qt) {
        for (int64_t qh = ih.lo; qh <= ih.hi; ++qh) {
          int64_t qw_lo = iw.lo;
          if (win.raster) qw_lo = imax(qw_lo, nk - raster_index(qt, qh, 0, win.q_len));  // flat(q) >= flat(k)
          const T* qrow = qb + qt * qs[1] + qh * qs[2];
          const T* dorow = dob + qt * dos[1] + qh * dos[2];
          const float* lrow = lb + qt * ls[1] + qh * ls[2];
          const float* dlrow = dlb + qt * dls[1] + qh * dls[2];
          int64_t qw = qw_lo;
          for (; qw + kUnroll - 1 <= iw.hi; qw += kUnroll) {
            dkv_queries<T, G, kUnroll>(qrow + qw * qs[3], dorow + qw * dos[3], lrow + qw * ls[3],
                                       dlrow + qw * dls[3], qs[3], qs[5], dos[3], dos[5], ls[3], dls[3], vq, vdo,
                                       lane_on, gmask, kx, vx, dk, dv);
          }
          for (; qw <= iw.hi; ++qw) {
            dkv_queries<T, G, 1>(qrow + qw * qs[3], dorow + qw * dos[3], lrow + qw * ls[3], dlrow + qw * dls[3],
                                 qs[3], qs[5], dos[3], dos[5], ls[3], dls[3], vq, vdo, lane_on, gmask, kx, vx, dk,
                                 dv);
          }
        }
      }
    }
    if (lane_on) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) dk[i] *= scale;
      store_chunk(dkp + off5(dks, b, kt, kh, kw, hk) + d0 * dks[5], dks[5], vdk, dk);
      store_chunk(dvp + off5(dvs, b, kt, kh, kw, hk) + d0 * dvs[5], dvs[5], vdv, dv);
    }
  }
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


// Validates a forward call and builds the kernel parameters; total = work items (0: nothing to do).
inline cudaError_t prepare_fwd(const Na3dFwdArgs& args, FwdParams& p, int64_t& total) {
  const Na3dProblem& pr = args.prob;
  total = 0;
  if (check_problem(pr) != nullptr) return cudaErrorInvalidValue;
  const int64_t n_q = pr.win.q_len[0] * pr.win.q_len[1] * pr.win.q_len[2];
  const int64_t n_k = pr.win.k_len[0] * pr.win.k_len[1] * pr.win.k_len[2];
  const int64_t items = pr.batch * n_q * pr.heads;
  if (items == 0) return cudaSuccess;
  if (n_k == 0) return cudaErrorInvalidValue;  // queries without keys: nothing to attend to
  if (args.query.data == nullptr || args.key.data == nullptr || args.value.data == nullptr ||
      args.out.data == nullptr || args.lse.data == nullptr)
    return cudaErrorInvalidValue;
  p.a = args;
  const size_t es = elem_size(pr.dtype);
  int64_t qsz[6], ksz[6];
  q_sizes(pr, qsz);
  k_sizes(pr, ksz);
  p.vec = 0;
  if (vec_ok(args.query.data, args.query.stride, qsz, es)) p.vec |= kVecQ;
  if (vec_ok(args.key.data, args.key.stride, ksz, es)) p.vec |= kVecK;
  if (vec_ok(args.value.data, args.value.stride, ksz, es)) p.vec |= kVecV;
  if (vec_ok(args.out.data, args.out.stride, qsz, es)) p.vec |= kVecO;
  total = items;
  return cudaSuccess;
}

// Validates a backward call and builds the kernel parameters; total_q / total_k = work items of the
// dQ and dK/dV kernels (0: that kernel has nothing to do).
inline cudaError_t prepare_bwd(const Na3dBwdArgs& args, BwdParams& p, int64_t& total_q, int64_t& total_k) {
  const Na3dProblem& pr = args.prob;
  total_q = total_k = 0;
  if (check_problem(pr) != nullptr) return cudaErrorInvalidValue;
  const int64_t n_q = pr.win.q_len[0] * pr.win.q_len[1] * pr.win.q_len[2];
  const int64_t n_k = pr.win.k_len[0] * pr.win.k_len[1] * pr.win.k_len[2];
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
  const size_t es = elem_size(pr.dtype);
  int64_t qsz[6], ksz[6];
  q_sizes(pr, qsz);
  k_sizes(pr, ksz);
  p.vec = 0;
  if (vec_ok(args.query.data, args.query.stride, qsz, es)) p.vec |= kVecQ;
  if (vec_ok(args.key.data, args.key.stride, ksz, es)) p.vec |= kVecK;
  if (vec_ok(args.value.data, args.value.stride, ksz, es)) p.vec |= kVecV;
  if (vec_ok(args.grad_out.data, args.grad_out.stride, qsz, es)) p.vec |= kVecDO;
  if (vec_ok(args.grad_query.data, args.grad_query.stride, qsz, es)) p.vec |= kVecDQ;
  if (vec_ok(args.grad_key.data, args.grad_key.stride, ksz, es)) p.vec |= kVecDK;
  if (vec_ok(args.grad_value.data, args.grad_value.stride, ksz, es)) p.vec |= kVecDV;
  total_q = items_q;
  total_k = items_k;
  return cudaSuccess;
}

}  // namespace detail
}  // namespace cuda
}  // namespace nuwa
