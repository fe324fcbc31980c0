"""NÜWA's 3D transformer encoder-decoder on token grids.

* The **encoder** embeds condition tokens on their grid (text `(L, 1, 1)`, image `(1, h, w)`, video or
  sketch `(t, h, w)`), adds a 3D positional embedding and runs pre-norm blocks of 3DNA self-attention
  and an MLP.
* The **decoder** embeds the target VQ tokens shifted right by one in raster order (a ``<bos>`` token
  first), adds the target positional embedding and runs pre-norm blocks of raster-causal 3DNA
  self-attention, 3DNA cross-attention to the encoder output, and an MLP; a linear head gives logits
  over the VQ codebook. Training minimises the next-token cross-entropy.

Attention is nearby (3DNA), axial or full by ``NuwaConfig.attention`` (the paper's ablation).
Generation with a key/value cache is in :mod:`nuwa.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import MLP, KVCache, PositionalEmbedding3d, _GroupRef, make_attention, set_context_parallel

__all__ = ["NuwaConfig", "Nuwa", "EncoderBlock", "DecoderBlock"]

KernelSize = Tuple[Optional[int], Optional[int], Optional[int]]


@dataclass
class NuwaConfig:
    """Sizes and attention settings of a :class:`Nuwa` model. Presets: :meth:`paper`, :meth:`tiny`.

    Grids are `(t, h, w)`. Kernel sizes follow ``nuwa_kernels`` (``None`` = the whole axis).
    """

    codebook_size: int = 12288  # target VQ codebook (logits); the VQ-GAN you pair the model with decides
    condition_vocab_size: int = 49408  # text BPE vocabulary, or the condition's VQ codebook
    dim: int = 1280
    heads: int = 20
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = heads
    encoder_layers: int = 24
    decoder_layers: int = 24
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    target_grid: Tuple[int, int, int] = (10, 21, 21)  # largest target grid (positional tables)
    condition_grid: Tuple[int, int, int] = (77, 1, 1)  # largest condition grid (positional tables)
    attention: str = "nearby"  # "nearby" | "axial" | "full"
    encoder_kernel_size: KernelSize = (None, 1, 1)  # text (L, 1, 1): every token sees the whole text
    decoder_kernel_size: KernelSize = (3, 3, 3)
    cross_kernel_size: KernelSize = (None, 1, 1)  # text condition: all of it; video condition: (3, 3, 3)
    border: str = "truncate"
    backend: str = "auto"

    @classmethod
    def paper(cls, **overrides) -> "NuwaConfig":
        """NÜWA's text-to-video sizes: 1280 wide, 20 heads, 24 layers, 10 x 21 x 21 video tokens."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "NuwaConfig":
        """A model for tests and CPU training: 32 wide, 4 heads (2 kv heads), 2 + 2 layers.

        Its encoder window `(None, 3, 3)` serves every condition kind: the whole text of an `(L, 1, 1)`
        grid, a 3 x 3 window on an image, all frames x 3 x 3 on a short video.
        """
        base = cls(
            codebook_size=16,
            condition_vocab_size=32,
            dim=32,
            heads=4,
            num_kv_heads=2,
            encoder_layers=2,
            decoder_layers=2,
            mlp_ratio=2.0,
            target_grid=(4, 8, 8),
            condition_grid=(8, 8, 8),
            encoder_kernel_size=(None, 3, 3),
        )
        return replace(base, **overrides)


def _attention(cfg: NuwaConfig, kernel_size, causal, context_dim=None):
    return make_attention(
        cfg.attention,
        cfg.dim,
        heads=cfg.heads,
        num_kv_heads=cfg.num_kv_heads,
        context_dim=context_dim,
        kernel_size=kernel_size,
        causal=causal,
        border=cfg.border,
        backend=cfg.backend,
    )


class EncoderBlock(nn.Module):
    """Pre-norm: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: NuwaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = _attention(cfg, cfg.encoder_kernel_size, causal=False)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Pre-norm: raster-causal self-attention, cross-attention to the encoder output, MLP."""

    def __init__(self, cfg: NuwaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.self_attn = _attention(cfg, cfg.decoder_kernel_size, causal=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.cross_attn = _attention(cfg, cfg.cross_kernel_size, causal=False, context_dim=cfg.dim)
        self.norm3 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """``x`` `(B, T, H, W, dim)`; ``memory`` the encoder output `(B, Tc, Hc, Wc, dim)`."""
        x = x + self.drop(self.self_attn(self.norm1(x)))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory))
        return x + self.drop(self.mlp(self.norm3(x)))

    def step(self, x: Tensor, positions: Tensor, grid, self_cache: KVCache, cross_cache: KVCache) -> Tensor:
        """The same block for new tokens `(B, n, dim)` at flat ``positions`` with cached keys/values."""
        x = x + self.self_attn.step(self.norm1(x), positions, grid, self_cache)
        x = x + self.cross_attn.step(self.norm2(x), positions, grid, cross_cache)
        return x + self.mlp(self.norm3(x))


