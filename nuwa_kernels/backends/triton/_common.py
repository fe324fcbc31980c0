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


def autotune_configs():
    """One config under the interpreter (it cannot benchmark), several on a GPU."""
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=3),
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=2, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=1),  # fits small shared memories (large head dims)
    ]


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
