// Lane kernels of 3D nearby attention on the CPU: queries in vector lanes. Included by na3d_cpu.cpp inside
// its anonymous namespace (it uses that file's Vec, Problem, Strides, HeadRows, exp_acc, ...).
//
// When the key grid has the query grid's H and W (self-attention, and slabs that differ only in T),
// the key (t + dt, h + dh, w + dw) of query (t, h, w) sits at local flat index
// flat(query) + dt * H * W + dh * W + dw: a shift that is the same for every query. A block of L
// consecutive flat queries (L = lanes of one 512-bit register: 16 float, 8 double; the block may span
// rows and frames) then sees, for each shift of the union of its windows, the L consecutive keys starting
// at q0 + shift, lane i with query q0 + i. Which lanes a shift is valid for is a bit mask: the product of
// the per-axis masks (window.h's window_on_axis per lane and axis, relative to the lane's coordinate),
// cut by raster causality, which for a shift is the same for every lane (global flat indices from
// query_row_flat / key_row_flat are linear). Shifts valid for no lane are dropped.
//
// Forward, per block: scores S[e] = Q^T-block . K^T[columns q0 + shift_e ...] for every entry e, a vector
// of L lanes, as a register-blocked small GEMM over the head dim (8 entries of accumulators, the query
// block transposed and scaled once); with AVX-512 and float, row_scores instead: the block's query rows
// against key rows from a RowRing, each pair's partial sums in a register and a transposed reduction
// into the lanes (aligned key loads, no transposes; the K^T ring below is then not built); masked lanes
// -inf; softmax per lane, vectorised over queries (max,
// vectorised exp and log, one sum chain in entry order); then out = P V in the natural layout: each query's
// output row (the head dim in registers, four queries at a time) sums P[e][lane] * V[q0 + lane + shift_e]
// over the entries in order, value rows read from a ring of rows (RowRing, converted to the accumulation
// type), scaled by 1 / sum and stored straight into the output rows (non-temporally when the output is
// beyond the caches): no value or output transposes. K^T is kept in a ring of transposed columns
// (TransposedRing) that advances with the query blocks: each key is transposed once per task with 16 x 16
// in-register transposes (AVX-512; scalar otherwise) and the window's reach stays in L2. The entries of
// every block are computed once per call (EntryTable) and shared by the tasks of all heads; grouped heads
// of a kv head share the rings and the block's entries. Scratch is 64-byte aligned.
//
// Backward: a query pass (dQ) and a key pass (dK, dV), both in this form (AVX-512 float: every score
// product by row_scores from row rings, no transposed rings). Query pass, per query block:
// S from the K^T ring, dP = dO^T-block . V^T ring, P = exp(scale s - lse), dS = P (dP - delta), dQ^T =
// scale sum_e dS[e] K^T[...]. Key pass, per block of L keys (the entries from window.h's inverse windows,
// raster causality kept as flat(query) >= flat(key)): rings of Q^T, dO^T, lse and delta over query
// columns per head of the group, S^T = (scale K)^T-block . Q^T ring, dP^T = V^T-block . dO^T ring, then
// dV^T += sum_e P[e] dO^T[...], dK^T += scale sum_e dS[e] Q^T[...], summed over the group's heads. With
// pair stores (small windows) the key pass, first, hands dS to the query pass (which then recomputes
// neither S nor dP). When the forward kept P (na3d_bwd_probs) the backward is one sweep instead
// (lane_bwd_probs.h: a query step forms dP, delta, dS and dQ, a key step a few blocks behind reads P and
// that dS for dV and dK only). Every output element is summed by one task in entry (shift) order, masked lanes adding exact zeros: no
// atomics, and results that do not depend on the chunking into tasks nor on the thread count.
//
// Limits: masked lanes multiply zero probabilities by in-grid keys/values outside the window, so an
// inf/NaN in a key or value outside a query's window is not ignored as the row kernels ignore it.

// ------------------------------------------------------------------------------------------------
// Vector helpers
// ------------------------------------------------------------------------------------------------

template <typename A>
using LaneInt = typename std::conditional<sizeof(A) == 4, int32_t, int64_t>::type;
template <typename A>
struct VecIOf {
  typedef LaneInt<A> type __attribute__((vector_size(kVecBytes)));
};
template <typename A>
using VecI = typename VecIOf<A>::type;

template <typename A>
inline Vec<A> vsplat(A x) {
  return Vec<A>{} + x;
}
template <typename A>
inline Vec<A> vld(const A* p) {
  Vec<A> r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <typename A>
inline void vst(A* p, const Vec<A>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// vld into a register that the compiler cannot turn back into a memory operand of each of the vector's
// users (GCC folds a plain load into every FMA that reads it, loading it again for each).
template <typename A>
__attribute__((always_inline)) inline Vec<A> vld_once(const A* p) {
#if defined(__AVX__)
  Vec<A> x;
  __asm__("vmovups %1, %0" : "=v"(x) : "m"(*reinterpret_cast<const Vec<A>*>(p)));
  return x;
#else
  return vld(p);
#endif
}

// Lanes whose bit is set in `mask`, as an all-ones integer lane.
template <typename A>
inline VecI<A> lane_mask(uint32_t mask) {
  constexpr int L = kLanes<A>;
  VecI<A> bits;
  for (int l = 0; l < L; ++l) bits[l] = LaneInt<A>(1) << l;
  return ((VecI<A>{} + LaneInt<A>(mask)) & bits) != 0;
}

// Entries (scores) or head-dim rows (lane_pv) accumulated side by side in registers: 8 vectors (one
// register each: zmm with AVX-512, ymm with AVX2). lane_pv needs head dims in multiples of 8 (lane_ok).
constexpr int kLaneBlock = 8;

// Vectorised exp_acc (same polynomial and rounding; 0 below the float range).
inline Vec<float> exp_vec(Vec<float> x) {
  const Vec<float> lo = vsplat(-87.33654475f), hi = vsplat(88.0f);
  Vec<float> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  Vec<float> n;
  const Vec<float> y = exp_poly(xc, n);
  const VecI<float> bits = (__builtin_convertvector(n, VecI<float>) + 127) << 23;
  Vec<float> p2;
  std::memcpy(&p2, &bits, sizeof(p2));
  const Vec<float> res = y * p2;
  return x < lo ? Vec<float>{} : res;
}
inline Vec<double> exp_vec(Vec<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

// Vectorised natural log of x >= 1 (softmax denominators; Cephes' logf polynomial, about 1 ulp).
inline Vec<float> log_vec(Vec<float> x) {
  VecI<float> bits;
  std::memcpy(&bits, &x, sizeof(bits));
  VecI<float> e = ((bits >> 23) & 0xff) - 126;
  const VecI<float> mb = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  Vec<float> m;
  std::memcpy(&m, &mb, sizeof(m));
  const VecI<float> small = m < 0.707106781186547524f;
  e = e + small;  // small lanes are all ones (-1)
  m = small ? m + m - 1.0f : m - 1.0f;
  const Vec<float> z = m * m;
  Vec<float> y = vsplat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const Vec<float> fe = __builtin_convertvector(e, Vec<float>);
  y = y + fe * -2.12194440e-4f;
  y = y - z * 0.5f;
  return m + y + fe * 0.693359375f;
}
inline Vec<double> log_vec(Vec<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::log(x[l]);
  return x;
}

template <typename A>
inline A hmax(const Vec<A>& v) {
  A m = v[0];
  for (int l = 1; l < kLanes<A>; ++l) m = std::max(m, v[l]);
  return m;
}

// dst[d * ld + i] = factor * src[i * rs + d] for i < rows (<= L), d < D; lanes rows..L-1 are set to 0.
template <typename A>
inline void transpose_rows(A* __restrict dst, int64_t ld, const A* __restrict src, int64_t rs, int rows, int64_t D,
                           A factor = A(1)) {
  constexpr int L = kLanes<A>;
  int64_t d0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) {
    if (rows == L) {
      for (; d0 + 16 <= D; d0 += 16) {
        __m512 r[16], t[16];
        const float* sp = src + d0;
        for (int i = 0; i < 16; ++i, sp += rs) r[i] = _mm512_loadu_ps(sp);
        for (int k = 0; k < 8; ++k) {
          t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
          t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        for (int k = 0; k < 4; ++k) {
          r[4 * k + 0] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], _MM_SHUFFLE(1, 0, 1, 0));
          r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], _MM_SHUFFLE(3, 2, 3, 2));
          r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(1, 0, 1, 0));
          r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int e = 0; e < 4; ++e) {
          t[e + 0] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);
          t[e + 4] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
          t[e + 8] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
          t[e + 12] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
        }
        for (int e = 0; e < 4; ++e) {
          r[e] = _mm512_shuffle_f32x4(t[e], t[e + 8], 0x88);
          r[4 + e] = _mm512_shuffle_f32x4(t[e + 4], t[e + 12], 0x88);
          r[8 + e] = _mm512_shuffle_f32x4(t[e], t[e + 8], 0xDD);
          r[12 + e] = _mm512_shuffle_f32x4(t[e + 4], t[e + 12], 0xDD);
        }
        if (factor != 1.0f)
          for (int i = 0; i < 16; ++i) r[i] = _mm512_mul_ps(r[i], _mm512_set1_ps(factor));
        float* dp = dst + d0 * ld;
        for (int i = 0; i < 16; ++i, dp += ld) _mm512_storeu_ps(dp, r[i]);
      }
    }
  }
#endif
  for (int64_t d = d0; d < D; ++d) {
    A* y = dst + d * ld;
    for (int i = 0; i < rows; ++i) y[i] = factor * src[i * rs + d];
    for (int i = rows; i < L; ++i) y[i] = A(0);
  }
}

// ------------------------------------------------------------------------------------------------
// Geometry of the lane kernels
// ------------------------------------------------------------------------------------------------

// Whether the lane kernels take this problem as it is: key H, W equal to the query's (flat shifts), head
// dims in whole vectors (lane_run_ok adds the padded head dims of AVX-512 builds).
template <typename A>
inline bool lane_ok(const Problem& pr) {
  constexpr int L = kLanes<A>;
  return pr.p.k_len[1] == pr.p.q_len[1] && pr.p.k_len[2] == pr.p.q_len[2] && pr.D > 0 && pr.Dv > 0 &&
         pr.D % L == 0 && pr.Dv % L == 0 && pr.D % kLaneBlock == 0 && pr.Dv % kLaneBlock == 0;
}

// Per-axis extremes of the relative windows (key coordinate minus query coordinate) over all queries.
struct LaneGeom {
  int64_t H = 0, W = 0, HW = 0, Nq = 0, Nk = 0;
  int64_t rlo[3] = {0, 0, 0}, rhi[3] = {0, 0, 0};  // extremes of rel lo / rel hi over non-empty windows
  int64_t box_max = 1;                               // bound on the entries of one block
  int64_t smin = 0, smax = 0;                        // extreme flat shifts
  bool prefetch = true;                              // the problem's software prefetches on (Problem)
  // The per-axis extents of the box summed (lane_entries' per-axis mask scratch).
  int64_t box_axes() const { return (rhi[0] - rlo[0] + 1) + (rhi[1] - rlo[1] + 1) + (rhi[2] - rlo[2] + 1); }
};

// key_side: the blocks are keys (Nq: keys, Nk: queries) and the tables the inverse windows.
inline LaneGeom lane_geom(const Problem& pr, bool key_side = false) {
  LaneGeom g;
  g.H = pr.p.q_len[1];
  g.W = pr.p.q_len[2];
  g.HW = g.H * g.W;
  g.prefetch = pr.prefetch;
  g.Nq = (key_side ? pr.p.k_len[0] : pr.p.q_len[0]) * g.HW;
  g.Nk = (key_side ? pr.p.q_len[0] : pr.p.k_len[0]) * g.HW;
  const std::vector<Interval>* tab = key_side ? pr.inv : pr.win;
  for (int a = 0; a < 3; ++a) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < static_cast<int64_t>(tab[a].size()); ++i) {
      const Interval w = tab[a][i];
      if (w.lo > w.hi) continue;
      lo = std::min(lo, w.lo - i);
      hi = std::max(hi, w.hi - i);
    }
    if (lo > hi) lo = hi = 0;
    g.rlo[a] = lo;
    g.rhi[a] = hi;
    g.box_max *= hi - lo + 1;
  }
  g.smin = g.rlo[0] * g.HW + g.rlo[1] * g.W + g.rlo[2];
  g.smax = g.rhi[0] * g.HW + g.rhi[1] * g.W + g.rhi[2];
  return g;
}

