"""Autoregressive generation of target tokens in raster order, with or without a key/value cache.

* ``use_cache=False``: every step reruns the whole decoder on the grid (the reference; the cost of a
  step grows with the grid).
* ``use_cache=True``: the encoder runs once and each decoder layer keeps the keys/values of the tokens
  generated so far (self-attention) and of the encoder output (cross-attention, fixed). A step embeds
  one token and, in each layer, attends only to the window of the new token, gathered from the cache
  (``nuwa_kernels.decode.nearby_attention_decode``), so its cost does not grow with the number of
  tokens generated. Greedy decoding gives the same tokens either way (``tests/test_generate.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .model import Nuwa

__all__ = ["generate", "sample_logits"]


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    greedy: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Tokens `(B,)` from logits `(B, V)`: argmax when ``greedy`` (or ``temperature == 0``), else a sample
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be a positive int or None; got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Nuwa,
    condition: Tensor,
    grid: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    greedy: bool = False,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> Tensor:
    """Sample target tokens `(B, T, H, W)` for condition tokens `(B, Tc, Hc, Wc)`, in raster order.

    Args:
        model: a :class:`~nuwa.model.Nuwa` (put it in ``eval()`` mode for dropout-free sampling).
        condition: int64 condition tokens.
        grid: target grid `(T, H, W)`; default ``model.config.target_grid`` (an image: `(1, h, w)`).
        temperature, top_k, greedy: see :func:`sample_logits`.
        use_cache: keep per-layer key/value caches (fast) or recompute the decoder every step.
        generator: a ``torch.Generator`` for reproducible sampling.
        progress: show a tqdm progress bar.
    """
    grid = tuple(int(g) for g in (grid or model.config.target_grid))
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive ints (T, H, W); got {grid!r}")
    B, n = condition.shape[0], grid[0] * grid[1] * grid[2]
    device = condition.device
    memory = model.encode(condition)
    tokens = torch.zeros(B, n, dtype=torch.long, device=device)
    steps = range(n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", unit="tok")
    caches = model.init_caches(memory, grid) if use_cache else None
    for p in steps:
        if use_cache:
            prev = tokens[:, p - 1] if p > 0 else tokens.new_full((B,), model.bos_id)
            pos = torch.tensor([p], device=device)
            logits = model.decode_step(prev[:, None], pos, grid, caches)[:, 0]
        else:
            inputs = model.shift_right(tokens.view(B, *grid))
            logits = model.decode(inputs, memory).flatten(1, 3)[:, p]
        tokens[:, p] = sample_logits(logits, temperature, top_k, greedy, generator)
    return tokens.view(B, *grid)
