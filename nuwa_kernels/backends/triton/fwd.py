"""Forward kernel of the Triton backend: one program per (query brick, batch * head).

The program walks only the key tiles its plan lists (:mod:`.plan`), scores them with ``tl.dot``,
masks per element only tiles that are not full on every axis (or that straddle the raster-causal
boundary), and keeps an online softmax in float32 (base-2 exponentials, natural-log LSE out).

Compile-time properties (``tl.constexpr``): the head dim (``HEAD_DIM``; the ``d`` mask exists only when
it is not a power of two, so Q/K/V rows load as 16-byte vectors), the block sizes, raster causality,
``UNIFORM`` (every row of a query brick shares one window: stride-aligned bricks, section 3a, so the
mask is a vector over the tile's keys) and the ``tl.dot`` precision. Warps and pipeline stages come
from the fixed table in :mod:`.config`.
"""

from __future__ import annotations

import torch

from ._common import LOG2E, dot_precision, triton, tl, upcast_tiles
from ._common import (  # noqa: F401  (jit helpers)
    brick_coords, brick_window, global_flat, in_grid, in_window, offsets64, packed_coords, program_brick,
    program_head, row_windows, tile_coords, tile_lists, window_mask, windows_meet,
)
from .plan import AttentionPlan

# Runtime ints that must not be specialised on their value (1 / multiples of 16): they only feed
# index arithmetic, and specialising them would multiply the compiled variants.
_NO_SPEC = [
    "NB_T", "NB_H", "NB_W", "MAX_T", "MAX_H", "MAX_W",
    "LOG_BT", "LOG_BH", "LOG_BW", "LOG_KT", "LOG_KH", "LOG_KW",
    "T", "H", "W", "TK", "HK", "WK", "HEADS", "GROUP",
    "QOT", "QOH", "QOW", "KOT", "KOH", "KOW", "FH", "FW",
]