// The shifts of block q0 (nv valid lanes) and their lane masks, in increasing shift order. Returns the
// count. mt/mh/mw: scratch of the per-axis box extents (rhi - rlo + 1 each).
//
// kKeySide: the block is one of keys and the entries are shifts to the queries that see them (window.h's
// inverse windows, pr.inv); raster causality then keeps flat(query) >= flat(key).
template <int L, bool kKeySide = false>
inline int64_t lane_entries(const Problem& pr, const LaneGeom& g, int64_t q0, int nv, int64_t* shift, uint32_t* mask,
                            uint32_t* mt, uint32_t* mh, uint32_t* mw) {
  const std::vector<Interval>* tab = kKeySide ? pr.inv : pr.win;
  int64_t t = q0 / g.HW, h = (q0 / g.W) % g.H, w = q0 % g.W;
  const int64_t t0 = t, h0 = h, w0 = w;
  int64_t lo[3] = {std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max(),
                   std::numeric_limits<int64_t>::max()};
  int64_t hi[3] = {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::min(),
                   std::numeric_limits<int64_t>::min()};
  int64_t rl[3][L], rh[3][L];
  for (int i = 0; i < nv; ++i) {
    const int64_t c[3] = {t, h, w};
    for (int a = 0; a < 3; ++a) {
      const Interval iv = tab[a][c[a]];
      rl[a][i] = iv.lo - c[a];
      rh[a][i] = iv.hi - c[a];
      if (iv.lo <= iv.hi) {
        lo[a] = std::min(lo[a], rl[a][i]);
        hi[a] = std::max(hi[a], rh[a][i]);
      }
    }
    if (++w == g.W) {
      w = 0;
      if (++h == g.H) {
        h = 0;
        ++t;
      }
    }
  }
  for (int a = 0; a < 3; ++a)
    if (lo[a] > hi[a]) return 0;  // no lane has a key on this axis
  uint32_t* m[3] = {mt, mh, mw};
  for (int a = 0; a < 3; ++a) {
    std::fill(m[a], m[a] + (hi[a] - lo[a] + 1), 0u);
    for (int i = 0; i < nv; ++i)
      for (int64_t r = rl[a][i]; r <= rh[a][i]; ++r) m[a][r - lo[a]] |= 1u << i;
  }
  const int64_t own_flat = kKeySide ? key_row_flat(pr.p, t0, h0) + w0 : query_row_flat(pr.p, t0, h0) + w0;
  int64_t n = 0;
  for (int64_t dt = lo[0]; dt <= hi[0]; ++dt) {
    const uint32_t a = mt[dt - lo[0]];
    if (!a) continue;
    for (int64_t dh = lo[1]; dh <= hi[1]; ++dh) {
      const uint32_t b = a & mh[dh - lo[1]];
      if (!b) continue;
      // Raster causality: flat(key) - flat(query) is the same for every lane; evaluated at lane 0.
      const int64_t other_row = kKeySide ? query_row_flat(pr.p, t0 + dt, h0 + dh) + w0
                                         : key_row_flat(pr.p, t0 + dt, h0 + dh) + w0;
      for (int64_t dw = lo[2]; dw <= hi[2]; ++dw) {
        const uint32_t c = b & mw[dw - lo[2]];
        if (!c) continue;
        if (pr.p.raster) {
          if (!kKeySide && other_row + dw > own_flat) break;  // and every larger dw
          if (kKeySide && other_row + dw < own_flat) continue;
        }
        shift[n] = dt * g.HW + dh * g.W + dw;
        mask[n] = c;
        ++n;
      }
    }
  }
  return n;
}

// The entries of every block of a call (blocks start at multiples of L), computed once and shared by the
// tasks of every head, when the table is small; otherwise `on` is false and the tasks compute them.
struct EntryTable {
  bool on = false;
  int64_t stride = 0;
  std::vector<int64_t> shift, count;
  std::vector<uint32_t> mask;

  // Whether the table of geometry g is built (small enough).
  template <int L>
  static bool fits(const LaneGeom& g) {
    return (g.Nq + L - 1) / L * g.box_max <= (int64_t(1) << 21);
  }
  template <int L, bool kKeySide = false>
  void build(const Problem& pr, const LaneGeom& g) {
    const int64_t nb = (g.Nq + L - 1) / L;
    stride = g.box_max;
    if (!fits<L>(g)) return;
    shift.resize(nb * stride);
    mask.resize(nb * stride);
    count.resize(nb);
    const int64_t axes = g.box_axes();
    std::vector<uint32_t> m(axes);
    uint32_t* mt = m.data();
    uint32_t* mh = mt + (g.rhi[0] - g.rlo[0] + 1);
    uint32_t* mw = mh + (g.rhi[1] - g.rlo[1] + 1);
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int nv = static_cast<int>(std::min<int64_t>(L, g.Nq - bi * L));
      count[bi] = lane_entries<L, kKeySide>(pr, g, bi * L, nv, shift.data() + bi * stride,
                                            mask.data() + bi * stride, mt, mh, mw);
    }
    on = true;
  }
  // The entries of block q0 (a multiple of L): from the table, or computed into shift_buf / mask_buf.
  template <int L, bool kKeySide = false>
  int64_t get(const Problem& pr, const LaneGeom& g, int64_t q0, int nv, const int64_t** sh, const uint32_t** mk,
              int64_t* shift_buf, uint32_t* mask_buf, uint32_t* mt, uint32_t* mh, uint32_t* mw) const {
    if (on) {
      const int64_t bi = q0 / L;
      *sh = shift.data() + bi * stride;
      *mk = mask.data() + bi * stride;
      return count[bi];
    }
    *sh = shift_buf;
    *mk = mask_buf;
    return lane_entries<L, kKeySide>(pr, g, q0, nv, shift_buf, mask_buf, mt, mh, mw);
  }
};

// Whether a (B, T, H, W, heads, X) tensor's tokens of one head are evenly spaced in flat order.
inline bool flat_strides(const Strides& s, int64_t H, int64_t W) {
  return s.s[2] == W * s.s[3] && s.s[1] == H * s.s[2];
}

// Calls f(t, h, w, n, pos) for the row segments of the flat token range [a, b) of a grid (H, W): n
// tokens starting at (t, h, w), flat index pos.
template <typename F>
inline void for_each_segment(int64_t a, int64_t b, int64_t H, int64_t W, const F& f) {
  int64_t pos = a;
  while (pos < b) {
    const int64_t w = pos % W, th = pos / W;
    const int64_t n = std::min(W - w, b - pos);
    f(th / H, th % H, w, n, pos);
    pos += n;
  }
}

// Reads tokens [a, b) of one head (rows of X elements) as rows of the accumulation type, either in place
// (`direct`: pointer to token a, row stride) or packed into `buf` (rows of hr.Xp elements).
template <typename S, bool kUnit, typename A>
struct TokenRows {
  const A* p;
  int64_t rs;
};

template <bool kUnit, typename S, typename A>
inline TokenRows<S, kUnit, A> token_rows(const HeadRows<S>& hr, bool direct, int64_t a, int64_t b, int64_t H,
                                          int64_t W, A* buf) {
  if constexpr (kUnit && std::is_same<S, A>::value) {
    if (direct) return {reinterpret_cast<const A*>(hr.at(0, 0, 0)) + a * hr.st.s[3], hr.st.s[3]};
  }
  for_each_segment(a, b, H, W, [&](int64_t t, int64_t h, int64_t w, int64_t n, int64_t pos) {
    hr.template gather<kUnit>(buf + (pos - a) * hr.Xp, t, h, w, n);
  });
  return {buf, hr.Xp};
}

// Prefetches the rows of tokens [a, b) of one head, flat indices of the grid g (unless g.prefetch is off).
template <typename S>
inline void prefetch_tokens(const HeadRows<S>& hr, int64_t a, int64_t b, const LaneGeom& g) {
  if (!g.prefetch) return;
  if (hr.st.s[2] == g.W * hr.st.s[3] && hr.st.s[1] == g.H * hr.st.s[2]) {
    prefetch_rows(hr.at(0, 0, 0) + a * hr.st.s[3], b - a, hr.st.s[3], hr.st.s[5], hr.X);
    return;
  }
  for_each_segment(a, b, g.H, g.W,
                   [&](int64_t t, int64_t h, int64_t w, int64_t n, int64_t) { hr.prefetch(t, h, w, n); });
}

// S[e * L + lane] = A^T-block . X^T[pos_e ...] for M entries: a[d * L + lane] (d < D), xp[m] + d * ld.
template <int M, typename A>
__attribute__((always_inline)) inline void lane_dots(A* __restrict S, const A* __restrict a, const A* const* xp,
                                                     int64_t ld, int64_t D) {
  constexpr int L = kLanes<A>;
  Vec<A> acc[M];
  for (int m = 0; m < M; ++m) acc[m] = Vec<A>{};
  const A* x[M];
  for (int m = 0; m < M; ++m) x[m] = xp[m];
  for (int64_t d = 0; d < D; ++d) {
    const Vec<A> q = vld(a + d * L);
    for (int m = 0; m < M; ++m) acc[m] += q * vld(x[m] + d * ld);
  }
  for (int m = 0; m < M; ++m) vst(S + m * L, acc[m]);
}

// f(std::integral_constant<int, r>{}) for a run-time count 0 < r < N: the tail of a loop over batches of
// N, with the batch size a template argument (nothing for r outside that range).
template <int N, typename F>
inline void with_count(int r, const F& f) {
  if constexpr (N > 1) {
    if (r == N - 1)
      f(std::integral_constant<int, N - 1>{});
    else
      with_count<N - 1>(r, f);
  }
}

// Entries scored at once by lane_scores: 9 accumulators (+ the query vector) fit AVX2's 16 registers too;
// three rows of a 3-wide window per batch (NÜWA's (1,3,3) block: one batch instead of 8 + 1).
constexpr int kScoreBatch = 9;

// S[e] for entries e < n: a (transposed block, [D][L]) against the transposed rows X^T (d-major,
// row length ld) at columns col[e].
template <typename A>
inline void lane_scores(A* S, const A* a, const A* XT, int64_t ld, const int64_t* col, int64_t n, int64_t D) {
  constexpr int L = kLanes<A>;
  constexpr int kBatch = kScoreBatch;
  const A* xp[kBatch];
  int64_t e = 0;
  for (; e + kBatch <= n; e += kBatch) {
    for (int m = 0; m < kBatch; ++m) xp[m] = XT + col[e + m];
    lane_dots<kBatch>(S + e * L, a, xp, ld, D);
  }
  const int r = static_cast<int>(n - e);
  for (int m = 0; m < r; ++m) xp[m] = XT + col[e + m];
  with_count<kBatch>(r, [&](auto m) { lane_dots<decltype(m)::value>(S + e * L, a, xp, ld, D); });
}

// Row-layout scores (AVX-512, float; every score product of the forward and the backward's passes; the
// key pass's "queries" are its block of keys or values, its "keys" the rows of Q or dO):
// S[e * 16 + i] = scale * Q_i . K(col[e] + i) for the block's 16 queries, Q_i the block's rows (row
// stride qs) and K(c) = krows + c * krs (a RowRing: krs = D; or rows in place: block_product_rows), both
// in their natural layout. Each (query, entry) pair sums 16 partial products over the head dim in one
// register (four queries at a time along a run of entries in consecutive key rows, each query row and key
// row loaded once: row_dots_run; key rows are aligned), then a transposed reduction turns the 16 queries'
// registers of an entry into its lane vector (unpack / 128-bit shuffle + add, 15 combines per entry; every
// query's partials summed in the same tree, so a query's score does not depend on its lane). A group of
// four queries computes only the entries of a run between its first and last valid one (`mask`): the
// scores of its other entries are 0, masked by every caller (with NATTEN's shifted windows a block's runs
// are longer than any one query's: NÜWA (1,3,3), 10x21x21, 1.55 score products per useful pair -> 1.13).
// Against lane_scores it needs no transposes of Q or K, and its key loads are aligned (lane_scores' start
// at the block plus the shift: most are unaligned, which this machine's load ports pay for twice).
#if defined(__AVX512F__)
constexpr bool kRowScores = true;
#else
constexpr bool kRowScores = false;
#endif
// Whether the lane kernels run this problem: lane_ok's problems, and with row_scores (AVX-512, float
// accumulation) any head dims, on rows packed with zero tails to whole vectors (HeadRows::Xp; the products
// add zeros past the head dim, the output rows' last vectors are stored in part). NÜWA (1,3,3), 10x21x21,
// 8 heads, D = 40: see DESIGN.md.
template <typename A>
inline bool lane_run_ok(const Problem& pr) {
  return lane_ok<A>(pr) || (kRowScores && std::is_same<A, float>::value && pr.p.k_len[1] == pr.p.q_len[1] &&
                            pr.p.k_len[2] == pr.p.q_len[2] && pr.D > 0 && pr.Dv > 0);
}

// Entries of a batch (whole runs of consecutive key rows, as many as fit), whose partial sums wait in
// scratch (kRowScoreBatch * 4 registers, one per four queries) for the rest of the transposed reduction.
constexpr int kRowScoreBatch = 9;

