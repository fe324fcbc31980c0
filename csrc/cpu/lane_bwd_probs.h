// The lane backward with the forward's probabilities (na3d_bwd_probs), in one sweep. Included by
// na3d_cpu.cpp after lane_kernels.h, inside its anonymous namespace (it uses that file's Problem, Strides,
// HeadRows, parallel_tasks and lane_kernels.h's rings, tables and products).
//
// A task is one (batch, kv head, chunk). It walks the query blocks of its chunk in order (plus the blocks
// just outside that its keys' inverse windows reach: their dS only) and, `lag` query positions behind, the
// key blocks of its chunk of keys:
//   query step, block q0 (each head of the group): dP = dO V^T (row_scores, or lane_scores from a V^T
//     ring), P from the forward's store, delta = sum_e P dP - dLSE (one chain in entry order), dS =
//     P (dP - delta) into a small ring of the task's own, dQ = scale dS K (pv rows, written when the
//     block is the task's);
//   key step, block k0 = q0 - lag: P (the store's unaligned vector at the key block plus the entry's
//     shift) and dS (the ring's) per entry, dV = P^T dO, dK = scale dS^T Q, a group's heads summed in
//     order.
// Key block k0 needs the dS of queries k0 + [smin, smax + L) (the key side's shifts): all written once the
// query step has passed k0 + smax, hence lag = smax rounded up to whole blocks, and a ring of
// lag + L - smin queries (plus one block mirrored past its end, so that an unaligned vector is
// contiguous) holds every one the key step still reads. For the image window that is a few KiB per head,
// in L1: dS never reaches memory, and dO and P are read a second time from the caches, a few blocks after
// the query step read them (the two-pass form stored dS for the whole call and swept dO, P and dS again in
// a second pass: 13 MB more memory traffic for NÜWA's 10x21x21 x 8 heads, D = 64).
//
// Every output element is still summed by one task in entry order (dQ: the query step of its block; dK,
// dV: the key step of its block), so results are those of the two-pass form, bitwise, and do not depend
// on the chunking nor on the thread count. The blocks a chunk's keys need outside its queries are
// recomputed by that task (their dP product only), so tasks share nothing.
#pragma once

// The sweep's per-task layout: the dS ring and the rows' rings (all in the accumulation type A).
struct ProbsSweep {
  int64_t lag = 0;         // key block k0 follows query block k0 + lag
  int64_t RL = 0;          // queries the dS ring holds
  int64_t ldr = 0;         // its row length (RL and one mirrored block)
  int64_t ring_elems = 0;  // one head's dS ring (the pair store's rows of ldr)
  int64_t vt_ring = 0;     // dP's value rows (RowRing) or V^T (TransposedRing)
  int64_t k_ring = 0;      // dQ's key rows
  int64_t q_ring = 0;      // the key step's Q rows, per head of the group
  int64_t g_ring = 0;      // its dO rows, per head of the group
  int64_t part = 0;        // row_scores' partial sums
  int64_t sbuf = 0;        // one block's [entries][L] values (P, and dP then dS)
  int64_t scratch = 0;     // elements of a task's scratch

  template <typename A>
  static ProbsSweep of(const Problem& pr, const LaneGeom& gq, const LaneGeom& gk, int64_t ds_rows) {
    constexpr int L = kLanes<A>;
    constexpr bool kRows = kRowScores && std::is_same<A, float>::value;
    using Ring = RowRing<A, true, A>;  // sizes do not depend on the input type
    // rows padded to whole vectors (lane_run_ok's head dims; the head dims otherwise)
    const int64_t Dp = round_up(pr.D, L), Dvp = round_up(pr.Dv, L), X = std::max(Dp, Dvp);
    ProbsSweep s;
    s.lag = round_up(std::max<int64_t>(gk.smax, 0), L);
    s.RL = round_up(s.lag + L - std::min<int64_t>(gk.smin, 0), L);
    s.ldr = s.RL + L;
    s.ring_elems = ds_rows * s.ldr;
    s.vt_ring = kRows ? Ring::elems(gq, L, Dvp) : Dvp * (TransposedRing<A, true, A>::size_for(gq, L) + 3 * L);
    s.k_ring = Ring::elems(gq, L, Dp);
    s.q_ring = Ring::elems(gk, L, Dp);
    s.g_ring = Ring::elems(gk, L, Dvp);
    s.part = kRows ? kRowScoreBatch * 4 * L : 0;
    s.sbuf = std::max(gq.box_max, gk.box_max) * L;
    s.scratch = s.vt_ring + s.k_ring + pr.group * (s.q_ring + s.g_ring + s.ring_elems) + 2 * s.sbuf + Dvp * L +
                L * X + 3 * L + s.part + (pr.group > 1 ? L * (Dp + Dvp) : 0);
    return s;
  }
};