class Nuwa(nn.Module):
    """NÜWA's 3D encoder-decoder: condition tokens in, logits over the target VQ codebook out.

    Tokens are int64 grids: ``condition`` `(B, Tc, Hc, Wc)` (text: `(B, L, 1, 1)`), ``target``
    `(B, T, H, W)`; each grid may be smaller than the config's (positional tables) grid.
    """

    def __init__(self, config: NuwaConfig):
        super().__init__()
        self.config = cfg = config
        self.cond_embed = nn.Embedding(cfg.condition_vocab_size, cfg.dim)
        self.cond_pos = PositionalEmbedding3d(cfg.condition_grid, cfg.dim)
        self.encoder = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.encoder_layers)])
        self.encoder_norm = nn.LayerNorm(cfg.dim)
        self.bos_id = cfg.codebook_size  # the extra row of the token table
        self.token_embed = nn.Embedding(cfg.codebook_size + 1, cfg.dim)
        self.target_pos = PositionalEmbedding3d(cfg.target_grid, cfg.dim)
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.decoder_layers)])
        self.decoder_norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.codebook_size)
        self.apply(self._init_weights)
        self._cp_group, self._cp_axis = _GroupRef(None), 0

    def set_context_parallel(self, process_group, shard_axis: int = 0) -> None:
        """Run the decoder context-parallel over ``process_group`` (``None``: single process again).

        Every rank passes the same whole inputs; the decoder runs on this rank's frames (``shard_axis=0``)
        or rows (``1``) of the target grid (even shards), its self-attention exchanging only the window's
        halo with the neighbouring ranks and its cross-attention reading the whole (replicated) encoder
        output; the logits are gathered, so every rank returns all of them. The encoder (the condition,
        short) runs whole on every rank. Parameter gradients are each rank's share: all-reduce (sum)
        them, as data parallelism does. Nearby attention only; no cached decoding.
        """
        if process_group is not None and self.config.attention != "nearby":
            raise ValueError(f"context parallelism needs attention='nearby'; this model has {self.config.attention!r}")
        set_context_parallel(self.decoder, process_group, shard_axis)
        self._cp_group, self._cp_axis = _GroupRef(process_group), shard_axis

    @property
    def context_parallel(self) -> Optional[Tuple[object, int]]:
        """``(process_group, shard_axis)`` of the decoder's context parallelism, or ``None``."""
        group = self._cp_group.group
        return None if group is None else (group, self._cp_axis)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @staticmethod
    def _check_tokens(name: str, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 4 or tokens.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor (B, T, H, W); got {getattr(tokens, 'shape', tokens)}")

    def encode(self, condition: Tensor) -> Tensor:
        """Condition tokens `(B, Tc, Hc, Wc)` -> encoder output `(B, Tc, Hc, Wc, dim)`."""
        self._check_tokens("condition", condition)
        x = self.cond_embed(condition) + self.cond_pos(condition.shape[1:])
        for block in self.encoder:
            x = block(x)
        return self.encoder_norm(x)

    def shift_right(self, target: Tensor) -> Tensor:
        """Decoder input tokens: ``<bos>`` then the target without its last token, in raster order."""
        flat = target.flatten(1)
        bos = flat.new_full((flat.shape[0], 1), self.bos_id)
        return torch.cat([bos, flat[:, :-1]], dim=1).view_as(target)

    def decode(self, inputs: Tensor, memory: Tensor) -> Tensor:
        """Shifted decoder inputs `(B, T, H, W)` and encoder output -> logits `(B, T, H, W, codebook)`."""
        x = self.token_embed(inputs) + self.target_pos(inputs.shape[1:])
        if self.context_parallel is not None:
            import torch.distributed as dist

            from nuwa_kernels.distributed import even_shard_lengths, gather_shards, shard

            group, axis = self.context_parallel
            lengths = even_shard_lengths(x.shape[1 + axis], dist.get_world_size(group))
            x = shard(x, 1 + axis, group, lengths)
        for block in self.decoder:
            x = block(x, memory)
        logits = self.to_logits(self.decoder_norm(x))
        if self.context_parallel is not None:
            logits = gather_shards(logits, 1 + axis, group, lengths)
        return logits

    def forward(self, condition: Tensor, target: Tensor) -> Tensor:
        """Teacher-forced logits `(B, T, H, W, codebook)`: position ``p`` predicts ``target`` at ``p``."""
        self._check_tokens("target", target)
        return self.decode(self.shift_right(target), self.encode(condition))

    def loss(self, condition: Tensor, target: Tensor) -> Tensor:
        """Next-token cross-entropy (mean over tokens)."""
        logits = self.forward(condition, target)
        return F.cross_entropy(logits.flatten(0, 3).float(), target.flatten())

    # -- cached decoding (used by nuwa.generate) ---------------------------------------------------

    def init_caches(self, memory: Tensor, grid: Sequence[int]) -> List[Tuple[KVCache, KVCache]]:
        """Per decoder layer: an empty self-attention cache on ``grid`` and the cross-attention cache."""
        B = memory.shape[0]
        return [
            (
                block.self_attn.make_cache(B, grid, dtype=memory.dtype, device=memory.device),
                block.cross_attn.context_cache(memory),
            )
            for block in self.decoder
        ]

    def decode_step(self, tokens: Tensor, positions: Tensor, grid, caches) -> Tensor:
        """Input tokens `(B, n)` at flat ``positions`` `(n,)` -> logits `(B, n, codebook)`; fills caches."""
        if self.context_parallel is not None:
            raise NotImplementedError("cached decoding of a context-parallel model (set_context_parallel(None) first)")
        x = self.token_embed(tokens) + self.target_pos.at(positions, grid)
        for block, (self_cache, cross_cache) in zip(self.decoder, caches):
            x = block.step(x, positions, grid, self_cache, cross_cache)
        return self.to_logits(self.decoder_norm(x))