#if defined(__AVX512F__)
// Queries a, b of a pair into one register: lanes 0, 2 of every 128-bit block hold a's partial sums,
// lanes 1, 3 b's.
__attribute__((always_inline)) inline __m512 fold_pair(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
// Pairs (q0, q1), (q2, q3) into a register whose 128-bit blocks each hold [q0, q1, q2, q3].
__attribute__((always_inline)) inline __m512 fold_quad(__m512 a, __m512 b) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
// Two registers of 128-bit blocks [a0, a1, a2, a3], [b0, b1, b2, b3] (each block the same queries) into
// [a0 + a1, a2 + a3, b0 + b1, b2 + b3].
__attribute__((always_inline)) inline __m512 fold_blocks(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// Bit 4j set when any of lanes 4j..4j+3 of a 16-lane mask is (groups of four queries, j < 4).
__attribute__((always_inline)) inline uint32_t groups_on(uint32_t m) {
  return (m | m >> 1 | m >> 2 | m >> 3) & 0x1111u;
}

// Largest run piece: QB * kMaxRun accumulators, QB query vectors and a key vector in AVX-512's 32 registers
// (6 made GCC spill with the head dim unrolled).
constexpr int kMaxRun = 5;

// part[(m0 + m) * 4 + u0 / 4] (the fold_quad of queries u0..u0+3, QB = 4) against the M entries of a run
// (key rows consecutive: entry m of query u reads row kr0 + (u + m) * D).
// Row j serves the pairs (u, j - u): each key row and query row is loaded once per head-dim vector (M + 3
// key rows for 4M dot products instead of 4M; vld_once keeps GCC from loading them again as memory
// operands of every FMA).
template <int M, int kD>
__attribute__((always_inline)) inline void row_dots_run(__m512* __restrict part, int m0, int u0, const float* q,
                                                       int64_t qs, const float* __restrict kr0, int64_t D_,
                                                       int64_t krs) {
  constexpr int QB = 4;
  const int64_t D = kD ? kD : D_;
  __m512 acc[QB][M];
  for (int u = 0; u < QB; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    Vec<float> x[QB];
    for (int u = 0; u < QB; ++u) x[u] = vld_once(q + (u0 + u) * qs + d);
    for (int j = 0; j < M + QB - 1; ++j) {
      const Vec<float> k = vld_once(kr0 + j * krs + d);
      for (int u = 0; u < QB; ++u) {
        const int m = j - u;
        if (m < 0 || m >= M) continue;
        acc[u][m] = _mm512_fmadd_ps(reinterpret_cast<const __m512&>(x[u]), reinterpret_cast<const __m512&>(k),
                                    acc[u][m]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    part[(m0 + m) * 4 + u0 / 4] = fold_quad(fold_pair(acc[0][m], acc[1][m]), fold_pair(acc[2][m], acc[3][m]));
}

// Scores of entries e < n (see above), taken in runs of consecutive key rows (a window's keys along W),
// batches of whole runs of at most kRowScoreBatch entries (a longer run in balanced pieces of at most
// kMaxRun); part: scratch of kRowScoreBatch * 4 registers.
template <int kD>
inline void row_scores_d(float* S, const float* q, int64_t qs, const float* krows, const int64_t* col,
                         const uint32_t* mask, int64_t n, int64_t D, float scale, __m512* part, int64_t krs) {
  const __m512 f = _mm512_set1_ps(scale);
  int64_t e = 0;
  while (e < n) {
    // The batch: whole runs while they fit (or the first run's first kRowScoreBatch entries).
    int64_t nb = 0;
    while (e + nb < n) {
      int64_t r = 1;
      while (e + nb + r < n && col[e + nb + r] == col[e + nb] + r) ++r;
      if (nb + r > kRowScoreBatch) {
        if (nb == 0) nb = kRowScoreBatch;
        break;
      }
      nb += r;
    }
    // Its runs, in pieces of at most kMaxRun; a run whose first or last entry is valid for no query of a
    // group of four is cut, for that group, to the entries between the group's first and last valid one
    // (the others' partial sums zero: their scores are masked by every caller).
    for (int64_t m0 = 0; m0 < nb;) {
      int64_t r = 1;
      while (m0 + r < nb && col[e + m0 + r] == col[e + m0] + r) ++r;
      const auto pieces_of = [&](int u0, int64_t lo, int64_t hi) __attribute__((always_inline)) {
        const int64_t pieces = (hi - lo + kMaxRun - 1) / kMaxRun;
        for (int64_t p = 0; p < pieces; ++p) {
          const int64_t a = lo + (hi - lo) * p / pieces, b = lo + (hi - lo) * (p + 1) / pieces;
          const float* k0 = krows + (col[e + m0 + a] + u0) * krs;
          const int mm = static_cast<int>(m0 + a);
          switch (b - a) {
            case 1: row_dots_run<1, kD>(part, mm, u0, q, qs, k0, D, krs); break;
            case 2: row_dots_run<2, kD>(part, mm, u0, q, qs, k0, D, krs); break;
            case 3: row_dots_run<3, kD>(part, mm, u0, q, qs, k0, D, krs); break;
            case 4: row_dots_run<4, kD>(part, mm, u0, q, qs, k0, D, krs); break;
            default: row_dots_run<5, kD>(part, mm, u0, q, qs, k0, D, krs); break;
          }
        }
      };
      if ((groups_on(mask[e + m0]) & groups_on(mask[e + m0 + r - 1])) == 0x1111u) {
        for (int u0 = 0; u0 < 16; u0 += 4) pieces_of(u0, 0, r);
      } else {
        for (int u0 = 0; u0 < 16; u0 += 4) {
          int64_t lo = 0, hi = r;
          while (lo < r && !((mask[e + m0 + lo] >> u0) & 0xFu)) ++lo;
          while (hi > lo && !((mask[e + m0 + hi - 1] >> u0) & 0xFu)) --hi;
          for (int64_t m = 0; m < r; ++m)
            if (m < lo || m >= hi) part[(m0 + m) * 4 + u0 / 4] = _mm512_setzero_ps();
          pieces_of(u0, lo, hi);
        }
      }
      m0 += r;
    }
    for (int64_t m = 0; m < nb; ++m) {  // the four quads of an entry into its lane vector: lane i query i
      const __m512* p = part + m * 4;
      const __m512 x = fold_blocks(fold_blocks(p[0], p[1]), fold_blocks(p[2], p[3]));
      _mm512_store_ps(S + (e + m) * 16, _mm512_mul_ps(x, f));
    }
    e += nb;
  }
}
// row_scores_d with the head dim a constant for D = 64 (the loops over it unrolled).
inline void row_scores(float* S, const float* q, int64_t qs, const float* krows, const int64_t* col,
                       const uint32_t* mask, int64_t n, int64_t D, float scale, __m512* part, int64_t krs = 0) {
  if (D == 64)
    row_scores_d<64>(S, q, qs, krows, col, mask, n, D, scale, part, krs ? krs : D);
  else
    row_scores_d<0>(S, q, qs, krows, col, mask, n, D, scale, part, krs ? krs : D);
}
#endif

// Ot[d * L + lane] = sum_e c[e * L + lane] * X^T[d][col[e] + lane] for d < X (a multiple of 8): kLaneBlock
// rows of d at once in registers, the entries streamed in order (c: zero on masked lanes).
template <typename A>
inline void lane_pv(A* __restrict Ot, const A* __restrict c, const A* __restrict XT, int64_t ld, const int64_t* col,
                    int64_t n, int64_t X, bool accumulate = false) {
  constexpr int L = kLanes<A>;
  constexpr int B = kLaneBlock;
  for (int64_t d0 = 0; d0 < X; d0 += B) {
    Vec<A> acc[B];
    for (int j = 0; j < B; ++j) acc[j] = accumulate ? vld(Ot + (d0 + j) * L) : Vec<A>{};
    const A* xr = XT + d0 * ld;
    for (int64_t e = 0; e < n; ++e) {
      const Vec<A> p = vld(c + e * L);
      const A* x = xr + col[e];
      for (int j = 0; j < B; ++j) acc[j] += p * vld(x + j * ld);
    }
    for (int j = 0; j < B; ++j) vst(Ot + (d0 + j) * L, acc[j]);
  }
}

// ------------------------------------------------------------------------------------------------
// Pair stores
// ------------------------------------------------------------------------------------------------

// A value for every (query, key) pair of the call: dS, written by the backward's key pass and read by its
// query pass, which then skips its recomputation of S and dP (two of its three products, the transposes
// of Q and dO and the K^T / V^T rings); and P, written by the forward (na3d_fwd_probs) and read by the
// backward's sweep (lane_bwd_probs.h), which then computes no scores at all (its dS lives in a ring of
// its own, in this layout's rows). For small windows the backward's products go from 9 to 4. Layout per (batch, head): one row per relative offset (dt, dh, dw)
// of the key side's box (key -> query), over the queries (flat query index + kPad, so that the masked
// lanes of border key blocks stay inside the row): a query block's entry is one aligned vector (the
// forward's P and the query pass's dS go out as whole cache lines), a key block's entry (the opposite
// offset) one unaligned vector at the block plus the entry's shift. Loads pay less for being unaligned
// than stores: with the rows over the keys (until session 7) each of the forward's P stores split two
// lines, each read for ownership. NÜWA (1,3,3), na3d_fwd_probs, two threads, alternating runs: 1.31 ->
// 1.24 ms with the rows over the queries, 1.20 with P's lines stored non-temporally (lane_fwd_kernel).
struct DsStore {
  static constexpr int64_t kPad = 16;  // query 0 sits at this element of a row (>= L of float and double)
  int64_t nh = 0, nw = 0;     // the key side's box extents along H and W
  int64_t lo[3] = {0, 0, 0};  // its lowest offsets
  int64_t ld = 0, rows = 0;   // row length (queries and pads), rows per (batch, head)

  // Whether the call's offsets decompose uniquely from flat shifts (box narrower than the grid along H
  // and W on both sides), and the store's elements when they do (0 otherwise).
  template <int L>
  static int64_t elems(const Problem& pr, const LaneGeom& gq, const LaneGeom& gk) {
    for (const LaneGeom* g : {&gq, &gk})
      if (g->rhi[1] - g->rlo[1] + 1 > g->H || g->rhi[2] - g->rlo[2] + 1 > g->W) return 0;
    return pr.B * pr.heads * gk.box_max * (round_up(gq.Nq, L) + 2 * kPad);
  }
  // gk: the key side's geometry, gq: the query side's.
  template <int L>
  void init(const LaneGeom& gq, const LaneGeom& gk) {
    nh = gk.rhi[1] - gk.rlo[1] + 1;
    nw = gk.rhi[2] - gk.rlo[2] + 1;
    for (int a = 0; a < 3; ++a) lo[a] = gk.rlo[a];
    ld = round_up(gq.Nq, L) + 2 * kPad;
    rows = gk.box_max;
  }
  // (dt, dh, dw) of a flat shift s whose offsets lie in [rlo, rhi] of geometry g.
  static void split(const LaneGeom& g, int64_t s, int64_t* d) {
    const int64_t W_ = g.W, H_ = g.H;
    d[2] = g.rlo[2] + (((s - g.rlo[2]) % W_) + W_) % W_;
    const int64_t s2 = (s - d[2]) / W_;
    d[1] = g.rlo[1] + (((s2 - g.rlo[1]) % H_) + H_) % H_;
    d[0] = (s2 - d[1]) / H_;
  }
  // Row of offsets (dt, dh, dw) (key -> query).
  int32_t row(const int64_t* d) const {
    return static_cast<int32_t>(((d[0] - lo[0]) * nh + (d[1] - lo[1])) * nw + (d[2] - lo[2]));
  }
  // Element of query 0 in the rows of (b, head).
  int64_t base(int64_t b, int64_t head, int64_t heads) const { return (b * heads + head) * rows * ld + kPad; }
  // Elements of the rows of one (batch, head), from base(b, head, heads) - kPad.
  int64_t head_elems() const { return rows * ld; }
  // Zeroes the elements of one (batch, head)'s rows (hb: base(b, head, heads)) that no query block owns
  // (block q0 owns elements q0 + [0, L) of every row): the pads.
  template <typename A>
  void zero_unowned(A* hb) const {
    for (int64_t r = 0; r < rows; ++r) {
      A* row = hb + r * ld;
      std::fill(row - kPad, row, A(0));
      std::fill(row + ld - 2 * kPad, row + ld - kPad, A(0));
    }
  }
};

// The DsStore row of every entry of a built table: the entry's offsets (key side: key -> query), or the
// opposite ones (query side).
inline std::vector<int32_t> ds_rows(const EntryTable& et, const LaneGeom& g, const DsStore& st, bool query_side) {
  std::vector<int32_t> r(et.shift.size(), 0);
  for (size_t bi = 0; bi < et.count.size(); ++bi)
    for (int64_t e = 0; e < et.count[bi]; ++e) {
      int64_t d[3];
      DsStore::split(g, et.shift[bi * et.stride + e], d);
      if (query_side)
        for (int a = 0; a < 3; ++a) d[a] = -d[a];
      r[bi * et.stride + e] = st.row(d);
    }
  return r;
}

// The entry table of one side of a problem and, with a pair store, its DsStore rows: built once per window
// geometry and kept for the calls that follow (a training step's forward and backward, the next steps).
// Building them is serial work (tenths of a millisecond on NÜWA's video grid) that every call repeated
// while the other threads waited.
struct LaneTables {
  EntryTable et;
  std::vector<int32_t> rows;  // ds_rows(et, ...) when built with a store
  bool has_rows = false;
  int64_t bytes() const {
    return int64_t(et.shift.size() * sizeof(int64_t) + et.mask.size() * sizeof(uint32_t) +
                   et.count.size() * sizeof(int64_t) + rows.size() * sizeof(int32_t));
  }
};

// Tables kept per instantiation of lane_tables: the most recent geometries, this many bytes at most.
constexpr int64_t kLaneTablesBytes = int64_t(64) << 20;

// The lock of the lane-table caches. The forking thread holds it across fork() (atfork handlers, as the
// block pool's), so a child never inherits it locked by a thread it does not have.
inline std::mutex& lane_tables_mutex() {
  static std::mutex* m = [] {
    auto* x = new std::mutex();  // never destroyed: calls may run during interpreter shutdown
#ifndef _WIN32
    pthread_atfork([] { lane_tables_mutex().lock(); }, [] { lane_tables_mutex().unlock(); },
                   [] { lane_tables_mutex().unlock(); });
#endif
    return x;
  }();
  return *m;
}

// The tables of side kKeySide (g: its geometry) of problem pr; with `st`, their DsStore rows too.
template <int L, bool kKeySide>
std::shared_ptr<const LaneTables> lane_tables(const Problem& pr, const LaneGeom& g, const DsStore* st) {
  using Entry = std::pair<std::vector<int64_t>, std::shared_ptr<const LaneTables>>;
  std::mutex& mu = lane_tables_mutex();
  static std::list<Entry> cache;  // most recently used first
  const WindowParams& p = pr.p;
  std::vector<int64_t> key = {int64_t(p.raster), int64_t(p.shift)};
  for (int a = 0; a < 3; ++a)
    for (int64_t x : {p.q_len[a], p.k_len[a], p.kernel[a], p.stride[a], int64_t(p.causal[a]), p.q_org[a], p.k_org[a],
                      p.q_full[a], p.k_full[a]})
      key.push_back(x);
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end(); ++it)
      if (it->first == key && (!st || it->second->has_rows)) {
        cache.splice(cache.begin(), cache, it);
        return cache.front().second;
      }
  }
  auto t = std::make_shared<LaneTables>();
  t->et.build<L, kKeySide>(pr, g);
  if (st) {
    t->rows = ds_rows(t->et, g, *st, /*query_side=*/!kKeySide);
    t->has_rows = true;
  }
  std::lock_guard<std::mutex> lock(mu);
  cache.remove_if([&](const Entry& e) { return e.first == key; });
  cache.emplace_front(std::move(key), t);
  int64_t total = 0;
  for (auto it = cache.begin(); it != cache.end();) {
    total += it->second->bytes();
    it = (total > kLaneTablesBytes && it != cache.begin()) ? cache.erase(it) : std::next(it);
  }
  return t;
}

// *p = v with a non-temporal store (p 64-byte aligned): no read for ownership of a line that will not be
// read again soon. AVX-512 builds (a regular store otherwise).
template <typename A>
inline void vst_nt(A* p, const Vec<A>& v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) {
    _mm512_stream_ps(p, reinterpret_cast<const __m512&>(v));
    return;
  } else {
    _mm512_stream_pd(p, reinterpret_cast<const __m512d&>(v));
    return;
  }
#endif
  vst(p, v);
}
// vst_nt when `nt`, vst otherwise.
template <typename A>
inline void vst_to(bool nt, A* p, const Vec<A>& v) {
  if (nt)
    vst_nt(p, v);
  else
    vst(p, v);
}

// *p = v on the lanes set in `mask` (the other elements of p untouched).
template <typename A>
inline void vst_masked(A* p, const Vec<A>& v, uint32_t mask) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(mask), reinterpret_cast<const __m512&>(v));
    return;
  } else {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>(mask), reinterpret_cast<const __m512d&>(v));
    return;
  }
