"""Backward kernels of the Triton backend (FlashAttention-2 style, deterministic).

``P = exp(scale * q.k - lse)`` is recomputed from the forward LSE; ``delta = rowsum(dO * O) - dLSE``
comes in from the shared autograd (``_ops.py``). Then ``dS = P * (dP - delta)``, ``dP = dO V^T``:

* :func:`nearby_bwd_dq_kernel`: one program per (query brick, batch * head), walking the same key
  tiles as the forward: ``dQ = scale * dS K``.
* :func:`nearby_bwd_dkdv_kernel`: one program per (key brick, batch * kv head), walking the query
  tiles whose windows reach the brick (the inverse neighbourhood, see :mod:`.plan`) for every query
  head of its group: ``dK = scale * dS^T Q``, ``dV = P^T dO``. Each program owns its outputs, so
  there are no atomics and the result is deterministic.
"""

from __future__ import annotations

import torch

from ._common import LOG2E, autotune_configs, dot_precision, triton, tl, upcast_tiles
from ._common import (  # noqa: F401  (jit helpers)
    brick_coords, in_grid, offsets64, program_brick, program_head, row_windows, tile_coords, tile_lists,
    window_mask,
)
from .fwd import _NO_SPEC
from .plan import AttentionPlan


@triton.autotune(configs=autotune_configs(), key=["BLOCK_M", "BLOCK_N", "BLOCK_D", "RASTER", "PRECISION"])
@triton.jit(do_not_specialize=_NO_SPEC)
def nearby_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, WIN, TILES, BOUNDS,
    sqb, sqt, sqh, sqw, sqn, sqd,
    skb, skt, skh, skw, skn, skd,
    svb, svt, svh, svw, svn, svd,
    sdob, sdot, sdoh, sdow, sdon, sdod,
    slb, slt, slh, slw, sln,
    sdlb, sdlt, sdlh, sdlw, sdln,
    sdqb, sdqt, sdqh, sdqw, sdqn, sdqd,
    T, H, W, TK, HK, WK, HEADS, GROUP, D,
    NB_T, NB_H, NB_W, MAX_T, MAX_H, MAX_W,
    LOG_BT, LOG_BH, LOG_BW, LOG_KT, LOG_KH, LOG_KW,
    scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RASTER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_n, i_nk = program_head(i_bh, HEADS, GROUP)
    pt, ph, pw, t0, h0, w0 = program_brick(i_m, NB_H, NB_W, LOG_BT, LOG_BH, LOG_BW)
    o_r = tl.arange(0, BLOCK_M)
    qt, qh, qw = brick_coords(o_r, t0, h0, w0, LOG_BH, LOG_BW)
    m_q = in_grid(qt, qh, qw, T, H, W)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_qd = m_q[:, None] & m_d[None, :]
    qt64 = qt.to(tl.int64)
    qh64 = qh.to(tl.int64)
    qw64 = qw.to(tl.int64)
    d64 = o_d.to(tl.int64)

    # [BLOCK_M, BLOCK_D]
    b_q = tl.load(Q + i_b * sqb + i_n * sqn + qt64[:, None] * sqt + qh64[:, None] * sqh + qw64[:, None] * sqw
                  + d64[None, :] * sqd, mask=m_qd, other=0.0)
    b_do = tl.load(DO + i_b * sdob + i_n * sdon + qt64[:, None] * sdot + qh64[:, None] * sdoh
                   + qw64[:, None] * sdow + d64[None, :] * sdod, mask=m_qd, other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # [BLOCK_M]
    b_lse2 = tl.load(LSE + i_b * slb + i_n * sln + qt64 * slt + qh64 * slh + qw64 * slw,
                     mask=m_q, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + i_b * sdlb + i_n * sdln + qt64 * sdlt + qh64 * sdlh + qw64 * sdlw,
                      mask=m_q, other=0.0)

    lt, ht, lh, hh, lw, hw = row_windows(WIN, qt, qh, qw, m_q, T, H, W, TK, HK, WK)
    fq = (qt * H + qh) * W + qw
    fq0 = (t0 * H + h0) * W + w0

    off_lt, off_lh, off_lw, cw, chw, j_begin, j_end = tile_lists(
        TILES, BOUNDS, i_m, pt, ph, pw, NB_T, NB_H, NB_W, MAX_T, MAX_H, RASTER)

    o_c = tl.arange(0, BLOCK_N)
    ot, oh, ow = brick_coords(o_c, 0, 0, 0, LOG_KH, LOG_KW)
    k_base = K + i_b * skb + i_nk * skn
    v_base = V + i_b * svb + i_nk * svn

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(j_begin, j_end):
        kt0, kh0, kw0, kt, kh, kw, full = tile_coords(
            TILES, j, off_lt, off_lh, off_lw, cw, chw, pt, ph, pw, MAX_T, MAX_H, MAX_W, ot, oh, ow)
        m_k = in_grid(kt, kh, kw, TK, HK, WK)
        koff = offsets64(kt, kh, kw, skt, skh, skw)
        voff = offsets64(kt, kh, kw, svt, svh, svw)
        # [BLOCK_N, BLOCK_D] and [BLOCK_D, BLOCK_N]
        b_k = tl.load(k_base + koff[:, None] + d64[None, :] * skd, mask=m_k[:, None] & m_d[None, :], other=0.0)
        b_vT = tl.load(v_base + voff[None, :] + d64[:, None] * svd, mask=m_k[None, :] & m_d[:, None], other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_vT = b_vT.to(tl.float32)
        # [BLOCK_M, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
        b_p = tl.exp2(b_s - b_lse2[:, None])
        if RASTER:
            fk_last = ((kt0 + (1 << LOG_KT) - 1) * HK + kh0 + (1 << LOG_KH) - 1) * WK + kw0 + (1 << LOG_KW) - 1
            full = full & (fk_last <= fq0).to(tl.int32)
        if full == 0:
            allowed = window_mask(qt, qh, qw, lt, ht, lh, hh, lw, hw, kt, kh, kw)
            if RASTER:
                fk = (kt * HK + kh) * WK + kw
                allowed = allowed & (fk[None, :] <= fq[:, None])
            b_p = tl.where(allowed, b_p, 0.0)
        b_dp = tl.dot(b_do, b_vT, input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)

    b_dq = b_dq * scale
    tl.store(DQ + i_b * sdqb + i_n * sdqn + qt64[:, None] * sdqt + qh64[:, None] * sdqh + qw64[:, None] * sdqw
             + d64[None, :] * sdqd, b_dq.to(DQ.dtype.element_ty), mask=m_qd)


@triton.autotune(configs=autotune_configs(), key=["BLOCK_M", "BLOCK_N", "BLOCK_D", "RASTER", "PRECISION"])
@triton.jit(do_not_specialize=_NO_SPEC)
def nearby_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, WIN, TILES, BOUNDS,
    sqb, sqt, sqh, sqw, sqn, sqd,
    skb, skt, skh, skw, skn, skd,
    svb, svt, svh, svw, svn, svd,
    sdob, sdot, sdoh, sdow, sdon, sdod,
    slb, slt, slh, slw, sln,
    sdlb, sdlt, sdlh, sdlw, sdln,
    sdkb, sdkt, sdkh, sdkw, sdkn, sdkd,
    sdvb, sdvt, sdvh, sdvw, sdvn, sdvd,
    T, H, W, TK, HK, WK, HEADS, GROUP, D,
    NB_T, NB_H, NB_W, MAX_T, MAX_H, MAX_W,
    LOG_BT, LOG_BH, LOG_BW, LOG_KT, LOG_KH, LOG_KW,
    scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RASTER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Here the primary bricks are on the key grid (BLOCK_N keys of (2**LOG_BT, 2**LOG_BH, 2**LOG_BW))
    # and the tiles on the query grid (BLOCK_M queries of (2**LOG_KT, 2**LOG_KH, 2**LOG_KW)).
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    HEADS_KV = HEADS // GROUP
    i_b = i_bh // HEADS_KV
    i_nk = i_bh % HEADS_KV
    pt, ph, pw, kt0, kh0, kw0 = program_brick(i_m, NB_H, NB_W, LOG_BT, LOG_BH, LOG_BW)
    o_c = tl.arange(0, BLOCK_N)
    kt, kh, kw = brick_coords(o_c, kt0, kh0, kw0, LOG_BH, LOG_BW)
    m_k = in_grid(kt, kh, kw, TK, HK, WK)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_kd = m_k[:, None] & m_d[None, :]
    kt64 = kt.to(tl.int64)
    kh64 = kh.to(tl.int64)
    kw64 = kw.to(tl.int64)
    d64 = o_d.to(tl.int64)

    # [BLOCK_N, BLOCK_D]
    b_k = tl.load(K + i_b * skb + i_nk * skn + kt64[:, None] * skt + kh64[:, None] * skh + kw64[:, None] * skw
                  + d64[None, :] * skd, mask=m_kd, other=0.0)
    b_v = tl.load(V + i_b * svb + i_nk * svn + kt64[:, None] * svt + kh64[:, None] * svh + kw64[:, None] * svw
                  + d64[None, :] * svd, mask=m_kd, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    fk = (kt * HK + kh) * WK + kw
    fk_last = ((kt0 + (1 << LOG_BT) - 1) * HK + kh0 + (1 << LOG_BH) - 1) * WK + kw0 + (1 << LOG_BW) - 1

    off_lt, off_lh, off_lw, cw, chw, j_begin, j_end = tile_lists(
        TILES, BOUNDS, i_m, pt, ph, pw, NB_T, NB_H, NB_W, MAX_T, MAX_H, RASTER)

    o_r = tl.arange(0, BLOCK_M)
    ort, orh, orw = brick_coords(o_r, 0, 0, 0, LOG_KH, LOG_KW)

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        i_n = i_nk * GROUP + g
        q_base = Q + i_b * sqb + i_n * sqn
        do_base = DO + i_b * sdob + i_n * sdon
        l_base = LSE + i_b * slb + i_n * sln
        dl_base = DELTA + i_b * sdlb + i_n * sdln
        for j in range(j_begin, j_end):
            qt0, qh0, qw0, qt, qh, qw, full = tile_coords(
                TILES, j, off_lt, off_lh, off_lw, cw, chw, pt, ph, pw, MAX_T, MAX_H, MAX_W, ort, orh, orw)
            m_q = in_grid(qt, qh, qw, T, H, W)
            m_qd = m_q[:, None] & m_d[None, :]
            qt64 = qt.to(tl.int64)
            qh64 = qh.to(tl.int64)
            qw64 = qw.to(tl.int64)
            # [BLOCK_M, BLOCK_D]
            b_q = tl.load(q_base + qt64[:, None] * sqt + qh64[:, None] * sqh + qw64[:, None] * sqw + d64[None, :] * sqd,
                          mask=m_qd, other=0.0)
            b_do = tl.load(do_base + qt64[:, None] * sdot + qh64[:, None] * sdoh + qw64[:, None] * sdow
                           + d64[None, :] * sdod, mask=m_qd, other=0.0)
            if UPCAST:
                b_q = b_q.to(tl.float32)
                b_do = b_do.to(tl.float32)
            b_lse2 = tl.load(l_base + qt64 * slt + qh64 * slh + qw64 * slw, mask=m_q, other=0.0) * 1.4426950408889634
            b_delta = tl.load(dl_base + qt64 * sdlt + qh64 * sdlh + qw64 * sdlw, mask=m_q, other=0.0)
            # [BLOCK_M, BLOCK_N]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
            b_p = tl.exp2(b_s - b_lse2[:, None])
            if RASTER:
                full = full & (fk_last <= (qt0 * H + qh0) * W + qw0).to(tl.int32)
            if full == 0:
                lt, ht, lh, hh, lw, hw = row_windows(WIN, qt, qh, qw, m_q, T, H, W, TK, HK, WK)
                allowed = window_mask(qt, qh, qw, lt, ht, lh, hh, lw, hw, kt, kh, kw)
                if RASTER:
                    fq = (qt * H + qh) * W + qw
                    allowed = allowed & (fk[None, :] <= fq[:, None])
                b_p = tl.where(allowed, b_p, 0.0)
            # [BLOCK_N, BLOCK_D]
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)

    b_dk = b_dk * scale
    tl.store(DK + i_b * sdkb + i_nk * sdkn + kt64[:, None] * sdkt + kh64[:, None] * sdkh + kw64[:, None] * sdkw
             + d64[None, :] * sdkd, b_dk.to(DK.dtype.element_ty), mask=m_kd)
    tl.store(DV + i_b * sdvb + i_nk * sdvn + kt64[:, None] * sdvt + kh64[:, None] * sdvh + kw64[:, None] * sdvw
             + d64[None, :] * sdvd, b_dv.to(DV.dtype.element_ty), mask=m_kd)


def launch_backward(grad_out, query, key, value, lse, delta, plan: AttentionPlan, scale: float):
    """Run both backward kernels; returns contiguous ``(grad_query, grad_key, grad_value)``."""
    B, T, H, W, heads, D = query.shape
    _, TK, HK, WK, heads_kv, _ = key.shape
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    dv = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if query.numel() == 0 or key.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.to(torch.float32)
    delta = delta.to(torch.float32)
    grad_out = grad_out.to(query.dtype)  # no copy when it already matches (any strides, even 0)
    common = dict(
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        RASTER=bool(plan.spec.raster_causal),
        PRECISION=dot_precision(query.dtype),
        UPCAST=upcast_tiles(query.dtype),
    )
    sizes = (T, H, W, TK, HK, WK, heads, heads // heads_kv, D)

    sweep = plan.fwd
    dev = plan.device_tensors(query.device, "fwd")
    nbt, nbh, nbw = sweep.num_bricks
    nearby_bwd_dq_kernel[(nbt * nbh * nbw, B * heads)](
        query, key, value, grad_out, lse, delta, dq, dev["win"], dev["tables"], dev["bounds"],
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *lse.stride(), *delta.stride(),
        *dq.stride(),
        *sizes,
        *sweep.num_bricks, *sweep.max_tiles, *sweep.log_brick, *sweep.log_tile,
        float(scale), float(scale) * LOG2E,
        BLOCK_M=sweep.block_primary, BLOCK_N=sweep.block_secondary, **common,
    )

    sweep = plan.bwd
    dev = plan.device_tensors(query.device, "bwd")
    nbt, nbh, nbw = sweep.num_bricks
    nearby_bwd_dkdv_kernel[(nbt * nbh * nbw, B * heads_kv)](
        query, key, value, grad_out, lse, delta, dk, dv, dev["win"], dev["tables"], dev["bounds"],
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *lse.stride(), *delta.stride(),
        *dk.stride(), *dv.stride(),
        *sizes,
        *sweep.num_bricks, *sweep.max_tiles, *sweep.log_brick, *sweep.log_tile,
        float(scale), float(scale) * LOG2E,
        BLOCK_M=sweep.block_secondary, BLOCK_N=sweep.block_primary, **common,
    )
    return dq, dk, dv
