"""The window maths of 3D nearby attention: the single Python source of truth.

Everything in this package that needs to know which keys a query may see (the reference
backend, the Triton launch planning, `tile_stats`, the decode path, the tests) asks this module.
The C++/CUDA kernels use the same rules from ``csrc/window.h``; the tests check the two agree.

Conventions (``shared/spec/nearby_attention.md``):

* Axes are ``(t, h, w)``. Per axis a query coordinate ``i`` on a query axis of length ``Lq`` maps to
  the key-axis centre ``c = floor(i * Lk / Lq)``.
* A window is an inclusive key interval ``[lo, hi]`` on each axis; a key is allowed only when it is
  inside the window on all three axes (and, with raster causality, ``flat(key) <= flat(query)``).
* Normalised kernel sizes are plain ints: ``None`` (the whole axis) becomes ``2 * Lk - 1``, which gives
  exactly the whole axis in every mode (truncate, shift and per-axis causal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch

__all__ = [
    "KernelSizeArg",
    "CausalArg",
    "WindowSpec",
    "BORDERS",
    "normalize_kernel_size",
    "normalize_causal",
    "make_window_spec",
    "map_centre",
    "axis_window",
    "axis_inverse_window",
    "axis_bounds",
    "spec_axis_bounds",
    "raster_index",
    "window_mask",
    "max_window_width",
]

Grid = Tuple[int, int, int]
KernelSizeArg = Union[int, None, Sequence[Union[int, None]]]
CausalArg = Union[bool, Sequence[bool]]
BORDERS = ("truncate", "shift")


@dataclass(frozen=True)
class WindowSpec:
    """The normalised semantic arguments of one call (performance knobs live elsewhere).

    Attributes:
        kernel_size: ``(kt, kh, kw)`` positive ints; ``None`` already replaced by ``2 * Lk - 1``.
        causal_axes: per-axis causal flags ``(t, h, w)``.
        raster_causal: ``True`` for raster-order causality (``flat(key) <= flat(query)``).
        shift_border: ``True`` for ``border="shift"`` (NATTEN), ``False`` for ``"truncate"`` (NÜWA).
        q_grid: query grid ``(T, H, W)``.
        kv_grid: key/value grid ``(Tk, Hk, Wk)``.
    """

    kernel_size: Tuple[int, int, int]
    causal_axes: Tuple[bool, bool, bool]
    raster_causal: bool
    shift_border: bool
    q_grid: Grid
    kv_grid: Grid

    @property
    def border(self) -> str:
        return "shift" if self.shift_border else "truncate"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def normalize_kernel_size(kernel_size: KernelSizeArg, kv_grid: Grid) -> Tuple[int, int, int]:
    """Validate ``kernel_size`` and return three positive ints (``None`` -> ``2 * Lk - 1``).

    Raises:
        TypeError / ValueError naming ``kernel_size`` when it is not a positive int, ``None``, or a
        3-tuple/list of those.
    """
    if kernel_size is None or _is_int(kernel_size):
        sizes = (kernel_size,) * 3
    elif isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 3:
            raise ValueError(
                f"kernel_size must be an int, None or a 3-tuple (kt, kh, kw); got a sequence of "
                f"length {len(kernel_size)}: {kernel_size!r}"
            )
        sizes = tuple(kernel_size)
    else:
        raise TypeError(
            f"kernel_size must be a positive int, None, or a 3-tuple of those; got "
            f"{type(kernel_size).__name__}: {kernel_size!r}"
        )
    out = []
    for axis, (k, lk) in enumerate(zip(sizes, kv_grid)):
        if k is None:
            out.append(max(2 * int(lk) - 1, 1))
            continue
        if not _is_int(k):
            raise TypeError(
                f"kernel_size[{axis}] must be a positive int or None; got {type(k).__name__}: {k!r}"
            )
        if k < 1:
            raise ValueError(f"kernel_size[{axis}] must be a positive int or None; got {k}")
        out.append(int(k))
    return (out[0], out[1], out[2])


def normalize_causal(causal: CausalArg) -> Tuple[Tuple[bool, bool, bool], bool]:
    """Return ``(causal_axes, raster_causal)`` from the public ``causal`` argument.

    ``False`` -> no mask; ``True`` -> raster-order causality; a 3-tuple of bools -> per-axis causality.
    """
    if isinstance(causal, bool):
        return (False, False, False), causal
    if isinstance(causal, (tuple, list)):
        if len(causal) != 3 or not all(isinstance(c, bool) for c in causal):
            raise ValueError(
                f"causal must be False, True, or a tuple of three bools (t, h, w); got {causal!r}"
            )
        return (causal[0], causal[1], causal[2]), False
    raise TypeError(
        f"causal must be False, True, or a tuple of three bools (t, h, w); got "
        f"{type(causal).__name__}: {causal!r}"
    )


def make_window_spec(
    q_grid: Sequence[int],
    kv_grid: Sequence[int],
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
) -> WindowSpec:
    """Validate and normalise the semantic arguments into a :class:`WindowSpec`."""
    q_grid = tuple(int(x) for x in q_grid)
    kv_grid = tuple(int(x) for x in kv_grid)
    if not isinstance(border, str) or border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}; got {border!r}")
    ks = normalize_kernel_size(kernel_size, kv_grid)
    axes, raster = normalize_causal(causal)
    if raster and q_grid != kv_grid:
        raise ValueError(
            "causal=True (raster-order causality) needs the query grid to equal the key grid; got "
            f"query grid {q_grid} and key grid {kv_grid}. Use per-axis causality, e.g. "
            "causal=(True, False, False), for cross-attention."
        )
    return WindowSpec(ks, axes, raster, border == "shift", q_grid, kv_grid)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Scalar rules (one axis, one coordinate). These mirror csrc/window.h line by line.
# ----------------------------------------------------------------------------------------------


def map_centre(i: int, lq: int, lk: int) -> int:
    """Key-axis centre of query coordinate ``i``: ``floor(i * Lk / Lq)``."""
    return (i * lk) // lq


def axis_window(i: int, lq: int, lk: int, k: int, causal: bool, shift: bool) -> Tuple[int, int]:
    """Inclusive key interval ``[lo, hi]`` seen by query coordinate ``i`` on one axis."""
    c = map_centre(i, lq, lk)
    if causal:
        return max(c - k + 1, 0), c
    left = k // 2
    right = k - 1 - left
    if shift:
        if k >= lk:
            return 0, lk - 1
        start = min(max(c - left, 0), lk - k)
        return start, start + k - 1
    return max(c - left, 0), min(c + right, lk - 1)


def axis_inverse_window(j: int, lq: int, lk: int, k: int, causal: bool, shift: bool) -> Tuple[int, int]:
    """Inclusive query interval ``[first, last]`` whose windows contain key coordinate ``j``.

    ``lo(i)`` and ``hi(i)`` are non-decreasing in ``i``, so the set is an interval; it is empty when
    ``first > last``. Found by two binary searches over ``axis_window`` (no second derivation).
    """
    # first query with hi(i) >= j
    a, b = 0, lq
    while a < b:
        m = (a + b) // 2
        if axis_window(m, lq, lk, k, causal, shift)[1] >= j:
            b = m
        else:
            a = m + 1
    first = a
    # last query with lo(i) <= j
    a, b = 0, lq
    while a < b:
        m = (a + b) // 2
        if axis_window(m, lq, lk, k, causal, shift)[0] <= j:
            a = m + 1
        else:
            b = m
    return first, a - 1


# ----------------------------------------------------------------------------------------------
# Vectorised forms (tables over a whole axis), for the reference backend and kernel planning.
# ----------------------------------------------------------------------------------------------


def axis_bounds(
    lq: int, lk: int, k: int, causal: bool, shift: bool, device: torch.device | str | None = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` int64 tensors of shape ``(Lq,)``: the inclusive key window of every query coord."""
    i = torch.arange(lq, device=device, dtype=torch.int64)
    c = torch.div(i * lk, lq, rounding_mode="floor")
    if causal:
        return (c - k + 1).clamp_min(0), c
    left = k // 2
    right = k - 1 - left
    if shift:
        if k >= lk:
            return torch.zeros_like(c), torch.full_like(c, lk - 1)
        start = (c - left).clamp(0, lk - k)
        return start, start + k - 1
    return (c - left).clamp_min(0), (c + right).clamp_max(lk - 1)


