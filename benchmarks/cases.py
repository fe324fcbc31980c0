"""Benchmark cases: the grids, windows, masks, directions and dtypes that are timed.

A :class:`Case` is one call shape: ``(B, T, H, W, heads, D)`` inputs, a window, a causal mode, a
direction (forward, or forward + backward) and a dtype. The named sets (``tiny``, ``quick``,
``full``; the GPU sets add HunyuanVideo's grid and half precision) are what ``python -m
benchmarks.run`` and ``benchmarks/test_bench.py`` iterate over.

Pair counting (:func:`window_pairs`) is exact and separable: it never builds an ``N x N`` mask, so it
also works for the 115,200-token HunyuanVideo grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from nuwa_kernels.window import make_window_spec, spec_axis_bounds

Grid = Tuple[int, int, int]
Causal = Union[bool, Tuple[bool, bool, bool]]

FRAME_CAUSAL = (True, False, False)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def causal_name(causal: Causal) -> str:
    """``noncausal``, ``raster`` (``causal=True``), ``frame`` (``(True, False, False)``) or ``axes-tft``."""
    if causal is False:
        return "noncausal"
    if causal is True:
        return "raster"
    if tuple(causal) == FRAME_CAUSAL:
        return "frame"
    return "axes-" + "".join("t" if c else "f" for c in causal)


@dataclass(frozen=True)
class Case:
    """One benchmark call.

    Attributes:
        label: the family, e.g. ``nuwa-image``, ``nuwa-video``, ``video-large``, ``hunyuan``, ``sweep``.
        grid: ``(T, H, W)`` (self-attention: the key grid equals it).
        kernel_size: ``(kt, kh, kw)``.
        causal: ``False``, ``True`` (raster order) or three bools (per axis).
        heads, head_dim, batch: the tensor shape ``(batch, T, H, W, heads, head_dim)``.
        dtype: ``float32`` / ``float16`` / ``bfloat16``.
        backward: time forward + backward instead of forward only.
        peers: the slow providers (the reference backend, FlexAttention with its per-shape compile,
            NATTEN, nuwa-pytorch) run only on cases marked ``peers=True``.
    """

    label: str
    grid: Grid
    kernel_size: Grid
    causal: Causal = False
    heads: int = 8
    head_dim: int = 64
    batch: int = 1
    dtype: str = "float32"
    backward: bool = False
    border: str = "truncate"
    peers: bool = False

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def direction(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def name(self) -> str:
        g = "x".join(map(str, self.grid))
        k = "x".join(map(str, self.kernel_size))
        extra = (
            ""
            if (self.heads, self.head_dim, self.batch) == (8, 64, 1)
            else f"-b{self.batch}h{self.heads}d{self.head_dim}"
        )
        return (
            f"{self.label}-{g}-w{k}-{causal_name(self.causal)}-{'fwdbwd' if self.backward else 'fwd'}"
            f"-{self.dtype}{extra}"
        )

    def shape(self) -> Tuple[int, ...]:
        return (self.batch, *self.grid, self.heads, self.head_dim)

    def check_case(self) -> "Case":
        """A small version for the correctness gate: each axis cut to ``min(L, k + 3)``, 2 heads, batch 1.

        It keeps the window, causal mode, head dim, dtype and direction, so the code path checked is
        the one timed; the grid is just small enough that the float64 reference is cheap.
        """
        grid = tuple(min(L, k + 3) for L, k in zip(self.grid, self.kernel_size))
        return replace(self, grid=grid, heads=min(self.heads, 2), batch=1)  # type: ignore[arg-type]

    def to_dict(self) -> Dict:
        return {
            "name": self.name,
            "label": self.label,
            "grid": list(self.grid),
            "tokens": self.tokens,
            "kernel_size": list(self.kernel_size),
            "causal": causal_name(self.causal),
            "border": self.border,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "batch": self.batch,
            "dtype": self.dtype,
            "direction": self.direction,
            "useful_pairs_per_head": window_pairs(self.grid, self.kernel_size, self.causal, self.border),
        }


# ----------------------------------------------------------------------------------------------
# pair counting (per batch element and head)
# ----------------------------------------------------------------------------------------------


def window_pairs(grid: Sequence[int], kernel_size, causal: Causal = False, border: str = "truncate") -> int:
    """Number of allowed (query, key) pairs of nearby self-attention on ``grid`` (one batch, one head).

    Non-raster masks are separable: ``prod_a sum_i width_a(i)``. Raster causality (``flat(k) <=
    flat(q)``) splits by the first axis where the key is before the query:
    ``sum_t before_t * S_h * S_w + T * sum_h before_h * S_w + T * H * sum_w upto_w``, where
    ``before`` counts window keys strictly before the query coordinate and ``upto`` those at or before
    it (a self-attention query's own coordinate is always inside its window).
    """
    grid = tuple(int(g) for g in grid)
    spec = make_window_spec(grid, grid, kernel_size, causal, border)
    sums, before, upto = [], [], []
    for a in range(3):
        lo, hi = spec_axis_bounds(spec, a)
        i = torch.arange(grid[a])
        sums.append(int((hi - lo + 1).sum()))
        before.append(int((torch.minimum(hi, i - 1) - lo + 1).clamp_min(0).sum()))
        upto.append(int((torch.minimum(hi, i) - lo + 1).clamp_min(0).sum()))
    if not spec.raster_causal:
        return sums[0] * sums[1] * sums[2]
    T, H, _ = grid
    return before[0] * sums[1] * sums[2] + T * before[1] * sums[2] + T * H * upto[2]


def full_pairs(n: int, causal: Causal) -> int:
    """Pairs of full attention over ``n`` tokens: ``n^2``, or ``n (n + 1) / 2`` for any causal mode
    (the full-attention baseline uses ``is_causal=True`` for every causal case)."""
    return n * (n + 1) // 2 if causal is not False else n * n


def axial_pairs(grid: Sequence[int], causal: Causal) -> int:
    """Pairs of axial attention (one pass along each axis, outputs summed)."""
    n = math.prod(grid)
    axes = (
        (True, True, True) if causal is True else (False, False, False) if causal is False else tuple(causal)
    )
    total = 0
    for L, c in zip(grid, axes):
        total += n * (L + 1) // 2 if c else n * L
    return total


#: Useful FLOPs per allowed (query, key) pair and head-dim element. Forward: ``S = QK^T`` and ``O = PV``,
#: one multiply-add (2 FLOPs) per element each. Backward: ``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``
#: and ``dK = dS^T Q``. Recomputing ``S`` in the backward (what FlashAttention-style kernels do instead of
#: storing ``P``) is not required by the op, so it is not counted: forward + backward is 3x the forward
#: (FlashAttention's papers count 3.5x; multiply our fwd+bwd figures by 7/6 to compare).
FWD_FLOPS_PER_PAIR_DIM = 4
BWD_FLOPS_PER_PAIR_DIM = 8


def attention_flops(pairs: int, head_dim: int, heads: int, batch: int, backward: bool) -> float:
    """Useful FLOPs of one call: ``4 * D`` per allowed pair forward, ``(4 + 8) * D`` forward + backward
    (see :data:`FWD_FLOPS_PER_PAIR_DIM`), times ``heads * batch``. ``pairs`` counts only the pairs the
    function's semantics allow, never the masked-out pairs an implementation may also compute."""
    per = FWD_FLOPS_PER_PAIR_DIM + (BWD_FLOPS_PER_PAIR_DIM if backward else 0)
    return float(per) * head_dim * pairs * heads * batch


# ----------------------------------------------------------------------------------------------
# the named sets
# ----------------------------------------------------------------------------------------------

IMAGE = (1, 21, 21)
VIDEO = (10, 21, 21)
LARGE = (16, 32, 32)
HUNYUAN = (30, 48, 80)


def _grid_cases(
    label, grid, windows, causals, dtypes, directions=(False, True), peers=False, **kw
) -> List[Case]:
    out = []
    for dtype in dtypes:
        for w in windows:
            for c in causals:
                for bwd in directions:
                    out.append(Case(label, grid, w, c, dtype=dtype, backward=bwd, peers=peers, **kw))
    return out


def tiny_cases(device: str = "cpu") -> List[Case]:
    """Seconds in total: the smoke test's set (tiny grids, 2 heads of 32)."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    kw = dict(heads=2, head_dim=32, dtype=dtype)
    return [
        Case("tiny", (1, 6, 6), (1, 3, 3), False, peers=True, **kw),
        Case("tiny", (3, 5, 5), (3, 3, 3), True, **kw),
        Case("tiny", (3, 5, 5), (3, 3, 3), FRAME_CAUSAL, backward=True, **kw),
    ]


def quick_cases(device: str = "cpu") -> List[Case]:
    """The README's default run (``make bench``): NÜWA's image and video grids, forward and forward +
    backward for the image (1, 3, 3), video (3, 3, 3) and (7, 7, 7) windows, non-causal and raster-causal,
    frame-causal (3, 3, 3) forward, and the (1, 3, 3) window on the video grid (a few minutes on a 2-core
    CPU; the slow peers only on the video 3x3x3 forward case)."""
    if device == "cpu":
        dt = "float32"
        both = (False, True)
        cases = _grid_cases("nuwa-image", IMAGE, [(1, 3, 3)], [False], [dt], both)
        # the image window on the video grid: the kernel's sustained rate on (1, 3, 3), which the
        # 441-token image grid (a fraction of a millisecond per call) cannot show
        cases += _grid_cases("nuwa-video", VIDEO, [(1, 3, 3)], [False], [dt], both)
        for w in ((3, 3, 3), (7, 7, 7)):
            for causal in (False, True):
                for bwd in both:
                    peers = (w, causal, bwd) == ((3, 3, 3), False, False)
                    cases.append(Case("nuwa-video", VIDEO, w, causal, dtype=dt, backward=bwd, peers=peers))
        cases.append(Case("nuwa-video", VIDEO, (3, 3, 3), FRAME_CAUSAL, dtype=dt))
        return cases
    dt = "bfloat16"
    # FlexAttention compiles twice per case (check + timed shape; about 20-40 s each on a GPU host):
    # peers run on three cases so that the GPU quick run stays within a few minutes.
    hy = dict(heads=24, head_dim=128, dtype=dt)
    return [
        Case("nuwa-image", IMAGE, (1, 3, 3), False, dtype=dt),
        Case("nuwa-video", VIDEO, (3, 3, 3), False, dtype=dt, peers=True),
        Case("nuwa-video", VIDEO, (3, 3, 3), False, dtype=dt, backward=True, peers=True),
        Case("nuwa-video", VIDEO, (3, 3, 3), True, dtype=dt),
        Case("nuwa-video", VIDEO, (3, 3, 3), True, dtype=dt, backward=True),
        Case("nuwa-video", VIDEO, (3, 3, 3), FRAME_CAUSAL, dtype=dt),
        Case("nuwa-video", VIDEO, (7, 7, 7), False, dtype=dt),
        Case("nuwa-video", VIDEO, (7, 7, 7), False, dtype=dt, backward=True),
        Case("video-large", LARGE, (3, 3, 3), False, dtype=dt),
        Case("hunyuan", HUNYUAN, (18, 24, 24), False, peers=True, **hy),
        Case("hunyuan", HUNYUAN, (18, 24, 24), False, backward=True, **hy),
        Case("hunyuan", HUNYUAN, (18, 24, 24), FRAME_CAUSAL, **hy),
    ]


def full_cases(device: str = "cpu") -> List[Case]:
    """Every grid x window x causal mode x direction (x dtype on GPU).

    Slow providers (``peers``): every CPU case; on the GPU the bfloat16 video, large and HunyuanVideo
    cases without the 1x3x3 window (FlexAttention compiles twice per case)."""
    gpu = device != "cpu"
    dtypes = ("bfloat16", "float16") if gpu else ("float32",)
    both = (False, True)
    cases: List[Case] = []
    # Image grid: (1, 3, 3) and (7, 7, 7) (which is (1, 7, 7) on one frame); frame-causal is
    # meaningless on one frame.
    cases += _grid_cases(
        "nuwa-image", IMAGE, [(1, 3, 3), (7, 7, 7)], [False, True], dtypes, both, peers=not gpu
    )
    cases += _grid_cases(
        "nuwa-video",
        VIDEO,
        [(1, 3, 3), (3, 3, 3), (7, 7, 7)],
        [False, True, FRAME_CAUSAL],
        dtypes,
        both,
        peers=True,
    )
    cases += _grid_cases(
        "video-large", LARGE, [(3, 3, 3)], [False, True, FRAME_CAUSAL], dtypes[:1], both, peers=True
    )
    cases += _grid_cases("video-large", LARGE, [(7, 7, 7)], [False], dtypes[:1], both, peers=True)
    if gpu:
        cases += _grid_cases(
            "hunyuan",
            HUNYUAN,
            [(18, 24, 24)],
            [False, FRAME_CAUSAL],
            dtypes[:1],
            both,
            peers=True,
            heads=24,
            head_dim=128,
        )
        cases = [
            replace(c, peers=c.peers and c.dtype == "bfloat16" and c.kernel_size != (1, 3, 3)) for c in cases
        ]
    return cases


CASE_SETS = {"tiny": tiny_cases, "quick": quick_cases, "full": full_cases}


def sweep_grids(mode: str, device: str = "cpu") -> List[Grid]:
    """Grids of the scaling sweep (time and memory vs tokens), window (3, 3, 3), forward."""
    if mode == "tiny":
        return [(1, 8, 8), (2, 8, 8)]
    grids = [(1, 16, 16), (2, 16, 16), (4, 16, 16), (8, 16, 16), (4, 32, 32)]  # 256 .. 4096 tokens
    if mode == "full" or device != "cpu":
        grids += [(8, 32, 32), (16, 32, 32)]  # 8192, 16384
    if device != "cpu":
        grids += [(16, 64, 64), (30, 48, 80)]  # 65536, 115200
    return grids


def sweep_cases(mode: str, device: str = "cpu") -> List[Case]:
    dtype = "float32" if device == "cpu" else "bfloat16"
    kw = dict(heads=2, head_dim=32) if mode == "tiny" else {}
    return [Case("sweep", g, (3, 3, 3), False, dtype=dtype, **kw) for g in sweep_grids(mode, device)]


def _case_matches(case: Case, pattern: str) -> bool:
    parts = [part for part in pattern.split("+") if part]
    return bool(parts) and all(part in case.name for part in parts)


def unmatched_patterns(cases: Sequence[Case], patterns: Sequence[str]) -> List[str]:
    """The ``--cases`` entries that select none of ``cases`` (the CLI refuses them)."""
    return [p for p in patterns if not any(_case_matches(c, p) for c in cases)]


def select(cases: Sequence[Case], patterns: Optional[Sequence[str]]) -> List[Case]:
    """Cases whose name contains every comma-free pattern of any one ``--cases`` entry (``a+b`` = and)."""
    if not patterns:
        return list(cases)
    return [c for c in cases if any(_case_matches(c, p) for p in patterns)]
