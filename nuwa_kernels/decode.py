"""Decode path of 3D nearby attention: a few new query tokens against a cached key/value grid.

Autoregressive generation produces one token at a time in raster order. With a key/value cache
(the keys and values of every token generated so far, stored on the full ``(Tk, Hk, Wk)`` grid),
step ``p`` needs attention for the query at flat raster position ``p`` only. That query sees the
keys of its 3D window, so this function **gathers only the window's keys** from the cache: the cost
of a step is ``O(window)``, independent of how many tokens were generated (or of the grid size).

Semantics are exactly those of :func:`nuwa_kernels.nearby_attention` (``docs/nearby_attention.md``):
the per-axis windows come from :mod:`nuwa_kernels.window`, and with ``causal=True`` the keys after
the query in raster order (``flat(key) > flat(query)``: not generated yet) are masked. The output for
position ``p`` equals row ``p`` of ``nearby_attention`` on the full grid (``tests/test_decode.py``).

This is a PyTorch reference implementation (any device, any float dtype, differentiable).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .window import (
    BORDERS,
    CausalArg,
    IntTriple,
    KernelSizeArg,
    _is_int,
    WindowSpec,
    axis_bounds,
    make_window_spec,
    normalize_dilation,
    spec_axis_bounds,
)

__all__ = ["nearby_attention_decode"]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@lru_cache(maxsize=64)
def _axis_tables(spec: WindowSpec, dilation: Tuple[int, int, int], device: torch.device):
    """Per axis ``(lo, hi, step, width)``: the keys ``lo, lo + step, ..., <= hi`` of every query coordinate,
    at most ``width`` of them (built once per spec and device: a decode step is small).

    A dilated axis (``step = d > 1``) is ``d`` interleaved groups, each an ordinary axis of its own
    (section 3a): the group's window on its sub-axis, mapped back to key coordinates.
    """
    out = []
    for axis in range(3):
        d = dilation[axis]
        if d == 1:
            lo, hi = spec_axis_bounds(spec, axis, device=device)
            out.append((lo, hi, 1, int((hi - lo + 1).max()) if lo.numel() else 1))
            continue
        length = spec.q_grid[axis]  # == key length on a dilated axis
        lo = torch.empty(length, dtype=torch.int64, device=device)
        hi = torch.empty(length, dtype=torch.int64, device=device)
        width = 1
        for g in range(min(d, length)):
            lg = (length - g + d - 1) // d
            k = min(spec.kernel_size[axis], 2 * lg - 1)  # kernel sizes were cut to the whole axis, not the group
            glo, ghi = axis_bounds(lg, lg, k, spec.causal_axes[axis], spec.shift_border, device=device,
                                   stride=spec.stride[axis])
            lo[g::d], hi[g::d] = g + d * glo, g + d * ghi
            width = max(width, int((ghi - glo + 1).max()))
        out.append((lo, hi, d, width))
    return tuple(out)


def _check_tensor(name: str, x: object, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}; got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {x.dtype}")


def _normalize_grid(grid: Sequence[int], kv_grid: Tuple[int, int, int]) -> Tuple[int, int, int]:
    if grid is None:
        return kv_grid
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 3:
        raise ValueError(f"grid must be the query grid (T, H, W), three positive ints; got {grid!r}")
    for axis, g in enumerate(grid):
        if not _is_int(g) or g < 1:
            raise ValueError(f"grid[{axis}] must be a positive int; got {g!r} in grid={tuple(grid)!r}")
    return (int(grid[0]), int(grid[1]), int(grid[2]))


def _normalize_positions(positions: Union[int, Tensor], batch: int, n: int, num_q: int, device) -> Tensor:
    """Return ``(B, n)`` int64 flat raster indices on the query grid, range-checked."""
    if _is_int(positions):
        positions = int(positions)
    if isinstance(positions, bool) or not isinstance(positions, (int, Tensor)):
        raise TypeError(
            f"positions must be an int or an integer tensor of shape (n,) or (B, n); got {type(positions).__name__}"
        )
    if isinstance(positions, int):  # checked here, without a device sync
        if not 0 <= positions < num_q:
            raise ValueError(f"positions must be flat raster indices in [0, {num_q}) of the query grid; got {positions}")
        return torch.full((batch, n), positions, dtype=torch.int64, device=device)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor; got dtype {positions.dtype}")
    positions = positions.to(device=device, dtype=torch.int64)
    if positions.dim() == 1:
        if positions.shape[0] != n:
            raise ValueError(
                f"positions of shape (n,) must have n = query.shape[1] = {n} entries; got {positions.shape[0]}"
            )
        positions = positions.unsqueeze(0).expand(batch, n)
    elif positions.dim() == 2:
        if tuple(positions.shape) != (batch, n):
            raise ValueError(
                f"positions of shape (B, n) must be ({batch}, {n}) to match query; got {tuple(positions.shape)}"
            )
    else:
        raise ValueError(f"positions must have shape (n,) or (B, n); got {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= num_q):
        raise ValueError(
            f"positions must be flat raster indices in [0, {num_q}) of the query grid; got values in "
            f"[{int(positions.min())}, {int(positions.max())}]"
        )
    return positions


def nearby_attention_decode(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    positions: Union[int, Tensor],
    grid: Optional[Sequence[int]] = None,
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Nearby attention of a few query tokens at given raster positions against a cached grid.

    Args:
        query: `(B, n, heads, D)`, the new query tokens.
        key_cache: `(B, Tk, Hk, Wk, heads_kv, D)`, keys on the whole key grid (any strides). Entries the
            queries cannot see are never read.
        value_cache: `(B, Tk, Hk, Wk, heads_kv, Dv)`, values, laid out like ``key_cache``.
        positions: flat raster indices ``(t * H + h) * W + w`` of the queries on ``grid``: an int (the
            same position for all ``n``), an integer tensor `(n,)` shared by the batch, or `(B, n)`.
        grid: query grid `(T, H, W)`; default: the key grid (self-attention decode). A different grid
            is cross-attention (NÜWA centre mapping ``floor(i * Lk / Lq)`` per axis).
        kernel_size, causal, border, scale: as in :func:`nuwa_kernels.nearby_attention`. With
            ``causal=True`` (raster order) keys with ``flat(key) > position`` are masked, so the cache
            may hold garbage there (e.g. not yet generated tokens).
        return_lse: also return the log-sum-exp `(B, n, heads)` (float32, float64 for float64 input).
        stride, dilation: as in :func:`nuwa_kernels.nearby_attention` (windows of the query grid).
        additional_keys, additional_values: `(B, S, heads_kv, D)` / `(B, S, heads_kv, Dv)` tokens every
            query also sees (text or start tokens of the prompt), or ``None``.

    Returns:
        ``out`` `(B, n, heads, Dv)` in the query dtype, or ``(out, lse)``.

    Raises:
        TypeError / ValueError naming the argument for malformed input (before any compute).
    """
    _check_tensor("query", query, 4, "(B, n, heads, D)")
    _check_tensor("key_cache", key_cache, 6, "(B, Tk, Hk, Wk, heads_kv, D)")
    _check_tensor("value_cache", value_cache, 6, "(B, Tk, Hk, Wk, heads_kv, Dv)")
    if not (query.dtype == key_cache.dtype == value_cache.dtype):
        raise TypeError(
            f"query, key_cache and value_cache must share a dtype; got {query.dtype}, {key_cache.dtype}, "
            f"{value_cache.dtype}"
        )
    if not (query.device == key_cache.device == value_cache.device):
        raise ValueError(
            f"query, key_cache and value_cache must be on one device; got {query.device}, "
            f"{key_cache.device}, {value_cache.device}"
        )
    B, n, heads, D = query.shape
    Bk, Tk, Hk, Wk, heads_kv, Dk = key_cache.shape
    if Bk != B or value_cache.shape[0] != B:
        raise ValueError(
            f"batch size mismatch: query has B={B}, key_cache {Bk}, value_cache {value_cache.shape[0]}"
        )
    if Dk != D:
        raise ValueError(f"head_dim mismatch: query has D={D}, key_cache has D={Dk}")
    if tuple(value_cache.shape[:5]) != tuple(key_cache.shape[:5]):
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} must match key_cache shape {tuple(key_cache.shape)} "
            "except for the last (value head) dimension"
        )
    if heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(
            f"heads of query ({heads}) must be a multiple of heads_kv of key_cache ({heads_kv})"
        )
    if not isinstance(border, str) or border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}; got {border!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}: {scale!r}")
    kv_grid = (Tk, Hk, Wk)
    q_grid = _normalize_grid(grid, kv_grid)
    spec = make_window_spec(q_grid, kv_grid, kernel_size, causal, border, stride)
    dil = normalize_dilation(dilation, q_grid, kv_grid)
    from .api import _check_additional  # the one section-5a validation

    extra = _check_additional(additional_keys, additional_values, key_cache, value_cache)
    T, H, W = q_grid
    pos = _normalize_positions(positions, B, n, T * H * W, query.device)
    scale = D ** -0.5 if scale is None else float(scale)
    Dv = value_cache.shape[-1]
    acc = _accum_dtype(query.dtype)
    if B == 0 or n == 0:
        out = query.new_zeros((B, n, heads, Dv))
        lse = query.new_zeros((B, n, heads), dtype=acc)
        return (out, lse) if return_lse else out

    # Per-axis window of each query: [lo, hi] from window.py's tables (O(T + H + W), no re-derivation).
    coords = (pos // (H * W), (pos // W) % H, pos % W)  # each (B, n)
    idx, valid = [], []
    for axis, (lo_tab, hi_tab, step, width) in enumerate(_axis_tables(spec, dil, query.device)):
        lo, hi = lo_tab[coords[axis]], hi_tab[coords[axis]]  # (B, n)
        j = lo.unsqueeze(-1) + step * torch.arange(width, device=query.device)  # (B, n, width)
        valid.append(j <= hi.unsqueeze(-1))
        idx.append(j.clamp_max(kv_grid[axis] - 1))
    # Broadcast the three axes into a (B, n, Kt, Kh, Kw) window.
    it = idx[0][:, :, :, None, None]
    ih = idx[1][:, :, None, :, None]
    iw = idx[2][:, :, None, None, :]
    ok = valid[0][:, :, :, None, None] & valid[1][:, :, None, :, None] & valid[2][:, :, None, None, :]
    if spec.raster_causal:
        ok = ok & ((it * Hk + ih) * Wk + iw <= pos[:, :, None, None, None])
    bi = torch.arange(B, device=query.device)[:, None, None, None, None]
    # Gather only the window: (B, n, Kt, Kh, Kw, heads_kv, D), then flatten the window.
    k = key_cache[bi, it, ih, iw].flatten(2, 4).to(acc)  # (B, n, Kwin, heads_kv, D)
    v = value_cache[bi, it, ih, iw].flatten(2, 4).to(acc)  # (B, n, Kwin, heads_kv, Dv)
    ok = ok.flatten(2, 4)  # (B, n, Kwin)
    if extra:  # the S additional tokens, unmasked, in the same softmax
        S = additional_keys.shape[1]
        k = torch.cat([k, additional_keys.to(acc)[:, None].expand(B, n, S, heads_kv, D)], 2)
        v = torch.cat([v, additional_values.to(acc)[:, None].expand(B, n, S, heads_kv, Dv)], 2)
        ok = torch.cat([ok, ok.new_ones(B, n, S)], 2)

    group = heads // heads_kv
    q = query.to(acc).reshape(B, n, heads_kv, group, D)
    s = torch.einsum("bnkgd,bnwkd->bnkgw", q, k) * scale  # (B, n, heads_kv, group, Kwin)
    s = s.masked_fill(~ok[:, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # every query sees at least its centre: finite
    p = torch.exp(s - lse.unsqueeze(-1))
    v = v.masked_fill(~ok[:, :, :, None, None], 0.0)  # masked cache entries may hold garbage (NaN)
    out = torch.einsum("bnkgw,bnwkv->bnkgv", p, v).reshape(B, n, heads, Dv).to(query.dtype)
    if return_lse:
        return out, lse.reshape(B, n, heads)
    return out
