#!/usr/bin/env python
"""Compile every Triton kernel specialisation of nuwa_kernels ahead of time for CUDA sm_80 and sm_90.

Runs without a GPU (``triton.compile`` on an ``ASTSource`` with ``GPUTarget("cuda", cc, 32)``) and
catches what the interpreter lets through (tiny ``tl.dot`` tiles, type errors, unsupported ops).
Exits non-zero, listing every failure, if any specialisation does not compile.

Specialisations: every kernel (forward, dQ, dK/dV) x input dtype (float16, bfloat16, float32 with
IEEE and with TF32 dots) x raster causality (on/off) x head-dim block (16..256) x every block shape
the launchers can pick for that head dim x 32/64-bit strides, with the first autotune config; plus
every autotune config (warps/stages) for one specialisation per kernel. ``--full`` crosses
everything with every autotune config.

Usage: python scripts/triton_aot_check.py [--arch 80 90] [--jobs N] [--full] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

# The kernels must be real JIT functions, not interpreted ones.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_POINTER_DTYPE_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"LSE", "DELTA"}
_I32_POINTERS = {"WIN", "TILES", "BOUNDS"}
_FLOATS = {"scale", "scale_log2"}
_CONSTEXPRS = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "RASTER", "PRECISION", "UPCAST"}
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _kernels():
    from nuwa_kernels.backends.triton.bwd import nearby_bwd_dkdv_kernel, nearby_bwd_dq_kernel
    from nuwa_kernels.backends.triton.fwd import nearby_fwd_kernel

    return {"fwd": nearby_fwd_kernel, "bwd_dq": nearby_bwd_dq_kernel, "bwd_dkdv": nearby_bwd_dkdv_kernel}


def _jit_fn(kernel):
    fn = kernel
    while not hasattr(fn, "arg_names") or type(fn).__name__ == "Autotuner":
        fn = fn.fn
    return fn


def _autotune_configs(kernel):
    return list(getattr(kernel, "configs", None) or [])


def _signature(fn, dtype: str, wide: bool):
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in _POINTER_DTYPE_ARGS:
            sig[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _I32_POINTERS:
            sig[name] = "*i32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name.startswith("s"):  # strides
            sig[name] = "i64" if wide else "i32"
        else:
            sig[name] = "i32"
    return sig


def _block_shapes(kind: str, head_dim_block: int):
    """(BLOCK_M, BLOCK_N) the launchers can pass for this kernel and head-dim block."""
    from nuwa_kernels.backends.triton.plan import BlockConfig, default_config

    configs = {default_config(head_dim_block)}
    if head_dim_block <= 128:
        configs.add(BlockConfig(32, 32))  # small windows
    out = []
    for c in sorted(configs, key=lambda c: (c.block_m, c.block_n)):
        # dK/dV: bricks on the key grid (block_m tokens), tiles on the query grid (block_n tokens)
        out.append((c.block_n, c.block_m) if kind == "bwd_dkdv" else (c.block_m, c.block_n))
    return out


def _jobs(full: bool, quick: bool, archs, ci: bool = False):
    kernels = _kernels()
    jobs = []
    dtypes = [("float16", "tf32"), ("bfloat16", "tf32"), ("float32", "ieee"), ("float32", "tf32")]
    dblocks = [16, 32, 64, 128, 256]
    if quick or ci:
        dtypes = [("bfloat16", "tf32"), ("float32", "ieee")]
        dblocks = [64] if ci else [64, 256]
    for kind, kernel in kernels.items():
        configs = _autotune_configs(kernel)
        first = configs[:1] or [None]
        for (dtype, prec), raster, dblock, wide in itertools.product(dtypes, (False, True), dblocks, (False, True)):
            if wide and (quick or ci or dblock != 64):
                continue  # 64-bit strides change only address arithmetic: one head-dim block suffices
            shapes = _block_shapes(kind, dblock)
            for bm, bn in shapes[-1:] if ci else shapes:
                for cfg in configs if full else first:
                    for arch in archs:
                        jobs.append((kind, dtype, prec, raster, dblock, bm, bn, wide, _cfg_tuple(cfg), arch))
        if not full and not ci:
            for cfg in configs[1:]:
                for arch in archs:
                    bm, bn = _block_shapes(kind, 64)[-1]
                    jobs.append((kind, "float16", "tf32", True, 64, bm, bn, False, _cfg_tuple(cfg), arch))
    return jobs


def _cfg_tuple(cfg):
    if cfg is None:
        return (4, 3)
    return (cfg.num_warps, cfg.num_stages)


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kind, dtype, prec, raster, dblock, bm, bn, wide, (warps, stages), arch = job
    fn = _jit_fn(_kernels()[kind])
    constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": dblock, "RASTER": raster, "PRECISION": prec, "UPCAST": False}
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, wide), constexprs=constexprs)
    t0 = time.time()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        asm = getattr(compiled, "asm", {})
        ptx = asm.get("ptx", "") if isinstance(asm, dict) else ""
        if isinstance(ptx, bytes):
            ptx = ptx.decode(errors="ignore")
        uses_mma = ("mma" in ptx) or ("wgmma" in ptx)
        # IEEE float32 dots are FMA loops by design; every other dot should use tensor cores
        expect_mma = not (dtype == "float32" and prec == "ieee")
        note = " (no mma instruction in PTX)" if expect_mma and ptx and not uses_mma else ""
        tf32_leak = dtype == "float32" and prec == "ieee" and ".tf32" in ptx
        if tf32_leak:
            return job, False, "float32 IEEE specialisation uses TF32 instructions", time.time() - t0
        return job, True, note, time.time() - t0
    except Exception as exc:  # noqa: BLE001 - report everything
        msg = f"{type(exc).__name__}: {exc}"
        return job, False, msg[-2000:], time.time() - t0


def _describe(job):
    kind, dtype, prec, raster, dblock, bm, bn, wide, (warps, stages), arch = job
    return (f"sm_{arch} {kind:8s} {dtype:8s} {prec:4s} raster={int(raster)} BLOCK_D={dblock:3d} "
            f"BLOCK_M={bm:3d} BLOCK_N={bn:3d} strides={'i64' if wide else 'i32'} warps={warps} stages={stages}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", "-j", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--full", action="store_true", help="every specialisation x every autotune config")
    ap.add_argument("--quick", action="store_true", help="a representative subset (smoke test)")
    ap.add_argument("--ci", action="store_true",
                    help="every kernel for bf16 and fp32-IEEE, raster on/off, default tiles (about 24 compiles)")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)

    import triton  # noqa: F401  (fail loudly when triton is missing)

    jobs = _jobs(args.full, args.quick, args.arch, ci=args.ci)
    print(f"AOT-compiling {len(jobs)} Triton specialisations for {', '.join(f'sm_{a}' for a in args.arch)} "
          f"with {args.jobs} worker(s) (triton {triton.__version__})", flush=True)
    t0 = time.time()
    failures = []
    notes = []
    if args.jobs <= 1:
        results = map(_compile_one, jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=args.jobs)
        futures = [pool.submit(_compile_one, j) for j in jobs]
        results = (f.result() for f in as_completed(futures))
    done = 0
    for job, ok, msg, dt in results:
        done += 1
        if not ok:
            failures.append((job, msg))
            print(f"FAIL {_describe(job)}\n     {msg}", flush=True)
        elif msg:
            notes.append((job, msg))
        if args.verbose:
            print(f"{'ok  ' if ok else 'FAIL'} {_describe(job)} {dt:.1f}s{msg if ok else ''}", flush=True)
        elif done % 25 == 0:
            print(f"  {done}/{len(jobs)} compiled ({time.time() - t0:.0f}s)", flush=True)
    for job, msg in notes:
        print(f"note {_describe(job)}{msg}")
    print(f"{len(jobs) - len(failures)}/{len(jobs)} specialisations compiled in {time.time() - t0:.0f}s")
    if failures:
        print(f"{len(failures)} FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
