#!/usr/bin/env python
"""Host overhead of one ``nearby_attention`` call on a tiny input, against SDPA in the same process.

What it times (median of ``--repeats`` batches of ``--iters`` calls, ``time.perf_counter``):

* ``sdpa``: ``F.scaled_dot_product_attention`` on the same tokens (``(B, heads, N, D)``);
* ``cpu``: the whole public call, ``nearby_attention(..., backend="cpu")`` (validation, spec, backend
  choice, the ``na3d_fwd`` op and its autograd; the kernel itself is tiny at this size);
* ``triton``: the whole public call with ``backend="triton"`` and every Triton kernel launch replaced by
  a no-op (the plan/config caches, the op and the autograd all run; on a machine without a GPU the
  process sets ``TRITON_INTERPRET=1`` so the backend accepts CPU tensors, but no kernel is interpreted);
* ``cuda``: the ``cuda`` backend's Python path (its ``can_run`` and the shared ``na3d_fwd``/``na3d_bwd``
  ops) with the op's kernel replaced by a no-op allocation, on CPU tensors when no GPU is present.

Each for the forward alone and forward+backward, with the ratio to SDPA (targets: at most 2x forward,
1.5x forward+backward for the cpu backend). ``--profile`` prints a cProfile of the cpu-backend call
(what in ``api.py``/``_ops.py`` costs time).

Usage: python benchmarks/host_overhead.py [--iters 300] [--repeats 7] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before nuwa_kernels imports the Triton kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.nn.functional as F  # noqa: E402

import nuwa_kernels as nk  # noqa: E402

GRID, HEADS, D, KS = (1, 4, 4), 2, 16, 3


def _bench(fn, iters: int, repeats: int) -> float:
    """Median microseconds per call."""
    for _ in range(max(3, iters // 10)):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(samples)


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _patch_triton_launches():
    from nuwa_kernels.backends.triton import bwd, fwd

    for mod, name in ((fwd, "nearby_fwd_kernel"), (bwd, "nearby_bwd_dq_kernel"), (bwd, "nearby_bwd_dkdv_kernel"),
                      (bwd, "nearby_delta_kernel")):
        setattr(mod, name, _NoLaunch())


def _patch_cuda_backend(device):
    """Let the cuda backend's Python path run on ``device`` with a no-op kernel behind the shared op."""
    from nuwa_kernels.backends import cuda as cb

    if device.type == "cuda" and cb.can_run(*(torch.zeros(1, 1, 1, 1, 1, 16, device=device),) * 3,
                                             nk.window.make_window_spec((1, 1, 1), (1, 1, 1)))[0]:
        return True  # real CUDA kernels: nothing to patch for the Python path
    if cb.kernels_error() is not None and "without the CUDA kernels" not in (cb.kernels_error() or ""):
        return False
    real = cb.can_run
    cb.can_run = lambda q, k, v, spec: (True, "") if q.device.type == device.type else real(q, k, v, spec)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    B = 1
    q, k, v = (torch.randn(B, *GRID, HEADS, D, generator=g).to(device).requires_grad_() for _ in range(3))
    n = GRID[0] * GRID[1] * GRID[2]
    qs, ks, vs = (x.detach().reshape(B, n, HEADS, D).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    go = torch.randn(B, *GRID, HEADS, D, generator=g).to(device)
    gos = go.reshape(B, n, HEADS, D).transpose(1, 2).contiguous()

    def sdpa_f():
        with torch.no_grad():
            F.scaled_dot_product_attention(qs, ks, vs)

    def sdpa_fb():
        out = F.scaled_dot_product_attention(qs, ks, vs)
        torch.autograd.grad(out, (qs, ks, vs), gos)

    def api_f(backend):
        def f():
            with torch.no_grad():
                nk.nearby_attention(q, k, v, kernel_size=KS, backend=backend)
        return f

    def api_fb(backend):
        def f():
            out = nk.nearby_attention(q, k, v, kernel_size=KS, backend=backend)
            torch.autograd.grad(out, (q, k, v), go)
        return f

    res = {"input": {"grid": GRID, "heads": HEADS, "D": D, "kernel_size": KS, "device": str(device)}}
    res["sdpa"] = {"fwd_us": _bench(sdpa_f, args.iters, args.repeats), "fwdbwd_us": _bench(sdpa_fb, args.iters,
                                                                                           args.repeats)}
    paths = []
    if device.type == "cpu":
        paths.append("cpu")
    _patch_triton_launches()
    ok, why = nk.can_run("triton", q, k, v, kernel_size=KS)
    if ok:
        paths.append("triton")
    else:
        res["triton"] = {"skipped": why}
    if _patch_cuda_backend(device):
        if device.type == "cpu":
            # the shared op's CPU kernel stands in for the launch; subtract nothing (it is ~1 us here)
            pass
        paths.append("cuda")
    for name in paths:
        res[name] = {"fwd_us": _bench(api_f(name), args.iters, args.repeats),
                     "fwdbwd_us": _bench(api_fb(name), args.iters, args.repeats)}
        res[name]["fwd_ratio"] = res[name]["fwd_us"] / res["sdpa"]["fwd_us"]
        res[name]["fwdbwd_ratio"] = res[name]["fwdbwd_us"] / res["sdpa"]["fwdbwd_us"]
    print(f"tiny input {GRID} x {HEADS} heads x D={D}, kernel_size={KS}, {device}, torch {torch.__version__}")
    print(f"{'path':8s} {'fwd us':>9s} {'x sdpa':>7s} {'fwd+bwd us':>11s} {'x sdpa':>7s}")
    print(f"{'sdpa':8s} {res['sdpa']['fwd_us']:9.1f} {'':7s} {res['sdpa']['fwdbwd_us']:11.1f}")
    for name in paths:
        r = res[name]
        print(f"{name:8s} {r['fwd_us']:9.1f} {r['fwd_ratio']:7.2f} {r['fwdbwd_us']:11.1f} {r['fwdbwd_ratio']:7.2f}")
    if "skipped" in res.get("triton", {}):
        print(f"triton skipped: {res['triton']['skipped']}")
    if args.profile:
        import cProfile
        import pstats

        for label, fn in (("cpu fwd", api_f(paths[0])), ("cpu fwd+bwd", api_fb(paths[0]))):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.iters):
                fn()
            pr.disable()
            print(f"\n--- profile: {label} ({args.iters} calls), by total time ---")
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
