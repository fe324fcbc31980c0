#!/usr/bin/env python
"""Compile every launch configuration of the Triton kernels ahead of time for sm_80 and sm_90, and
read the cubins: registers, spills, local memory, shared memory, tensor-core instructions, loads.

Runs without a GPU (``triton.compile`` on an ``ASTSource`` with ``GPUTarget("cuda", cc, 32)``, the
specialisation a real launch gets: 16-byte aligned pointers, unit head-dim strides, other strides
multiples of 16) and then inspects each cubin with the ``cuobjdump`` that ships with Triton
(``triton/backends/nvidia/bin``). It fails when a configuration

* does not compile;
* spills (``STACK`` > 0) or uses local memory (``LOCAL`` > 0, ``STL``/``LDL`` in the SASS), for head
  dims up to 128 (D=256 is reported, not enforced: ``--strict-256`` enforces it too);
* lacks ``wgmma`` (``HGMMA``) on sm_90 in float16/bfloat16 where the table promises it
  (``LaunchConfig.mma == "wgmma"``: the large-window configs; the 16-row small-window configs run
  ``mma.sync`` by design, since ``wgmma`` needs ``M >= 64``);
* loads Q/K/V element by element (16-bit ``LDG``/``LDGSTS`` in half precision; in float32, no
  128-bit loads at all) instead of 16-byte vectors;
* uses TF32 in an IEEE float32 build.

Jobs: every entry the config table (``nuwa_kernels/backends/triton/config.py``) can return for
D in {64, 128} x {float16, bfloat16, float32} x {fwd, dq, dkdv} x {sm_80, sm_90} x {small, large
window}, each with the plain variant (no raster, no uniform bricks, box key tiles) and, for the forward
and ``dQ``, the packed-key-tile variant (``PACKED``, what small windows and HunyuanVideo's 18x24x24 run);
``--variants`` adds the raster (box and packed) and uniform (stride-aligned) variants,
``--head-dims 64 128 256`` other head dims.

``--cubin-dir DIR`` writes every cubin as ``<kernel>-<dtype>-d<D>-sm<arch>-<config>.cubin``;
``--table FILE`` writes the Markdown table (registers, spills, shared memory, tensor-core
instruction, load width, compile time); ``--json FILE`` the same as JSON.

``--ci``: bfloat16 and float32, D in {64, 128}, both architectures (70 compiles, about three minutes
with two workers). Works with triton 3.6 (the GPU machines) and 3.9 (CI).

Usage: python scripts/triton_aot_check.py [--arch 80 90] [--jobs N] [--ci] [--variants]
       [--head-dims 64 128] [--cubin-dir DIR] [--table FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

# The kernels must be real JIT functions, not interpreted ones.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_DATA_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"LSE", "DELTA"}
_I32_POINTERS = {"WIN", "TILES", "BOUNDS"}
_FLOATS = {"scale", "scale_log2"}
_CONSTEXPRS = {"HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_D", "RASTER", "UNIFORM", "PRECISION", "UPCAST", "PACKED"}
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# strides of the data tensors (not of LSE/delta): the head-dim stride is 1, the others multiples of 16
_DATA_STRIDE_PREFIXES = ("sq", "sk", "sv", "so", "sdo", "sdq", "sdk", "sdv")
KERNELS = ("fwd", "dq", "dkdv")


def _kernels():
    from nuwa_kernels.backends.triton.bwd import nearby_bwd_dkdv_kernel, nearby_bwd_dq_kernel
    from nuwa_kernels.backends.triton.fwd import nearby_fwd_kernel

    return {"fwd": nearby_fwd_kernel, "dq": nearby_bwd_dq_kernel, "dkdv": nearby_bwd_dkdv_kernel}


def _jit_fn(kernel):
    fn = kernel
    while not hasattr(fn, "arg_names") or type(fn).__name__ == "Autotuner":
        fn = fn.fn
    return fn


def _is_data_stride(name: str) -> bool:
    # sqb..sqd, skb.., sdob.., but not slb/sdlb (LSE/delta) nor scale
    return name not in _FLOATS and any(name.startswith(p) and len(name) == len(p) + 1 for p in _DATA_STRIDE_PREFIXES)


def _specialisation(fn, dtype: str, wide: bool):
    """Signature, constexprs (incl. unit strides) and divisibility attributes of a typical launch."""
    sig, ones, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in _DATA_POINTERS:
            sig[name] = "*" + _TRITON_DTYPE[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _I32_POINTERS:
            sig[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif _is_data_stride(name) and name.endswith("d"):
            ones[name] = 1  # unit head-dim stride: a real launch specialises it to the constant 1
            sig[name] = "constexpr"
        elif _is_data_stride(name):
            sig[name] = "i64" if wide else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("sln", "sdln"):
            ones[name] = 1  # contiguous LSE / delta: unit head stride
            sig[name] = "constexpr"
        elif name.startswith("s") and len(name) in (3, 4):
            sig[name] = "i64" if wide else "i32"
        else:
            sig[name] = "i32"
    return sig, ones, attrs


def _dtype(name):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _jobs(archs, head_dims, dtypes, variants: bool, wide: bool, candidates: bool = False):
    from nuwa_kernels.backends.triton.config import CANDIDATES, all_configs

    jobs = []
    for arch in archs:
        for d in head_dims:
            for dtype in dtypes:
                seen = set()
                if candidates:  # the untimed large-window alternatives (sm_90, half precision only)
                    if arch < 90 or dtype == "float32":
                        continue
                    configs = CANDIDATES.items()
                else:
                    configs = all_configs(arch, d, _dtype(dtype)).items()
                for window, cfg in configs:
                    if cfg.name in seen:
                        continue
                    seen.add(cfg.name)
                    for kind in KERNELS:
                        # (raster, uniform, packed); dK/dV never packs
                        flavours = [(False, False, False)] + ([(False, False, True)] if kind != "dkdv" else [])
                        if variants:
                            flavours += [(True, False, False), (False, True, False)]
                            flavours += [(True, False, True)] if kind != "dkdv" else []
                        for raster, uniform, packed in flavours:
                            bn = cfg.block.bwd_tile or cfg.block.block_n if kind == "dkdv" else cfg.block.block_n
                            jobs.append(dict(kind=kind, dtype=dtype, d=d, arch=arch, config=cfg.name,
                                             block_m=cfg.block.block_m, block_n=bn,
                                             warps=cfg.warps_stages(kind)[0], stages=cfg.warps_stages(kind)[1],
                                             mma=cfg.mma, raster=raster, uniform=uniform, packed=packed,
                                             wide=wide))
    return jobs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _res_usage(cubin_path: str) -> dict:
    out = subprocess.run([_cuobjdump(), "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        res[key.lower()] = int(m.group(1)) if m else None
    return res


def _sass_facts(cubin_path: str) -> dict:
    sass = subprocess.run([_cuobjdump(), "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    facts = {
        "hgmma": sum(i.startswith("HGMMA") for i in ins),
        "hmma": sum(i.startswith("HMMA") for i in ins),
        "spill_ins": sum(i.startswith(("STL", "LDL")) for i in ins),
        # global loads by width (LDG / LDGSTS cp.async; 'U16'/'16' = 2-byte, '64' = 8-byte, '128' = 16-byte)
        "ldg16": sum(i.startswith(("LDG", "LDGSTS")) and (".U16" in i or ".S16" in i or i.endswith(".16")) for i in ins),
        "ldg128": sum(i.startswith(("LDG", "LDGSTS")) and "128" in i for i in ins),
        "ldgsts": sum(i.startswith("LDGSTS") for i in ins),
        "tma": sum(i.startswith("UTMALDG") for i in ins),
    }
    return facts


def _compile_one(job, cubin_dir):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(_kernels()[job["kind"]])
    sig, ones, attrs = _specialisation(fn, job["dtype"], job["wide"])
    constexprs = dict(ones)
    constexprs.update(HEAD_DIM=job["d"], BLOCK_M=job["block_m"], BLOCK_N=job["block_n"], BLOCK_D=max(16, job["d"]),
                      RASTER=job["raster"], UNIFORM=job["uniform"],
                      PRECISION="ieee" if job["dtype"] == "float32" else "tf32", UPCAST=False)
    if job["kind"] == "dkdv":  # dK/dV: BLOCK_N = key brick (M side), BLOCK_M = query tile
        constexprs.update(BLOCK_M=job["block_n"], BLOCK_N=job["block_m"])
    else:
        constexprs["PACKED"] = job["packed"]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    t0 = time.time()
    rec = dict(job)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                  options={"num_warps": job["warps"], "num_stages": job["stages"]})
    except Exception as exc:  # noqa: BLE001 - report everything
        rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:], seconds=time.time() - t0)
        return rec
    rec["seconds"] = time.time() - t0
    asm = compiled.asm
    cubin = asm["cubin"]
    ptx = asm.get("ptx", "")
    if isinstance(ptx, bytes):
        ptx = ptx.decode(errors="ignore")
    name = _cubin_name(job)
    path = os.path.join(cubin_dir, name)
    with open(path, "wb") as f:
        f.write(cubin)
    rec["cubin"] = name
    rec.update(_res_usage(path))
    rec["shared"] = int(getattr(compiled.metadata, "shared", 0) or 0)  # dynamic shared memory (bytes)
    rec.update(_sass_facts(path))
    rec["tf32_leak"] = job["dtype"] == "float32" and ".tf32" in ptx
    rec["ok"] = True
    return rec


def _cubin_name(job) -> str:
    flav = (("-raster" if job["raster"] else "") + ("-uniform" if job["uniform"] else "")
            + ("-packed" if job.get("packed") else "") + ("-i64" if job["wide"] else ""))
    return f"{job['kind']}-{job['dtype']}-d{job['d']}-sm{job['arch']}-{job['config']}{flav}.cubin"


def _problems(rec, strict_256: bool, spills_enforced: bool = True):
    if not rec["ok"]:
        return [rec["error"]]
    out = []
    enforce = spills_enforced and (rec["d"] <= 128 or strict_256)
    # STACK alone can be an empty NVPTX frame (a 1-byte local depot, 8 bytes aligned) that no instruction
    # touches; spills are the STL/LDL instructions and local memory
    if enforce and (rec["local"] or rec["spill_ins"]):
        out.append(f"spills: STACK={rec['stack']} LOCAL={rec['local']} STL/LDL={rec['spill_ins']}")
    half = rec["dtype"] in ("float16", "bfloat16")
    if half and rec["arch"] >= 90 and rec["mma"] == "wgmma" and not rec["hgmma"]:
        out.append("no wgmma (HGMMA) on sm_90")
    if half and not (rec["hgmma"] or rec["hmma"]):
        out.append("no tensor-core instruction")
    if half and rec["ldg16"]:
        out.append(f"{rec['ldg16']} 2-byte global loads (Q/K/V must load as 16-byte vectors)")
    if not rec["ldg128"] and not rec["tma"]:
        out.append("no 16-byte global loads")
    if rec["tf32_leak"]:
        out.append("float32 IEEE build uses TF32")
    return out


def _table(recs) -> str:
    lines = [
        "| kernel | dtype | D | arch | config | warps | stages | regs | STL/LDL | stack (B) | local (B) | smem (B) "
        "| tensor core | 16-B loads | 2-B loads | cp.async | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if not r["ok"]:
            lines.append(f"| {r['kind']} | {r['dtype']} | {r['d']} | sm_{r['arch']} | {r['config']} | {r['warps']} | "
                         f"{r['stages']} | FAILED | | | | | | | | | {r['seconds']:.1f} |")
            continue
        tc = "wgmma" if r["hgmma"] else "mma.sync" if r["hmma"] else "FMA"
        flav = (" raster" if r["raster"] else "") + (" uniform" if r["uniform"] else "") + (" packed" if r.get("packed") else "")
        lines.append(
            f"| {r['kind']}{flav} | {r['dtype']} | {r['d']} | sm_{r['arch']} | {r['config']} | {r['warps']} | "
            f"{r['stages']} | {r['reg']} | {r['spill_ins']} | {r['stack']} | {r['local']} | {r['shared']} | {tc} | "
            f"{r['ldg128']} | "
            f"{r['ldg16']} | {'yes' if r['ldgsts'] or r['tma'] else 'no'} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    ap.add_argument("--jobs", "-j", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--ci", action="store_true", help="bfloat16 and float32 only (the CI subset)")
    ap.add_argument("--variants", action="store_true", help="also the raster and uniform (stride-aligned) variants")
    ap.add_argument("--wide", action="store_true", help="64-bit strides (inputs over 2**31 elements)")
    ap.add_argument("--strict-256", action="store_true", help="enforce zero spills at D=256 too")
    ap.add_argument("--cubin-dir", help="write every cubin here")
    ap.add_argument("--table", help="write the Markdown table here")
    ap.add_argument("--json", help="write the records as JSON here")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the user's Triton cache (faster reruns)")
    ap.add_argument("--verbose", "-v", action="store_true")
    # accepted for compatibility with older Makefiles
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help="--variants and --wide")
    ap.add_argument("--candidates", action="store_true",
                    help="compile config.CANDIDATES (sm_90, half precision) instead of the table; their "
                         "spills are reported, not failures (they are not shipped)")
    args = ap.parse_args(argv)

    if not args.keep_cache and "TRITON_CACHE_DIR" not in os.environ:
        # a fresh Triton cache: every job really compiles (honest compile times, fresh cubins)
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="nuwa-triton-cache-")
    import triton

    dtypes = ["bfloat16", "float32"] if args.ci else args.dtypes
    jobs = _jobs(args.arch, args.head_dims, dtypes, args.variants or args.full, args.wide or args.full,
                 args.candidates)
    cubin_dir = args.cubin_dir or tempfile.mkdtemp(prefix="nuwa-cubins-")
    os.makedirs(cubin_dir, exist_ok=True)
    print(f"AOT-compiling {len(jobs)} Triton kernels for {', '.join(f'sm_{a}' for a in args.arch)} with "
          f"{args.jobs} worker(s) (triton {triton.__version__}); cubins in {cubin_dir}", flush=True)
    t0 = time.time()
    pool = None
    if args.jobs <= 1:
        results = (_compile_one(j, cubin_dir) for j in jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=args.jobs)
        futures = [pool.submit(_compile_one, j, cubin_dir) for j in jobs]
        results = (f.result() for f in as_completed(futures))
    recs, failures = [], []
    for rec in results:
        recs.append(rec)
        # candidates are not shipped: their spills are reported in the table, not failures
        probs = _problems(rec, args.strict_256, spills_enforced=not args.candidates)
        if probs:
            failures.append((rec, probs))
            print(f"FAIL {_cubin_name(rec)}: {'; '.join(probs)}", flush=True)
        elif args.verbose:
            print(f"ok   {_cubin_name(rec)} regs={rec['reg']} smem={rec['shared']} {rec['seconds']:.1f}s", flush=True)
        if len(recs) % 12 == 0:
            print(f"  {len(recs)}/{len(jobs)} compiled ({time.time() - t0:.0f}s)", flush=True)
    if pool is not None:
        pool.shutdown(wait=True)  # join the workers before exit (no late writes to a closed pipe)
    order = {k: i for i, k in enumerate(KERNELS)}
    recs.sort(key=lambda r: (r["arch"], r["d"], r["dtype"], r["config"], order[r["kind"]], r["raster"], r["uniform"],
                             r.get("packed", False)))
    if args.table:
        with open(args.table, "w") as f:
            f.write(f"<!-- scripts/triton_aot_check.py, triton {triton.__version__} -->\n")
            f.write(_table(recs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "records": recs}, f, indent=1)
    for r in recs:
        if r["ok"] and r["d"] > 128 and (r["spill_ins"] or r["local"]):
            print(f"note {r['cubin']}: D={r['d']} spills ({r['spill_ins']} STL/LDL, STACK {r['stack']} B; "
                  "not enforced above D=128)")
    print(f"{len(recs) - len(failures)}/{len(recs)} kernels compiled clean in {time.time() - t0:.0f}s")
    if not args.cubin_dir:
        for p in glob.glob(os.path.join(cubin_dir, "*.cubin")):
            os.remove(p)
        os.rmdir(cubin_dir)
    if failures:
        print(f"{len(failures)} FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
