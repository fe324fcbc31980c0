"""Train a tiny NÜWA on the moving-shapes text-to-video data set (CPU, minutes).

``python -m nuwa.train`` (or ``examples/train_tiny.py``) trains the tiny preset with nearby, axial and
full attention for the same number of steps on the same batches and prints the final training and
held-out losses of each, with a tqdm progress bar per run; ``--sample`` then generates videos with
each model (greedy, with the KV cache) and scores them against the ground truth.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .data import ColourTokenizer, MovingShapes
from .model import Nuwa, NuwaConfig

__all__ = ["TrainResult", "train", "compare_attention", "sample_and_score", "main"]


@dataclass
class TrainResult:
    attention: str
    losses: List[float] = field(default_factory=list)  # training loss per step
    eval_loss: float = float("nan")  # mean loss on the held-out batch after training
    seconds: float = 0.0
    model: Optional[Nuwa] = field(default=None, repr=False)


def train(
    attention: str = "nearby",
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    data: Optional[MovingShapes] = None,
    seed: int = 0,
    progress: bool = True,
    **config_overrides,
) -> TrainResult:
    """Train ``NuwaConfig.tiny(attention=...)`` for ``steps`` AdamW steps; batches depend on ``seed`` only."""
    data = data or MovingShapes()
    torch.manual_seed(seed)
    cfg = NuwaConfig.tiny(
        attention=attention,
        codebook_size=ColourTokenizer().codebook_size,
        condition_vocab_size=data.condition_vocab_size,
        target_grid=data.target_grid,
        condition_grid=data.condition_grid,
        **config_overrides,
    )
    model = Nuwa(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches = torch.Generator().manual_seed(seed + 1)  # the same data stream for every attention type
    held_out = data.sample(64, torch.Generator().manual_seed(10_000 + seed))
    result = TrainResult(attention)
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"{attention:>6}", unit="step")
    start = time.perf_counter()
    model.train()
    for _ in bar:
        captions, video = data.sample(batch_size, batches)
        loss = model.loss(captions, video)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    result.seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        result.eval_loss = model.loss(*held_out).item()
    result.model = model
    return result


def sample_and_score(model: Nuwa, data: MovingShapes, n: int = 8, seed: int = 123) -> float:
    """Greedy-generate (with the KV cache) the videos of ``n`` fresh captions; print the first one next to
    the ground truth as palette indices and return the token accuracy against the ground truth."""
    from .generate import generate

    captions, video = data.sample(n, torch.Generator().manual_seed(seed))
    model.eval()
    tokens = generate(model, captions, data.target_grid, greedy=True, use_cache=True)
    accuracy = (tokens == video).float().mean().item()
    print(f"caption tokens {captions[0].flatten().tolist()}: generated | ground truth (frame by frame)")
    for t in range(data.frames):
        for row_gen, row_true in zip(tokens[0, t].tolist(), video[0, t].tolist()):
            print("  " + "".join(".rgbymcw"[c] for c in row_gen) + "   " + "".join(".rgbymcw"[c] for c in row_true))
        print()
    return accuracy


def compare_attention(kinds: Sequence[str] = ("nearby", "axial", "full"), **kwargs) -> List[TrainResult]:
    """Train one model per attention type at equal steps and print a comparison table."""
    results = [train(kind, **kwargs) for kind in kinds]
    print(f"\n{'attention':>9} | {'first-10 loss':>13} | {'last-10 loss':>12} | {'held-out':>8} | {'time (s)':>8}")
    for r in results:
        first = sum(r.losses[:10]) / len(r.losses[:10])
        last = sum(r.losses[-10:]) / len(r.losses[-10:])
        print(f"{r.attention:>9} | {first:13.3f} | {last:12.3f} | {r.eval_loss:8.3f} | {r.seconds:8.1f}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--attention", nargs="+", default=["nearby", "axial", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", action="store_true", help="greedy-generate videos with each trained model")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: fastest for the tiny model; 0: torch's default)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = MovingShapes(frames=args.frames, size=args.size)
    results = compare_attention(
        args.attention,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        data=data,
        seed=args.seed,
    )
    if args.sample:
        for r in results:
            print(f"--- {r.attention}")
            acc = sample_and_score(r.model, data)
            print(f"{r.attention}: greedy token accuracy vs the ground-truth videos {acc:.3f}")


if __name__ == "__main__":
    main()
