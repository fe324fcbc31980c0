"""Host-side tiling plan of the Triton backend: brick shapes, window tables, key-tile lists.

Vocabulary (the same for the forward and both backward sweeps):

* The **primary** grid is cut into aligned *bricks* of ``(bt, bh, bw)`` tokens (powers of two, so a
  brick is one ``BLOCK_M``/``BLOCK_N`` block and the coordinates of a block row are a few shifts).
  One Triton program owns one brick (of one batch and head).
* The **secondary** grid is visited through *tiles* of ``(st, sh, sw)`` tokens. Tiles are **not**
  aligned to the grid: on each axis they start at the first secondary coordinate the brick can reach
  and step by the tile width, so a brick whose windows span ``span`` keys on an axis visits
  ``ceil(span / s)`` tiles there instead of up to one more aligned tile.
* Per axis, each brick gets the compact list of the tiles that hold at least one allowed pair (tiles
  in a gap of a cross-grid window union are dropped), each tagged *full* when every (in-grid) row of
  the brick sees every token of the tile on that axis. The program walks the product of the three
  lists; a tile full on all three axes (and, with raster causality, entirely before the brick's first
  query) is scored without the per-element mask.
* **Packed** key tiles (forward and ``dQ`` only, when they save pairs): per axis each brick gets the
  sorted list of the secondary coordinates its windows reach (the union, gaps dropped), and the program
  walks the ``n_t * n_h * n_w`` keys of that union in lexicographic (raster) order, ``block_n`` at a
  time (``ceil(n_t n_h n_w / block_n)`` tiles, only the last one padded). Boxes waste the rounding of
  the union to the tile on every axis; packing wastes only the last tile's padding (NÜWA's 1x3x3 on
  1x32x32: 5.56 -> 4.75; HunyuanVideo's 18x24x24 with 64-row bricks: 1.60 -> 1.45). Tile ``j`` holds
  keys ``j * block_n + c``, decoded by two divisions and three small gathers; a tile skips the mask
  when all its keys lie in the box every row of the brick sees.
* Raster causality (``flat(key) <= flat(query)``): the tiles of a brick are walked in lexicographic
  order of their (strictly increasing) per-axis starts, so the tiles to skip form a suffix (forward:
  tiles that start after the brick's last query) or a prefix (``dK/dV``: query tiles that end before
  the key brick's first key). :class:`SweepPlan` stores the resulting ``[begin, end)`` per brick.

Forward and ``dQ``: primary = query grid, secondary = key grid, intervals = the key windows
``[lo, hi]`` of :func:`nuwa_kernels.window.axis_bounds`. ``dK/dV``: primary = key grid,
secondary = query grid, intervals = the inverse windows (the queries whose windows contain a key),
found from the same tables with ``searchsorted`` (``lo`` and ``hi`` are non-decreasing).

Packed tiles keep this: lexicographic order on the union is raster order, so the forward keeps a
prefix of the packed tiles (``ceil(#keys not after the brick's last query / block_n)``).

Everything here is plain PyTorch on the host; plans are cached per (spec, config, device).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from ...window import WindowSpec, spec_axis_bounds

Dims = Tuple[int, int, int]

__all__ = [
    "BlockConfig",
    "SweepPlan",
    "AttentionPlan",
    "default_config",
    "interpreter_config",
    "override_config",
    "current_override",
    "choose_shapes",
    "build_plan",
    "get_plan",
    "clear_plan_cache",
    "useful_pairs",
    "plan_stats",
]

_BIG = 1 << 31  # "no tile" sentinel; keeps flat indices of sentinels far from int64 overflow
PACKED_GAIN = 0.95  # packed key tiles are chosen when they score at most this fraction of the box pairs


def _log2(x: int) -> int:
    r = int(x).bit_length() - 1
    if x <= 0 or (1 << r) != x:
        raise ValueError(f"brick/tile dimensions must be powers of two; got {x}")
    return r


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Block configuration (performance knobs, never semantics)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Block sizes of one launch family.

    Attributes:
        block_m: tokens per primary brick of the forward / ``dQ`` sweep (query bricks).
        block_n: tokens per key tile of the forward / ``dQ`` sweep.
        q_brick, k_tile: optional fixed ``(t, h, w)`` shapes (powers of two with products
            ``block_m`` / ``block_n``); ``None`` lets :func:`choose_shapes` pick them for the call.
        packed: key tiles of the forward / ``dQ`` sweeps: ``True`` packed (``block_n`` consecutive
            keys of the brick's window union), ``False`` boxes, ``None`` (default) whichever scores
            fewer pairs (packed only when it saves at least ``1 - PACKED_GAIN`` of them).

    The ``dK/dV`` sweep reuses the forward sizes with the roles swapped (key bricks of ``block_m`` keys,
    query tiles of ``bwd_tile`` or ``block_n`` queries), so both directions waste about the same.
    """

    block_m: int
    block_n: int
    q_brick: Optional[Dims] = None
    k_tile: Optional[Dims] = None
    bwd_tile: Optional[int] = None  # query-tile tokens of the dK/dV sweep (default: block_n)
    # forward/dQ key tiles: None = packed when that scores at least PACKED_GAIN fewer pairs than the
    # best box tiles (:func:`choose_shapes`); True/False force packed / box tiles
    packed: Optional[bool] = None

    def __post_init__(self):
        _log2(self.block_m)
        _log2(self.block_n)
        if self.bwd_tile is not None:
            _log2(self.bwd_tile)
        for dims, total in ((self.q_brick, self.block_m), (self.k_tile, self.block_n)):
            if dims is not None:
                for d in dims:
                    _log2(d)
                if math.prod(dims) != total:
                    raise ValueError(f"brick shape {dims} must hold exactly {total} tokens")


