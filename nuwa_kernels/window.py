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
  exactly the whole axis in every mode (truncate, shift and per-axis causal); larger sizes are cut to it.
* Stride (section 3a): the queries of a block of ``s`` positions share the window of the block's leader
  (:func:`stride_leader`). Dilation is not a window rule here: a dilated axis is ``d`` interleaved
  groups, each an ordinary axis of its own (:func:`dilation_groups`); the API runs every group as one
  call on strided views.
* Slabs (:class:`Slab`): the tensors of a call may be slabs of larger global grids (context
  parallelism, tiled inference). Windows follow the global grids; keys outside the local key slab are
  absent.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "KernelSizeArg",
    "IntTriple",
    "Slab",
    "normalize_stride",
    "normalize_dilation",
    "stride_leader",
    "dilation_groups",
    "needed_key_range",
    "CausalArg",
    "WindowSpec",
    "BORDERS",
    "normalize_kernel_size",
    "normalize_causal",
    "make_window_spec",
    "spec_from_op_args",
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
IntTriple = Union[int, Sequence[int]]
CausalArg = Union[bool, Sequence[bool]]
BORDERS = ("truncate", "shift")


@dataclass(frozen=True)
class Slab:
    """Where a call's tensors sit in larger global grids (context parallelism, tiled inference).

    Attributes:
        q_origin: global ``(t, h, w)`` of the local query tensor's element ``[0, 0, 0]``.
        k_origin: global ``(t, h, w)`` of the local key/value tensors' element ``[0, 0, 0]``.
        q_full: the global query grid ``(T, H, W)`` whose windows the call follows.
        k_full: the global key grid ``(Tk, Hk, Wk)``.
    """

    q_origin: Grid
    k_origin: Grid
    q_full: Grid
    k_full: Grid

    def op_args(self) -> list:
        """The 12 ints of the ops' ``slab`` argument: ``q_origin, k_origin, q_full, k_full``."""
        return [*self.q_origin, *self.k_origin, *self.q_full, *self.k_full]


@dataclass(frozen=True)
class WindowSpec:
    """The normalised semantic arguments of one call (performance knobs live elsewhere).

    Attributes:
        kernel_size: ``(kt, kh, kw)`` positive ints; ``None`` already replaced by ``2 * Lk - 1``.
        causal_axes: per-axis causal flags ``(t, h, w)``.
        raster_causal: ``True`` for raster-order causality (``flat(key) <= flat(query)``).
        shift_border: ``True`` for ``border="shift"`` (NATTEN), ``False`` for ``"truncate"`` (NÜWA).
        q_grid: the query tensor's grid ``(T, H, W)`` (local extents when ``slab`` is set).
        kv_grid: the key/value tensors' grid ``(Tk, Hk, Wk)`` (local extents when ``slab`` is set).
        stride: ``(st, sh, sw)``, each ``1 <= s``; queries of a block share the block leader's window.
        slab: ``None``, or where the tensors sit in the global grids the windows follow.
    """

    kernel_size: Tuple[int, int, int]
    causal_axes: Tuple[bool, bool, bool]
    raster_causal: bool
    shift_border: bool
    q_grid: Grid
    kv_grid: Grid
    stride: Grid = (1, 1, 1)
    slab: Optional[Slab] = None

    @property
    def border(self) -> str:
        return "shift" if self.shift_border else "truncate"

    @property
    def q_full(self) -> Grid:
        """The global query grid the windows follow (``q_grid`` without a slab)."""
        return self.slab.q_full if self.slab is not None else self.q_grid

    @property
    def k_full(self) -> Grid:
        """The global key grid (``kv_grid`` without a slab)."""
        return self.slab.k_full if self.slab is not None else self.kv_grid

    def slab_args(self) -> list:
        """The ops' ``slab`` argument: ``[]`` or the 12 ints of :meth:`Slab.op_args`."""
        return self.slab.op_args() if self.slab is not None else []


def _is_int(x: object) -> bool:
    """A Python or numpy integer (not a bool)."""
    if type(x) is int:  # the common case, without the abstract-class check
        return True
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np_bool))


try:  # numpy's bool is not a Python bool; keep numpy optional
    from numpy import bool_ as np_bool
except ImportError:  # pragma: no cover
    class np_bool:  # type: ignore[no-redef]
        pass


