"""The ``reference`` backend: plain PyTorch, any device, any float dtype (float64 included).

Exact and memory-bounded: queries are processed in chunks, and for each chunk only the keys inside
its queries' windows are gathered (``chunk x window`` scores, never ``N x N``). Softmax and
accumulation run in float64 for float64 inputs and in float32 otherwise. The backward is the
explicit FlashAttention formula over the same gathered windows (no autograd graph is kept), with
``index_add_`` scattering dK/dV.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .. import _ops
from ..window import WindowSpec, global_raster_index, spec_axis_bounds, spec_from_op_args

NAME = "reference"

# Upper bound on the elements of one chunk's gathered key (or value) block: keeps peak memory at a
# few hundred MB whatever the grid size.
CHUNK_ELEMENTS = 1 << 24


def can_run(query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec) -> Tuple[bool, str]:
    """The reference runs every valid call (validation happens in the public API)."""
    return True, ""


class _Windows:
    """Per-axis window tables of one call and the gather indices for a chunk of queries."""

    def __init__(self, spec: WindowSpec, device):
        self.q_grid, self.kv_grid, self.raster = spec.q_grid, spec.kv_grid, spec.raster_causal
        self.lo: List[Tensor] = []
        self.width: List[int] = []
        self.hi: List[Tensor] = []
        for a in range(3):
            lo, hi = spec_axis_bounds(spec, a, device=device)
            self.lo.append(lo)
            self.hi.append(hi)
            self.width.append(max(1, int((hi - lo + 1).max().item())) if lo.numel() else 1)
        self.window = self.width[0] * self.width[1] * self.width[2]
        if self.raster:
            self.q_flat = global_raster_index(spec, False, device)
            self.k_flat = global_raster_index(spec, True, device)

    def gather(self, start: int, stop: int) -> Tuple[Tensor, Tensor]:
        """Flat key indices ``(C, window)`` (clamped in range) and their validity mask for queries
        ``start .. stop-1`` in raster order."""
        T, H, W = self.q_grid
        _, Hk, Wk = self.kv_grid
        device = self.lo[0].device
        flat_q = torch.arange(start, stop, device=device)
        coords = (flat_q // (H * W), (flat_q // W) % H, flat_q % W)
        idx, ok = [], []
        for a in range(3):
            j = self.lo[a][coords[a]][:, None] + torch.arange(self.width[a], device=device)[None, :]
            ok.append(j <= self.hi[a][coords[a]][:, None])
            idx.append(j.clamp(0, self.kv_grid[a] - 1))
        it, ih, iw = (x[:, :, None, None] if a == 0 else x[:, None, :, None] if a == 1 else x[:, None, None, :]
                      for a, x in enumerate(idx))
        flat_k = ((it * Hk + ih) * Wk + iw).reshape(stop - start, -1)
        valid = (ok[0][:, :, None, None] & ok[1][:, None, :, None] & ok[2][:, None, None, :]).reshape(stop - start, -1)
        if self.raster:
            valid &= self.k_flat[flat_k] <= self.q_flat[flat_q][:, None]
        return flat_k, valid

    def chunk_size(self, batch: int, heads_kv: int, dim: int) -> int:
        return max(1, CHUNK_ELEMENTS // max(1, batch * self.window * heads_kv * dim))


def _setup(query, key, value, *window_args):
    B, T, H, W, heads, D = query.shape
    Tk, Hk, Wk, heads_kv = key.shape[1:5]
    win = _Windows(spec_from_op_args((T, H, W), (Tk, Hk, Wk), *window_args), query.device)
    acc = _ops.accum_dtype(query.dtype)
    q = query.reshape(B, T * H * W, heads_kv, heads // heads_kv, D)
    k = key.reshape(B, Tk * Hk * Wk, heads_kv, D)
    v = value.reshape(B, Tk * Hk * Wk, heads_kv, value.shape[-1])
    return win, acc, q, k, v


def _chunk_scores(win, q, k, start, stop, scale, acc):
    """Scores ``(B, C, hkv, G, window)`` (masked with -inf), gathered keys and the flat indices."""
    flat_k, valid = win.gather(start, stop)
    kw = k[:, flat_k].to(acc)  # (B, C, window, hkv, D)
    qc = q[:, start:stop].to(acc)  # (B, C, hkv, G, D)
    s = torch.einsum("bchgd,bcwhd->bchgw", qc, kw) * scale
    s = s.masked_fill(~valid[None, :, None, None, :], float("-inf"))
    return s, kw, qc, flat_k


def _forward_chunks(query, key, value, window_args, scale):
    """Yield ``(start, stop, out, lse)`` per chunk of queries in raster order: ``out (B, C, hkv, G, Dv)`` in
    the accumulation dtype, ``lse (B, C, hkv, G)``; plain PyTorch ops (differentiable)."""
    B, T, H, W, heads, D = query.shape
    win, acc, q, k, v = _setup(query, key, value, *window_args)
    N, heads_kv = T * H * W, key.shape[4]
    step = win.chunk_size(B, heads_kv, max(D, value.shape[-1]))
    for start in range(0, N, step):
        stop = min(start + step, N)
        s, _, _, flat_k = _chunk_scores(win, q, k, start, stop, scale, acc)
        chunk_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - chunk_lse[..., None])
        yield start, stop, torch.einsum("bchgw,bcwhd->bchgd", p, v[:, flat_k].to(acc)), chunk_lse


def _fwd_impl(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale):
    with torch.autocast(query.device.type, enabled=False):
        B, T, H, W, heads, D = query.shape
        N, heads_kv = T * H * W, key.shape[4]
        out = torch.empty((B, N, heads_kv, heads // heads_kv, value.shape[-1]), dtype=query.dtype, device=query.device)
        lse = torch.empty((B, N, heads_kv, heads // heads_kv), dtype=_ops.accum_dtype(query.dtype), device=query.device)
        window_args = (kernel_size, causal_axes, raster_causal, shift_border, stride, slab)
        for start, stop, chunk_out, chunk_lse in _forward_chunks(query, key, value, window_args, scale):
            out[:, start:stop] = chunk_out.to(query.dtype)
            lse[:, start:stop] = chunk_lse
        return out.reshape(B, T, H, W, heads, -1), lse.reshape(B, T, H, W, heads)


def _bwd_impl(grad_out, query, key, value, lse, delta, kernel_size, causal_axes, raster_causal, shift_border, stride,
              slab, scale):
    with torch.autocast(query.device.type, enabled=False):
        B, T, H, W, heads, D = query.shape
        win, acc, q, k, v = _setup(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab)
        N, heads_kv, G = T * H * W, key.shape[4], heads // key.shape[4]
        do = grad_out.reshape(B, N, heads_kv, G, -1)
        lse_ = lse.reshape(B, N, heads_kv, G)
        delta_ = delta.reshape(B, N, heads_kv, G)
        dq = torch.empty((B, N, heads_kv, G, D), dtype=query.dtype, device=query.device)
        dk = torch.zeros(k.shape, dtype=acc, device=query.device)
        dv = torch.zeros(v.shape, dtype=acc, device=query.device)
        step = win.chunk_size(B, heads_kv, max(D, value.shape[-1]))
        for start in range(0, N, step):
            stop = min(start + step, N)
            s, kw, qc, flat_k = _chunk_scores(win, q, k, start, stop, scale, acc)
            p = torch.exp(s - lse_[:, start:stop, ..., None].to(acc))  # (B, C, hkv, G, window)
            vw = v[:, flat_k].to(acc)
            doc = do[:, start:stop].to(acc)
            dp = torch.einsum("bchgd,bcwhd->bchgw", doc, vw)
            ds = p * (dp - delta_[:, start:stop, ..., None].to(acc))
            dq[:, start:stop] = (torch.einsum("bchgw,bcwhd->bchgd", ds, kw) * scale).to(query.dtype)
            flat = flat_k.reshape(-1)
            dk.index_add_(1, flat, (torch.einsum("bchgw,bchgd->bcwhd", ds, qc) * scale).flatten(1, 2))
            dv.index_add_(1, flat, torch.einsum("bchgw,bchgd->bcwhd", p, doc).flatten(1, 2))
        return dq.reshape(query.shape), dk.to(key.dtype).reshape(key.shape), dv.to(value.dtype).reshape(value.shape)


def differentiable_forward(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab,
                           scale) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the op as plain differentiable PyTorch (chunked gathers, autograd keeps each
    chunk's window): the path for second-order gradients of every backend (see ``_ops``)."""
    with torch.autocast(query.device.type, enabled=False):
        B, T, H, W, heads, _ = query.shape
        window_args = (kernel_size, causal_axes, raster_causal, shift_border, stride, slab)
        chunks = list(_forward_chunks(query, key, value, window_args, scale))
        out = torch.cat([c[2] for c in chunks], 1).to(query.dtype)
        return out.reshape(B, T, H, W, heads, -1), torch.cat([c[3] for c in chunks], 1).reshape(B, T, H, W, heads)


PAIR = _ops.define_python_ops("reference", _fwd_impl, _bwd_impl)
FWD_OP, BWD_OP = PAIR.fwd, PAIR.bwd


def forward(query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec, scale: float) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` through ``nuwa_kernels::reference_fwd`` (differentiable)."""
    return _ops.call(PAIR, query, key, value, *_ops.spec_op_args(spec), scale)


def runner(spec: WindowSpec, scale: float):
    """:func:`forward` of one window as ``run(query, key, value)``, its op arguments built once (eager
    calls; the API's plans keep it)."""
    return _ops.prepared(PAIR, spec, scale)
