"""``tile_stats``: how much work the Triton forward schedule does beyond the allowed pairs."""

from __future__ import annotations

from typing import Optional, Sequence

from ...window import CausalArg, KernelSizeArg, make_window_spec
from .plan import BlockConfig, default_config, get_plan, plan_stats

__all__ = ["tile_stats"]


def tile_stats(
    grid: Sequence[int],
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    backend: str = "triton",
    kv_grid: Optional[Sequence[int]] = None,
    head_dim: int = 64,
    config: Optional[BlockConfig] = None,
) -> dict:
    """Useful vs computed (query, key) pairs of one batch and head.

    Args:
        grid: query grid ``(T, H, W)``; kv_grid: key grid (defaults to ``grid``).
        kernel_size, causal, border: as in :func:`nuwa_kernels.nearby_attention`.
        backend: only ``"triton"`` has a tile schedule to report.
        head_dim: picks the GPU block sizes (default 64); config: force a
            :class:`~nuwa_kernels.backends.triton.plan.BlockConfig` instead.

    Returns:
        A dict with ``useful`` (exact number of allowed pairs, from the window tables), ``computed``
        (pairs the forward kernel scores: for every program ``block_m * block_n`` times the key tiles
        it visits, from the same plan the kernel runs), ``ratio = computed / useful``, ``block_m``,
        ``block_n``, ``q_brick``/``k_tile`` (the ``(t, h, w)`` brick and tile shapes), ``programs``
        (query bricks per batch and head) and ``tiles_visited``. The GPU block configuration is used
        even under the Triton interpreter.
    """
    if backend != "triton":
        raise ValueError(f"tile_stats only describes backend='triton' schedules; got backend={backend!r}")
    kv_grid = tuple(grid) if kv_grid is None else tuple(kv_grid)
    spec = make_window_spec(grid, kv_grid, kernel_size, causal, border)
    plan = get_plan(spec, config or default_config(head_dim, spec))
    return plan_stats(plan)
