"""Stride = tile (NATTEN's GNA, Sliding Tile Attention) against exact windows and dense attention.

Two parts, both written to ``benchmarks/results/<device-slug>/stride_tiles.{md,json}`` (``--out``):

1. The Triton schedule, readable without a GPU (:func:`nuwa_kernels.tile_stats`): computed / useful
   (query, key) pairs of the forward kernel for exact windows (stride 1) and for the stride that aligns
   the stride blocks with the query bricks (:func:`nuwa_kernels.aligned_stride`), on HunyuanVideo's and
   NÜWA's grids, for sm_90 and sm_80 tile tables.
2. Timings on the present device (median ms, one process): nearby attention with exact windows, with
   the aligned stride, and full attention (SDPA) on the same tokens. On CUDA the ``triton`` backend
   (where the aligned stride runs the mask-free path); on CPU the ``cpu`` backend (whose cost follows
   the useful pairs, so stride changes little there: the figure is for reference).

Usage: ``python -m benchmarks.stride_tiles [--device cuda] [--out DIR] [--no-timing]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import nuwa_kernels as nk  # noqa: E402
from benchmarks import measure  # noqa: E402

# (name, grid, kernel_size): the video transformers this is for.
SCHEDULE_CASES = [
    ("HunyuanVideo 30x48x80, (18,24,24)", (30, 48, 80), (18, 24, 24)),
    ("NÜWA video 10x21x21, (7,7,7)", (10, 21, 21), (7, 7, 7)),
    ("NÜWA video 10x21x21, (3,3,3)", (10, 21, 21), (3, 3, 3)),
]
# Timed on the present device: small enough for a CPU run, large enough to mean something on a GPU.
TIMING_CASES = {
    "cpu": [("8x24x24, (4,8,8), 4 heads, D=64", (8, 24, 24), (4, 8, 8), 4, 64)],
    "cuda": [
        ("HunyuanVideo 30x48x80, (18,24,24), 24 heads, D=128", (30, 48, 80), (18, 24, 24), 24, 128),
        ("16x32x32, (8,16,16), 16 heads, D=64", (16, 32, 32), (8, 16, 16), 16, 64),
    ],
}


def schedule_rows() -> List[Dict]:
    rows = []
    for arch in (90, 80):
        for name, grid, ks in SCHEDULE_CASES:
            stride = nk.aligned_stride(ks, grid, arch=arch)
            exact = nk.tile_stats(grid, ks, arch=arch)
            aligned = nk.tile_stats(grid, ks, stride=stride, arch=arch)
            rows.append(dict(case=name, arch=f"sm_{arch}", stride=list(stride), exact_ratio=exact["ratio"],
                             aligned_ratio=aligned["ratio"], uniform=aligned["uniform"],
                             useful_exact=exact["useful"], useful_aligned=aligned["useful"]))
    return rows


def timing_rows(device: str) -> List[Dict]:
    backend = "triton" if device == "cuda" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name, grid, ks, heads, d in TIMING_CASES["cuda" if device == "cuda" else "cpu"]:
        q, k, v = (torch.randn(1, *grid, heads, d, device=device, dtype=dtype) for _ in range(3))
        stride = nk.aligned_stride(ks, grid, head_dim=d, dtype=dtype if device == "cuda" else torch.bfloat16)
        if not nk.can_run(backend, q, k, v, kernel_size=ks, stride=stride)[0]:
            continue
        qs, ks_, vs = (x.flatten(1, 3).transpose(1, 2) for x in (q, k, v))
        timer = measure.time_cuda if device == "cuda" else measure.time_cpu
        t_exact = timer(lambda: nk.nearby_attention(q, k, v, ks, backend=backend))["median_ms"]
        t_stride = timer(lambda: nk.nearby_attention(q, k, v, ks, stride=stride, backend=backend))["median_ms"]
        t_dense = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks_, vs))["median_ms"]
        rows.append(dict(case=name, backend=backend, dtype=str(dtype).replace("torch.", ""), stride=list(stride),
                         exact_ms=t_exact, stride_ms=t_stride, dense_ms=t_dense))
    return rows


def markdown(env: Dict, sched: List[Dict], timed: List[Dict]) -> str:
    lines = [f"# Stride = tile against exact windows ({env['device_name']})", "",
             "Triton forward schedule, computed / useful (query, key) pairs (`nuwa_kernels.tile_stats`, D=64,",
             "bfloat16), exact windows against the stride from `nuwa_kernels.aligned_stride` (every query",
             "brick inside one stride block: one window per brick, no per-element masks).", "",
             "| case | arch | aligned stride | exact | stride = tile | mask-free |", "|---|---|---|---:|---:|---|"]
    for r in sched:
        lines.append(f"| {r['case']} | {r['arch']} | {tuple(r['stride'])} | {r['exact_ratio']:.2f} | "
                     f"{r['aligned_ratio']:.2f} | {'yes' if r['uniform'] else 'no'} |")
    if timed:
        lines += ["", f"Median ms on {env['device_name']} (one process; full attention = SDPA on the same tokens):",
                  "", "| case | backend | dtype | exact | stride = tile | full attention |", "|---|---|---|---:|---:|---:|"]
        for r in timed:
            lines.append(f"| {r['case']} | {r['backend']} | {r['dtype']} | {r['exact_ms']:.2f} | "
                         f"{r['stride_ms']:.2f} | {r['dense_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    ap.add_argument("--no-timing", action="store_true", help="only the schedule table (no kernels run)")
    args = ap.parse_args(argv)
    env = measure.environment(args.device, ROOT)
    sched = schedule_rows()
    timed = [] if args.no_timing else timing_rows(args.device)
    text = markdown(env, sched, timed)
    print(text)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", measure.device_slug(args.device))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stride_tiles.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "stride_tiles.json"), "w") as f:
        json.dump(dict(environment=env, schedule=sched, timing=timed), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
