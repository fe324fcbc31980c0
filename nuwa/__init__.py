"""nuwa: NÜWA's 3D encoder-decoder and attention modules on top of ``nuwa_kernels``.

* :mod:`nuwa.modules`: :class:`NearbyAttention`, :class:`NearbyCrossAttention`, :class:`AxialAttention`,
  :class:`FullAttention` (one interface, switch by config), :class:`PositionalEmbedding3d`.
* :mod:`nuwa.model`: :class:`NuwaConfig` (``paper()`` and ``tiny()`` presets) and :class:`Nuwa`.
* :mod:`nuwa.generate`: :func:`generate` (greedy / temperature / top-k, with a key/value cache).
* :mod:`nuwa.data`: procedurally generated moving-shape videos and their colour tokeniser.
* :mod:`nuwa.integrations.diffusers`: route a diffusers video transformer's attention to ``nearby_sdpa``.
"""

from .generate import generate, sample_logits
from .model import Nuwa, NuwaConfig
from .modules import (
    AxialAttention,
    FullAttention,
    KVCache,
    NearbyAttention,
    NearbyCrossAttention,
    PositionalEmbedding3d,
    make_attention,
    set_context_parallel,
)

__all__ = [
    "Nuwa",
    "NuwaConfig",
    "generate",
    "sample_logits",
    "NearbyAttention",
    "NearbyCrossAttention",
    "AxialAttention",
    "FullAttention",
    "PositionalEmbedding3d",
    "KVCache",
    "make_attention",
    "set_context_parallel",
]
