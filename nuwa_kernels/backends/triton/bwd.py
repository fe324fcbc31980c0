"""Backward kernels of the Triton backend (FlashAttention-2 style, deterministic).

``P = exp(scale * q.k - lse)`` is recomputed from the forward LSE; ``delta = rowsum(dO * O) - dLSE``
comes in from the shared autograd (``_ops.py``; :func:`delta` is the fused Triton kernel for it). Then
``dS = P * (dP - delta)``, ``dP = dO V^T``:

* :func:`nearby_bwd_dq_kernel`: one program per (query brick, batch * head), walking the same key
  tiles as the forward: ``dQ = scale * dS K``. ``M`` = the query brick on all three products.
* :func:`nearby_bwd_dkdv_kernel`: one program per (key brick, batch * kv head), walking the query
  tiles whose windows reach the brick (the inverse neighbourhood, see :mod:`.plan`) for every query
  head of its group. All four products have the key brick as ``M`` (``S^T = K Q^T``,
  ``dP^T = V dO^T``, ``dV += P^T dO``, ``dK += dS^T Q``), so a 64-key brick runs them all on sm_90's
  ``wgmma`` with ``P^T``/``dS^T`` as register operands. Each program owns its outputs: no atomics,
  deterministic.
"""

from __future__ import annotations

import torch

