"""What the memory side allows the fused CPU forward of the image window, per layout (issue 13).

    python -m benchmarks.cpu_read_bound [--grid 10,21,21] [--heads 8] [--dim 64] [--fmas 0,1152,2304,3456]
                                        [--reps 15] [--rounds 3] [--overlap]

Compiles ``benchmarks/read_pattern.c`` (the forward's read pattern for a (1,3,3) window whose rows are
read in place, without its arithmetic; see that file) with the C compiler (``$CC``, else ``cc``) and
OpenMP, and runs it with this process's thread count for the contract's token-major layout and for
heads-contiguous rows: without prefetches, with the kernel's prefetches, and with ``--fmas`` vector FMAs
per block of 16 queries and head standing in for the in-core work (the (1,3,3) forward does 1,152 useful
ones per block and head); then with each thread taking a range of blocks and every head of a block in
turn (whole tokens read close together) instead of tasks of one head. In the same rounds it times the fused CPU forward (``nearby_attention``,
``backend="cpu"``, (1,3,3)) on the same grid in both layouts (heads-contiguous: views of
``(B, heads, T, H, W, D)`` tensors, as ``cpu_gemm_rate.py --heads-contiguous``). Prints, per row, the
median over rounds of each run's minimum (ms). Needs an AVX-512 CPU (the stand-in is AVX-512 code).
With ``--overlap`` it runs ``benchmarks/prefetch_overlap.c`` instead: the forward's prefetch stream beside
FMAs whose operands are registers or L1 loads, in one burst per block or in chunks spread over the FMAs
(whether prefetches can hide behind arithmetic on this machine; session 16 of gemm-rate.md).
See benchmarks/results/cpu-amd-epyc-2t/gemm-rate.md, sessions 9 and 12, for what it showed on this project's
machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # also runnable as `python benchmarks/cpu_read_bound.py`
    sys.path.insert(0, ROOT)

import nuwa_kernels  # noqa: E402
from benchmarks.cpu_gemm_rate import make_inputs  # noqa: E402
from benchmarks.measure import cpu_model, time_cpu  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "read_pattern.c")
OVERLAP_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prefetch_overlap.c")
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_in.h")  # both include it
LAYOUTS = ("token-major", "heads-contiguous")
KERNEL_SIZE = (1, 3, 3)


def has_avx512() -> bool:
    """Whether this CPU runs the AVX-512 stand-in (what PyTorch's CPU dispatch detected)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def compiler() -> Optional[str]:
    """The C compiler to build the stand-in with, or None."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(cache_dir: Optional[str] = None, source: str = SOURCE) -> str:
    """Compiles ``source`` (read_pattern.c, or prefetch_overlap.c; once per source and compiler: cached under
    ``cache_dir``, default the temporary folder) and returns the executable's path. Raises RuntimeError if
    it does not build."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    with open(source, "rb") as f, open(HEADER, "rb") as h:
        key = hashlib.sha256(f.read() + h.read() + cc.encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(source))[0].replace("_", "-")
    exe = os.path.join(cache_dir or tempfile.gettempdir(), f"nuwa-{name}-{key}")
    if not os.path.exists(exe):
        tmp = f"{exe}.{os.getpid()}"
        cmd = [cc, "-O3", "-march=native", "-fopenmp", source, "-o", tmp]  # as setup.py builds the kernels
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
        os.replace(tmp, exe)
    return exe


def run_pattern(exe: str, ntok: int, heads: int, dim: int, reach: int, layout: int, fmas: int, reps: int,
                prefetch: bool, threads: int, all_heads: bool = False) -> float:
    """Minimum time (ms) of ``reps`` sweeps of the read pattern (see read_pattern.c); ``all_heads``: each
    thread a range of blocks, every head of a block in turn, instead of tasks of one head each."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    args = [str(x) for x in (ntok, heads, dim, reach, layout, fmas, reps, int(prefetch), int(all_heads))]
    res = subprocess.run([exe] + args, capture_output=True, text=True, env=env, check=True)
    return float(res.stdout.split()[0])


def run_overlap(exe: str, ntok: int, heads: int, fmas: int, rounds: int, threads: int) -> Dict[str, Dict[str, float]]:
    """prefetch_overlap.c's table: {operands: {schedule: median ms}} (see that file)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([exe] + [str(x) for x in (ntok, heads, fmas, rounds)], capture_output=True, text=True,
                         env=env, check=True)
    table: Dict[str, Dict[str, float]] = {}
    for line in res.stdout.split("\n"):
        if line.strip():
            operands, schedule, ms = line.split()
            table.setdefault(operands, {})[schedule] = float(ms)
    return table