def _triple(name: str, value: object, what: str) -> tuple:
    """``value`` as a 3-tuple: an int-like or ``None`` repeated, or a 3-sequence (raises naming ``name``)."""
    if value is None or _is_int(value):
        return (value,) * 3
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) != 3:
            raise ValueError(f"{name} must be {what} or a 3-tuple (t, h, w) of those; got a sequence of length "
                             f"{len(value)}: {value!r}")
        return tuple(value)
    raise TypeError(f"{name} must be {what} or a 3-tuple (t, h, w) of those; got {type(value).__name__}: {value!r}")


def _positive_ints(name: str, value: object) -> Grid:
    """``stride``/``dilation``: a positive int or a 3-tuple of positive ints."""
    out = []
    for axis, x in enumerate(_triple(name, value, "a positive int")):
        if not _is_int(x):
            raise TypeError(f"{name}[{axis}] must be a positive int; got {type(x).__name__}: {x!r}")
        if x < 1:
            raise ValueError(f"{name}[{axis}] must be a positive int; got {x}")
        out.append(int(x))
    return (out[0], out[1], out[2])


def normalize_kernel_size(kernel_size: KernelSizeArg, kv_grid: Grid) -> Tuple[int, int, int]:
    """Validate ``kernel_size`` and return three positive ints (``None`` -> ``2 * Lk - 1``).

    Raises:
        TypeError / ValueError naming ``kernel_size`` when it is not a positive int, ``None``, or a
        3-tuple/list of those.
    """
    sizes = _raw_kernel_size(kernel_size)
    out = []
    for k, lk in zip(sizes, kv_grid):
        whole = max(2 * int(lk) - 1, 1)  # the whole axis in every mode; larger sizes mean the same
        out.append(whole if k is None else min(k, whole))
    return (out[0], out[1], out[2])


def _raw_kernel_size(kernel_size: KernelSizeArg) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """Validate ``kernel_size``; three positive ints or ``None`` (not yet cut to the axes)."""
    out = []
    for axis, k in enumerate(_triple("kernel_size", kernel_size, "a positive int, None")):
        if k is None:
            out.append(None)
            continue
        if not _is_int(k):
            raise TypeError(
                f"kernel_size[{axis}] must be a positive int or None; got {type(k).__name__}: {k!r}"
            )
        if k < 1:
            raise ValueError(f"kernel_size[{axis}] must be a positive int or None; got {k}")
        out.append(int(k))
    return (out[0], out[1], out[2])


def normalize_stride(stride: IntTriple, kernel_size: KernelSizeArg, q_grid: Sequence[int]) -> Grid:
    """Validate ``stride`` (section 3a) against the window sizes; return three ints.

    Each stride is a positive int at most the (int) window size on its axis, and 1 where the window is
    ``None``. Strides beyond ``2 * Lq`` are cut to it (every query of the axis then shares one leader,
    as for any larger stride).

    Raises:
        TypeError / ValueError naming ``stride``.
    """
    strides = _positive_ints("stride", stride)
    sizes = _raw_kernel_size(kernel_size)
    out = []
    for axis, (s, k, lq) in enumerate(zip(strides, sizes, q_grid)):
        if k is None and s != 1:
            raise ValueError(f"stride[{axis}] must be 1 where kernel_size[{axis}] is None (the whole axis); got {s}")
        if k is not None and s > k:
            raise ValueError(f"stride[{axis}] must be at most kernel_size[{axis}] ({k}); got {s}")
        out.append(min(s, max(2 * int(lq), 1)))
    return (out[0], out[1], out[2])


