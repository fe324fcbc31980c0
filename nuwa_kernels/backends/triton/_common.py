"""Pieces shared by the Triton kernels and launchers: interpreter detection, autotune configs,
``@triton.jit`` helpers for brick coordinates and tile lists."""

from __future__ import annotations

import os

import torch

try:  # triton is optional: the backend reports "not importable" through can_run
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _interpreting() -> bool:
    if not HAS_TRITON:
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ``triton.jit`` decides at decoration time whether a kernel is interpreted, so the mode is fixed when
# this module is imported.
INTERPRET = _interpreting()

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE float32 unless the user allowed TF32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_tiles(dtype: torch.dtype) -> bool:
    """bfloat16 tiles must be converted to float32 after loading in the interpreter."""
    return INTERPRET and dtype == torch.bfloat16


if HAS_TRITON:

    @triton.jit
    def brick_coords(r, t0, h0, w0, LOG_H, LOG_W):
        """Grid coordinates of the rows ``r`` of a brick of ``(?, 2**LOG_H, 2**LOG_W)`` at ``(t0, h0, w0)``."""
        w = w0 + (r & ((1 << LOG_W) - 1))
        h = h0 + ((r >> LOG_W) & ((1 << LOG_H) - 1))
        t = t0 + (r >> (LOG_W + LOG_H))
        return t, h, w

    @triton.jit
    def tile_entry(TILES, off_list, p, MAXC, j):
        """``(start, full)`` of tile ``j`` of primary brick ``p`` on one axis."""
        e = tl.load(TILES + off_list + p * MAXC + j)
        return e >> 1, e & 1

    @triton.jit
    def window_mask(qt, qh, qw, lt, ht, lh, hh, lw, hw, kt, kh, kw):
        """``[M, N]`` allowed-pair mask from per-row windows and per-column key coordinates."""
        m = (kt[None, :] >= lt[:, None]) & (kt[None, :] <= ht[:, None])
        m = m & (kh[None, :] >= lh[:, None]) & (kh[None, :] <= hh[:, None])
        m = m & (kw[None, :] >= lw[:, None]) & (kw[None, :] <= hw[:, None])
        return m

    @triton.jit
    def window_mask_t(kt, kh, kw, lt, ht, lh, hh, lw, hw):
        """``[N, M]`` allowed-pair mask (keys x queries) from per-key coordinates and per-query windows."""
        m = (kt[:, None] >= lt[None, :]) & (kt[:, None] <= ht[None, :])
        m = m & (kh[:, None] >= lh[None, :]) & (kh[:, None] <= hh[None, :])
        m = m & (kw[:, None] >= lw[None, :]) & (kw[:, None] <= hw[None, :])
        return m

    @triton.jit
    def program_head(i_bh, HEADS, GROUP):
        """``(batch, query head, kv head)`` of the flat index ``i_bh`` over ``batch * HEADS``."""
        i_b = i_bh // HEADS
        i_n = i_bh % HEADS
        i_nk = i_n // GROUP
        return i_b, i_n, i_nk

    @triton.jit
    def program_brick(i_m, NB_H, NB_W, LOG_BT, LOG_BH, LOG_BW):
        """Brick ``(pt, ph, pw)`` of program ``i_m`` on a ``(?, NB_H, NB_W)`` brick grid and its origin
        ``(t0, h0, w0)`` for bricks of ``(2**LOG_BT, 2**LOG_BH, 2**LOG_BW)``."""
        pw = i_m % NB_W
        ph = (i_m // NB_W) % NB_H
        pt = i_m // (NB_W * NB_H)
        t0 = pt << LOG_BT
        h0 = ph << LOG_BH
        w0 = pw << LOG_BW
        return pt, ph, pw, t0, h0, w0

    @triton.jit
    def brick_window(WIN, t0, h0, w0, T, H, W):
        """The one window ``(lt, ht, lh, hh, lw, hw)`` that every row of a uniform brick (or tile) shares,
        read at its first row ``(t0, h0, w0)`` (always inside the grid)."""
        lt = tl.load(WIN + t0)
        ht = tl.load(WIN + T + t0)
        lh = tl.load(WIN + 2 * T + h0)
        hh = tl.load(WIN + 2 * T + H + h0)
        lw = tl.load(WIN + 2 * T + 2 * H + w0)
        hw = tl.load(WIN + 2 * T + 2 * H + W + w0)
        return lt, ht, lh, hh, lw, hw

    @triton.jit
    def in_window(kt, kh, kw, lt, ht, lh, hh, lw, hw):
        """Mask of the key coordinates inside one window (scalar bounds)."""
        return (kt >= lt) & (kt <= ht) & (kh >= lh) & (kh <= hh) & (kw >= lw) & (kw <= hw)

    @triton.jit
    def global_flat(t, h, w, OT, OH, OW, FH, FW):
        """Global raster index of local coordinates (slab origin ``(OT, OH, OW)``, global grid ``(?, FH, FW)``)."""
        return ((t + OT) * FH + h + OH) * FW + w + OW

    @triton.jit
    def in_grid(t, h, w, T, H, W):
        """Mask of the coordinates inside a ``(T, H, W)`` grid."""
        return (t < T) & (h < H) & (w < W)

    @triton.jit
    def offsets64(t, h, w, st, sh, sw):
        """64-bit element offsets of the coordinates ``(t, h, w)`` for strides ``(st, sh, sw)``."""
        return t.to(tl.int64) * st + h.to(tl.int64) * sh + w.to(tl.int64) * sw

    @triton.jit
    def row_windows(WIN, qt, qh, qw, m_q, T, H, W, TK, HK, WK):
        """Per-row key windows ``(lt, ht, lh, hh, lw, hw)`` (inclusive); rows outside the grid see nothing."""
        lt = tl.load(WIN + qt, mask=m_q, other=TK)
        ht = tl.load(WIN + T + qt, mask=m_q, other=-1)
        lh = tl.load(WIN + 2 * T + qh, mask=m_q, other=HK)
        hh = tl.load(WIN + 2 * T + H + qh, mask=m_q, other=-1)
        lw = tl.load(WIN + 2 * T + 2 * H + qw, mask=m_q, other=WK)
        hw = tl.load(WIN + 2 * T + 2 * H + W + qw, mask=m_q, other=-1)
        return lt, ht, lh, hh, lw, hw

    @triton.jit
    def tile_lists(TILES, BOUNDS, i_m, pt, ph, pw, NB_T, NB_H, NB_W, MAX_T, MAX_H, RASTER: tl.constexpr,
                   PACKED: tl.constexpr, BLOCK: tl.constexpr):
        """Offsets of the per-axis tile lists of brick ``(pt, ph, pw)`` in ``TILES``, the tile counts
        ``cw`` and ``chw`` that decode a flat tile index, their product with ``ct`` and the
        ``[j_begin, j_end)`` range to walk.

        ``PACKED``: the lists hold the secondary coordinates the brick reaches on each axis (its window
        union) and the program walks ``ceil(ct * ch * cw / BLOCK)`` packed tiles of ``BLOCK`` keys
        (:func:`packed_coords`); ``cw``/``chw`` then decode a flat key index."""
        off_lt = NB_T
        off_ch = NB_T * (1 + MAX_T)
        off_lh = off_ch + NB_H
        off_cw = off_lh + NB_H * MAX_H
        off_lw = off_cw + NB_W
        ct = tl.load(TILES + pt)
        ch = tl.load(TILES + off_ch + ph)
        cw = tl.load(TILES + off_cw + pw)
        chw = ch * cw
        if RASTER:
            j_begin = tl.load(BOUNDS + 2 * i_m)
            j_end = tl.load(BOUNDS + 2 * i_m + 1)
        else:
            j_begin = 0
            if PACKED:
                j_end = (ct * chw + BLOCK - 1) // BLOCK
            else:
                j_end = ct * chw
        return off_lt, off_lh, off_lw, cw, chw, ct * chw, j_begin, j_end

    @triton.jit
    def packed_coords(TILES, j, off_lt, off_lh, off_lw, cw, chw, total, pt, ph, pw, MAX_T, MAX_H, MAX_W, o_c,
                      TK, BLOCK: tl.constexpr):
        """Coordinates ``(t, h, w)`` of the ``BLOCK`` keys of packed tile ``j``: keys ``j * BLOCK + o_c`` of
        the brick's window union in lexicographic (raster) order, gathered from the per-axis coordinate
        lists. Padding keys past the union's ``total`` keys get ``t = TK`` (outside the key grid and
        every window)."""
        f = j * BLOCK + o_c
        valid = f < total
        it = f // chw
        r = f - it * chw
        ih = r // cw
        iw = r - ih * cw
        kt = tl.load(TILES + off_lt + pt * MAX_T + it, mask=valid, other=TK)
        kh = tl.load(TILES + off_lh + ph * MAX_H + ih, mask=valid, other=0)
        kw = tl.load(TILES + off_lw + pw * MAX_W + iw, mask=valid, other=0)
        return kt, kh, kw

    @triton.jit
    def windows_meet(lt, ht, lh, hh, lw, hw, m_q):
        """The box of keys every in-grid row of a brick sees (the intersection of its windows; empty
        when ``lo > hi`` on an axis): a key inside it needs no mask."""
        big = 1 << 30
        x_lt = tl.max(tl.where(m_q, lt, -1), 0)
        x_ht = tl.min(tl.where(m_q, ht, big), 0)
        x_lh = tl.max(tl.where(m_q, lh, -1), 0)
        x_hh = tl.min(tl.where(m_q, hh, big), 0)
        x_lw = tl.max(tl.where(m_q, lw, -1), 0)
        x_hw = tl.min(tl.where(m_q, hw, big), 0)
        return x_lt, x_ht, x_lh, x_hh, x_lw, x_hw

    @triton.jit
    def tile_coords(TILES, j, off_lt, off_lh, off_lw, cw, chw, pt, ph, pw, MAX_T, MAX_H, MAX_W, ot, oh, ow):
        """Tile ``j`` of brick ``(pt, ph, pw)``: its origin ``(t0, h0, w0)``, the coordinates
        ``(t, h, w)`` of its elements (offsets ``(ot, oh, ow)`` from the origin) and whether it is
        full on every axis."""
        jt = j // chw
        jh = (j - jt * chw) // cw
        jw = j - jt * chw - jh * cw
        t0, ft = tile_entry(TILES, off_lt, pt, MAX_T, jt)
        h0, fh = tile_entry(TILES, off_lh, ph, MAX_H, jh)
        w0, fw = tile_entry(TILES, off_lw, pw, MAX_W, jw)
        return t0, h0, w0, t0 + ot, h0 + oh, w0 + ow, ft & fh & fw