def default_config(head_dim: int = 64, spec: Optional[WindowSpec] = None, dtype: torch.dtype = torch.bfloat16,
                   arch: int = 90) -> BlockConfig:
    """The GPU tiling of the launch-configuration table (:mod:`.config`) for one call: what the
    kernels run on a GPU and what ``tile_stats`` reports (a spec-less call means a large window)."""
    from .config import lookup, window_class

    return lookup(arch, head_dim, dtype, window_class(spec) if spec is not None else "large").block


def interpreter_config(nq: int, nk: int) -> BlockConfig:
    """Interpreter block sizes: as large as the grids allow (few, fat programs interpret fastest)."""
    return BlockConfig(min(128, max(16, _next_pow2(nq))), min(128, max(16, _next_pow2(nk))))


_override = threading.local()


@contextlib.contextmanager
def _thread_override(name: str, value) -> Iterator[None]:
    """Set ``_override.<name>`` on this thread for the ``with`` block, then restore it."""
    old = getattr(_override, name, None)
    setattr(_override, name, value)
    try:
        yield
    finally:
        setattr(_override, name, old)


def override_config(config: Optional[BlockConfig]):
    """Force a :class:`BlockConfig` for launches on this thread (tests and tuning); a context manager."""
    return _thread_override("config", config)


def current_override() -> Optional[BlockConfig]:
    return getattr(_override, "config", None)


def override_launch(**kernels: Tuple[int, int]):
    """Force ``(num_warps, num_stages)`` per kernel (``fwd=``, ``dq=``, ``dkdv=``) for launches on this
    thread (tuning: ``benchmarks/gpu_profile.py --candidates``); kernels not named keep the table's. A
    context manager."""
    bad = set(kernels) - {"fwd", "dq", "dkdv"}
    if bad:
        raise ValueError(f"override_launch: unknown kernels {sorted(bad)} (fwd, dq, dkdv)")
    return _thread_override("launch", tuple(sorted(kernels.items())) or None)


def current_launch_override() -> Optional[tuple]:
    """``((kernel, (warps, stages)), ...)`` forced by :func:`override_launch`, or ``None``."""
    return getattr(_override, "launch", None)


# ----------------------------------------------------------------------------------------------
# Per-axis tables
# ----------------------------------------------------------------------------------------------


@dataclass
class AxisTiles:
    """Tiles of one axis for every primary brick on that axis.

    ``cnt[p]``: number of tiles brick ``p`` visits; ``lst[p, j] = 2 * start + full`` for ``j < cnt[p]``.
    """

    cnt: torch.Tensor  # (nb,) int64
    lst: torch.Tensor  # (nb, max(1, max cnt)) int64
    start: torch.Tensor  # (nb, max) int64 tile starts (BIG where unused)
    full: torch.Tensor  # (nb, max) bool

    @property
    def max(self) -> int:
        return self.lst.shape[1]