#endif
  for (int l = 0; l < kLanes<A>; ++l)
    if ((mask >> l) & 1u) p[l] = v[l];
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// Outputs larger than this many bytes are stored non-temporally (AVX-512 builds).
constexpr int64_t kStreamBytes = int64_t(4) << 20;
#if defined(__AVX512F__)
constexpr bool kStreamOK = true;
#else
constexpr bool kStreamOK = false;
#endif

// Whether rows of x elements of S are not whole cache lines (then never streamed; spread_heads).
template <typename S>
inline bool rows_share_lines(int64_t x) {
  return (x * int64_t(sizeof(S))) % 64 != 0;
}

// Whether rows of X elements written into `out` (rows in all) go out with non-temporal stores: outputs
// beyond the caches, 64-byte aligned rows, AVX-512 builds, S the accumulation type or a half type (vstore).
template <typename S, typename A>
inline bool stream_rows(const S* out, double rows, int64_t X) {
  constexpr bool kHalf = std::is_same<A, float>::value && sizeof(S) == 2;
  return (std::is_same<S, A>::value || kHalf) && kStreamOK && rows * X * sizeof(S) > double(kStreamBytes) &&
         (reinterpret_cast<uintptr_t>(out) % 64) == 0 && !rows_share_lines<S>(X);
}

// How many groups of L columns ahead the rings prefetch their input rows. Two: a block's work covers the
// memory latency many times over, and more lines in flight only fill the miss buffers, where the
// prefetch instructions then wait (NÜWA forward, one thread, against four: (1,3,3) 2.83-3.01 -> 2.72-2.77
// ms, (3,3,3) 5.63-5.74 -> 5.23-5.39; the key pass measured about 7% faster).
#ifndef NUWA_PREFETCH_AHEAD
#define NUWA_PREFETCH_AHEAD 2
#endif
constexpr int kPrefetchAhead = NUWA_PREFETCH_AHEAD;
// Build knob for measuring: 0 keeps the forward's value ring for small windows too (block_product_rows).
#ifndef NUWA_V_DIRECT
#define NUWA_V_DIRECT 1
#endif

// Slots of columns base + shift[e] (|shift| < R) in a ring of R slots starting at column `origin`, one
// division in all.
inline void ring_slots(int64_t R, int64_t origin, int64_t base, const int64_t* shift, int64_t n, int64_t* col) {
  const int64_t s0 = ((base - origin) % R + R) % R;
  for (int64_t e = 0; e < n; ++e) {
    int64_t x = s0 + shift[e];
    x = x < 0 ? x + R : (x >= R ? x - R : x);
    col[e] = x;
  }
}

// Transposed key (or value) columns of one head in a ring: column c (flat key index) lives at slot
// (c - origin) mod R of every row d (row stride R + L; slots [0, L) are mirrored at [R, R + L) so that a
// vector load starting at any slot is contiguous). Columns are written in aligned groups of L as the
// query blocks advance, so only the window's reach is held (L2-resident) and each column is transposed
// once per task.
template <typename S, bool kUnit, typename A>
struct TransposedRing {
  A* buf;
  int64_t R, ld, origin, hi;  // columns [hi - R + L, hi) are valid
  HeadRows<S> hr;
  bool direct;
  const LaneGeom* g;

  static int64_t size_for(const LaneGeom& g, int L) { return round_up(g.smax - g.smin + 3 * L, L) + L; }

  void init(A* b, const LaneGeom& g_, int L, int64_t first_col, const HeadRows<S>& h, bool dir) {
    buf = b;
    g = &g_;
    R = size_for(g_, L);
    ld = R + L + (((R + L) % 256 == 0) ? L : 0);
    origin = first_col - ((first_col % L) + L) % L;  // aligned down
    hi = origin;
    hr = h;
    direct = dir;
  }
  // Makes columns up to `need` (exclusive) valid.
  void advance(int64_t need, A* tmp) {
    constexpr int L = kLanes<A>;
    while (hi < need) {
      const int64_t slot = (hi - origin) % R;
      const int64_t a = std::max<int64_t>(hi, 0), b = std::min<int64_t>(hi + L, g->Nk);
      const int64_t X = hr.X;
      if (b - a == L) {
        if (hi + kPrefetchAhead * L + L <= g->Nk)
          prefetch_tokens(hr, hi + kPrefetchAhead * L, hi + kPrefetchAhead * L + L, *g);
        const TokenRows<S, kUnit, A> tr = token_rows<kUnit>(hr, direct, a, b, g->H, g->W, tmp);
        transpose_rows(buf + slot, ld, tr.p, tr.rs, L, X);
      } else {
        for (int64_t d = 0; d < X; ++d) std::fill(buf + d * ld + slot, buf + d * ld + slot + L, A(0));
        if (b > a) {
          const TokenRows<S, kUnit, A> tr = token_rows<kUnit>(hr, direct, a, b, g->H, g->W, tmp);
          for (int64_t d = 0; d < X; ++d)
            for (int64_t j = a; j < b; ++j) buf[d * ld + slot + (j - hi)] = tr.p[(j - a) * tr.rs + d];
        }
      }
      if (slot == 0)
        for (int64_t d = 0; d < X; ++d) std::memcpy(buf + d * ld + R, buf + d * ld, L * sizeof(A));
      hi += L;
    }
  }
  int64_t slot(int64_t c) const { return (c - origin) % R; }
  void slots(int64_t base, const int64_t* shift, int64_t n, int64_t* col) const {
    ring_slots(R, origin, base, shift, n, col);
  }
};

// Key (or value) rows of one head in a ring, in their natural layout converted to the accumulation type:
// column (flat key index) c lives in row (c - origin) mod R of `buf` (rows of hr.Xp elements; rows [0, L) are
// mirrored at [R, R + L) so that the L rows of consecutive columns starting at any slot are contiguous).
// Columns outside the key grid are zero rows. Advances with the query blocks like TransposedRing.
template <typename S, bool kUnit, typename A>
struct RowRing {
  A* buf;
  int64_t R, origin, hi;
  HeadRows<S> hr;
  const LaneGeom* g;

  static int64_t size_for(const LaneGeom& g, int L) { return TransposedRing<S, kUnit, A>::size_for(g, L); }
  // Elements of the ring for rows of X elements.
  static int64_t elems(const LaneGeom& g, int L, int64_t X) { return (size_for(g, L) + L) * X; }

  void init(A* b, const LaneGeom& g_, int L, int64_t first_col, const HeadRows<S>& h) {
    buf = b;
    g = &g_;
    R = size_for(g_, L);
    origin = first_col - ((first_col % L) + L) % L;
    hi = origin;
    hr = h;
  }
  void advance(int64_t need) {
    constexpr int L = kLanes<A>;
    const int64_t X = hr.Xp;
    while (hi < need) {
      const int64_t slot = (hi - origin) % R;
      const int64_t a = std::max<int64_t>(hi, 0), b = std::min<int64_t>(hi + L, g->Nk);
      A* dst = buf + slot * X;
      if (b - a < L) std::fill(dst, dst + L * X, A(0));
      if (b > a) {
        if (hi + kPrefetchAhead * L + L <= g->Nk)
          prefetch_tokens(hr, hi + kPrefetchAhead * L, hi + kPrefetchAhead * L + L, *g);
        for_each_segment(a, b, g->H, g->W, [&](int64_t t, int64_t h, int64_t w, int64_t n, int64_t pos) {
          hr.template gather<kUnit>(dst + (pos - hi) * X, t, h, w, n);
        });
      }
      if (slot == 0) std::memcpy(buf + R * X, buf, L * X * sizeof(A));
      hi += L;
    }
  }
  void slots(int64_t base, const int64_t* shift, int64_t n, int64_t* col) const {
    ring_slots(R, origin, base, shift, n, col);
  }
};

// Whether every row that a block of nv queries at q0 reads for entries shift[0..n) lies in the grid.
inline bool block_rows_in_grid(const LaneGeom& g, int64_t q0, int nv, const int64_t* shift, int64_t n) {
  if (n == 0) return false;
  int64_t lo = shift[0], hi = shift[0];
  for (int64_t e = 1; e < n; ++e) lo = std::min(lo, shift[e]), hi = std::max(hi, shift[e]);
  return q0 + lo >= 0 && q0 + hi + nv <= g.Nk;
}

// The rows of one head that a block's product reads on the ring side, for small windows (at most
// kDirectKeys keys): in place (`direct`: float rows of D = 64, evenly spaced; `in_grid`: all of them in
// the grid), row stride in *rs, or else from `ring`, advanced to the block (and started afresh when the
// blocks in place left it behind), *rs = 0. The rows' columns (flat indices in place, ring slots
// otherwise) go to cols. Used by the forward (K for S, V for P V), the query pass (V for dP, K for dQ)
// and the sweep of lane_bwd_probs.h (its query step's V and K, its key step's dO and Q). In place, each of the 54 rows a (1,3,3)
// block reads is loaded once per group of four queries, from L2 at worst, which costs less than copying
// the block's 16 new rows into the ring; with 27 entries ((3,3,3): 162 rows 2 KiB apart) the forward was
// 9% slower, hence the bound. NÜWA 10x21x21, 8 heads, (1,3,3), alternating runs, medians of the minimum
// of 2 s (ms, one thread / two threads): forward V 2.50 -> 2.40 / 1.24 -> 1.21 (2026-11-29, session 6),
// then K 2.42 -> 2.36 / 1.18 -> 1.13; backward with probabilities, the query pass's K and V 4.97 -> 4.90
// / 2.52 -> 2.39, the key pass's Q and dO 4.84 -> 4.70 / 2.36 -> 2.25 (session 7; in session 6, before
// the row products' runs had constant lengths, the key pass measured within the noise this way).
constexpr int64_t kDirectKeys = 9;
template <typename S, bool kUnit, typename A>
inline const A* block_product_rows(bool direct, bool in_grid, RowRing<S, kUnit, A>& ring, const HeadRows<S>& hr,
                                   const LaneGeom& g, int64_t q0, const int64_t* shift, int64_t n, int64_t* cols,
                                   int64_t* rs) {
  constexpr int L = kLanes<A>;
  if (direct && in_grid) {
    for (int64_t e = 0; e < n; ++e) cols[e] = q0 + shift[e];
    const int64_t pc = round_up(q0 + L + g.smax, L) + (kPrefetchAhead - 1) * L;  // as the ring would
    if (pc + L <= g.Nk) prefetch_tokens(hr, pc, pc + L, g);
    *rs = hr.st.s[3];
    return reinterpret_cast<const A*>(hr.at(0, 0, 0));
  }
  if (ring.hi < q0 + g.smin) ring.init(ring.buf, g, L, std::max<int64_t>(q0 + g.smin, -L), hr);
  ring.advance(q0 + L + g.smax);
  ring.slots(q0, shift, n, cols);
  *rs = 0;
  return ring.buf;
}