def spec_axis_bounds(spec: WindowSpec, axis: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`axis_bounds` for one axis (0 = t, 1 = h, 2 = w) of a :class:`WindowSpec`."""
    return axis_bounds(
        spec.q_grid[axis],
        spec.kv_grid[axis],
        spec.kernel_size[axis],
        spec.causal_axes[axis],
        spec.shift_border,
        device=device,
    )


def max_window_width(spec: WindowSpec, axis: int) -> int:
    """The largest number of keys any query sees on ``axis`` (``<= min(k, Lk)``)."""
    lo, hi = spec_axis_bounds(spec, axis)
    return int((hi - lo + 1).max().item()) if lo.numel() else 0


def raster_index(t, h, w, grid: Grid):
    """Flat raster index ``(t * H + h) * W + w`` (works on ints and tensors)."""
    return (t * grid[1] + h) * grid[2] + w


def window_mask(spec: WindowSpec, device=None) -> torch.Tensor:
    """Dense boolean mask of shape ``(Nq, Nk)``: ``True`` where the key is allowed.

    For tests and small grids only (it is ``N x N``).
    """
    per_axis = []
    for axis in range(3):
        lo, hi = spec_axis_bounds(spec, axis, device=device)
        j = torch.arange(spec.kv_grid[axis], device=device)
        per_axis.append((j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None]))
    mt, mh, mw = per_axis
    mask = mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
    nq = spec.q_grid[0] * spec.q_grid[1] * spec.q_grid[2]
    nk = spec.kv_grid[0] * spec.kv_grid[1] * spec.kv_grid[2]
    mask = mask.reshape(nq, nk)
    if spec.raster_causal:
        mask &= torch.ones(nq, nk, dtype=torch.bool, device=device).tril()
    return mask