from ._common import LOG2E, dot_precision, triton, tl, upcast_tiles
from ._common import (  # noqa: F401  (jit helpers)
    brick_coords, brick_window, global_flat, in_grid, in_window, offsets64, packed_coords, program_brick,
    program_head, row_windows, tile_coords, tile_lists, window_mask, window_mask_t, windows_meet,
)
from .fwd import _NO_SPEC, slab_frame
from .plan import AttentionPlan


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
    T, H, W, TK, HK, WK, HEADS, GROUP,
    NB_T, NB_H, NB_W, MAX_T, MAX_H, MAX_W,
    LOG_BT, LOG_BH, LOG_BW, LOG_KT, LOG_KH, LOG_KW,
    QOT, QOH, QOW, KOT, KOH, KOW, FH, FW,
    scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RASTER: tl.constexpr, UNIFORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_n, i_nk = program_head(i_bh, HEADS, GROUP)
    pt, ph, pw, t0, h0, w0 = program_brick(i_m, NB_H, NB_W, LOG_BT, LOG_BH, LOG_BW)
    o_r = tl.arange(0, BLOCK_M)
    qt, qh, qw = brick_coords(o_r, t0, h0, w0, LOG_BH, LOG_BW)
    m_q = in_grid(qt, qh, qw, T, H, W)
    o_d = tl.arange(0, BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        m_d = o_d < BLOCK_D
    else:
        m_d = o_d < HEAD_DIM
    m_qd = m_q[:, None] & m_d[None, :]
    d64 = o_d.to(tl.int64)

    # [BLOCK_M, BLOCK_D]
    b_q = tl.load(Q + i_b * sqb + i_n * sqn + offsets64(qt, qh, qw, sqt, sqh, sqw)[:, None] + d64[None, :] * sqd,
                  mask=m_qd, other=0.0)
    b_do = tl.load(DO + i_b * sdob + i_n * sdon + offsets64(qt, qh, qw, sdot, sdoh, sdow)[:, None]
                   + d64[None, :] * sdod, mask=m_qd, other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # [BLOCK_M]
    b_lse2 = tl.load(LSE + i_b * slb + i_n * sln + offsets64(qt, qh, qw, slt, slh, slw),
                     mask=m_q, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + i_b * sdlb + i_n * sdln + offsets64(qt, qh, qw, sdlt, sdlh, sdlw), mask=m_q, other=0.0)

    if UNIFORM:
        lt, ht, lh, hh, lw, hw = brick_window(WIN, t0, h0, w0, T, H, W)
    else:
        lt, ht, lh, hh, lw, hw = row_windows(WIN, qt, qh, qw, m_q, T, H, W, TK, HK, WK)
    if RASTER:
        fq = global_flat(qt, qh, qw, QOT, QOH, QOW, FH, FW)
        fq0 = global_flat(t0, h0, w0, QOT, QOH, QOW, FH, FW)

    off_lt, off_lh, off_lw, cw, chw, total, j_begin, j_end = tile_lists(
        TILES, BOUNDS, i_m, pt, ph, pw, NB_T, NB_H, NB_W, MAX_T, MAX_H, RASTER, PACKED, BLOCK_N)
    if PACKED:
        if UNIFORM:
            x_lt, x_ht, x_lh, x_hh, x_lw, x_hw = lt, ht, lh, hh, lw, hw
        else:
            x_lt, x_ht, x_lh, x_hh, x_lw, x_hw = windows_meet(lt, ht, lh, hh, lw, hw, m_q)

    o_c = tl.arange(0, BLOCK_N)
    ot, oh, ow = brick_coords(o_c, 0, 0, 0, LOG_KH, LOG_KW)
    k_base = K + i_b * skb + i_nk * skn
    v_base = V + i_b * svb + i_nk * svn

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(j_begin, j_end):
        if PACKED:
            kt, kh, kw = packed_coords(TILES, j, off_lt, off_lh, off_lw, cw, chw, total, pt, ph, pw,
                                       MAX_T, MAX_H, MAX_W, o_c, TK, BLOCK_N)
            full = tl.min(in_window(kt, kh, kw, x_lt, x_ht, x_lh, x_hh, x_lw, x_hw).to(tl.int32), 0)
            if RASTER:
                fk_last = tl.max(tl.where(kt < TK, global_flat(kt, kh, kw, KOT, KOH, KOW, FH, FW), 0), 0)
                full = full & (fk_last <= fq0).to(tl.int32)
        else:
            kt0, kh0, kw0, kt, kh, kw, full = tile_coords(
                TILES, j, off_lt, off_lh, off_lw, cw, chw, pt, ph, pw, MAX_T, MAX_H, MAX_W, ot, oh, ow)
            if RASTER:
                fk_last = global_flat(kt0 + (1 << LOG_KT) - 1, kh0 + (1 << LOG_KH) - 1, kw0 + (1 << LOG_KW) - 1,
                                      KOT, KOH, KOW, FH, FW)
                full = full & (fk_last <= fq0).to(tl.int32)
        m_k = in_grid(kt, kh, kw, TK, HK, WK)
        m_kd = m_k[:, None] & m_d[None, :]
        # [BLOCK_N, BLOCK_D] rows of 16-byte vectors
        b_k = tl.load(k_base + offsets64(kt, kh, kw, skt, skh, skw)[:, None] + d64[None, :] * skd,
                      mask=m_kd, other=0.0)
        b_v = tl.load(v_base + offsets64(kt, kh, kw, svt, svh, svw)[:, None] + d64[None, :] * svd,
                      mask=m_kd, other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # [BLOCK_M, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
        b_p = tl.exp2(b_s - b_lse2[:, None])
        if full == 0:
            if UNIFORM:
                allowed = in_window(kt, kh, kw, lt, ht, lh, hh, lw, hw)[None, :]
            else:
                allowed = window_mask(qt, qh, qw, lt, ht, lh, hh, lw, hw, kt, kh, kw)
            if RASTER:
                fk = global_flat(kt, kh, kw, KOT, KOH, KOW, FH, FW)
                allowed = allowed & (fk[None, :] <= fq[:, None])
            b_p = tl.where(allowed, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)

    b_dq = b_dq * scale
    tl.store(DQ + i_b * sdqb + i_n * sdqn + offsets64(qt, qh, qw, sdqt, sdqh, sdqw)[:, None] + d64[None, :] * sdqd,
             b_dq.to(DQ.dtype.element_ty), mask=m_qd)


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
    T, H, W, TK, HK, WK, HEADS, GROUP,
    NB_T, NB_H, NB_W, MAX_T, MAX_H, MAX_W,
    LOG_BT, LOG_BH, LOG_BW, LOG_KT, LOG_KH, LOG_KW,
    QOT, QOH, QOW, KOT, KOH, KOW, FH, FW,
    scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RASTER: tl.constexpr, UNIFORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Here the primary bricks are on the key grid (BLOCK_N keys of (2**LOG_BT, 2**LOG_BH, 2**LOG_BW))
    # and the tiles on the query grid (BLOCK_M queries of (2**LOG_KT, 2**LOG_KH, 2**LOG_KW)).
    # Every product is computed transposed, keys x queries, so that the key brick is M.
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
    if HEAD_DIM == BLOCK_D:
        m_d = o_d < BLOCK_D
    else:
        m_d = o_d < HEAD_DIM
    m_kd = m_k[:, None] & m_d[None, :]
    d64 = o_d.to(tl.int64)

    # [BLOCK_N, BLOCK_D]
    b_k = tl.load(K + i_b * skb + i_nk * skn + offsets64(kt, kh, kw, skt, skh, skw)[:, None] + d64[None, :] * skd,
                  mask=m_kd, other=0.0)
    b_v = tl.load(V + i_b * svb + i_nk * svn + offsets64(kt, kh, kw, svt, svh, svw)[:, None] + d64[None, :] * svd,
                  mask=m_kd, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    if RASTER:
        fk = global_flat(kt, kh, kw, KOT, KOH, KOW, FH, FW)
        fk_last = global_flat(kt0 + (1 << LOG_BT) - 1, kh0 + (1 << LOG_BH) - 1, kw0 + (1 << LOG_BW) - 1,
                              KOT, KOH, KOW, FH, FW)

    off_lt, off_lh, off_lw, cw, chw, _total, j_begin, j_end = tile_lists(
        TILES, BOUNDS, i_m, pt, ph, pw, NB_T, NB_H, NB_W, MAX_T, MAX_H, RASTER, False, BLOCK_M)

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
            # [BLOCK_M, BLOCK_D]
            b_q = tl.load(q_base + offsets64(qt, qh, qw, sqt, sqh, sqw)[:, None] + d64[None, :] * sqd,
                          mask=m_qd, other=0.0)
            b_do = tl.load(do_base + offsets64(qt, qh, qw, sdot, sdoh, sdow)[:, None] + d64[None, :] * sdod,
                           mask=m_qd, other=0.0)
            if UPCAST:
                b_q = b_q.to(tl.float32)
                b_do = b_do.to(tl.float32)
            b_lse2 = tl.load(l_base + offsets64(qt, qh, qw, slt, slh, slw), mask=m_q, other=0.0) * 1.4426950408889634
            b_delta = tl.load(dl_base + offsets64(qt, qh, qw, sdlt, sdlh, sdlw), mask=m_q, other=0.0)
            # [BLOCK_N, BLOCK_M]: keys x queries
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * scale_log2
            b_pt = tl.exp2(b_st - b_lse2[None, :])
            if RASTER:
                full = full & (fk_last <= global_flat(qt0, qh0, qw0, QOT, QOH, QOW, FH, FW)).to(tl.int32)
            if full == 0:
                if UNIFORM:
                    lt, ht, lh, hh, lw, hw = brick_window(WIN, qt0, qh0, qw0, T, H, W)
                    allowed = in_window(kt, kh, kw, lt, ht, lh, hh, lw, hw)[:, None]
                else:
                    lt, ht, lh, hh, lw, hw = row_windows(WIN, qt, qh, qw, m_q, T, H, W, TK, HK, WK)
                    allowed = window_mask_t(kt, kh, kw, lt, ht, lh, hh, lw, hw)
                if RASTER:
                    fq = global_flat(qt, qh, qw, QOT, QOH, QOW, FH, FW)
                    allowed = allowed & (fk[:, None] <= fq[None, :])
                b_pt = tl.where(allowed, b_pt, 0.0)
            # [BLOCK_N, BLOCK_D]
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)

    b_dk = b_dk * scale
    tl.store(DK + i_b * sdkb + i_nk * sdkn + offsets64(kt, kh, kw, sdkt, sdkh, sdkw)[:, None] + d64[None, :] * sdkd,
             b_dk.to(DK.dtype.element_ty), mask=m_kd)
    tl.store(DV + i_b * sdvb + i_nk * sdvn + offsets64(kt, kh, kw, sdvt, sdvh, sdvw)[:, None] + d64[None, :] * sdvd,
             b_dv.to(DV.dtype.element_ty), mask=m_kd)


@triton.jit
def nearby_delta_kernel(
    DO, O, DLSE, DELTA, ROWS, HEADS, W, H, T,
    sdob, sdot, sdoh, sdow, sdon, sdod,
    sob, sot, soh, sow, son, sod,
    sgb, sgt, sgh, sgw, sgn,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """``DELTA[r] = sum_d DO[r, d] * O[r, d] - DLSE[r]`` in float32 over ``BLOCK_R`` rows (any strides)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = r < ROWS
    r64 = r.to(tl.int64)
    n = r64 % HEADS
    x = r64 // HEADS
    w = x % W
    x = x // W
    h = x % H
    x = x // H
    t = x % T
    b = x // T
    o_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m = m_r[:, None] & (o_d < HEAD_DIM)[None, :]
    do = tl.load(DO + (b * sdob + t * sdot + h * sdoh + w * sdow + n * sdon)[:, None] + o_d[None, :] * sdod,
                 mask=m, other=0.0).to(tl.float32)
    o = tl.load(O + (b * sob + t * sot + h * soh + w * sow + n * son)[:, None] + o_d[None, :] * sod,
                mask=m, other=0.0).to(tl.float32)
    d = tl.sum(do * o, 1)
    if HAS_DLSE:
        d -= tl.load(DLSE + b * sgb + t * sgt + h * sgh + w * sgw + n * sgn, mask=m_r, other=0.0).to(tl.float32)
    tl.store(DELTA + r64, d, mask=m_r)


def delta(grad_out, out, grad_lse=None):
    """``rowsum(grad_out * out) - grad_lse`` as a contiguous float32 ``(B, T, H, W, heads)`` tensor, in one
    small fused kernel (no float32 temporaries of the size of ``out``); any input strides (an expanded
    ``grad_out`` of stride 0 included). ``grad_lse`` may be ``None``."""
    B, T, H, W, heads, D = out.shape
    res = torch.empty((B, T, H, W, heads), dtype=torch.float32, device=out.device)
    rows = res.numel()
    if rows == 0:
        return res
    if D == 0:
        return res.zero_() if grad_lse is None else res.copy_(-grad_lse.to(torch.float32))
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(1, min(128, 4096 // block_d))
    g = grad_lse if grad_lse is not None else res
    nearby_delta_kernel[(triton.cdiv(rows, block_r),)](
        grad_out, out, g, res, rows, heads, W, H, T,
        *grad_out.stride(), *out.stride(), *g.stride(),
        HEAD_DIM=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_DLSE=grad_lse is not None,
        num_warps=4,
    )
    return res


def launch_backward(grad_out, query, key, value, lse, delta, plan: AttentionPlan, scale: float, launch=None):
    """Run both backward kernels; returns contiguous ``(grad_query, grad_key, grad_value)``.

    ``launch``: ``{"dq": (num_warps, num_stages), "dkdv": (...)}`` from the config table (default
    ``(4, 2)`` for both)."""
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
    launch = launch or {}
    common = dict(
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        RASTER=bool(plan.spec.raster_causal),
        PRECISION=dot_precision(query.dtype),
        UPCAST=upcast_tiles(query.dtype),
    )
    sizes = (T, H, W, TK, HK, WK, heads, heads // heads_kv)
    frame = slab_frame(plan)

    sweep = plan.fwd
    dev = plan.device_tensors(query.device, "fwd")
    nbt, nbh, nbw = sweep.num_bricks
    warps, stages = launch.get("dq", (4, 2))
    nearby_bwd_dq_kernel[(nbt * nbh * nbw, B * heads)](
        query, key, value, grad_out, lse, delta, dq, dev["win"], dev["tables"], dev["bounds"],
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *lse.stride(), *delta.stride(),
        *dq.stride(),
        *sizes,
        *sweep.num_bricks, *sweep.max_tiles, *sweep.log_brick, *sweep.log_tile,
        *frame,
        float(scale), float(scale) * LOG2E,
        BLOCK_M=sweep.block_primary, BLOCK_N=sweep.block_secondary, UNIFORM=bool(sweep.uniform),
        PACKED=bool(sweep.packed), **common,
        num_warps=warps, num_stages=stages,
    )

    sweep = plan.bwd
    dev = plan.device_tensors(query.device, "bwd")
    nbt, nbh, nbw = sweep.num_bricks
    warps, stages = launch.get("dkdv", (4, 2))
    nearby_bwd_dkdv_kernel[(nbt * nbh * nbw, B * heads_kv)](
        query, key, value, grad_out, lse, delta, dk, dv, dev["win"], dev["tables"], dev["bounds"],
        *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *lse.stride(), *delta.stride(),
        *dk.stride(), *dv.stride(),
        *sizes,
        *sweep.num_bricks, *sweep.max_tiles, *sweep.log_brick, *sweep.log_tile,
        *frame,
        float(scale), float(scale) * LOG2E,
        BLOCK_M=sweep.block_secondary, BLOCK_N=sweep.block_primary, UNIFORM=bool(sweep.uniform), **common,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