def time_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int) -> float:
    """Minimum time (ms) of ``reps`` calls of the fused CPU forward, (1,3,3), after one warm-up call."""
    fwd = lambda: nuwa_kernels.nearby_attention(q, k, v, kernel_size=KERNEL_SIZE, backend="cpu")  # noqa: E731
    return time_cpu(fwd, budget_s=0.0, min_reps=reps, max_reps=reps)["min_ms"]


def measure(grid: Sequence[int], heads: int, dim: int, fmas: Sequence[int], reps: int, rounds: int,
            exe: str) -> Dict[str, Dict[str, float]]:
    """Rows (label -> {layout: median over rounds of the minimum, ms}), rounds alternating all runs."""
    T, H, W = grid
    ntok, threads, reach = T * H * W, torch.get_num_threads(), W + 1  # the (1,3,3) window's newest key
    runs = [(f"read pattern, no prefetch, {fmas[0]} FMAs", fmas[0], False, False)]
    runs += [(f"read pattern, prefetch, {f} FMAs", f, True, False) for f in fmas]
    runs += [(f"all heads per block, prefetch, {f} FMAs", f, True, True) for f in fmas]
    torch.manual_seed(0)
    inputs = {layout: make_inputs(grid, heads, dim, layout == "heads-contiguous") for layout in LAYOUTS}
    samples: Dict[str, Dict[str, List[float]]] = {}
    for _ in range(rounds):
        for li, layout in enumerate(LAYOUTS):
            for label, f, pf, all_heads in runs:
                t = run_pattern(exe, ntok, heads, dim, reach, li, f, reps, pf, threads, all_heads)
                samples.setdefault(label, {}).setdefault(layout, []).append(t)
            t = time_forward(*inputs[layout], reps)
            samples.setdefault("fused forward (1,3,3)", {}).setdefault(layout, []).append(t)
    return {label: {lay: statistics.median(ts) for lay, ts in row.items()} for label, row in samples.items()}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default="10,21,21", help="T,H,W")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--fmas", default="0,1152,2304,3456", help="vector FMAs per block of 16 queries and head")
    ap.add_argument("--reps", type=int, default=15, help="sweeps (calls) per run; the minimum is kept")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is printed")
    ap.add_argument("--overlap", action="store_true",
                    help="instead: whether the forward's prefetches hide behind FMAs (prefetch_overlap.c), "
                         "with the first --fmas FMAs per block and head that is not 0")
    args = ap.parse_args(argv)
    grid = tuple(int(x) for x in args.grid.split(","))
    fmas = [int(x) // 8 * 8 for x in args.fmas.split(",")]
    if len(grid) != 3 or min(grid) < 1 or args.dim % 16 or args.heads < 1 or args.reps < 1 or args.rounds < 1:
        raise SystemExit("cpu_read_bound: --grid needs three positive sizes, --dim a multiple of 16")
    if not has_avx512():
        raise SystemExit("cpu_read_bound: the stand-in needs an AVX-512 CPU; this one is "
                         f"{torch.backends.cpu.get_cpu_capability()}")
    if args.overlap:
        overlap(grid, args.heads, next((f for f in fmas if f), 1152), args.rounds)
        return
    exe = build()
    T, H, W = grid
    mb = T * H * W * args.heads * args.dim * 4 / 1e6
    print(f"cpu: {cpu_model()}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"grid {T}x{H}x{W}, {args.heads} heads, D={args.dim}, fp32: Q, K, V {3 * mb:.1f} MB read, "
          f"output {mb:.1f} MB written per sweep; medians of {args.rounds} rounds' minima of {args.reps}")
    rows = measure(grid, args.heads, args.dim, fmas, args.reps, args.rounds, exe)
    width = max(len(label) for label in rows)
    print(f"{'':{width}s}  " + "  ".join(f"{lay:>16s}" for lay in LAYOUTS))
    for label, row in rows.items():
        print(f"{label:{width}s}  " + "  ".join(f"{row[lay]:13.3f} ms" for lay in LAYOUTS), flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


def overlap(grid: Sequence[int], heads: int, fmas: int, rounds: int) -> None:
    """Prints prefetch_overlap.c's table: the forward's prefetch stream against FMAs on registers or with
    L1 loads, in one burst per block or in chunks spread over the FMAs."""
    exe = build(source=OVERLAP_SOURCE)
    T, H, W = grid
    table = run_overlap(exe, T * H * W, heads, fmas, rounds, torch.get_num_threads())
    print(f"cpu: {cpu_model()}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"grid {T}x{H}x{W}, {heads} heads, D=64, token-major: per block of 16 queries and head {fmas} vector "
          f"FMAs and the prefetches of a block two ahead (192 lines); ms, medians of {rounds} rounds")
    schedules = list(next(iter(table.values())))
    print(f"{'FMA operands':14s}" + "".join(f"{s:>15s}" for s in schedules))
    for operands, row in table.items():
        print(f"{operands:14s}" + "".join(f"{row[s]:15.3f}" for s in schedules))
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