// Whether a head's rows (strides st, row length X) can be read in place by block_product_rows.
template <typename S, bool kUnit, typename A>
inline bool direct_rows_ok(const Problem& pr, const LaneGeom& g, const Strides& st, int64_t X) {
  return NUWA_V_DIRECT && kRowScores && kUnit && std::is_same<S, A>::value && std::is_same<A, float>::value &&
         X == 4 * kLanes<A> && pr.win_max <= kDirectKeys && flat_strides(st, g.H, g.W);
}

// o[0, n) = the first n < L lanes of y, converted as vstore converts (static_cast<S>).
template <typename S, typename A>
__attribute__((always_inline)) inline void store_head(S* o, const Vec<A>& y, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<S, float>::value && std::is_same<A, float>::value) {
    __m512 x;
    std::memcpy(&x, &y, sizeof(x));
    _mm512_mask_storeu_ps(o, static_cast<__mmask16>((1u << n) - 1), x);
    return;
  }
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (sizeof(S) == 2 && std::is_same<A, float>::value) {
    alignas(32) S t[kLanes<A>];
    vstore<S, A>(t, y);
    const __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
    _mm256_mask_storeu_epi16(o, static_cast<__mmask16>((1u << n) - 1), h);
    return;
  }
#endif
  alignas(64) A t[kLanes<A>];
  vst(t, y);
  for (int64_t k = 0; k < n; ++k) o[k] = static_cast<S>(t[k]);
}

// out[i] (row i < nv of the block, row stride ors) = f[i] * sum_e P[e * L + i] * row(col[e] + i) over the
// entries e, in entry order; row(c) = rows + c * rs (rs_: the rows' stride, in place; 0: X, a RowRing). P
// is 0 on the masked lanes (which add exact
// zeros, as in lane_pv); a run's entries before the first and after the last one valid for any of the QB
// queries of a group are skipped. QB queries at a
// time, NB vectors of the head dim each, in registers. With `init` (rows of the accumulation type, row
// stride irs; may be `out` itself), the sums start from init[i] instead of 0 (the backward's key pass sums
// a group's heads this way, one head after the other). kX: X as a compile-time constant (0: X at run time),
// so that the rows' offsets are immediates (a run-time X left GCC short of registers: it kept offsets in
// vector registers and moved them back per entry, on the FMA ports).
template <int QB, int NB, bool kStream, int kX, bool kTail, typename S, typename A>
__attribute__((always_inline)) inline void pv_rows_group(S* out, int64_t ors, const A* f, const A* __restrict P,
                                                         const A* __restrict rows, int64_t X_, int64_t d0, int i,
                                                         const int64_t* col, const uint32_t* mask, int64_t n,
                                                         const A* init, int64_t irs, int64_t rs_, int64_t xs) {
  constexpr int L = kLanes<A>;
  const int64_t X = kX ? kX : X_;
  const int64_t rs = rs_ ? rs_ : X;  // the rows' stride
  Vec<A> acc[QB][NB];
  if (init) {
    for (int u = 0; u < QB; ++u)
      for (int j = 0; j < NB; ++j) acc[u][j] = vld(init + (i + u) * irs + d0 + j * L);
  } else {
    for (int u = 0; u < QB; ++u)
      for (int j = 0; j < NB; ++j) acc[u][j] = Vec<A>{};
  }
  constexpr uint32_t kBits = (1u << QB) - 1;
  if constexpr (QB > 1 && kX != 0) {
    // Runs of entries in consecutive ring rows (a window's rows along W): query u's row for the run's
    // entry m is the run's row m + u, so row j serves queries u with entry j - u. Each row is loaded once
    // for the group (M + QB - 1 rows for M entries instead of QB * M) and its products added query by query,
    // each query's entries still in order.
    for (int64_t e = 0; e < n;) {
      int64_t M = 1;
      uint32_t any = (mask[e] >> i) & kBits;
      while (e + M < n && col[e + M] == col[e] + M) any |= (mask[e + M] >> i) & kBits, ++M;
      const int64_t run = M, e0 = e;
      if (any) {
        // The group's entries of the run: from its first valid one to its last (NATTEN's shifted windows
        // give blocks runs longer than any one query's; the queries' own stay in entry order).
        while (!((mask[e] >> i) & kBits)) ++e, --M;
        while (!((mask[e + M - 1] >> i) & kBits)) --M;
        const A* r = rows + (col[e] + i) * rs + d0;
        const A* pe = P + e * L + i;
        // Row j, queries u in [ulo, uhi] (all QB of them in the run's middle, fewer at its ends).
        auto row = [&](int64_t j, int ulo, int uhi) __attribute__((always_inline)) {
          Vec<A> x[NB];
          for (int c = 0; c < NB; ++c) x[c] = vld_once(r + j * rs + c * L);
          const A* pj = pe + j * L;  // query u's probability of entry j - u: pj[u - u * L]
          for (int u = 0; u < QB; ++u) {
            if (u < ulo || u > uhi) continue;
            const A pu = pj[u - u * L];
            for (int c = 0; c < NB; ++c) acc[u][c] += pu * x[c];
          }
        };
        // Rows j < M + QB - 1 serve queries [max(0, j - M + 1), min(j, QB - 1)]. With M a constant (runs
        // of up to 7 entries: the windows' widths along W up to 7) the loops unroll and the query bounds
        // are immediates (the run-time loops branched per row and query: (1,3,3) backward with
        // probabilities, 2 frames, one thread, alternating runs, 0.813 -> 0.768 ms; (7,7,7) 24.8 -> 23.9).
        auto run = [&](auto mc) __attribute__((always_inline)) {
          constexpr int64_t Mc = decltype(mc)::value;
#pragma GCC unroll 16
          for (int64_t j = 0; j < Mc + QB - 1; ++j)
            row(j, static_cast<int>(std::max<int64_t>(0, j - Mc + 1)), static_cast<int>(std::min<int64_t>(j, QB - 1)));
        };
        switch (M) {
          case 1: run(std::integral_constant<int64_t, 1>{}); break;
          case 2: run(std::integral_constant<int64_t, 2>{}); break;
          case 3: run(std::integral_constant<int64_t, 3>{}); break;
          case 4: run(std::integral_constant<int64_t, 4>{}); break;
          case 5: run(std::integral_constant<int64_t, 5>{}); break;
          case 6: run(std::integral_constant<int64_t, 6>{}); break;
          case 7: run(std::integral_constant<int64_t, 7>{}); break;
          default:
            for (int64_t j = 0; j < M + QB - 1; ++j)
              row(j, static_cast<int>(std::max<int64_t>(0, j - M + 1)), static_cast<int>(std::min<int64_t>(j, QB - 1)));
        }
      }
      e = e0 + run;
    }
  } else {
    for (int64_t e = 0; e < n; ++e) {
      if (!((mask[e] >> i) & kBits)) continue;
      const A* r = rows + (col[e] + i) * rs + d0;
      const A* pe = P + e * L + i;
      for (int u = 0; u < QB; ++u) {
        const A pu = pe[u];
        for (int j = 0; j < NB; ++j) acc[u][j] += pu * vld(r + u * rs + j * L);
      }
    }
  }
  for (int u = 0; u < QB; ++u) {
    const A fu = f[i + u];
    S* o = out + (i + u) * ors + d0;
    for (int j = 0; j < NB; ++j) {
      const Vec<A> y = acc[u][j] * fu;
      if constexpr (kTail) {  // rows padded to whole vectors past xs: the last one stored in part
        const int64_t left = xs - d0 - j * L;
        if (left >= L)
          vstore<S, A>(o + j * L, y);
        else if (left > 0)
          store_head<S, A>(o + j * L, y, left);
      } else if constexpr (std::is_same<S, A>::value) {
        vst_to(kStream, o + j * L, y);  // non-temporal: no read for ownership of lines not cached
      } else {
        vstore<S, A, kStream>(o + j * L, y);
      }
    }
  }
}

template <int NB, bool kStream, int kX = 0, bool kTail = false, typename S, typename A>
inline void pv_rows_chunk(S* out, int64_t ors, const A* f, const A* P, const A* rows, int64_t X, int64_t d0,
                          const int64_t* col, const uint32_t* mask, int64_t n, int nv, const A* init, int64_t irs,
                          int64_t rs, int64_t xs) {
  // Accumulators QB * NB registers: 16 of AVX-512's 32, 8 of AVX2's 16.
  constexpr int QB = kVecBytes == 64 ? (NB == 3 ? 2 : 4) : (NB <= 2 ? 4 : 2);
  int i = 0;
  for (; i + QB <= nv; i += QB)
    pv_rows_group<QB, NB, kStream, kX, kTail>(out, ors, f, P, rows, X, d0, i, col, mask, n, init, irs, rs, xs);
  for (; i < nv; ++i)
    pv_rows_group<1, NB, kStream, kX, kTail>(out, ors, f, P, rows, X, d0, i, col, mask, n, init, irs, rs, xs);
}