@triton.jit(do_not_specialize=_NO_SPEC)
def nearby_fwd_kernel(
    Q, K, V, O, LSE, WIN, TILES, BOUNDS,
    sqb, sqt, sqh, sqw, sqn, sqd,
    skb, skt, skh, skw, skn, skd,
    svb, svt, svh, svw, svn, svd,
    sob, sot, soh, sow, son, sod,
    slb, slt, slh, slw, sln,
    T, H, W, TK, HK, WK, HEADS, GROUP,
    NB_T, NB_H, NB_W, MAX_T, MAX_H, MAX_W,
    LOG_BT, LOG_BH, LOG_BW, LOG_KT, LOG_KH, LOG_KW,
    QOT, QOH, QOW, KOT, KOH, KOW, FH, FW,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RASTER: tl.constexpr, UNIFORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    PACKED: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_n, i_nk = program_head(i_bh, HEADS, GROUP)
    # brick (pt, ph, pw) of the query grid
    pt, ph, pw, t0, h0, w0 = program_brick(i_m, NB_H, NB_W, LOG_BT, LOG_BH, LOG_BW)
    o_r = tl.arange(0, BLOCK_M)
    qt, qh, qw = brick_coords(o_r, t0, h0, w0, LOG_BH, LOG_BW)
    m_q = in_grid(qt, qh, qw, T, H, W)
    o_d = tl.arange(0, BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        m_d = o_d < BLOCK_D  # all true: folded away, loads stay vectorised
    else:
        m_d = o_d < HEAD_DIM
    d64 = o_d.to(tl.int64)

    # [BLOCK_M, BLOCK_D]
    p_q = Q + i_b * sqb + i_n * sqn + offsets64(qt, qh, qw, sqt, sqh, sqw)[:, None] + d64[None, :] * sqd
    b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)

    if UNIFORM:
        lt, ht, lh, hh, lw, hw = brick_window(WIN, t0, h0, w0, T, H, W)
    else:
        lt, ht, lh, hh, lw, hw = row_windows(WIN, qt, qh, qw, m_q, T, H, W, TK, HK, WK)
    if RASTER:
        fq = global_flat(qt, qh, qw, QOT, QOH, QOW, FH, FW)
        fq0 = global_flat(t0, h0, w0, QOT, QOH, QOW, FH, FW)

    # tile lists of this brick
    off_lt, off_lh, off_lw, cw, chw, total, j_begin, j_end = tile_lists(
        TILES, BOUNDS, i_m, pt, ph, pw, NB_T, NB_H, NB_W, MAX_T, MAX_H, RASTER, PACKED, BLOCK_N)
    if PACKED:
        # packed tiles: a tile needs no mask when all its keys lie in the box every row sees
        if UNIFORM:
            x_lt, x_ht, x_lh, x_hh, x_lw, x_hw = lt, ht, lh, hh, lw, hw
        else:
            x_lt, x_ht, x_lh, x_hh, x_lw, x_hw = windows_meet(lt, ht, lh, hh, lw, hw, m_q)

    o_c = tl.arange(0, BLOCK_N)
    ot, oh, ow = brick_coords(o_c, 0, 0, 0, LOG_KH, LOG_KW)
    k_base = K + i_b * skb + i_nk * skn
    v_base = V + i_b * svb + i_nk * svn

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
        # [BLOCK_N, BLOCK_D] rows of 16-byte vectors
        b_k = tl.load(k_base + offsets64(kt, kh, kw, skt, skh, skw)[:, None] + d64[None, :] * skd,
                      mask=m_k[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(v_base + offsets64(kt, kh, kw, svt, svh, svw)[:, None] + d64[None, :] * svd,
                      mask=m_k[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # [BLOCK_M, BLOCK_N], in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale_log2
        if full == 0:
            if UNIFORM:
                allowed = in_window(kt, kh, kw, lt, ht, lh, hh, lw, hw)[None, :]
            else:
                allowed = window_mask(qt, qh, qw, lt, ht, lh, hh, lw, hw, kt, kh, kw)
            if RASTER:
                fk = global_flat(kt, kh, kw, KOT, KOH, KOW, FH, FW)
                allowed = allowed & (fk[None, :] <= fq[:, None])
            b_s = tl.where(allowed, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    p_o = O + i_b * sob + i_n * son + offsets64(qt, qh, qw, sot, soh, sow)[:, None] + d64[None, :] * sod
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    b_lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    p_lse = LSE + i_b * slb + i_n * sln + offsets64(qt, qh, qw, slt, slh, slw)
    tl.store(p_lse, b_lse, mask=m_q)


def slab_frame(plan: AttentionPlan):
    """``(QOT, QOH, QOW, KOT, KOH, KOW, FH, FW)``: slab origins and the global grid's ``H, W`` (raster
    causality compares global flat indices)."""
    spec = plan.spec
    if spec.slab is None:
        return (0, 0, 0, 0, 0, 0, spec.q_grid[1], spec.q_grid[2])
    s = spec.slab
    return (*s.q_origin, *s.k_origin, s.q_full[1], s.q_full[2])


def launch_forward(query, key, value, plan: AttentionPlan, scale: float, launch=None):
    """Run the forward kernel. Returns ``(out, lse)``: ``out`` contiguous in the input dtype, ``lse``
    float32 (natural log), both freshly allocated.

    ``launch``: ``(num_warps, num_stages)`` (the config table's entry; ``None``: ``(4, 2)``)."""
    B, T, H, W, heads, D = query.shape
    _, TK, HK, WK, heads_kv, _ = key.shape
    out = torch.empty((B, T, H, W, heads, value.shape[-1]), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, T, H, W, heads), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse
    sweep = plan.fwd
    dev = plan.device_tensors(query.device, "fwd")
    nbt, nbh, nbw = sweep.num_bricks
    warps, stages = launch or (4, 2)
    grid = (nbt * nbh * nbw, B * heads)
    nearby_fwd_kernel[grid](
        query, key, value, out, lse, dev["win"], dev["tables"], dev["bounds"],
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *lse.stride(),
        T, H, W, TK, HK, WK, heads, heads // heads_kv,
        nbt, nbh, nbw, *sweep.max_tiles, *sweep.log_brick, *sweep.log_tile,
        *slab_frame(plan),
        float(scale) * LOG2E,
        HEAD_DIM=D,
        BLOCK_M=sweep.block_primary,
        BLOCK_N=sweep.block_secondary,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        RASTER=bool(plan.spec.raster_causal),
        UNIFORM=bool(sweep.uniform),
        PRECISION=dot_precision(query.dtype),
        UPCAST=upcast_tiles(query.dtype),
        PACKED=bool(sweep.packed),
        num_warps=warps,
        num_stages=stages,
    )
    return out, lse
