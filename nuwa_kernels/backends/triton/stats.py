"""``tile_stats``: how much work the Triton forward schedule does beyond the allowed pairs, and
``aligned_stride``: the stride whose blocks coincide with the query bricks (no per-element masks)."""

from __future__ import annotations

import functools
import itertools
from typing import Optional, Sequence, Tuple

import torch

from ...window import (CausalArg, IntTriple, KernelSizeArg, _raw_kernel_size, dilation_groups, make_window_spec,
                       normalize_dilation)
from .plan import BlockConfig, _next_pow2, _shapes, default_config, get_plan, plan_stats

__all__ = ["tile_stats", "aligned_stride"]


def tile_stats(
    grid: Sequence[int],
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    backend: str = "triton",
    kv_grid: Optional[Sequence[int]] = None,
    head_dim: int = 64,
    config: Optional[BlockConfig] = None,
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    dtype: torch.dtype = torch.bfloat16,
    arch: int = 90,
) -> dict:
    """Useful vs computed (query, key) pairs of one batch and head.

    Args:
        grid: query grid ``(T, H, W)``; kv_grid: key grid (defaults to ``grid``).
        kernel_size, causal, border, stride, dilation: as in :func:`nuwa_kernels.nearby_attention`
            (a dilated call is one launch per dilation group; the figures add them up).
        backend: only ``"triton"`` has a tile schedule to report.
        head_dim, dtype, arch: pick the entry of the launch-configuration table
            (:mod:`nuwa_kernels.backends.triton.config`; default: D=64, bfloat16, sm_90);
            config: force a :class:`~nuwa_kernels.backends.triton.plan.BlockConfig` instead.

    Returns:
        A dict with ``useful`` (exact number of allowed pairs, from the window tables), ``computed``
        (pairs the forward kernel scores: for every program ``block_m * block_n`` times the key tiles
        it visits, from the same plan the kernel runs), ``ratio = computed / useful``, ``block_m``,
        ``block_n``, ``q_brick``/``k_tile`` (the ``(t, h, w)`` brick and tile shapes of the first
        launch; ``k_tile`` is ``(1, 1, block_n)`` with packed tiles), ``packed`` (the key tiles are
        ``block_n`` consecutive keys of each brick's window union instead of boxes; see
        :mod:`nuwa_kernels.backends.triton.plan`), ``programs`` (query bricks per batch and head),
        ``tiles_visited`` and ``uniform`` (every brick shares one window: the mask-free stride-aligned
        path). The GPU block configuration is used even under the Triton interpreter.
    """
    if backend != "triton":
        raise ValueError(f"tile_stats only describes backend='triton' schedules; got backend={backend!r}")
    grid = tuple(int(x) for x in grid)
    kv_grid = grid if kv_grid is None else tuple(int(x) for x in kv_grid)
    dil = normalize_dilation(dilation, grid, kv_grid)
    make_window_spec(grid, kv_grid, kernel_size, causal, border, stride)  # validate once on the whole grid
    total = None
    raw = _raw_kernel_size(kernel_size)
    per_axis = [dilation_groups(lq, d) if d > 1 else [(0, 0, lq, 0, lq)] for lq, d in zip(grid, dil)]
    for groups in itertools.product(*per_axis):
        qg = tuple(g[2] for g in groups)
        kg = tuple(g[2] if d > 1 else lk for g, d, lk in zip(groups, dil, kv_grid))
        spec = make_window_spec(qg, kg, raw, causal, border, stride)
        plan = get_plan(spec, config or default_config(head_dim, spec, dtype, arch))
        st = plan_stats(plan)
        if total is None:
            total = dict(st)
            total["uniform"] = bool(plan.fwd.uniform)
        else:
            for k in ("useful", "computed", "programs", "tiles_visited"):
                total[k] += st[k]
            total["uniform"] &= bool(plan.fwd.uniform)
            total["packed"] |= bool(plan.fwd.packed)
    total["ratio"] = total["computed"] / total["useful"] if total["useful"] else float("inf")
    return total


def aligned_stride(
    kernel_size: KernelSizeArg,
    grid: Optional[Sequence[int]] = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    border: str = "truncate",
    causal: CausalArg = False,
    arch: int = 90,
) -> Tuple[int, int, int]:
    """The stride that aligns the windows with the Triton query bricks for ``kernel_size``.

    With this stride every query brick of the launch-configuration table's tiling lies inside one
    stride block, so all its rows share one window (section 3a's leader rule): the plan marks the
    launch ``uniform``, the kernels skip per-element masks, and key tiles cover the shared window with
    almost no waste (NATTEN's GNA / Sliding Tile Attention). Among the brick shapes of the table's
    ``block_m`` tokens that fit the window (each side at most the window size on its axis), it returns
    the one with the fewest computed pairs per useful pair on ``grid`` (default: four windows per axis).

    Example: ``aligned_stride((18, 24, 24), (30, 48, 80))`` for HunyuanVideo; pass the result as
    ``stride=`` to :func:`nuwa_kernels.nearby_attention` (``tile_stats(..., stride=...)`` shows the ratio).
    """
    ks = _raw_kernel_size(kernel_size)
    if any(k is None for k in ks):
        raise ValueError("aligned_stride needs an int window size on every axis (stride must be 1 on a None axis)")
    grid = tuple(4 * k for k in ks) if grid is None else tuple(int(x) for x in grid)
    return _aligned(tuple(ks), grid, head_dim, dtype, border, causal if isinstance(causal, bool) else tuple(causal),
                    arch)


@functools.lru_cache(maxsize=256)
def _aligned(ks, grid, head_dim, dtype, border, causal, arch):
    spec0 = make_window_spec(grid, grid, ks, causal, border)
    block = default_config(head_dim, spec0, dtype, arch)
    best = None
    for cand in _shapes(block.block_m):
        if any(c > k or c > _next_pow2(g) for c, k, g in zip(cand, ks, grid)):
            continue
        st = tile_stats(grid, ks, causal, border, head_dim=head_dim, stride=cand, dtype=dtype, arch=arch)
        key = (not st["uniform"], st["ratio"], -cand[2], -cand[1])
        if best is None or key < best[0]:
            best = (key, cand)
    if best is None:  # the window is smaller than any brick: the best per-axis fit (capped at the window)
        return tuple(min(k, _next_pow2(g)) for k, g in zip(ks, grid))
    return best[1]
