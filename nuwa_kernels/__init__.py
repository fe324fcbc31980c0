"""nuwa_kernels: 3D Nearby Attention (NÜWA's 3DNA) with fused CPU, CUDA and Triton kernels.

Public API (semantics: docs/nearby_attention.md, a copy of the project's contract):

* :func:`nearby_attention` on grid-layout tensors ``(B, T, H, W, heads, D)``;
* :func:`nearby_sdpa`, a drop-in beside ``F.scaled_dot_product_attention`` on ``(B, heads, N, D)``;
* :func:`available_backends` and :func:`can_run` to see which backends can run a call and why not.
"""

from . import _extension  # noqa: F401  (loads nuwa_kernels._C when it was built)
from .api import can_run, available_backends, nearby_attention, nearby_sdpa
from .decode import nearby_attention_decode  # noqa: F401  (KV-cache decode: a few queries vs a cached grid)
from .backends import BackendUnavailableError, load_backends

load_backends()

__all__ = [
    "nearby_attention",
    "nearby_sdpa",
    "can_run",
    "available_backends",
    "BackendUnavailableError",
]
__version__ = "0.1.0"
from .backends.triton.stats import tile_stats  # noqa: E402,F401  (Triton tile-schedule statistics)
