"""nuwa_kernels: 3D Nearby Attention (NÜWA's 3DNA) with fused CPU, CUDA and Triton kernels.

Public API (semantics: docs/nearby_attention.md, a copy of the project's contract):

* :func:`nearby_attention` on grid-layout tensors ``(B, T, H, W, heads, D)``;
* :func:`nearby_sdpa`, a drop-in beside ``F.scaled_dot_product_attention`` on ``(B, heads, N, D)``;
* :func:`available_backends` and :func:`can_run` to see which backends can run a call and why not.
"""

from . import _extension  # noqa: F401  (loads nuwa_kernels._C when it was built)
from .api import (
    available_backends,
    can_run,
    merge_attentions,
    nearby_attention,
    nearby_attention_slab,
    nearby_sdpa,
)
from .decode import nearby_attention_decode  # KV-cache decode: a few queries vs a cached grid
from .backends import BackendUnavailableError, load_backends
from .window import Slab

load_backends()

__all__ = [
    "nearby_attention",
    "nearby_sdpa",
    "nearby_attention_decode",
    "nearby_attention_slab",
    "merge_attentions",
    "Slab",
    "tile_stats",
    "aligned_stride",
    "clear_plan_cache",
    "can_run",
    "available_backends",
    "BackendUnavailableError",
    "distributed",
]
__version__ = "0.2.0"
from .backends.triton import aligned_stride, clear_plan_cache  # noqa: E402  (stride-aligned tiles, plan cache)
from .backends.triton.stats import tile_stats  # noqa: E402  (Triton tile-schedule statistics)


def __getattr__(name: str):
    """``nuwa_kernels.distributed`` (context parallelism) is imported on first use."""
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