// The head dim in chunks of up to four vectors (X a multiple of L), each chunk's rows kept in registers.
template <bool kStream, bool kTail, typename S, typename A>
inline void pv_rows_chunks(S* out, int64_t ors, const A* f, const A* P, const A* rows, int64_t X, const int64_t* col,
                           const uint32_t* mask, int64_t n, int nv, const A* init, int64_t irs, int64_t rs,
                           int64_t xs) {
  constexpr int L = kLanes<A>;
  int64_t d0 = 0;
  for (; d0 + 4 * L <= X; d0 += 4 * L)
    pv_rows_chunk<4, kStream, 0, kTail>(out, ors, f, P, rows, X, d0, col, mask, n, nv, init, irs, rs, xs);
  const auto rest = [&](auto nb) {
    pv_rows_chunk<decltype(nb)::value, kStream, 0, kTail>(out, ors, f, P, rows, X, d0, col, mask, n, nv, init, irs,
                                                          rs, xs);
  };
  switch ((X - d0) / L) {
    case 3: rest(std::integral_constant<int, 3>{}); break;
    case 2: rest(std::integral_constant<int, 2>{}); break;
    case 1: rest(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// xs (0: X): the output rows' length, when the products' rows are padded with zeros to X (whole vectors)
// past it (lane_run_ok's head dims; their rows are never streamed: not 64-byte multiples).
template <bool kStream = false, typename S, typename A>
inline void lane_pv_rows(S* out, int64_t ors, const A* f, const A* P, const A* rows, int64_t X, const int64_t* col,
                         const uint32_t* mask, int64_t n, int nv, const A* init = nullptr, int64_t irs = 0,
                         int64_t rs = 0, int64_t xs = 0) {
  constexpr int L = kLanes<A>;
  if constexpr (!kStream && kRowScores && std::is_same<A, float>::value) {  // lane_run_ok's padded rows
    if (xs && xs != X) {  // the last vector of each row stored in part (a separate instantiation: a branch in
      // the stores of whole rows slowed the bfloat16 ones by a fifth)
      pv_rows_chunks<false, true>(out, ors, f, P, rows, X, col, mask, n, nv, init, irs, rs, xs);
      return;
    }
  }
  if (X == 4 * L) {  // one chunk of the head dim (float D = 64 with AVX-512): the row stride in immediates
    pv_rows_chunk<4, kStream, 4 * L>(out, ors, f, P, rows, X, 0, col, mask, n, nv, init, irs, rs, X);
    return;
  }
  pv_rows_chunks<kStream, false>(out, ors, f, P, rows, X, col, mask, n, nv, init, irs, rs, X);
}

// lane_pv_rows with non-temporal row stores when `stream` (stream_rows), regular ones otherwise. Each group
// of four queries sweeps all the entries' rows ((7,7,7): about 125 KB, out of L1); taking the entries in
// passes of 14 for all the block's queries, the sums kept in scratch between passes, kept the rows in L1
// and made the forward 3-5% faster until the diagonal row reuse (pv_rows_group), after which it was the
// slower: NÜWA (7,7,7) forward, alternating runs, one thread 40.8 -> 37.0 ms, two threads 19.9 -> 17.8
// without the passes.
template <typename S, typename A>
inline void pv_rows_to(bool stream, S* out, int64_t ors, const A* f, const A* P, const A* rows, int64_t X,
                       const int64_t* col, const uint32_t* mask, int64_t n, int nv, const A* init = nullptr,
                       int64_t irs = 0, int64_t rs = 0, int64_t xs = 0) {
  if (stream)
    lane_pv_rows<true>(out, ors, f, P, rows, X, col, mask, n, nv, init, irs, rs, xs);
  else
    lane_pv_rows<false>(out, ors, f, P, rows, X, col, mask, n, nv, init, irs, rs, xs);
}

// Rows of tokens [a, a + nv) of one head into dst [L][X] (row_scores' query side), rows nv..L-1 zero.
template <bool kUnit, typename S, typename A>
inline void block_rows(A* dst, const HeadRows<S>& hr, int64_t a, int nv, int64_t H, int64_t W) {
  constexpr int L = kLanes<A>;
  token_rows<kUnit>(hr, false, a, a + nv, H, W, dst);
  if (nv < L) std::fill(dst + nv * hr.Xp, dst + L * hr.Xp, A(0));
}

// The block's rows for row_scores' query side, row stride in *rs: read in place when they are rows of
// the accumulation type, evenly spaced (`flat`) and the block is full, else packed into buf
// (block_rows). In place is faster although the rows are 2 KiB apart (8 heads, D = 64): each row is
// loaded once per batch of entries, and the copy stalled on every row's first touch (NÜWA (3,3,3)
// forward, one thread, alternating runs: 5.60-5.86 -> 5.36-5.39 ms; (1,3,3): within the noise).
template <bool kUnit, typename S, typename A>
inline const A* block_rows_at(A* buf, const HeadRows<S>& hr, bool flat, int64_t a, int nv, int64_t H, int64_t W,
                              int64_t* rs) {
  if constexpr (kUnit && std::is_same<S, A>::value) {
    if (flat && nv == kLanes<A> && hr.Xp == hr.X) {
      *rs = hr.st.s[3];
      return reinterpret_cast<const A*>(hr.at(0, 0, 0)) + a * hr.st.s[3];
    }
  }
  block_rows<kUnit>(buf, hr, a, nv, H, W);
  *rs = hr.Xp;
  return buf;
}

// Task bg of n (batch, kv head) pairs in an order that keeps the pairs that run at the same time apart,
// when `spread` (a head's output rows are not whole cache lines: two neighbouring heads then share a line
// at every token, which two threads walking the tokens in step would pass back and forth): 0, n/2, 1,
// n/2 + 1, ..., so that neither neighbouring tasks (taken from the shared counter) nor tasks n/2 apart (the
// two threads' own ranges of cache-resident calls) are neighbouring heads. NÜWA 10x21x21, 8 heads, D = 40
// (160-byte rows), two threads: evens first, then odds (per-call alternation against the plain order):
// (1,3,3) forward 1,631 -> 1,448 us, forward + backward 6.30 -> 5.70 ms, (3,3,3) 11.2 -> 10.2; this order
// (alternating processes): (1,3,3) forward + backward 6.17-6.36 -> 5.68-5.96 ms, image grid unchanged
// (383-393 against 390 us; evens first had paired the sharing heads there).
inline int64_t spread_heads(int64_t bg, int64_t n, bool spread) {
  return spread ? (bg % 2 ? (n + 1) / 2 + bg / 2 : bg / 2) : bg;
}

// probs (optional): every pair's probability, stored in the DsStore layout `ps` for the backward's key
// pass. Every block writes all the elements it owns (DsStore::zero_unowned), zeros where its lanes have
// no pair: each element is written once, no clearing pass.
template <typename S, bool kUnit>
void lane_fwd_kernel(const Problem& pr, const S* q, Strides qs, const S* k, Strides ks, const S* v, Strides vs, S* out,
                     acc_t<S>* lse, acc_t<S>* probs = nullptr, const DsStore* ps = nullptr) {
  using A = acc_t<S>;
  constexpr int L = kLanes<A>;
  const LaneGeom g = lane_geom(pr);
  const int64_t D = pr.D, Dv = pr.Dv, heads = pr.heads, group = pr.group;
  // Head dims that are not whole vectors (lane_run_ok: AVX-512 float only) run on rows packed with zero
  // tails to Dp, Dvp (the products then add exact zeros), the output rows stored to Dv.
  const int64_t Dp = round_up(D, L), Dvp = round_up(Dv, L);
  // Chunks of queries per (batch, kv head): enough tasks for the threads (the forward's results do not
  // depend on the chunking: each query's entries are summed in shift order, masked ones adding zeros).
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = std::max<int64_t>(1, (2 * nt + pr.B * pr.heads_kv - 1) / (pr.B * pr.heads_kv));
  const int64_t chunk = round_up(std::max<int64_t>((g.Nq + want - 1) / want, 1), L);
  const int64_t nch = (g.Nq + chunk - 1) / chunk;
  const int64_t ntask = pr.B * pr.heads_kv * nch;
  const bool spread = rows_share_lines<S>(Dv);  // the output rows
  const bool kflat = flat_strides(ks, g.H, g.W), qflat = flat_strides(qs, g.H, g.W);
  const bool v_direct = direct_rows_ok<S, kUnit, A>(pr, g, vs, Dv);  // P V's value rows in place
  const bool k_direct = direct_rows_ok<S, kUnit, A>(pr, g, ks, D);   // the scores' key rows in place
  // AVX-512 float: keys as rows and row_scores; otherwise K^T columns and lane_scores.
  constexpr bool kRows = kRowScores && std::is_same<A, float>::value;
  using KRing = typename std::conditional<kRows, RowRing<S, kUnit, A>, TransposedRing<S, kUnit, A>>::type;
  const int64_t R = TransposedRing<S, kUnit, A>::size_for(g, L);
  const int64_t ring = R + 3 * L;
  const int64_t sbuf = g.box_max * L;
  const int64_t X = std::max(Dp, Dvp);
  const int64_t kring = kRows ? RowRing<S, kUnit, A>::elems(g, L, Dp) : D * ring;
  const int64_t part = kRows ? kRowScoreBatch * 4 * L : 0;  // row_scores' partial sums
  const int64_t scratch = kring + RowRing<S, kUnit, A>::elems(g, L, Dvp) + part + Dp * L + sbuf + L * X + 2 * L;
  const std::shared_ptr<const LaneTables> tables = lane_tables<L, false>(pr, g, probs ? ps : nullptr);
  const EntryTable& et = tables->et;
  const std::vector<int32_t>& psr = tables->rows;
  if (probs)
    for (int64_t bh = 0; bh < pr.B * heads; ++bh) ps->zero_unowned(probs + ps->base(bh / heads, bh % heads, heads));
  const bool stream_out = stream_rows<S, A>(out, double(pr.B) * heads * g.Nq, Dv);
  // The probabilities too when the output goes past the caches (their lines would be evicted before the
  // backward reads them); one aligned line per row and block. NÜWA (1,3,3), two threads, alternating
  // runs: na3d_fwd_probs 1.24 -> 1.20 ms, with na3d_bwd_probs after it 4.27-4.51 -> 4.06-4.10.
  const bool stream_probs = probs && stream_out && reinterpret_cast<uintptr_t>(probs) % 64 == 0;
  const int64_t box_axes = g.box_axes();
  const double work = double(pr.B) * heads * g.Nq * pr.win_max * (D + Dv);
  const A scale = static_cast<A>(pr.scale);
  // lse by (batch, head) rows of nq_pad queries first, one aligned vector per block and head, and into its
  // (B, Nq, heads) layout after the tasks: stored there directly, a block's 16 scalars at a stride of
  // `heads` land in cache lines that the tasks of the other heads, running on the other threads at the
  // same queries, write too (false sharing). NÜWA (1,3,3), two threads, in-process alternation, medians:
  // forward 1.36-1.43 -> 1.27-1.33 ms, training step 4.32-4.63 -> 4.23-4.56; one thread unchanged.
  const int64_t nq_pad = round_up(g.Nq, L);
  const std::unique_ptr<A, void (*)(void*)> lse_rows(static_cast<A*>(pool_alloc(sizeof(A) * pr.B * heads * nq_pad)),
                                                     pool_free);  // uninitialised
  parallel_tasks<A>(pr, ntask, work, scratch, 4 * g.box_max + box_axes, [&](Scratch<A>& sc, int64_t task) {
    const int64_t c = task % nch, bg = spread_heads(task / nch, pr.B * pr.heads_kv, spread);
    const int64_t b = bg / pr.heads_kv, gh = bg % pr.heads_kv;
    const int64_t qa = c * chunk, qb = std::min(g.Nq, qa + chunk);
    A* Qt = sc.a.data();      // [D][L]   queries of the block, transposed and scaled (lane_scores)
    A* Sb = Qt + Dp * L;      // [entries][L] scores, then probabilities
    A* tmp = Sb + sbuf;       // [L][max(Dp, Dvp)]  (row_scores: the block's query rows)
    A* inv_l = tmp + L * X;   // [L]
    A* kbuf = inv_l + 2 * L;  // rings: K (K^T [D][ld] or rows [R + L][D]), V rows [R + L][Dv]; part
    int64_t* shift_buf = sc.idx.data();
    int64_t* col = shift_buf + g.box_max;
    uint32_t* mask_buf = reinterpret_cast<uint32_t*>(col + g.box_max);
    uint32_t* mt = reinterpret_cast<uint32_t*>(mask_buf + 2 * g.box_max);
    uint32_t* mh = mt + (g.rhi[0] - g.rlo[0] + 1);
    uint32_t* mw = mh + (g.rhi[1] - g.rlo[1] + 1);
    const int64_t first_col = std::max<int64_t>(qa + g.smin, -L);
    std::vector<int32_t> prow_entry(probs ? ps->rows : 0);  // the block's entry of each row of the store, or -1
    KRing kr;
    RowRing<S, kUnit, A> vr;
    const HeadRows<S> kh = head_rows(k, ks, b, gh, D, Dp);
    if constexpr (kRows)
      kr.init(kbuf, g, L, first_col, kh);
    else
      kr.init(kbuf, g, L, first_col, kh, kflat);
    const HeadRows<S> vh = head_rows(v, vs, b, gh, Dv, Dvp);
    vr.init(kbuf + kring, g, L, first_col, vh);
    std::vector<int64_t> vcol(g.box_max);  // the value rows' columns of the block
    [[maybe_unused]] A* pbuf = kbuf + kring + RowRing<S, kUnit, A>::elems(g, L, Dvp);
    const Vec<A> ninf = vsplat(-std::numeric_limits<A>::infinity());
    for (int64_t q0 = qa; q0 < qb; q0 += L) {
      const int nv = static_cast<int>(std::min<int64_t>(L, qb - q0));
      const int64_t* shift;
      const uint32_t* mask;
      const int64_t n = et.get<L>(pr, g, q0, nv, &shift, &mask, shift_buf, mask_buf, mt, mh, mw);
      // Key and value rows: in place inside the grid for small windows, else the rings (block_product_rows).
      const bool in_grid = (k_direct || v_direct) && block_rows_in_grid(g, q0, nv, shift, n);
      [[maybe_unused]] int64_t krs = 0;
      [[maybe_unused]] const A* krows = nullptr;
      if constexpr (kRows) {
        krows = block_product_rows(k_direct, k_direct && in_grid, kr, kh, g, q0, shift, n, col, &krs);
      } else {
        kr.advance(q0 + L + g.smax, tmp);
        kr.slots(q0, shift, n, col);
      }
      int64_t vrs;
      const A* vrows = block_product_rows(v_direct, v_direct && in_grid, vr, vh, g, q0, shift, n, vcol.data(), &vrs);
      if (probs) {  // the block's entry of each row of the store (shared by the group's heads)
        const int32_t* rr = psr.data() + (q0 / L) * et.stride;
        std::fill(prow_entry.begin(), prow_entry.end(), -1);
        for (int64_t e = 0; e < n; ++e) prow_entry[rr[e]] = static_cast<int32_t>(e);
      }
      // Grouped heads share the block's keys, values and entries.
      for (int64_t head = gh * group; head < (gh + 1) * group; ++head) {
        const HeadRows<S> qh = head_rows(q, qs, b, head, D, Dp);
        if (head + 1 < (gh + 1) * group)
          prefetch_tokens(head_rows(q, qs, b, head + 1, D), q0, q0 + nv, g);
        else if (q0 + L < qb)
          prefetch_tokens(head_rows(q, qs, b, gh * group, D), q0 + L, std::min(qb, q0 + 2 * L), g);
        if constexpr (kRows) {  // the block's query rows (packed: rows past the block zeros)
#if defined(__AVX512F__)
          int64_t qrs;
          const A* qrows = block_rows_at<kUnit>(tmp, qh, qflat, q0, nv, g.H, g.W, &qrs);
          row_scores(Sb, qrows, qrs, krows, col, mask, n, Dp, scale, reinterpret_cast<__m512*>(pbuf), krs);
#endif
        } else {  // Q^T of the block, scaled
          const TokenRows<S, kUnit, A> qr = token_rows<kUnit>(qh, qflat, q0, q0 + nv, g.H, g.W, tmp);
          transpose_rows(Qt, L, qr.p, qr.rs, nv, D, scale);
          lane_scores(Sb, Qt, kr.buf, kr.ld, col, n, D);
        }
        // Softmax per lane over the valid entries; masked lanes get probability 0.
        Vec<A> mx = ninf;
        for (int64_t e = 0; e < n; ++e) {
          Vec<A> s = vld(Sb + e * L);
          s = lane_mask<A>(mask[e]) ? s : ninf;
          vst(Sb + e * L, s);
          mx = s > mx ? s : mx;
        }
        const Vec<A> msafe = mx == ninf ? Vec<A>{} : mx;
        Vec<A> l = {};  // one chain in entry order: the same sums whatever the block alignment
        for (int64_t e = 0; e < n; ++e) {
          const Vec<A> p = exp_vec(vld(Sb + e * L) - msafe);
          vst(Sb + e * L, p);
          l += p;
        }
        {
          const auto any = l > A(0);  // l >= 1 where any entry is valid
          const Vec<A> lsafe = any ? l : vsplat(A(1));
          vst(inv_l, any ? A(1) / lsafe : Vec<A>{});
          const Vec<A> lv = any ? msafe + log_vec(lsafe) : ninf;
          vst(lse_rows.get() + (b * heads + head) * nq_pad + q0, lv);  // lanes past nv: padding
        }
        if (probs) {  // P = p / l (0 on masked lanes) into every row's owned elements, 0 in rows without entry
          A* pb = probs + ps->base(b, head, heads) + q0;
          const Vec<A> il = vld(inv_l);
          for (int64_t r = 0; r < ps->rows; ++r) {
            const Vec<A> x = prow_entry[r] >= 0 ? vld(Sb + prow_entry[r] * L) * il : Vec<A>{};
            vst_to(stream_probs, pb + r * ps->ld, x);
          }
        }
        // out = P V, in the natural layout: value rows in place or from the ring, straight into the output rows.
        S* orow = out + ((b * g.Nq + q0) * heads + head) * Dv;
        pv_rows_to(stream_out, orow, heads * Dv, inv_l, Sb, vrows, Dvp, vcol.data(), mask, n, nv,
                   static_cast<const A*>(nullptr), 0, vrs, Dv);
      }
    }
#if defined(__AVX512F__)
    if (stream_out) _mm_sfence();  // the non-temporal stores are visible before the task ends
#endif
  });
  // lse[b, q, head] = lse_rows[b, head, q], in equal parts per thread past 1,024 rows (a grain of 4,096
  // left NÜWA's 4,410 to one thread: 16-24 -> 13-15 us a call)
  at::parallel_for(0, pr.B * g.Nq, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const A* src = lse_rows.get() + (r / g.Nq) * heads * nq_pad + r % g.Nq;
      A* dst = lse + r * heads;
      for (int64_t h = 0; h < heads; ++h) dst[h] = src[h * nq_pad];
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward: a query pass (dQ) and a key pass (dK, dV), both in lanes
// ------------------------------------------------------------------------------------------------

// Chunks of blocks per (batch, kv head) for n blocks' worth of rows: enough tasks for the threads (results
// do not depend on it: every output element is summed by one task in shift order).
template <int L>
inline int64_t lane_task_chunk(const Problem& pr, int64_t n) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = std::max<int64_t>(1, (2 * nt + pr.B * pr.heads_kv - 1) / (pr.B * pr.heads_kv));
  return round_up(std::max<int64_t>((n + want - 1) / want, 1), L);
}

// dst[i] = element 0 of tokens [a, a + nv) of a (B, T, H, W, heads) stats tensor's head, 0 beyond nv.
template <typename A>
inline void gather_lane_stats(A* dst, const HeadRows<A>& hr, int64_t a, int nv, int64_t H, int64_t W) {
  constexpr int L = kLanes<A>;
  for_each_segment(a, a + nv, H, W, [&](int64_t t, int64_t h, int64_t w, int64_t n, int64_t pos) {
    hr.gather_scalars(dst + (pos - a), t, h, w, n);
  });
  for (int i = nv; i < L; ++i) dst[i] = A(0);
}

// Transposed block of tokens [a, a + nv) of one head into dst [X][L], times `factor`.
template <bool kUnit, typename S, typename A>
inline void transposed_block(A* dst, const HeadRows<S>& hr, bool direct, int64_t a, int nv, int64_t H, int64_t W,
                             A factor, A* tmp) {
  constexpr int L = kLanes<A>;
  const TokenRows<S, kUnit, A> tr = token_rows<kUnit>(hr, direct, a, a + nv, H, W, tmp);
  transpose_rows(dst, L, tr.p, tr.rs, nv, hr.X, factor);
}

// How many blocks ahead the query pass prefetches the dS store's rows.
constexpr int64_t kDsAhead = 2;

template <typename S, bool kUnit>
void lane_bwd_dq_kernel(const Problem& pr, const S* go, Strides gs, const S* q, Strides qs, const S* k, Strides ks,
                        const S* v, Strides vs, const acc_t<S>* lse, Strides ls, const acc_t<S>* delta, Strides dls,
                        S* dq, const acc_t<S>* ds_in = nullptr, const DsStore* ds = nullptr) {
  // ds_in: the key pass's dS (DsStore ds), read instead of recomputed. (With the forward's P the backward
  // is lane_bwd_probs_kernel, lane_bwd_probs.h.)
  using A = acc_t<S>;
  constexpr int L = kLanes<A>;
  const LaneGeom g = lane_geom(pr);
  const int64_t D = pr.D, Dv = pr.Dv, heads = pr.heads, group = pr.group;
  const int64_t Dp = round_up(D, L), Dvp = round_up(Dv, L);  // rows padded to whole vectors (lane_run_ok)
  const int64_t chunk = lane_task_chunk<L>(pr, g.Nq);
  const int64_t nch = (g.Nq + chunk - 1) / chunk;
  const int64_t ntask = pr.B * pr.heads_kv * nch;
  const bool spread = rows_share_lines<S>(D);  // dQ's rows
  const bool kflat = flat_strides(ks, g.H, g.W), vflat = flat_strides(vs, g.H, g.W);
  const bool qflat = flat_strides(qs, g.H, g.W), gflat = flat_strides(gs, g.H, g.W);
  const int64_t ring = TransposedRing<S, kUnit, A>::size_for(g, L) + 3 * L;
  const int64_t sbuf = g.box_max * L;
  const int64_t X = std::max(Dp, Dvp);
  // AVX-512 float: S and dP (without the dS store) by row_scores from the rows of K and V.
  constexpr bool kRows = kRowScores && std::is_same<A, float>::value;
  const int64_t part = kRows ? kRowScoreBatch * 4 * L : 0;
  const int64_t tring = kRows ? RowRing<S, kUnit, A>::elems(g, L, Dvp) : (D + Dv) * ring;
  const int64_t scratch =
      tring + RowRing<S, kUnit, A>::elems(g, L, Dp) + (Dp + Dvp) * L + 2 * sbuf + L * X + 4 * L + part;
  const int64_t box_axes = g.box_axes();
  const std::shared_ptr<const LaneTables> tables = lane_tables<L, false>(pr, g, ds_in ? ds : nullptr);
  const EntryTable& et = tables->et;
  const std::vector<int32_t>& dsr = tables->rows;
  // Small windows: dQ's key rows and dP's value rows in place inside the grid (block_product_rows).
  const bool k_direct = direct_rows_ok<S, kUnit, A>(pr, g, ks, D);
  const bool v_direct = kRows && direct_rows_ok<S, kUnit, A>(pr, g, vs, Dv);
  const bool stream_dq = stream_rows<S, A>(dq, double(pr.B) * heads * g.Nq, D);
  const double work = double(pr.B) * heads * g.Nq * pr.win_max * (ds_in ? D : 2 * D + Dv);
  const A scale = static_cast<A>(pr.scale);
  parallel_tasks<A>(pr, ntask, work, scratch, 4 * g.box_max + box_axes, [&](Scratch<A>& sc, int64_t task) {
    const int64_t c = task % nch, bg = spread_heads(task / nch, pr.B * pr.heads_kv, spread);
    const int64_t b = bg / pr.heads_kv, gh = bg % pr.heads_kv;
    const int64_t qa = c * chunk, qb = std::min(g.Nq, qa + chunk);
    A* Qt = sc.a.data();     // [D][L]  queries, transposed, scaled (row_scores: [L][Dp] rows)
    A* Gt = Qt + Dp * L;     // [Dv][L] output gradients, transposed (row_scores: [L][Dvp] rows)
    A* Sb = Gt + Dvp * L;    // [entries][L] scores, then P
    A* Pb = Sb + sbuf;       // [entries][L] dP, then dS
    A* tmp = Pb + sbuf;      // [L][max(D, Dv)]
    A* lse_v = tmp + L * X;  // [L]
    A* del_v = lse_v + L;    // [L]
    A* fac = del_v + L;      // [L]
    A* kbuf = fac + L;       // rings: K^T [D][ld], V^T [Dv][ld] (row_scores: V rows), K rows [R + L][D]; part
    int64_t* shift_buf = sc.idx.data();
    int64_t* col = shift_buf + g.box_max;
    uint32_t* mask_buf = reinterpret_cast<uint32_t*>(col + g.box_max);
    uint32_t* mt = reinterpret_cast<uint32_t*>(mask_buf + 2 * g.box_max);
    uint32_t* mh = mt + (g.rhi[0] - g.rlo[0] + 1);
    uint32_t* mw = mh + (g.rhi[1] - g.rlo[1] + 1);
    for (int i = 0; i < L; ++i) fac[i] = scale;
    const int64_t first_col = std::max<int64_t>(qa + g.smin, -L);
    TransposedRing<S, kUnit, A> kr, vr;
    RowRing<S, kUnit, A> krow, vrow;  // same slots as kr
    if (!kRows) {
      kr.init(kbuf, g, L, first_col, head_rows(k, ks, b, gh, D), kflat);
      vr.init(kbuf + D * kr.ld, g, L, first_col, head_rows(v, vs, b, gh, Dv), vflat);
    } else {
      vrow.init(kbuf, g, L, first_col, head_rows(v, vs, b, gh, Dv, Dvp));
    }
    const HeadRows<S> kh = head_rows(k, ks, b, gh, D, Dp), vh = head_rows(v, vs, b, gh, Dv, Dvp);
    krow.init(kbuf + tring, g, L, first_col, kh);
    [[maybe_unused]] A* pbuf = kbuf + tring + RowRing<S, kUnit, A>::elems(g, L, Dp);
    std::vector<int64_t> vcol(kRows ? g.box_max : 0);  // dP's value rows' columns (row_scores)
    int64_t q0 = qa;
    // The dS store's lines of block q0 + kDsAhead * L (one stream per row), at hb (base + q0).
    const auto prefetch_store = [&](int64_t hb) {
      if (!g.prefetch || q0 + kDsAhead * L >= qb) return;
      const int64_t bi = q0 / L + kDsAhead;
      const int32_t* ra = dsr.data() + bi * et.stride;
      for (int64_t e = 0; e < et.count[bi]; ++e) prefetch_l2(ds_in + hb + kDsAhead * L + ra[e] * ds->ld);
    };
    for (; q0 < qb; q0 += L) {
      const int nv = static_cast<int>(std::min<int64_t>(L, qb - q0));
      const int64_t* shift;
      const uint32_t* mask;
      const int64_t n = et.get<L>(pr, g, q0, nv, &shift, &mask, shift_buf, mask_buf, mt, mh, mw);
      const bool in_grid = (k_direct || v_direct) && block_rows_in_grid(g, q0, nv, shift, n);
      [[maybe_unused]] const A* vrows = nullptr;  // row_scores: dP's value rows (in place or vrow), stride vrs
      [[maybe_unused]] int64_t vrs = 0;
      if (!ds_in) {
        if (kRows) {
          vrows = block_product_rows(v_direct, v_direct && in_grid, vrow, vh, g, q0, shift, n, vcol.data(), &vrs);
        } else {
          kr.advance(q0 + L + g.smax, tmp);
          vr.advance(q0 + L + g.smax, tmp);
        }
      }
      // dQ's key rows (in place or krow, stride krs; the lane rings' slots are krow's).
      int64_t krs;
      const A* krows = block_product_rows(k_direct, k_direct && in_grid, krow, kh, g, q0, shift, n, col, &krs);
      for (int64_t head = gh * group; head < (gh + 1) * group; ++head) {
        const int64_t hb = ds ? ds->base(b, head, heads) + q0 : 0;  // the pair stores' rows of the block
        const int32_t* rr = dsr.empty() ? nullptr : dsr.data() + (q0 / L) * et.stride;
        if (ds_in) {  // dS from the key pass; masked lanes read other pairs' (or unwritten) slots: zeroed
          prefetch_store(hb);
          for (int64_t e = 0; e < n; ++e) {
            const Vec<A> x = vld(ds_in + hb + rr[e] * ds->ld);
            vst(Pb + e * L, lane_mask<A>(mask[e]) ? x : Vec<A>{});
          }
        } else {
          const HeadRows<S> qh = head_rows(q, qs, b, head, D, Dp), gh_ = head_rows(go, gs, b, head, Dv, Dvp);
          // Prefetch the next head's (or block's) query and output-gradient rows.
          {
            const bool more = head + 1 < (gh + 1) * group;
            const int64_t nh = more ? head + 1 : gh * group, pa = more ? q0 : q0 + L;
            const int64_t pb = more ? q0 + nv : std::min(qb, q0 + 2 * L);
            if (pa < pb) {
              prefetch_tokens(head_rows(q, qs, b, nh, D), pa, pb, g);
              prefetch_tokens(head_rows(go, gs, b, nh, Dv), pa, pb, g);
            }
          }
          if constexpr (kRows) {
#if defined(__AVX512F__)
            int64_t qrs, grs;
            const A* qrows = block_rows_at<kUnit>(Qt, qh, qflat, q0, nv, g.H, g.W, &qrs);
            const A* grows = block_rows_at<kUnit>(Gt, gh_, gflat, q0, nv, g.H, g.W, &grs);
            row_scores(Sb, qrows, qrs, krows, col, mask, n, Dp, scale, reinterpret_cast<__m512*>(pbuf), krs);
            row_scores(Pb, grows, grs, vrows, vcol.data(), mask, n, Dvp, A(1), reinterpret_cast<__m512*>(pbuf), vrs);
#endif
          } else {
            transposed_block<kUnit>(Qt, qh, qflat, q0, nv, g.H, g.W, scale, tmp);
            transposed_block<kUnit>(Gt, gh_, gflat, q0, nv, g.H, g.W, A(1), tmp);
            lane_scores(Sb, Qt, kr.buf, kr.ld, col, n, D);
            lane_scores(Pb, Gt, vr.buf, vr.ld, col, n, Dv);
          }
          gather_lane_stats(lse_v, head_rows(lse, ls, b, head, 1), q0, nv, g.H, g.W);
          gather_lane_stats(del_v, head_rows(delta, dls, b, head, 1), q0, nv, g.H, g.W);
          const Vec<A> lv = vld(lse_v), dv = vld(del_v);
          for (int64_t e = 0; e < n; ++e) {
            const Vec<A> p0 = exp_vec(vld(Sb + e * L) - lv);
            const Vec<A> p = lane_mask<A>(mask[e]) ? p0 : Vec<A>{};
            vst(Pb + e * L, p * (vld(Pb + e * L) - dv));
          }
        }
        // dQ = scale dS K, in the natural layout: key rows in place or from the ring, straight into dQ's rows.
        pv_rows_to(stream_dq, dq + ((b * g.Nq + q0) * heads + head) * D, heads * D, fac, Pb, krows, Dp, col, mask,
                   n, nv, static_cast<const A*>(nullptr), 0, krs, D);
      }
    }
#if defined(__AVX512F__)
    if (stream_dq) _mm_sfence();
#endif
  });
}

template <typename S, bool kUnit>
void lane_bwd_dkv_kernel(const Problem& pr, const S* go, Strides gs, const S* q, Strides qs, const S* k, Strides ks,
                         const S* v, Strides vs, const acc_t<S>* lse, Strides ls, const acc_t<S>* delta, Strides dls,
                         S* dk, S* dv, acc_t<S>* ds_out = nullptr, const DsStore* ds = nullptr) {
  // ds_out: where to store every pair's dS (DsStore ds) for the query pass. (With the forward's P the
  // backward is lane_bwd_probs_kernel, lane_bwd_probs.h.)
  using A = acc_t<S>;
  constexpr int L = kLanes<A>;
  const LaneGeom g = lane_geom(pr, /*key_side=*/true);  // Nq: keys (the blocks), Nk: queries (the rings)
  const int64_t D = pr.D, Dv = pr.Dv, heads_kv = pr.heads_kv, group = pr.group;
  const int64_t Dp = round_up(D, L), Dvp = round_up(Dv, L);  // rows padded to whole vectors (lane_run_ok)
  const int64_t chunk = lane_task_chunk<L>(pr, g.Nq);
  const int64_t nch = (g.Nq + chunk - 1) / chunk;
  const int64_t ntask = pr.B * heads_kv * nch;
  const bool spread = rows_share_lines<S>(D) || rows_share_lines<S>(Dv);  // dK's, dV's rows
  const bool kflat = flat_strides(ks, g.H, g.W), vflat = flat_strides(vs, g.H, g.W);
  const bool qflat = flat_strides(qs, g.H, g.W), gflat = flat_strides(gs, g.H, g.W);
  const bool lflat = flat_strides(ls, g.H, g.W), dflat = flat_strides(dls, g.H, g.W);
  const int64_t ring = TransposedRing<S, kUnit, A>::size_for(g, L) + 3 * L;
  const int64_t sbuf = g.box_max * L;
  const int64_t X = std::max(Dp, Dvp);
  // AVX-512 float: S^T and dP^T by row_scores from the row rings of Q and dO (no Q^T, dO^T rings).
  constexpr bool kRows = kRowScores && std::is_same<A, float>::value;
  const int64_t part = kRows ? kRowScoreBatch * 4 * L : 0;  // row_scores' partial sums
  const int64_t scratch = group * (((kRows ? 0 : D + Dv) + 2) * ring + RowRing<S, kUnit, A>::elems(g, L, Dp) +
                                   RowRing<S, kUnit, A>::elems(g, L, Dvp)) +
                          (Dp + Dvp) * L + 2 * sbuf + L * X + 2 * L + (group > 1 ? L * (Dp + Dvp) : 0) + part;
  const int64_t box_axes = g.box_axes();
  const std::shared_ptr<const LaneTables> tables = lane_tables<L, true>(pr, g, ds_out ? ds : nullptr);
  const EntryTable& et = tables->et;
  const std::vector<int32_t>& dsr = tables->rows;
  const bool stream_dkv = stream_rows<S, A>(dk, double(pr.B) * heads_kv * g.Nq, D) &&
                          stream_rows<S, A>(dv, double(pr.B) * heads_kv * g.Nq, Dv);
  const double work = double(pr.B) * pr.heads * g.Nk * pr.win_max * 2 * (D + Dv);
  const A scale = static_cast<A>(pr.scale);
  parallel_tasks<A>(pr, ntask, work, scratch, 4 * g.box_max + box_axes, [&](Scratch<A>& sc, int64_t task) {
    const int64_t c = task % nch, bg = spread_heads(task / nch, pr.B * pr.heads_kv, spread);
    const int64_t b = bg / heads_kv, gh = bg % heads_kv;
    const int64_t ka = c * chunk, kb = std::min(g.Nq, ka + chunk);
    A* Kt = sc.a.data();     // [D][L]  keys, transposed, scaled (row_scores: [L][Dp] rows)
    A* Vt = Kt + Dp * L;     // [Dv][L] values, transposed (row_scores: [L][Dvp] rows)
    A* Sb = Vt + Dvp * L;    // [entries][L] scores, then P
    A* Pb = Sb + sbuf;       // [entries][L] dP, then dS
    A* tmp = Pb + sbuf;      // [L][max(D, Dv)]
    A* fac = tmp + L * X;    // [L] scale
    A* one = fac + L;        // [L] 1
    A* rbuf = one + L;       // rings of every head of the group, then (group > 1) dK, dV sums [L][D], [L][Dv]
    int64_t* shift_buf = sc.idx.data();
    int64_t* col = shift_buf + g.box_max;
    uint32_t* mask_buf = reinterpret_cast<uint32_t*>(col + g.box_max);
    uint32_t* mt = reinterpret_cast<uint32_t*>(mask_buf + 2 * g.box_max);
    uint32_t* mh = mt + (g.rhi[0] - g.rlo[0] + 1);
    uint32_t* mw = mh + (g.rhi[1] - g.rlo[1] + 1);
    for (int i = 0; i < L; ++i) {
      fac[i] = scale;
      one[i] = A(1);
    }
    const int64_t first_col = std::max<int64_t>(ka + g.smin, -L);
    std::vector<TransposedRing<S, kUnit, A>> qr(group), gr(group);
    std::vector<TransposedRing<A, true, A>> lr(group), dr(group);
    std::vector<RowRing<S, kUnit, A>> qrow(group), grow(group);  // same slots as qr, gr
    A* rp = rbuf;
    for (int64_t j = 0; j < group; ++j) {
      const int64_t head = gh * group + j;
      if (!kRows) {
        qr[j].init(rp, g, L, first_col, head_rows(q, qs, b, head, D), qflat);
        rp += D * qr[j].ld;
        gr[j].init(rp, g, L, first_col, head_rows(go, gs, b, head, Dv), gflat);
        rp += Dv * gr[j].ld;
      }
      lr[j].init(rp, g, L, first_col, head_rows(lse, ls, b, head, 1), lflat);
      rp += lr[j].ld;
      dr[j].init(rp, g, L, first_col, head_rows(delta, dls, b, head, 1), dflat);
      rp += dr[j].ld;
      qrow[j].init(rp, g, L, first_col, head_rows(q, qs, b, head, D, Dp));
      rp += RowRing<S, kUnit, A>::elems(g, L, Dp);
      grow[j].init(rp, g, L, first_col, head_rows(go, gs, b, head, Dv, Dvp));
      rp += RowRing<S, kUnit, A>::elems(g, L, Dvp);
    }
    A* dKs = rp;            // [L][Dp]  dK sums over the group's heads but the last
    A* dVs = dKs + L * Dp;  // [L][Dvp] dV sums
    [[maybe_unused]] A* pbuf = dKs + (group > 1 ? L * (Dp + Dvp) : 0);  // row_scores' partial sums
    const HeadRows<S> kh_ = head_rows(k, ks, b, gh, D, Dp), vh = head_rows(v, vs, b, gh, Dv, Dvp);
    for (int64_t k0 = ka; k0 < kb; k0 += L) {
      const int nv = static_cast<int>(std::min<int64_t>(L, kb - k0));
      const int64_t* shift;
      const uint32_t* mask;
      const int64_t n = et.get<L, true>(pr, g, k0, nv, &shift, &mask, shift_buf, mask_buf, mt, mh, mw);
      qrow[0].slots(k0, shift, n, col);
      if (k0 + L < kb) {  // the next block's key and value rows
        prefetch_tokens(kh_, k0 + L, std::min(kb, k0 + 2 * L), g);
        prefetch_tokens(vh, k0 + L, std::min(kb, k0 + 2 * L), g);
      }
      const A* krows = Kt;  // the block's key and value rows (row_scores: in place or packed)
      const A* vrows = Vt;
      int64_t krs = Dp, vrs = Dvp;
      if constexpr (kRows) {
        krows = block_rows_at<kUnit>(Kt, kh_, kflat, k0, nv, g.H, g.W, &krs);
        vrows = block_rows_at<kUnit>(Vt, vh, vflat, k0, nv, g.H, g.W, &vrs);
      } else {
        transposed_block<kUnit>(Kt, kh_, kflat, k0, nv, g.H, g.W, scale, tmp);
        transposed_block<kUnit>(Vt, vh, vflat, k0, nv, g.H, g.W, A(1), tmp);
      }
      const int64_t row0 = (b * g.Nq + k0) * heads_kv + gh;
      const int32_t* rr = dsr.empty() ? nullptr : dsr.data() + (k0 / L) * et.stride;
      for (int64_t j = 0; j < group; ++j) {
        if (!kRows) {
          qr[j].advance(k0 + L + g.smax, tmp);
          gr[j].advance(k0 + L + g.smax, tmp);
        }
        lr[j].advance(k0 + L + g.smax, tmp);
        dr[j].advance(k0 + L + g.smax, tmp);
        qrow[j].advance(k0 + L + g.smax);  // the rows of Q and dO (same slots: columns col)
        grow[j].advance(k0 + L + g.smax);
#if defined(__AVX512F__)
        __m512* const part_v = reinterpret_cast<__m512*>(pbuf);
#endif
        // dP^T into Pb
        if constexpr (kRows) {
#if defined(__AVX512F__)
          row_scores(Pb, vrows, vrs, grow[j].buf, col, mask, n, Dvp, A(1), part_v);
#endif
        } else {
          lane_scores(Pb, Vt, gr[j].buf, gr[j].ld, col, n, Dv);
        }
        if (ds_out && g.prefetch && k0 + kDsAhead * L < kb) {  // the store's rows kDsAhead blocks ahead (one stream per
          const int64_t bi = k0 / L + kDsAhead;  // row, as the query pass's)
          const int32_t* ra = dsr.data() + bi * et.stride;
          const int64_t* sa = et.shift.data() + bi * et.stride;
          const int64_t off = ds->base(b, gh * group + j, pr.heads) + k0 + kDsAhead * L + L - 1;
          for (int64_t e = 0; e < et.count[bi]; ++e) prefetch_l2(ds_out + off + ra[e] * ds->ld + sa[e]);
        }
        // P into Sb (0 on masked lanes), recomputed from S; then dS = P (dP - delta) into Pb.
        if constexpr (kRows) {
#if defined(__AVX512F__)
          row_scores(Sb, krows, krs, qrow[j].buf, col, mask, n, Dp, scale, part_v);
#endif
        } else {
          lane_scores(Sb, Kt, qr[j].buf, qr[j].ld, col, n, D);
        }
        for (int64_t e = 0; e < n; ++e) {
          const Vec<A> p = exp_vec(vld(Sb + e * L) - vld(lr[j].buf + col[e]));
          vst(Sb + e * L, lane_mask<A>(mask[e]) ? p : Vec<A>{});
        }
        for (int64_t e = 0; e < n; ++e)
          vst(Pb + e * L, vld(Sb + e * L) * (vld(Pb + e * L) - vld(dr[j].buf + col[e])));
        if (ds_out) {
          A* dsb = ds_out + ds->base(b, gh * group + j, pr.heads) + k0;
          for (int64_t e = 0; e < n; ++e) vst(dsb + rr[e] * ds->ld + shift[e], vld(Pb + e * L));
        }
        // dV = P^T dO and dK = scale dS^T Q in the natural layout, from the rows of dO and Q; a group's
        // heads summed in order in dKs / dVs, the last head's sums stored into dK, dV.
        const A* init_k = j > 0 ? dKs : nullptr;
        const A* init_v = j > 0 ? dVs : nullptr;
        if (j + 1 == group) {
          pv_rows_to(stream_dkv, dv + row0 * Dv, heads_kv * Dv, one, Sb, grow[j].buf, Dvp, col, mask, n, nv, init_v,
                     Dvp, 0, Dv);
          pv_rows_to(stream_dkv, dk + row0 * D, heads_kv * D, fac, Pb, qrow[j].buf, Dp, col, mask, n, nv, init_k, Dp, 0,
                     D);
        } else {
          lane_pv_rows(dVs, Dvp, one, Sb, grow[j].buf, Dvp, col, mask, n, nv, init_v, Dvp);
          lane_pv_rows(dKs, Dp, one, Pb, qrow[j].buf, Dp, col, mask, n, nv, init_k, Dp);
        }
      }
    }
#if defined(__AVX512F__)
    if (stream_dkv) _mm_sfence();
#endif
  });
}