def normalize_dilation(dilation: IntTriple, q_grid: Sequence[int], kv_grid: Sequence[int]) -> Grid:
    """Validate ``dilation`` (section 3a): positive ints; ``> 1`` only where query and key axes match.

    Raises:
        TypeError / ValueError naming ``dilation``.
    """
    out = _positive_ints("dilation", dilation)
    for axis, (d, lq, lk) in enumerate(zip(out, q_grid, kv_grid)):
        if d > 1 and lq != lk:
            raise ValueError(
                f"dilation[{axis}] = {d} needs equal query and key lengths on that axis; got {lq} and {lk}"
            )
    return out


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
    stride: IntTriple = 1,
    slab: Optional[Slab] = None,
) -> WindowSpec:
    """Validate and normalise the semantic arguments into a :class:`WindowSpec`.

    ``q_grid``/``kv_grid`` are the tensors' grids; with a ``slab`` the windows follow ``slab.q_full`` /
    ``slab.k_full`` instead. Dilation is handled before this (one spec per dilation group).
    """
    q_grid = tuple(int(x) for x in q_grid)
    kv_grid = tuple(int(x) for x in kv_grid)
    q_full = slab.q_full if slab is not None else q_grid
    k_full = slab.k_full if slab is not None else kv_grid
    if not isinstance(border, str) or border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}; got {border!r}")
    ks = normalize_kernel_size(kernel_size, k_full)
    strides = normalize_stride(stride, kernel_size, q_full)
    axes, raster = normalize_causal(causal)
    if raster and q_full != k_full:
        raise ValueError(
            "causal=True (raster-order causality) needs the query grid to equal the key grid; got "
            f"query grid {q_full} and key grid {k_full}. Use per-axis causality, e.g. "
            "causal=(True, False, False), for cross-attention."
        )
    for axis in range(3):  # section 4: every query sees a key; a strided causal cross axis could break it
        if axes[axis] and strides[axis] > 1 and q_full[axis] != k_full[axis]:
            lo, hi = axis_bounds(q_full[axis], k_full[axis], ks[axis], True, False, stride=strides[axis])
            empty = (lo > hi).nonzero()
            if empty.numel():
                i = int(empty[0])
                raise ValueError(
                    f"stride[{axis}] = {strides[axis]} on a causal axis of a cross-attention grid (query length "
                    f"{q_full[axis]}, key length {k_full[axis]}) leaves query {i} of that axis without keys (its "
                    f"block leader's window starts at key {int(lo[i])}, past the query's own centre "
                    f"{int(hi[i])}); use a smaller stride or a larger kernel_size[{axis}]"
                )
    return WindowSpec(ks, axes, raster, border == "shift", q_grid, kv_grid, strides, slab)  # type: ignore[arg-type]


def spec_from_op_args(q_grid, kv_grid, kernel_size, causal_axes, raster, shift, stride, slab) -> WindowSpec:
    """The :class:`WindowSpec` of already-normalised op arguments (the ops' window arguments; no
    validation): the inverse of ``_ops.spec_op_args`` for tensors with grids ``q_grid``/``kv_grid``."""
    s = None
    if len(slab):
        s = Slab(tuple(slab[0:3]), tuple(slab[3:6]), tuple(slab[6:9]), tuple(slab[9:12]))
    return WindowSpec(tuple(kernel_size), tuple(bool(c) for c in causal_axes), bool(raster), bool(shift),
                      tuple(q_grid), tuple(kv_grid), tuple(stride), s)


def _sig(x):
    """A cache key for one call argument that keeps ``1``, ``True``, ``1.0`` and ``np.int64(1)`` apart."""
    t = type(x)
    if t is tuple or t is list:
        return (t, tuple(x), tuple([type(e) for e in x]))
    return (t, x)


def _unsig(key):
    return key[1] if len(key) == 2 else key[1]


@functools.lru_cache(maxsize=512)
def _cached_spec_and_dilation(q_grid, kv_grid, kernel_key, causal_key, border, stride_key, dilation_key, slab):
    spec = make_window_spec(q_grid, kv_grid, _unsig(kernel_key), _unsig(causal_key), border, _unsig(stride_key), slab)
    return spec, normalize_dilation(_unsig(dilation_key), spec.q_full, spec.k_full)


def spec_and_dilation(
    q_grid: Sequence[int],
    kv_grid: Sequence[int],
    kernel_size: KernelSizeArg,
    causal: CausalArg,
    border: str,
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    slab: Optional[Slab] = None,
) -> Tuple[WindowSpec, Grid]:
    """:func:`make_window_spec` and :func:`normalize_dilation` of one call, cached on the arguments (a
    call's host path then costs a dictionary lookup, not the validation again)."""
    q_grid, kv_grid = tuple(q_grid), tuple(kv_grid)
    if torch.compiler.is_compiling():  # traced once per graph anyway; dynamo does not trace into lru_cache
        spec = make_window_spec(q_grid, kv_grid, kernel_size, causal, border, stride, slab)
        return spec, normalize_dilation(dilation, spec.q_full, spec.k_full)
    try:
        return _cached_spec_and_dilation(q_grid, kv_grid, _sig(kernel_size), _sig(causal), border, _sig(stride),
                                         _sig(dilation), slab)
    except TypeError:  # an unhashable argument: validate without the cache (and raise the usual errors)
        spec = make_window_spec(q_grid, kv_grid, kernel_size, causal, border, stride, slab)
        return spec, normalize_dilation(dilation, spec.q_full, spec.k_full)