// Largest scratch of a sweep task (per thread), past which the forward keeps no probabilities and the
// backward recomputes the scores (lane_probs_elems, na3d_cpu.cpp). NÜWA 10x21x21, D = 64, float: (1,3,3)
// 0.14 MiB, (3,3,3) 1.1 MiB (2.8 with NATTEN's shifted borders), (7,7,7) 6.5 MiB, whose probabilities
// (kept only with NUWA_CPU_PROBS=8) measured no faster than recomputing the scores, before the sweep as now.
constexpr int64_t kProbsSweepBytes = int64_t(4) << 20;

template <typename A>
inline bool probs_sweep_fits(const Problem& pr, const LaneGeom& gq, const LaneGeom& gk) {
  return ProbsSweep::of<A>(pr, gq, gk, gk.box_max).scratch * int64_t(sizeof(A)) <= kProbsSweepBytes;
}

template <typename S, bool kUnit>
void lane_bwd_probs_kernel(const Problem& pr, const S* go, Strides gs, const S* q, Strides qs, const S* k,
                           Strides ks, const S* v, Strides vs, const acc_t<S>* dlse, Strides dls, S* dq, S* dk,
                           S* dv, const DsStore& ds, const acc_t<S>* p_in) {
  using A = acc_t<S>;
  constexpr int L = kLanes<A>;
  const LaneGeom gq = lane_geom(pr);                        // query blocks: Nq queries, Nk keys
  const LaneGeom gk = lane_geom(pr, /*key_side=*/true);    // key blocks: Nq keys, Nk queries
  const int64_t D = pr.D, Dv = pr.Dv, heads = pr.heads, heads_kv = pr.heads_kv, group = pr.group;
  // Head dims that are not whole vectors (AVX-512 float, lane_run_ok) run on rows packed with zero tails to
  // Dp, Dvp; the gradients' rows are stored to D, Dv.
  const int64_t Dp = round_up(D, L), Dvp = round_up(Dv, L);
  const int64_t Nq = gq.Nq, Nk = gk.Nq;
  // Chunks: the same count on both sides, so that task c owns query chunk c (dQ) and key chunk c (dK, dV).
  const int64_t chunk_q = lane_task_chunk<L>(pr, Nq), chunk_k = lane_task_chunk<L>(pr, Nk);
  const int64_t nch = std::max((Nq + chunk_q - 1) / chunk_q, (Nk + chunk_k - 1) / chunk_k);
  const int64_t ntask = pr.B * heads_kv * nch;
  const bool spread = rows_share_lines<S>(D) || rows_share_lines<S>(Dv);  // dQ's, dK's, dV's rows
  const ProbsSweep sw = ProbsSweep::of<A>(pr, gq, gk, ds.rows);
  const int64_t lag = sw.lag, RL = sw.RL, ldr = sw.ldr, ring_elems = sw.ring_elems;
  const bool gflat = flat_strides(gs, gq.H, gq.W);
  // Rows in place for small windows (block_product_rows): the query step's K and V, the key step's Q, dO.
  const bool k_direct = direct_rows_ok<S, kUnit, A>(pr, gq, ks, D);
  const bool v_direct = direct_rows_ok<S, kUnit, A>(pr, gq, vs, Dv);
  const bool qg_direct = direct_rows_ok<S, kUnit, A>(pr, gk, qs, D) && direct_rows_ok<S, kUnit, A>(pr, gk, gs, Dv);
  // AVX-512 float: dP by row_scores from V's rows; otherwise lane_scores from a V^T ring (same slots as K's).
  constexpr bool kRows = kRowScores && std::is_same<A, float>::value;
  const int64_t box_max = std::max(gq.box_max, gk.box_max), sbuf = sw.sbuf;
  const int64_t X = std::max(Dp, Dvp);
  const int64_t box_axes = std::max(gq.box_axes(), gk.box_axes());
  const std::shared_ptr<const LaneTables> tq = lane_tables<L, false>(pr, gq, &ds);
  const std::shared_ptr<const LaneTables> tk = lane_tables<L, true>(pr, gk, &ds);
  const EntryTable &etq = tq->et, &etk = tk->et;
  const std::vector<int32_t>&rq = tq->rows, &rk = tk->rows;
  const bool stream_dq = stream_rows<S, A>(dq, double(pr.B) * heads * Nq, D);
  const bool stream_dkv = stream_rows<S, A>(dk, double(pr.B) * heads_kv * Nk, D) &&
                          stream_rows<S, A>(dv, double(pr.B) * heads_kv * Nk, Dv);
  const double work = double(pr.B) * heads * Nq * pr.win_max * 2 * (D + Dv);
  const A scale = static_cast<A>(pr.scale);
  parallel_tasks<A>(pr, ntask, work, sw.scratch, 7 * box_max + box_axes, [&](Scratch<A>& sc, int64_t task) {
    const int64_t c = task % nch, bg = spread_heads(task / nch, pr.B * heads_kv, spread);
    const int64_t b = bg / heads_kv, gh = bg % heads_kv;
    const int64_t qa = std::min(Nq, c * chunk_q), qb = std::min(Nq, qa + chunk_q);  // dQ's blocks
    const int64_t ka = std::min(Nk, c * chunk_k), kb = std::min(Nk, ka + chunk_k);  // dK's and dV's blocks
    // Query blocks swept: the task's own (dQ), and those whose dS its keys read (qa is Nq, not a block
    // start, when the chunk has no queries).
    int64_t slo = qa, shi = qb;
    if (ka < kb) {
      const int64_t lo = std::max<int64_t>(0, ka + gk.smin) / L * L, hi = std::min(Nq, kb + gk.smax);
      if (lo < hi) {
        slo = qa < qb ? std::min(qa, lo) : lo;
        shi = std::max(shi, hi);
      }
    }
    A* p = sc.a.data();
    A* vt = p;          // dP's value rows (RowRing) or V^T (TransposedRing)
    p += sw.vt_ring;
    A* kbuf = p;        // dQ's key rows (RowRing)
    p += sw.k_ring;
    A* qbuf = p;        // the key step's Q rows, one RowRing per head of the group
    p += group * sw.q_ring;
    A* gbuf = p;        // its dO rows
    p += group * sw.g_ring;
    A* dsr = p;         // [group][ds.rows][ldr] the dS rings
    p += group * ring_elems;
    A* Sb = p;          // [entries][L] P
    A* Pb = Sb + sbuf;  // [entries][L] dP, then dS
    A* Gt = Pb + sbuf;  // [Dv][L] or [L][Dvp] the block's output gradients (packed when not in place)
    A* tmp = Gt + Dvp * L;  // [L][max(Dp, Dvp)]
    A* fac = tmp + L * X;  // [L] scale
    A* one = fac + L;      // [L] 1
    A* del_v = one + L;    // [L] dLSE
    [[maybe_unused]] A* pbuf = del_v + L;  // row_scores' partial sums
    A* dKs = pbuf + sw.part;  // [L][Dp]  dK sums over the group's heads but the last
    A* dVs = dKs + L * Dp;  // [L][Dvp] dV sums
    std::fill(dsr, dsr + group * ring_elems, A(0));  // masked lanes read slots no query step wrote
    for (int i = 0; i < L; ++i) fac[i] = scale, one[i] = A(1);
    int64_t* shift_buf = sc.idx.data();
    int64_t* col = shift_buf + box_max;  // dQ's key rows (and lane_scores' V^T slots: the same ring slots)
    uint32_t* mask_buf = reinterpret_cast<uint32_t*>(col + box_max);
    uint32_t* mt = reinterpret_cast<uint32_t*>(mask_buf + 2 * box_max);  // box_axes per-axis masks
    int64_t* vcol = shift_buf + 4 * box_max + box_axes;  // dP's value rows (row_scores)
    int64_t* qcol = vcol + box_max;                      // the key step's Q and dO rows (the same)
    int64_t* dcol = qcol + box_max;                      // the key step's dS ring slots
    const auto entries = [&](const auto& et, const LaneGeom& g, auto key_side, int64_t x0, int nv,
                             const int64_t** shift, const uint32_t** mask) {
      uint32_t* mh = mt + (g.rhi[0] - g.rlo[0] + 1);
      uint32_t* mw = mh + (g.rhi[1] - g.rlo[1] + 1);
      return et.template get<L, decltype(key_side)::value>(pr, g, x0, nv, shift, mask, shift_buf, mask_buf, mt,
                                                           mh, mw);
    };
    const HeadRows<S> kh = head_rows(k, ks, b, gh, D, Dp), vh = head_rows(v, vs, b, gh, Dv, Dvp);
    const int64_t first_q = std::max<int64_t>(slo + gq.smin, -L), first_k = std::max<int64_t>(ka + gk.smin, -L);
    RowRing<S, kUnit, A> krow, vrow;  // vrow with row_scores, vtr otherwise (krow's slots)
    TransposedRing<S, kUnit, A> vtr;
    krow.init(kbuf, gq, L, first_q, kh);
    if (kRows)
      vrow.init(vt, gq, L, first_q, vh);
    else
      vtr.init(vt, gq, L, first_q, vh, flat_strides(vs, gq.H, gq.W));
    std::vector<RowRing<S, kUnit, A>> qrow(group), grow(group);
    for (int64_t j = 0; j < group; ++j) {
      qrow[j].init(qbuf + j * sw.q_ring, gk, L, first_k,
                   head_rows(q, qs, b, gh * group + j, D, Dp));
      grow[j].init(gbuf + j * sw.g_ring, gk, L, first_k,
                   head_rows(go, gs, b, gh * group + j, Dv, Dvp));
    }

    // Query block q0 (slo <= q0 < shi): dS into the rings; dQ when qa <= q0 < qb.
    const auto query_step = [&](int64_t q0) {
      const int nv = static_cast<int>(std::min<int64_t>(L, Nq - q0));
      const int64_t* shift;
      const uint32_t* mask;
      const int64_t n = entries(etq, gq, std::false_type{}, q0, nv, &shift, &mask);
      const bool own = q0 >= qa && q0 < qb;
      const bool in_grid = (k_direct || v_direct) && block_rows_in_grid(gq, q0, nv, shift, n);
      [[maybe_unused]] const A* vrows = nullptr;  // row_scores: dP's value rows, stride vrs
      [[maybe_unused]] int64_t vrs = 0;
      if constexpr (kRows)
        vrows = block_product_rows(v_direct, v_direct && in_grid, vrow, vh, gq, q0, shift, n, vcol, &vrs);
      else
        vtr.advance(q0 + L + gq.smax, tmp);
      int64_t krs = 0;
      const A* krows = nullptr;
      if (own || !kRows)  // dQ's key rows; without row_scores their ring's slots are V^T's columns too
        krows = block_product_rows(k_direct, k_direct && in_grid, krow, kh, gq, q0, shift, n, col, &krs);
      const int32_t* rr = rq.data() + (q0 / L) * etq.stride;
      const int64_t s0 = q0 % RL;  // the block's slot in the dS rings
      for (int64_t head = gh * group; head < (gh + 1) * group; ++head) {
        const int64_t hb = ds.base(b, head, heads) + q0;  // the forward's P of the block
        const HeadRows<S> gr = head_rows(go, gs, b, head, Dv, Dvp);
        {  // the next head's (or block's) output-gradient rows, and P kDsAhead blocks ahead
          const bool more = head + 1 < (gh + 1) * group;
          const int64_t nh = more ? head + 1 : gh * group, pa = more ? q0 : q0 + L;
          const int64_t pb = more ? q0 + nv : std::min(shi, q0 + 2 * L);
          if (pa < pb) prefetch_tokens(head_rows(go, gs, b, nh, Dv), pa, pb, gq);
          if (gq.prefetch && q0 + kDsAhead * L < shi) {
            const int64_t bi = q0 / L + kDsAhead;
            const int32_t* ra = rq.data() + bi * etq.stride;
            for (int64_t e = 0; e < etq.count[bi]; ++e) prefetch_l2(p_in + hb + kDsAhead * L + ra[e] * ds.ld);
          }
        }
        if constexpr (kRows) {
#if defined(__AVX512F__)
          int64_t grs;
          const A* grows = block_rows_at<kUnit>(Gt, gr, gflat, q0, nv, gq.H, gq.W, &grs);
          row_scores(Pb, grows, grs, vrows, vcol, mask, n, Dvp, A(1), reinterpret_cast<__m512*>(pbuf), vrs);
#endif
        } else {
          transposed_block<kUnit>(Gt, gr, gflat, q0, nv, gq.H, gq.W, A(1), tmp);
          lane_scores(Pb, Gt, vtr.buf, vtr.ld, col, n, Dv);
        }
        Vec<A> dl = {};  // delta: one chain in entry order, as the forward's sums
        for (int64_t e = 0; e < n; ++e) {
          const Vec<A> pe = lane_mask<A>(mask[e]) ? vld(p_in + hb + rr[e] * ds.ld) : Vec<A>{};
          vst(Sb + e * L, pe);
          dl += pe * vld(Pb + e * L);
        }
        if (dlse) {
          gather_lane_stats(del_v, head_rows(dlse, dls, b, head, 1), q0, nv, gq.H, gq.W);
          dl -= vld(del_v);
        }
        A* ring = dsr + (head - gh * group) * ring_elems;
        for (int64_t e = 0; e < n; ++e) {
          const Vec<A> x = vld(Sb + e * L) * (vld(Pb + e * L) - dl);
          vst(Pb + e * L, x);
          vst(ring + rr[e] * ldr + s0, x);
          if (s0 == 0) vst(ring + rr[e] * ldr + RL, x);  // the mirror: unaligned vectors stay contiguous
        }
        if (own)  // dQ = scale dS K, straight into dQ's rows
          pv_rows_to(stream_dq, dq + ((b * Nq + q0) * heads + head) * D, heads * D, fac, Pb, krows, Dp, col, mask,
                     n, nv, static_cast<const A*>(nullptr), 0, krs, D);
      }
    };

    // Key block k0 (ka <= k0 < kb): dV = P^T dO and dK = scale dS^T Q over the group's heads.
    const auto key_step = [&](int64_t k0) {
      const int nv = static_cast<int>(std::min<int64_t>(L, Nk - k0));
      const int64_t* shift;
      const uint32_t* mask;
      const int64_t n = entries(etk, gk, std::true_type{}, k0, nv, &shift, &mask);
      const bool in_grid = qg_direct && block_rows_in_grid(gk, k0, nv, shift, n);
      const int64_t row0 = (b * Nk + k0) * heads_kv + gh;
      const int32_t* rr = rk.data() + (k0 / L) * etk.stride;
      ring_slots(RL, 0, k0, shift, n, dcol);  // queries k0 + shift[e] in the dS rings (|shift| < RL)
      for (int64_t j = 0; j < group; ++j) {
        int64_t qrs, grs;  // Q's and dO's rows: both rings start and advance together (one set of columns)
        const A* qrows = block_product_rows(qg_direct, in_grid, qrow[j], qrow[j].hr, gk, k0, shift, n, qcol, &qrs);
        const A* grows = block_product_rows(qg_direct, in_grid, grow[j], grow[j].hr, gk, k0, shift, n, qcol, &grs);
        const A* pb = p_in + ds.base(b, gh * group + j, heads) + k0;
        const A* ring = dsr + j * ring_elems;
        for (int64_t e = 0; e < n; ++e) {  // masked lanes read elements of no pair: zeroed
          const auto on = lane_mask<A>(mask[e]);
          vst(Sb + e * L, on ? vld(pb + rr[e] * ds.ld + shift[e]) : Vec<A>{});
          vst(Pb + e * L, on ? vld(ring + rr[e] * ldr + dcol[e]) : Vec<A>{});
        }
        const A* init_k = j > 0 ? dKs : nullptr;
        const A* init_v = j > 0 ? dVs : nullptr;
        if (j + 1 == group) {
          pv_rows_to(stream_dkv, dv + row0 * Dv, heads_kv * Dv, one, Sb, grows, Dvp, qcol, mask, n, nv, init_v, Dvp,
                     grs, Dv);
          pv_rows_to(stream_dkv, dk + row0 * D, heads_kv * D, fac, Pb, qrows, Dp, qcol, mask, n, nv, init_k, Dp, qrs,
                     D);
        } else {
          lane_pv_rows(dVs, Dvp, one, Sb, grows, Dvp, qcol, mask, n, nv, init_v, Dvp, grs);
          lane_pv_rows(dKs, Dp, one, Pb, qrows, Dp, qcol, mask, n, nv, init_k, Dp, qrs);
        }
      }
    };

    // Positions of the sweep (block starts): query block q0, then key block q0 - lag.
    int64_t start = std::numeric_limits<int64_t>::max(), end = 0;
    if (slo < shi) start = slo, end = shi;
    if (ka < kb) start = std::min(start, ka + lag), end = std::max(end, kb + lag);
    for (int64_t q0 = start; q0 < end; q0 += L) {
      if (q0 >= slo && q0 < shi) query_step(q0);
      const int64_t k0 = q0 - lag;
      if (k0 >= ka && k0 < kb) key_step(k0);
    }
#if defined(__AVX512F__)
    if (stream_dq || stream_dkv) _mm_sfence();
#endif
  });
}