def _axis_tiles(lo: torch.Tensor, hi: torch.Tensor, bp: int, bs: int) -> AxisTiles:
    """Tiles of width ``bs`` over the secondary intervals ``[lo[i], hi[i]]`` (empty when lo > hi) of the
    primary coordinates, grouped in aligned bricks of ``bp`` primary coordinates."""
    lp = lo.numel()
    nb = _cdiv(lp, bp)
    pad = nb * bp - lp
    valid = torch.arange(nb * bp) < lp
    lo_p = torch.cat([lo, torch.full((pad,), _BIG, dtype=torch.int64)]).view(nb, bp)
    hi_p = torch.cat([hi, torch.full((pad,), -1, dtype=torch.int64)]).view(nb, bp)
    valid = valid.view(nb, bp)
    nonempty = lo_p <= hi_p
    any_row = nonempty.any(1)
    fullable = (nonempty | ~valid).all(1) & any_row
    u_lo = torch.where(nonempty, lo_p, _BIG).amin(1)
    u_hi = torch.where(nonempty, hi_p, -1).amax(1)
    in_lo = torch.where(nonempty, lo_p, -_BIG).amax(1)  # every row sees keys >= in_lo ...
    in_hi = torch.where(nonempty, hi_p, _BIG).amin(1)  # ... and <= in_hi
    n_tiles = torch.where(any_row, torch.div(u_hi - u_lo + bs, bs, rounding_mode="floor"), 0)
    n_max = int(n_tiles.max().item()) if nb else 0
    starts, fulls, hits = [], [], []
    for j in range(n_max):
        a = u_lo + j * bs
        e = a + bs - 1
        inside = j < n_tiles
        hit = (nonempty & (torch.maximum(lo_p, a[:, None]) <= torch.minimum(hi_p, e[:, None]))).any(1) & inside
        full = fullable & (a >= in_lo) & (e <= in_hi) & inside
        starts.append(a)
        fulls.append(full)
        hits.append(hit)
    if n_max == 0:
        empty = torch.zeros(nb, 1, dtype=torch.int64)
        return AxisTiles(torch.zeros(nb, dtype=torch.int64), empty, empty + _BIG, empty.bool())
    start = torch.stack(starts, 1)
    full = torch.stack(fulls, 1)
    hit = torch.stack(hits, 1)
    cnt = hit.sum(1)
    width = max(1, int(cnt.max().item()))
    # compact: stable order of the hit tiles (starts stay strictly increasing)
    order = torch.argsort((~hit).to(torch.int8), dim=1, stable=True)[:, :width]
    start = torch.gather(start, 1, order)
    full = torch.gather(full, 1, order)
    used = torch.arange(width)[None, :] < cnt[:, None]
    start = torch.where(used, start, _BIG)
    full = full & used
    lst = torch.where(used, start * 2 + full.long(), 0)
    return AxisTiles(cnt, lst, start, full)


def _rows_uniform(lo: torch.Tensor, hi: torch.Tensor, starts: torch.Tensor, width: int) -> bool:
    """Whether, for every start ``a`` in ``starts`` (entries ``>= len(lo)`` are ignored), the rows
    ``a .. a + width - 1`` inside the axis all have the same window ``(lo, hi)``."""
    n = lo.numel()
    if n == 0:
        return True
    change = torch.zeros(n, dtype=torch.int64)
    change[1:] = ((lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])).long()
    csum = torch.cumsum(change, 0)
    a = starts.reshape(-1)
    a = a[(a >= 0) & (a < n)]
    e = torch.clamp(a + width - 1, max=n - 1)
    return bool((csum[e] == csum[a]).all().item())


