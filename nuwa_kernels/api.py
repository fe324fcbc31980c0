"""Public API: :func:`nearby_attention` and :func:`nearby_sdpa`.

Each call validates every input (contract section 9) before any kernel runs, normalises the
semantic arguments into a :class:`~nuwa_kernels.window.WindowSpec`, picks a backend and calls it.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import BACKEND_NAMES, get_backend, select_backend
from .window import CausalArg, KernelSizeArg, WindowSpec, make_window_spec

__all__ = ["nearby_attention", "nearby_sdpa", "can_run", "available_backends"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_tensors(query, key, value, layout: str) -> None:
    """Types, dtypes, devices and ranks of the three inputs."""
    ndim = 6 if layout == "grid" else 4
    shape_doc = {
        "grid": ("(B, T, H, W, heads, D)", "(B, Tk, Hk, Wk, heads_kv, D)", "(B, Tk, Hk, Wk, heads_kv, Dv)"),
        "sdpa": ("(B, heads, N, D)", "(B, heads_kv, Nk, D)", "(B, heads_kv, Nk, Dv)"),
    }[layout]
    for name, t, doc in zip(("query", "key", "value"), (query, key, value), shape_doc):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {doc}; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64); got {t.dtype}"
            )
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {doc}; got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have the dtype of query ({query.dtype}); got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on the device of query ({query.device}); got {t.device}")


def _check_shapes(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Shape agreement in grid layout (B, T, H, W, heads, D)."""
    B, heads, D = query.shape[0], query.shape[4], query.shape[5]
    for name, t in (("key", key), ("value", value)):
        if t.shape[0] != B:
            raise ValueError(f"{name} batch size must equal query's ({B}); got {t.shape[0]}")
    if key.shape[5] != D:
        raise ValueError(f"key head_dim must equal query's ({D}); got {key.shape[5]}")
    if value.shape[5] != D:
        raise ValueError(f"value head_dim (Dv) must equal query's head_dim ({D}) in this version; got {value.shape[5]}")
    if value.shape[1:5] != key.shape[1:5]:
        raise ValueError(
            f"value grid and heads_kv must equal key's {tuple(key.shape[1:5])}; got {tuple(value.shape[1:5])}"
        )
    if D < 1:
        raise ValueError(f"query head_dim must be positive; got {D}")
    heads_kv = key.shape[4]
    if heads < 1 or heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(
            f"query heads ({heads}) must be a positive multiple of key/value heads (heads_kv={heads_kv})"
        )
    if query.numel() and math.prod(key.shape[1:4]) == 0:
        raise ValueError(f"key grid must be non-empty when query is non-empty; got key grid {tuple(key.shape[1:4])}")


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}: {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return scale


def _autocast(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[str]]:
    """Under ``torch.autocast``, cast float16/bfloat16/float32 inputs to the autocast dtype (as SDPA does)."""
    if not isinstance(query, Tensor):
        return query, key, value, None
    dev = query.device.type
    if dev not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(dev):
        return query, key, value, None
    target = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(target) if isinstance(t, Tensor) and t.dtype in _FLOAT_DTYPES[:3] else t  # noqa: E731
    return cast(query), cast(key), cast(value), dev


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------


def _validated_spec(query, key, value, kernel_size, causal, border) -> WindowSpec:
    """Validate grid-layout inputs and the semantic arguments; return the normalised window spec."""
    _check_tensors(query, key, value, "grid")
    _check_shapes(query, key, value)
    return make_window_spec(query.shape[1:4], key.shape[1:4], kernel_size, causal, border)


def _prepare(query, key, value, kernel_size, causal, border, scale, backend):
    spec = _validated_spec(query, key, value, kernel_size, causal, border)
    scale = _resolve_scale(scale, query.shape[-1])
    module = select_backend(backend, query, key, value, spec)
    return spec, scale, module


def _empty_result(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
    """Outputs for empty inputs, still attached to the autograd graph (gradients are empty)."""
    from ._ops import accum_dtype

    out = query.new_zeros((*query.shape[:-1], value.shape[-1]))
    lse = query.new_zeros(query.shape[:-1], dtype=accum_dtype(query.dtype))
    if query.requires_grad or key.requires_grad or value.requires_grad:
        out = out + (query.sum() + key.sum() + value.sum()) * 0
    return out, lse


def nearby_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """3D nearby attention (NÜWA's 3DNA) on grid-layout tensors.

    Each query token attends only to the key tokens in a ``(kt, kh, kw)`` window around its (mapped)
    position; see ``docs/nearby_attention.md`` for the exact window rules.

    Args:
        query: ``(B, T, H, W, heads, D)``, any strides.
        key: ``(B, Tk, Hk, Wk, heads_kv, D)``; the key grid may differ from the query grid
            (cross-attention; window centre ``floor(i * Lk / Lq)`` per axis). ``heads % heads_kv == 0``.
        value: ``(B, Tk, Hk, Wk, heads_kv, Dv)`` with ``Dv == D``.
        kernel_size: an int, or ``(kt, kh, kw)`` of ints or ``None`` (``None`` = the whole axis).
            Default ``3``. NÜWA presets: images ``(1, 3, 3)``, video ``(3, 3, 3)``, text ``(None, 1, 1)``.
        causal: ``False`` (default); ``True`` for raster-order causality (``flat(key) <= flat(query)``,
            self-attention grids only); or ``(t, h, w)`` bools for per-axis causal windows.
        border: ``"truncate"`` (default; NÜWA: border queries see fewer keys) or ``"shift"``
            (NATTEN: windows shift inwards so every query sees ``k`` keys per axis).
        scale: score scale; default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores.
        backend: ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``. ``auto``
            picks the fastest backend that can run the call (override with ``NUWA_KERNELS_BACKEND``);
            an explicit backend that cannot run raises :class:`BackendUnavailableError` saying why.

    Returns:
        ``out (B, T, H, W, heads, Dv)`` in the input dtype, and with ``return_lse`` also
        ``lse (B, T, H, W, heads)`` (natural log; float32, float64 for float64 inputs).
    """
    query, key, value, autocast_dev = _autocast(query, key, value)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    spec, scale, module = _prepare(query, key, value, kernel_size, causal, border, scale, backend)
    if query.numel() == 0:
        out, lse = _empty_result(query, key, value)
    elif autocast_dev is not None:
        with torch.autocast(autocast_dev, enabled=False):
            out, lse = module.forward(query, key, value, spec, scale)
    else:
        out, lse = module.forward(query, key, value, spec, scale)
    return (out, lse) if return_lse else out


def _check_grid(name: str, grid, n: int) -> Tuple[int, int, int]:
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 3:
        raise ValueError(f"{name} must be a 3-tuple (T, H, W); got {grid!r}")
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in grid):
        raise TypeError(f"{name} must hold non-negative ints (T, H, W); got {grid!r}")
    if math.prod(grid) != n:
        raise ValueError(f"{name} {tuple(grid)} must multiply to the sequence length {n}; got {math.prod(grid)}")
    return (grid[0], grid[1], grid[2])


def nearby_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    grid: Sequence[int],
    kv_grid: Optional[Sequence[int]] = None,
    kernel_size: KernelSizeArg = 3,
    is_causal: CausalArg = False,
    border: str = "truncate",
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Nearby attention as a drop-in beside ``F.scaled_dot_product_attention``.

    Args:
        query: ``(B, heads, N, D)`` with ``N == T * H * W`` tokens in raster order.
        key, value: ``(B, heads_kv, Nk, D)`` with ``Nk == prod(kv_grid)``.
        grid: the query grid ``(T, H, W)``.
        kv_grid: the key/value grid; defaults to ``grid``.
        kernel_size, border, scale, backend: as in :func:`nearby_attention`.
        is_causal: ``True`` for raster-order causality (what ``is_causal=True`` means for SDPA on the
            flattened sequence), or per-axis ``(t, h, w)`` bools.

    Returns:
        ``(B, heads, N, Dv)`` (a strided view of a ``(B, N, heads, Dv)`` buffer, so
        ``out.transpose(1, 2).reshape(B, N, heads * Dv)`` is free).
    """
    query, key, value, _ = _autocast(query, key, value)
    _check_tensors(query, key, value, "sdpa")
    grid = _check_grid("grid", grid, query.shape[2])
    kv_grid = grid if kv_grid is None else kv_grid
    kv_grid = _check_grid("kv_grid", kv_grid, key.shape[2])
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value sequence length must equal key's ({key.shape[2]}); got {value.shape[2]}")
    to_grid = lambda t, g: t.transpose(1, 2).unflatten(1, g)  # noqa: E731  (a view, no copy)
    out = nearby_attention(
        to_grid(query, grid),
        to_grid(key, kv_grid),
        to_grid(value, kv_grid),
        kernel_size=kernel_size,
        causal=is_causal,
        border=border,
        scale=scale,
        backend=backend,
    )
    return out.flatten(1, 3).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# introspection
# ----------------------------------------------------------------------------------------------


def can_run(
    backend: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
) -> Tuple[bool, str]:
    """Whether ``backend`` can run this grid-layout call, and the reason when it cannot."""
    spec = _validated_spec(query, key, value, kernel_size, causal, border)
    return get_backend(backend).can_run(query, key, value, spec)


def available_backends(
    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 64
) -> Dict[str, Tuple[bool, str]]:
    """``{backend: (can_run, reason)}`` for a small probe call on ``device`` with ``dtype``."""
    q = torch.zeros(1, 1, 2, 2, 1, head_dim, device=device, dtype=dtype)
    return {name: can_run(name, q, q, q) for name in BACKEND_NAMES}
