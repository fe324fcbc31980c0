"""A procedurally generated text-to-video data set: coloured shapes moving on small frames.

Each sample is a caption of six tokens ``[shape, colour, dx, dy, x0, y0]`` (a "text" condition on an
`(6, 1, 1)` grid) and the video it describes: a shape of one colour starting at ``(x0, y0)`` and moving
by ``(dx, dy)`` pixels per frame (wrapping around), on a black background, with pixel noise. Videos are
tokenised by nearest-colour quantisation against a fixed palette (:class:`ColourTokenizer`): one token
per pixel, the palette is the codebook. Everything is deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["PALETTE", "ColourTokenizer", "MovingShapes", "SHAPES"]

# The codebook: black background and seven colours (RGB in [0, 1]).
PALETTE = torch.tensor(
    [
        [0.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 1.0, 1.0],
    ]
)

# Shapes as pixel offsets from their anchor.
SHAPES = {
    "square": [(0, 0), (0, 1), (1, 0), (1, 1)],
    "plus": [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)],
    "bar": [(0, 0), (0, 1), (0, 2)],
}


class ColourTokenizer:
    """Nearest-colour quantisation: RGB pixels `(..., 3)` <-> palette indices `(...)`."""

    def __init__(self, palette: Tensor = PALETTE):
        self.palette = palette

    @property
    def codebook_size(self) -> int:
        return self.palette.shape[0]

    def encode(self, pixels: Tensor) -> Tensor:
        d = ((pixels[..., None, :] - self.palette.to(pixels)) ** 2).sum(-1)  # (..., K)
        return d.argmin(-1)

    def decode(self, tokens: Tensor) -> Tensor:
        return self.palette.to(tokens.device)[tokens]


@dataclass
class MovingShapes:
    """Caption/video pairs. ``sample(n)`` returns ``(captions (n, 6, 1, 1), video tokens (n, T, S, S))``."""

    frames: int = 4
    size: int = 8
    noise: float = 0.15

    @property
    def condition_vocab_size(self) -> int:
        return len(SHAPES) + (PALETTE.shape[0] - 1) + 3 + 3 + 2 * self.size

    @property
    def condition_grid(self) -> Tuple[int, int, int]:
        return (6, 1, 1)

    @property
    def target_grid(self) -> Tuple[int, int, int]:
        return (self.frames, self.size, self.size)

    def sample_pixels(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``(captions (n, 6, 1, 1) int64, videos (n, T, S, S, 3) float)``."""
        g = generator
        T, S = self.frames, self.size
        shape = torch.randint(0, len(SHAPES), (n,), generator=g)
        colour = torch.randint(1, PALETTE.shape[0], (n,), generator=g)
        dx = torch.randint(-1, 2, (n,), generator=g)
        dy = torch.randint(-1, 2, (n,), generator=g)
        x0 = torch.randint(0, S, (n,), generator=g)
        y0 = torch.randint(0, S, (n,), generator=g)
        video = torch.zeros(n, T, S, S, 3)
        names = list(SHAPES)
        for i in range(n):
            for t in range(T):
                for oy, ox in SHAPES[names[shape[i]]]:
                    y = (int(y0[i]) + int(dy[i]) * t + oy) % S
                    x = (int(x0[i]) + int(dx[i]) * t + ox) % S
                    video[i, t, y, x] = PALETTE[colour[i]]
        video = video + self.noise * torch.randn(video.shape, generator=g)
        # caption token ids: disjoint ranges per field
        off = [0, len(SHAPES), len(SHAPES) + PALETTE.shape[0] - 1]
        off += [off[2] + 3, off[2] + 6, off[2] + 6 + S]
        caption = torch.stack(
            [shape + off[0], colour - 1 + off[1], dx + 1 + off[2], dy + 1 + off[3], x0 + off[4], y0 + off[5]], dim=1
        )
        return caption.view(n, 6, 1, 1), video

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        captions, video = self.sample_pixels(n, generator)
        return captions, ColourTokenizer().encode(video)