# ----------------------------------------------------------------------------------------------
# Scalar rules (one axis, one coordinate). These mirror csrc/window.h line by line.
# ----------------------------------------------------------------------------------------------


def map_centre(i: int, lq: int, lk: int) -> int:
    """Key-axis centre of query coordinate ``i``: ``floor(i * Lk / Lq)``."""
    return (i * lk) // lq


def stride_leader(i: int, lq: int, s: int, causal: bool) -> int:
    """The query whose window every query of ``i``'s stride block uses (section 3a): the block's middle
    on a non-causal axis, its last position on a causal one, cut at the axis end."""
    return min((i // s) * s + (s - 1 if causal else s // 2), lq - 1)


def axis_window(i: int, lq: int, lk: int, k: int, causal: bool, shift: bool, s: int = 1) -> Tuple[int, int]:
    """Inclusive key interval ``[lo, hi]`` seen by query coordinate ``i`` on one axis (stride ``s``)."""
    c = map_centre(stride_leader(i, lq, s, causal), lq, lk)
    if causal:
        return max(c - k + 1, 0), map_centre(i, lq, lk)
    left = k // 2
    right = k - 1 - left
    if shift:
        if k >= lk:
            return 0, lk - 1
        start = min(max(c - left, 0), lk - k)
        return start, start + k - 1
    return max(c - left, 0), min(c + right, lk - 1)


def axis_inverse_window(
    j: int, lq: int, lk: int, k: int, causal: bool, shift: bool, s: int = 1
) -> Tuple[int, int]:
    """Inclusive query interval ``[first, last]`` whose windows contain key coordinate ``j``.

    ``lo(i)`` and ``hi(i)`` are non-decreasing in ``i``, so the set is an interval; it is empty when
    ``first > last``. Found by two binary searches over ``axis_window`` (no second derivation).
    """
    # first query with hi(i) >= j
    a, b = 0, lq
    while a < b:
        m = (a + b) // 2
        if axis_window(m, lq, lk, k, causal, shift, s)[1] >= j:
            b = m
        else:
            a = m + 1
    first = a
    # last query with lo(i) <= j
    a, b = 0, lq
    while a < b:
        m = (a + b) // 2
        if axis_window(m, lq, lk, k, causal, shift, s)[0] <= j:
            a = m + 1
        else:
            b = m
    return first, a - 1


# ----------------------------------------------------------------------------------------------
# Vectorised forms (tables over a whole axis), for the reference backend and kernel planning.
# ----------------------------------------------------------------------------------------------


def axis_bounds(
    lq: int,
    lk: int,
    k: int,
    causal: bool,
    shift: bool,
    device: torch.device | str | None = None,
    stride: int = 1,
    q_origin: int = 0,
    k_origin: int = 0,
    q_count: Optional[int] = None,
    k_count: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` int64 tensors of shape ``(q_count,)``: the inclusive key window of every query coord.

    ``lq``/``lk`` are the (global) axis lengths the windows follow. With a slab, the local queries are
    global coordinates ``q_origin .. q_origin + q_count - 1`` and the bounds are local key indices
    (global minus ``k_origin``) cut to ``[0, k_count - 1]``; a row with ``lo > hi`` sees no key.
    """
    q_count = lq if q_count is None else q_count
    k_count = lk if k_count is None else k_count
    i = torch.arange(q_origin, q_origin + q_count, device=device, dtype=torch.int64)
    lead = torch.clamp_max(torch.div(i, stride, rounding_mode="floor") * stride + (stride - 1 if causal else stride // 2),
                           lq - 1)
    c = torch.div(lead * lk, lq, rounding_mode="floor")
    if causal:
        lo, hi = (c - k + 1).clamp_min(0), torch.div(i * lk, lq, rounding_mode="floor")
    elif shift and k >= lk:
        lo, hi = torch.zeros_like(c), torch.full_like(c, lk - 1)
    elif shift:
        lo = (c - k // 2).clamp(0, lk - k)
        hi = lo + k - 1
    else:
        lo, hi = (c - k // 2).clamp_min(0), (c + k - 1 - k // 2).clamp_max(lk - 1)
    return (lo - k_origin).clamp_min(0), (hi - k_origin).clamp_max(k_count - 1)


def spec_axis_bounds(spec: WindowSpec, axis: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`axis_bounds` for one axis (0 = t, 1 = h, 2 = w) of a :class:`WindowSpec` (local indices)."""
    slab = spec.slab
    return axis_bounds(
        spec.q_full[axis],
        spec.k_full[axis],
        spec.kernel_size[axis],
        spec.causal_axes[axis],
        spec.shift_border,
        device=device,
        stride=spec.stride[axis],
        q_origin=slab.q_origin[axis] if slab is not None else 0,
        k_origin=slab.k_origin[axis] if slab is not None else 0,
        q_count=spec.q_grid[axis],
        k_count=spec.kv_grid[axis],
    )


def max_window_width(spec: WindowSpec, axis: int) -> int:
    """The largest number of keys any query sees on ``axis`` (``<= min(k, Lk)``)."""
    lo, hi = spec_axis_bounds(spec, axis)
    return int((hi - lo + 1).max().item()) if lo.numel() else 0


def raster_index(t, h, w, grid: Grid):
    """Flat raster index ``(t * H + h) * W + w`` (works on ints and tensors)."""
    return (t * grid[1] + h) * grid[2] + w


def global_raster_index(spec: WindowSpec, keys: bool, device=None) -> torch.Tensor:
    """Global flat raster index of every local query (``keys=False``) or key token, in local raster order
    (slabs keep the global order for raster causality)."""
    grid = spec.kv_grid if keys else spec.q_grid
    full = spec.k_full if keys else spec.q_full
    origin = (0, 0, 0) if spec.slab is None else (spec.slab.k_origin if keys else spec.slab.q_origin)
    t, h, w = (torch.arange(o, o + n, device=device) for o, n in zip(origin, grid))
    return raster_index(t[:, None, None], h[None, :, None], w[None, None, :], full).reshape(-1)


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
        mask &= global_raster_index(spec, True, device)[None, :] <= global_raster_index(spec, False, device)[:, None]
    return mask


# ----------------------------------------------------------------------------------------------
# Dilation groups and slab planning.
# ----------------------------------------------------------------------------------------------


def dilation_groups(length: int, d: int, origin: int = 0, full: Optional[int] = None):
    """The dilation groups of one axis of a (local) tensor, as ``(g, first, count, sub_origin, sub_full)``.

    Global group ``g`` (coordinates ``g, g + d, ...`` of an axis of ``full`` positions) meets the local
    positions ``first, first + d, ...`` (``count`` of them) of a tensor covering global coordinates
    ``origin .. origin + length - 1``; on the group's own axis (``sub_full = ceil((full - g) / d)``
    positions) they start at ``sub_origin``. Groups the tensor does not meet are left out.
    """
    full = length if full is None else full
    out = []
    for g in range(min(d, full)):
        first = (g - origin) % d
        if first >= length:
            continue
        count = (length - first + d - 1) // d
        out.append((g, first, count, (origin + first - g) // d, (full - g + d - 1) // d))
    return out


def needed_key_range(
    grid: Sequence[int],
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    axis: int = 0,
    q_lo: int = 0,
    q_hi: Optional[int] = None,
) -> Tuple[int, int]:
    """Inclusive global key interval along ``axis`` that the windows of the queries with coordinate in
    ``[q_lo, q_hi]`` on that axis reach, for self-attention on ``grid`` (what a context-parallel rank
    must hold). With raster causality on axis 0 keys of later frames are never seen, so the interval
    ends at ``q_hi``.
    """
    grid = tuple(int(x) for x in grid)
    spec = make_window_spec(grid, grid, kernel_size, causal, border, stride)
    dil = normalize_dilation(dilation, grid, grid)
    length, d = grid[axis], dil[axis]
    q_hi = length - 1 if q_hi is None else q_hi
    if not 0 <= q_lo <= q_hi < length:
        raise ValueError(f"need 0 <= q_lo <= q_hi < {length}; got q_lo={q_lo}, q_hi={q_hi}")
    lo_all, hi_all = length, -1
    for g, _, _, _, sub_full in dilation_groups(length, d):
        sub = torch.arange(sub_full)
        glob = g + d * sub
        keep = (glob >= q_lo) & (glob <= q_hi)
        if not bool(keep.any()):
            continue
        ks = normalize_kernel_size(_raw_kernel_size(kernel_size)[axis:axis + 1] * 3, (sub_full,) * 3)[0]
        lo, hi = axis_bounds(sub_full, sub_full, ks, spec.causal_axes[axis], spec.shift_border,
                             stride=spec.stride[axis])
        lo_all = min(lo_all, g + d * int(lo[keep].min()))
        hi_all = max(hi_all, g + d * int(hi[keep].max()))
    if spec.raster_causal and axis == 0:
        hi_all = min(hi_all, q_hi)
    return lo_all, hi_all