def _inverse_intervals(lo: torch.Tensor, hi: torch.Tensor, lk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every key coordinate ``j < lk``: the query interval ``[first, last]`` whose windows contain it
    (``axis_inverse_window`` for a whole axis; empty when ``first > last``)."""
    j = torch.arange(lk, dtype=torch.int64)
    first = torch.searchsorted(hi.contiguous(), j, side="left")
    last = torch.searchsorted(lo.contiguous(), j, side="right") - 1
    return first, last


def _axis_union(lo: torch.Tensor, hi: torch.Tensor, bp: int, ls: int) -> AxisTiles:
    """Per aligned brick of ``bp`` primary coordinates: the sorted secondary coordinates (``< ls``) that
    the intervals ``[lo[i], hi[i]]`` of its rows reach (the packed tiles' per-axis lists: ``cnt`` of them,
    listed in ``lst``/``start``; ``full`` is unused)."""
    lp = lo.numel()
    nb = _cdiv(lp, bp)
    if nb == 0 or ls == 0:
        empty = torch.zeros(nb, 1, dtype=torch.int64)
        return AxisTiles(torch.zeros(nb, dtype=torch.int64), empty, empty + _BIG, empty.bool())
    brick = torch.arange(lp) // bp
    ne = lo <= hi
    diff = torch.zeros(nb, ls + 1, dtype=torch.int64)
    one = torch.ones(int(ne.sum().item()), dtype=torch.int64)
    diff.index_put_((brick[ne], lo[ne].clamp(0, ls)), one, accumulate=True)
    diff.index_put_((brick[ne], (hi[ne] + 1).clamp(0, ls)), -one, accumulate=True)
    cover = torch.cumsum(diff, 1)[:, :ls] > 0
    cnt = cover.sum(1)
    width = max(1, int(cnt.max().item()))
    order = torch.argsort((~cover).to(torch.int8), dim=1, stable=True)[:, :width]  # covered first, ascending
    used = torch.arange(width)[None, :] < cnt[:, None]
    start = torch.where(used, order, _BIG)
    lst = torch.where(used, order, 0)
    return AxisTiles(cnt, lst, start, torch.zeros_like(used))


@functools.lru_cache(maxsize=4096)
def _axis_union_cached(lo_key: Tuple[int, ...], hi_key: Tuple[int, ...], bp: int, ls: int) -> AxisTiles:
    return _axis_union(torch.tensor(lo_key, dtype=torch.int64), torch.tensor(hi_key, dtype=torch.int64), bp, ls)


def _packed_visits(axes, primary_grid: Sequence[int], brick: Dims, block_s: int, raster: bool,
                   p_origin: Dims = (0, 0, 0), s_origin: Dims = (0, 0, 0)) -> torch.Tensor:
    """Packed tiles each brick visits (flat brick order): ``ceil(keys / block_s)``, where ``keys`` is the
    size of the brick's window union, or with raster causality the number of union keys that are not
    after the brick's last query (lexicographic order on global coordinates is raster order)."""
    n = [a.cnt for a in axes]
    if not raster:
        keys = n[0][:, None, None] * n[1][None, :, None] * n[2][None, None, :]
    else:
        less, eq, leq = [], [], []
        for a, b, lp, po, so in zip(axes, brick, primary_grid, p_origin, s_origin):
            nb = a.cnt.numel()
            last = torch.clamp(torch.arange(nb) * b + b - 1, max=lp - 1) + po  # the brick's last query
            used = torch.arange(a.start.shape[1])[None, :] < a.cnt[:, None]
            c = a.start + so
            less.append((used & (c < last[:, None])).sum(1))
            eq.append((used & (c == last[:, None])).any(1).long())
            leq.append(less[-1] + eq[-1])
        keys = (less[0][:, None, None] * (n[1][:, None] * n[2][None, :])[None]
                + eq[0][:, None, None] * (less[1][:, None] * n[2][None, :] + eq[1][:, None] * leq[2][None, :])[None])
    return torch.div(keys + block_s - 1, block_s, rounding_mode="floor").reshape(-1)


# ----------------------------------------------------------------------------------------------
# Sweeps and plans
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    """One kernel family's schedule: primary bricks, secondary tiles, per-brick loop bounds."""

    primary_grid: Dims
    secondary_grid: Dims
    brick: Dims
    tile: Dims
    axes: Tuple[AxisTiles, AxisTiles, AxisTiles]
    bounds: Optional[torch.Tensor]  # (num_bricks, 2) int64 [begin, end) with raster causality
    visits: torch.Tensor  # (num_bricks,) int64 tiles visited by each brick
    tables: torch.Tensor = field(repr=False, default=None)  # packed int32 for the kernel
    # True when every query group the kernel masks shares one window: forward/dQ: all rows of every
    # query brick; dK/dV: all rows of every visited query tile (stride-aligned bricks, section 3a).
    # The kernels then mask a vector of keys instead of a [rows, keys] matrix (constexpr UNIFORM).
    uniform: bool = False
    # packed key tiles (forward/dQ): ``axes`` hold per-brick coordinate lists, ``tile`` is (1, 1, block_n)
    packed: bool = False

    @property
    def num_bricks(self) -> Dims:
        return tuple(a.cnt.numel() for a in self.axes)  # type: ignore[return-value]

    @property
    def block_primary(self) -> int:
        return math.prod(self.brick)

    @property
    def block_secondary(self) -> int:
        return math.prod(self.tile)

    @property
    def log_brick(self) -> Dims:
        return tuple(_log2(x) for x in self.brick)  # type: ignore[return-value]

    @property
    def log_tile(self) -> Dims:
        return tuple(_log2(x) for x in self.tile)  # type: ignore[return-value]

    @property
    def max_tiles(self) -> Dims:
        return tuple(a.max for a in self.axes)  # type: ignore[return-value]

    @property
    def computed_pairs(self) -> int:
        return int(self.visits.sum().item()) * self.block_primary * self.block_secondary


def _flat(t, h, w, grid: Sequence[int]):
    return (t * grid[1] + h) * grid[2] + w


def _make_sweep(
    primary_grid: Dims,
    secondary_grid: Dims,
    intervals: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    brick: Dims,
    tile: Dims,
    raster: Optional[str],
    p_origin: Dims = (0, 0, 0),
    s_origin: Dims = (0, 0, 0),
    full: Optional[Dims] = None,
) -> SweepPlan:
    """One sweep. With raster causality, flat indices are global: local coordinates plus ``p_origin`` /
    ``s_origin`` (slabs) on the common global grid ``full`` (the local grids without a slab)."""
    axes = tuple(_axis_tiles(lo, hi, b, s) for (lo, hi), b, s in zip(intervals, brick, tile))
    nbt, nbh, nbw = (a.cnt.numel() for a in axes)
    ct, ch, cw = (a.cnt for a in axes)
    total = (ct[:, None, None] * ch[None, :, None] * cw[None, None, :]).reshape(-1)
    bounds = None
    visits = total
    if raster is not None:
        # Per-axis tile starts strictly increase, so the flat index of the tile starts (forward) or of
        # the clipped tile ends (dK/dV) increases along the walk: the kept tiles are a prefix (forward)
        # or a suffix (dK/dV) of it, and counting them gives the loop bounds.
        at, ah, aw = (a.start for a in axes)
        sg = full if full is not None else secondary_grid
        pg = full if full is not None else primary_grid
        po, so = p_origin, s_origin
        if raster == "fwd":
            last = [
                torch.clamp(torch.arange(n) * b + b - 1, max=L - 1)
                for n, b, L in zip((nbt, nbh, nbw), brick, primary_grid)
            ]
        else:
            first = [torch.arange(n) * b for n, b in zip((nbt, nbh, nbw), brick)]
        counts = torch.empty(nbt, nbh, nbw, dtype=torch.int64)
        for pt in range(nbt):
            if raster == "fwd":
                # (nbh, nbw, jt, jh, jw): key tiles whose first key is not after the brick's last query
                fk = _flat(at[pt].view(1, 1, -1, 1, 1) + so[0], ah.view(nbh, 1, 1, -1, 1) + so[1],
                           aw.view(1, nbw, 1, 1, -1) + so[2], sg)
                fq = _flat(last[0][pt] + po[0], last[1].view(-1, 1) + po[1], last[2].view(1, -1) + po[2], pg)
                keep = fk <= fq.view(nbh, nbw, 1, 1, 1)
            else:
                # query tiles whose (clipped) last query comes at or after the key brick's first key
                et = torch.clamp(at[pt] + tile[0] - 1, max=secondary_grid[0] - 1) + so[0]
                eh = torch.clamp(ah + tile[1] - 1, max=secondary_grid[1] - 1) + so[1]
                ew = torch.clamp(aw + tile[2] - 1, max=secondary_grid[2] - 1) + so[2]
                fqe = _flat(et.view(1, 1, -1, 1, 1), eh.view(nbh, 1, 1, -1, 1), ew.view(1, nbw, 1, 1, -1), sg)
                fk = _flat(first[0][pt] + po[0], first[1].view(-1, 1) + po[1], first[2].view(1, -1) + po[2], pg)
                keep = fqe >= fk.view(nbh, nbw, 1, 1, 1)
            # unused list slots hold BIG starts: mask them out
            used = (
                (torch.arange(at.shape[1]) < ct[pt]).view(1, 1, -1, 1, 1)
                & (torch.arange(ah.shape[1])[None, :] < ch[:, None]).view(nbh, 1, 1, -1, 1)
                & (torch.arange(aw.shape[1])[None, :] < cw[:, None]).view(1, nbw, 1, 1, -1)
            )
            counts[pt] = (keep & used).sum((2, 3, 4))
        counts = counts.reshape(-1)
        if raster == "fwd":
            begin = torch.zeros_like(counts)
            end = counts
        else:
            begin = total - counts
            end = total
        bounds = torch.stack([begin, end], 1)
        visits = counts
    plan = SweepPlan(primary_grid, secondary_grid, brick, tile, axes, bounds, visits)  # type: ignore[arg-type]
    parts = []
    for a in axes:
        parts += [a.cnt, a.lst.reshape(-1)]
    plan.tables = torch.cat(parts).to(torch.int32)
    return plan


def _make_packed_sweep(
    primary_grid: Dims,
    secondary_grid: Dims,
    intervals: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    brick: Dims,
    block_s: int,
    raster: bool,
    p_origin: Dims = (0, 0, 0),
    s_origin: Dims = (0, 0, 0),
) -> SweepPlan:
    """The forward/``dQ`` sweep with packed key tiles of ``block_s`` keys (see the module docs)."""
    axes = tuple(_axis_union_cached(tuple(lo.tolist()), tuple(hi.tolist()), b, ls)
                 for (lo, hi), b, ls in zip(intervals, brick, secondary_grid))
    visits = _packed_visits(axes, primary_grid, brick, block_s, raster, p_origin, s_origin)
    bounds = torch.stack([torch.zeros_like(visits), visits], 1) if raster else None
    plan = SweepPlan(primary_grid, secondary_grid, brick, (1, 1, block_s), axes, bounds, visits,  # type: ignore
                     packed=True)
    parts = []
    for a in axes:
        parts += [a.cnt, a.lst.reshape(-1)]
    plan.tables = torch.cat(parts).to(torch.int32)
    return plan


@dataclass
class AttentionPlan:
    """Everything a launch needs: the window tables and the forward/``dQ`` and ``dK/dV`` sweeps."""

    spec: WindowSpec
    config: BlockConfig
    win: torch.Tensor  # int32 [lo_t, hi_t, lo_h, hi_h, lo_w, hi_w] over the query axes
    fwd: SweepPlan
    _bwd: Optional[SweepPlan] = None
    _device_cache: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def bwd(self) -> SweepPlan:
        """The ``dK/dV`` sweep (built on first use)."""
        if self._bwd is None:
            spec = self.spec
            inv = []
            for axis in range(3):
                lo, hi = spec_axis_bounds(spec, axis)
                inv.append(_inverse_intervals(lo, hi, spec.kv_grid[axis]))
            raster = "bwd" if spec.raster_causal else None
            # key bricks of block_m keys, query tiles of block_n queries (the forward's sizes, so the
            # kernels compile to the same block shapes); shapes chosen for the inverse windows unless
            # the config fixes them (then mirrored from the forward)
            nb, nt = math.prod(self.fwd.brick), self.config.bwd_tile or math.prod(self.fwd.tile)
            if (self.config.q_brick is not None and self.config.k_tile is not None and not self.fwd.packed
                    and nt == math.prod(self.fwd.tile)):
                brick = _clip_dims(self.fwd.brick, spec.kv_grid, nb)
                tile = _clip_dims(self.fwd.tile, spec.q_grid, nt)
            else:
                brick, tile, _ = _choose(spec.kv_grid, spec.q_grid, inv, nb, nt, raster)
            sweep = _make_sweep(spec.kv_grid, spec.q_grid, inv, brick, tile, raster,
                                *_raster_frame(spec, keys_primary=True))
            sweep.uniform = all(
                _rows_uniform(lo, hi, a.start, b)
                for (lo, hi), a, b in zip(_spec_intervals(spec), sweep.axes, tile))
            self._bwd = sweep
        return self._bwd

    def device_tensors(self, device: torch.device, which: str) -> Dict[str, torch.Tensor]:
        """``win``, ``tables`` and ``bounds`` of sweep ``which`` ("fwd" | "bwd") on ``device`` (cached)."""
        key = f"{which}:{device}"
        if key not in self._device_cache:
            sweep = self.fwd if which == "fwd" else self.bwd
            bounds = sweep.bounds if sweep.bounds is not None else torch.zeros(1, 2, dtype=torch.int64)
            self._device_cache[key] = {
                "win": self.win.to(device),
                "tables": sweep.tables.to(device),
                "bounds": bounds.to(torch.int32).reshape(-1).to(device),
            }
        return self._device_cache[key]


def _clip_dims(dims: Dims, grid: Sequence[int], total: int) -> Dims:
    """Keep ``dims`` (their product is ``total``) unless they overhang a small grid badly; then pick
    the shape of ``total`` tokens that wastes the least padding on ``grid``."""
    if all(d <= _next_pow2(g) for d, g in zip(dims, grid)):
        return dims
    best = None
    for cand in _shapes(total):
        pad = math.prod(_cdiv(g, c) * c for g, c in zip(grid, cand))
        key = (pad, -cand[2], -cand[1])
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


@functools.lru_cache(maxsize=None)
def _shapes(total: int) -> Tuple[Dims, ...]:
    lg = _log2(total)
    out = []
    for a in range(lg + 1):
        for b in range(lg + 1 - a):
            out.append((1 << a, 1 << b, 1 << (lg - a - b)))
    return tuple(out)


def _spec_intervals(spec: WindowSpec):
    return [spec_axis_bounds(spec, axis) for axis in range(3)]


@functools.lru_cache(maxsize=4096)
def _axis_count_sum(lo_key: Tuple[int, ...], hi_key: Tuple[int, ...], bp: int, bs: int) -> int:
    lo = torch.tensor(lo_key, dtype=torch.int64)
    hi = torch.tensor(hi_key, dtype=torch.int64)
    return int(_axis_tiles(lo, hi, bp, bs).cnt.sum().item())


def choose_shapes(spec: WindowSpec, block_m: int, block_n: int, packed: Optional[bool] = None
                  ) -> Tuple[Dims, Dims, bool]:
    """Pick the query-brick and key-tile shapes (``block_m`` / ``block_n`` tokens) of the forward and
    ``dQ`` sweeps that score the fewest pairs on this call's grids and windows, and whether the key
    tiles are packed (then the tile shape is ``(1, 1, block_n)``); ``packed`` forces the choice."""
    return _choose(spec.q_grid, spec.kv_grid, _spec_intervals(spec), block_m, block_n,
                   "fwd" if spec.raster_causal else None, packed=packed)


def _choose(primary_grid, secondary_grid, intervals, block_p: int, block_s: int, raster: Optional[str],
            packed: Optional[bool] = False):
    """Brick and tile shapes (``block_p`` / ``block_s`` tokens) minimising the pairs a sweep scores, and
    whether its tiles are packed (``packed=None``: when that scores at most ``PACKED_GAIN`` times the
    pairs of the best box tiles; ``True``/``False`` force it; the ``dK/dV`` sweep never packs).

    Without raster causality the number of scored pairs separates over the axes
    (``block_p * block_s * prod_axis sum_bricks tiles``), so every shape pair is ranked exactly and
    cheaply. Raster causality only removes tiles: the best few shapes are then re-ranked by their
    exact visited-tile count. Packed tiles are ranked per brick shape by their exact visited-tile count.
    """
    keys = [(tuple(lo.tolist()), tuple(hi.tolist())) for lo, hi in intervals]
    p_cands = [c for c in _shapes(block_p) if all(d <= _next_pow2(g) for d, g in zip(c, primary_grid))]
    s_cands = [c for c in _shapes(block_s) if all(d <= _next_pow2(g) for d, g in zip(c, secondary_grid))]
    if not p_cands:
        p_cands = [_clip_dims((block_p, 1, 1), primary_grid, block_p)]
    if not s_cands:
        s_cands = [_clip_dims((block_s, 1, 1), secondary_grid, block_s)]
    ranked = []
    for pb in p_cands:
        for st in s_cands:
            cost = 1
            for axis in range(3):
                cost *= _axis_count_sum(keys[axis][0], keys[axis][1], pb[axis], st[axis])
            # ties: wider w (contiguous rows coalesce), then wider h
            ranked.append(((cost, -pb[2], -st[2], -pb[1], -st[1]), pb, st))
    ranked.sort()
    # Stride-aligned bricks (every row of every brick shares one window, section 3a) run without
    # per-element masks (UNIFORM): prefer the best such brick unless it scores 5% more pairs.
    uniform = {pb: all(_rows_uniform(lo, hi, torch.arange(_cdiv(lo.numel(), b)) * b, b)
                       for (lo, hi), b in zip(intervals, pb)) for pb in p_cands}
    aligned = [r for r in ranked if uniform[r[1]] and r[0][0] <= 1.05 * ranked[0][0][0]]
    if aligned and not uniform[ranked[0][1]]:
        ranked.remove(aligned[0])
        ranked.insert(0, aligned[0])
    if packed is not True:
        if raster is None:
            box = (ranked[0][0][0], ranked[0][1], ranked[0][2])
        else:
            best_cost = ranked[0][0][0]
            best = None
            for key, pb, st in ranked[:_RASTER_CANDIDATES]:
                if key[0] > 2 * best_cost:
                    break
                sweep = _make_sweep(primary_grid, secondary_grid, intervals, pb, st, raster)
                rkey = (int(sweep.visits.sum().item()),) + key
                if best is None or rkey < best[0]:
                    best = (rkey, pb, st)
            box = (best[0][0], best[1], best[2])
        if packed is False:
            return box[1], box[2], False
    # packed tiles: rank every brick shape by its exact visited-tile count
    best_packed = None
    for pb in p_cands:
        axes = tuple(_axis_union_cached(lo_k, hi_k, b, ls)
                     for (lo_k, hi_k), b, ls in zip(keys, pb, secondary_grid))
        visits = int(_packed_visits(axes, primary_grid, pb, block_s, raster is not None).sum().item())
        key = (visits, -pb[2], -pb[1])
        if best_packed is None or key < best_packed[0]:
            best_packed = (key, pb)
    if packed is True or best_packed[0][0] <= PACKED_GAIN * box[0]:
        return best_packed[1], (1, 1, block_s), True
    return box[1], box[2], False


_RASTER_CANDIDATES = 24


def build_plan(spec: WindowSpec, config: BlockConfig) -> AttentionPlan:
    """Build the plan of one call (uncached; see :func:`get_plan`)."""
    packed = config.packed
    if config.q_brick is not None and (config.k_tile is not None or packed):
        qb, kt, packed = config.q_brick, config.k_tile, bool(packed)
    else:
        qb, kt, packed = choose_shapes(spec, config.block_m, config.block_n,
                                       False if config.k_tile is not None else packed)
        qb = config.q_brick or qb
        kt = config.k_tile or kt
    intervals = _spec_intervals(spec)
    win = torch.cat([torch.cat([lo, hi]) for lo, hi in intervals]).to(torch.int32)
    if packed:
        po, so, _ = _raster_frame(spec, keys_primary=False)
        fwd = _make_packed_sweep(spec.q_grid, spec.kv_grid, intervals, qb, config.block_n, spec.raster_causal,
                                 po, so)
    else:
        fwd = _make_sweep(spec.q_grid, spec.kv_grid, intervals, qb, kt, "fwd" if spec.raster_causal else None,
                          *_raster_frame(spec, keys_primary=False))
    fwd.uniform = all(
        _rows_uniform(lo, hi, torch.arange(_cdiv(lo.numel(), b)) * b, b) for (lo, hi), b in zip(intervals, qb))
    return AttentionPlan(spec, config, win, fwd)


def _raster_frame(spec: WindowSpec, keys_primary: bool):
    """``(p_origin, s_origin, full)`` of :func:`_make_sweep` for a spec (global raster order on slabs)."""
    if spec.slab is None:
        return (0, 0, 0), (0, 0, 0), None
    qo, ko = spec.slab.q_origin, spec.slab.k_origin
    return (ko, qo, spec.k_full) if keys_primary else (qo, ko, spec.q_full)


_PLANS: Dict[Tuple[WindowSpec, BlockConfig], AttentionPlan] = {}
_PLANS_LOCK = threading.Lock()


def get_plan(spec: WindowSpec, config: BlockConfig) -> AttentionPlan:
    """Cached :func:`build_plan`, keyed on ``(spec, config)``.

    Plans are immutable once built and keep their device tables (:meth:`AttentionPlan.device_tensors`)
    alive for as long as they are cached: a captured CUDA graph that replays a launch reads those
    tables, so the cache never evicts. :func:`clear_plan_cache` drops everything (only when no captured
    graph that used the Triton backend will be replayed again).
    """
    key = (spec, config)
    plan = _PLANS.get(key)
    if plan is None:
        plan = build_plan(spec, config)
        with _PLANS_LOCK:
            plan = _PLANS.setdefault(key, plan)
    return plan


def clear_plan_cache() -> None:
    """Drop every cached Triton plan and its device tables (see :func:`get_plan`)."""
    with _PLANS_LOCK:
        _PLANS.clear()


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def useful_pairs(spec: WindowSpec) -> int:
    """Exact number of allowed (query, key) pairs for one batch and head, from the window tables."""
    (lt, ht), (lh, hh), (lw, hw) = _spec_intervals(spec)
    wt, wh, ww = ht - lt + 1, hh - lh + 1, hw - lw + 1
    if not spec.raster_causal:
        return int(wt.sum().item() * wh.sum().item() * ww.sum().item())
    T, H, W = spec.q_grid
    t = torch.arange(T)
    h = torch.arange(H)
    w = torch.arange(W)
    # keys with kt < t, or kt == t and (kh < h, or kh == h and kw <= w), inside the window box
    before_t = (torch.minimum(ht, t - 1) - lt + 1).clamp_min(0)  # (T,)
    at_t = ((lt <= t) & (t <= ht)).long()
    before_h = (torch.minimum(hh, h - 1) - lh + 1).clamp_min(0)
    at_h = ((lh <= h) & (h <= hh)).long()
    upto_w = (torch.minimum(hw, w) - lw + 1).clamp_min(0)
    per_hw = before_h[:, None] * ww[None, :] + at_h[:, None] * upto_w[None, :]  # (H, W)
    total = before_t[:, None, None] * (wh[:, None] * ww[None, :])[None] + at_t[:, None, None] * per_hw[None]
    return int(total.sum().item())


def plan_stats(plan: AttentionPlan) -> dict:
    """``useful``/``computed`` figures of a plan's forward schedule."""
    useful = useful_pairs(plan.spec)
    computed = plan.fwd.computed_pairs
    return {
        "useful": useful,
        "computed": computed,
        "ratio": computed / useful if useful else float("inf"),
        "block_m": plan.fwd.block_primary,
        "block_n": plan.fwd.block_secondary,
        "q_brick": plan.fwd.brick,
        "k_tile": plan.fwd.tile,
        "packed": bool(plan.fwd.packed),
        "programs": int(plan.fwd.visits.numel()),
        "tiles_visited": int(plan.fwd.visits.sum().item()),
    }
