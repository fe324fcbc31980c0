"""The fused CPU kernel against the GEMM rate and against SDPA, all in one process (issue 13).

    python -m benchmarks.cpu_gemm_rate [--reps 7] [--cases 333,777,133,333c,777c] [--bwd] [--heads-contiguous]
                                       [--input-sets 1] [--dtype float32]

For each case on the NÜWA video grid (10x21x21, 8 heads, D=64, fp32, B=1, default threads): the
median time of ``nearby_attention(backend="cpu")`` forward (and forward+backward with ``--bwd``), the
useful GFLOP/s (the report's convention, ``benchmarks.cases.attention_flops``: 4*D FLOPs per allowed
(query, key) pair and head forward, 12*D forward+backward; the QK^T that fused kernels recompute in the
backward is not counted), its share of the same-process ``torch.mm``
fp32 rate, and the speedup over full SDPA (``is_causal=True`` SDPA for the raster-causal cases).
Medians of several repeats; the ``uptime`` load is printed beside the results (shared cores).

``--heads-contiguous`` passes query, key and value as views of ``(B, heads, T, H, W, D)`` tensors (strided
inputs of the contract's shapes, each head's rows contiguous instead of 2 KiB apart for 8 heads of 64):
the same kernel on the same data, to measure what the token-major layout's row stride costs the memory
system (``gemm-rate.md``, session 8). Outputs and gradients are token-major either way.

``--input-sets N`` times the calls over N independent sets of inputs in turn (query, key, value and, with
``--bwd``, the output gradient), so that each call finds its inputs where the calls on the other sets
left them: with N = 1 (the default) a NÜWA call's 27 MB of query, key and value are partly still in the
L3 cache from the previous call; with N = 4 (108 MB) they come from memory, as in a model whose every
layer attends new tensors (``gemm-rate.md``, session 12).

``--dtype bfloat16`` (or ``float16``) times the calls on half-type inputs (the kernels compute in float32);
the useful FLOPs are the same, and the reference stays the float32 ``torch.mm`` rate, so the share says
how close a half-type call comes to float32 GEMM arithmetic (SDPA runs in the same dtype).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # also runnable as `python benchmarks/cpu_gemm_rate.py`
    sys.path.insert(0, ROOT)

import nuwa_kernels  # noqa: E402
from benchmarks.cases import attention_flops  # noqa: E402
from benchmarks.measure import cpu_model  # noqa: E402
from nuwa_kernels.window import make_window_spec, window_mask  # noqa: E402

CASES = {
    "333": ((3, 3, 3), False),
    "777": ((7, 7, 7), False),
    "133": ((1, 3, 3), False),
    "333c": ((3, 3, 3), True),
    "777c": ((7, 7, 7), True),
}


CLOCK = time.perf_counter


def timeit(fn, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts)


class Rotation:
    """The input sets of the timed calls, taken in turn: ``next()`` returns the next set."""

    def __init__(self, sets):
        self.sets, self.i = list(sets), -1

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def make_inputs(grid, heads: int, dim: int, heads_contiguous: bool = False, dtype=torch.float32):
    """q, k, v of shape (1, T, H, W, heads, dim) in ``dtype``, standard normal: contiguous (token-major), or
    views of (1, heads, T, H, W, dim) tensors (each head's rows contiguous)."""
    if heads_contiguous:
        return [torch.randn(1, heads, *grid, dim).to(dtype).permute(0, 2, 3, 4, 1, 5) for _ in range(3)]
    return [torch.randn(1, *grid, heads, dim).to(dtype) for _ in range(3)]


def mm_rate(reps: int) -> float:
    n = 1024
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t = timeit(lambda: torch.mm(a, b), reps * 3)
    return 2 * n ** 3 / t / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--grid", default="10,21,21")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--heads-contiguous", action="store_true",
                    help="q, k, v as views of (B, heads, T, H, W, D) tensors (each head's rows contiguous)")
    ap.add_argument("--input-sets", type=int, default=1,
                    help="time the calls over this many input sets in turn (4: inputs come from memory, "
                         "not from the last call's caches)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the inputs' dtype (the torch.mm reference stays float32)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, process CPU time instead of wall time "
                         "(a busy machine: the work, not the waits)")
    args = ap.parse_args(argv)
    if args.input_sets < 1:
        ap.error(f"--input-sets must be at least 1, got {args.input_sets}")
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    grid = tuple(int(x) for x in args.grid.split(","))
    heads, D = args.heads, args.dim
    N = grid[0] * grid[1] * grid[2]
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    sets = [make_inputs(grid, heads, D, args.heads_contiguous, dtype) for _ in range(args.input_sets)]
    q, k, v = sets[0]
    arch = nuwa_kernels._build_info.BUILD.get("cpu_arch") if hasattr(nuwa_kernels, "_build_info") else "?"
    print(f"cpu: {cpu_model()}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, "
          f"build {arch}{', heads contiguous' if args.heads_contiguous else ''}"
          f"{f', inputs {args.dtype}' if dtype != torch.float32 else ''}"
          f"{f', {args.input_sets} input sets in turn' if args.input_sets > 1 else ''}")
    rate = mm_rate(args.reps)
    print(f"torch.mm fp32 1024^3: {rate:.1f} GFLOP/s")
    sd = {}
    if not args.no_sdpa:
        qs, ks, vs = (x.flatten(1, 3).transpose(1, 2).contiguous() for x in (q, k, v))
        for causal in (False, True):
            sd[causal] = timeit(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal),
                                max(3, args.reps // 2), warm=1)
            print(f"SDPA full{' causal' if causal else ''}: {sd[causal] * 1e3:.1f} ms")
    for name in args.cases.split(","):
        ks_, causal = CASES[name]
        spec = make_window_spec(grid, grid, ks_, causal, "truncate")
        pairs = int(window_mask(spec).sum())
        flops = attention_flops(pairs, D, heads, 1, backward=False)

        fwd_sets = Rotation(sets)

        def fwd():
            q_, k_, v_ = fwd_sets.next()
            return nuwa_kernels.nearby_attention(q_, k_, v_, kernel_size=ks_, causal=causal, backend="cpu")

        t = timeit(fwd, args.reps)
        g = flops / t / 1e9
        line = (f"{name:5s} fwd {t * 1e3:7.2f} ms  {g:6.1f} GFLOP/s  {100 * g / rate:5.1f}% of mm")
        if sd:
            line += f"  {sd[causal] / t:6.1f}x SDPA"
        if args.bwd:
            # clone keeps the strides; one output gradient per set
            fb_sets = Rotation([tuple(x.detach().clone().requires_grad_() for x in s_) + (torch.randn_like(s_[0]),)
                                for s_ in sets])

            def fb():  # the gradients returned, not accumulated into .grad (no extra adds in the timing)
                qg, kg, vg, go = fb_sets.next()
                o = nuwa_kernels.nearby_attention(qg, kg, vg, kernel_size=ks_, causal=causal, backend="cpu")
                return torch.autograd.grad(o, (qg, kg, vg), go)

            tb = timeit(fb, max(5, args.reps // 2))
            gb = attention_flops(pairs, D, heads, 1, backward=True) / tb / 1e9
            line += f" | fwd+bwd {tb * 1e3:7.2f} ms {gb:6.1f} GFLOP/s {100 * gb / rate:5.1f}% of mm"
        print(line, flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
