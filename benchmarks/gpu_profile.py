#!/usr/bin/env python
"""Where the GPU time of one call goes: wall time against the kernels' own device time.

For each case and provider it reports, on one CUDA device:

* ``wall ms``: the median time of the whole call (``triton.testing.do_bench``: CUDA events, L2 flush,
  rotated input sets), forward or forward + backward, exactly as ``benchmarks.run`` times a row;
* ``kernel ms``: the summed device time of every kernel one call launches, from ``torch.profiler``
  (CUPTI), the mean over ``--profile-iters`` calls; ``wall - kernel`` is host time the GPU waited for
  (Python, launches, allocator) when the call is host-bound;
* the kernels that take most of it (name, count, ms per call);
* for the nearby rows, the relative error against the ``cuda`` backend's output (exact pairs, a
  different code path) when both ran, so that a fast row is also a right one.

The cases are the GPU benchmark grids (``benchmarks/cases.py``): NÜWA's video grid, a larger video grid,
and HunyuanVideo's 30x48x80 grid with its (18, 24, 24) window. ``--budget-s`` bounds the whole run:
cases that would start after it are listed as not run.

Usage: python benchmarks/gpu_profile.py [--sets nuwa,large,hunyuan] [--providers triton,cuda,flash,cudnn]
       [--budget-s 240] [--blocks 32x32,...] [--candidates] [--json FILE]

``--candidates`` adds one triton row per ``backends.triton.config.CANDIDATES`` entry (wider large-window
tiles with their warps and stages) on the HunyuanVideo cases: the sweep the next GPU session runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import measure  # noqa: E402
from benchmarks.cases import FRAME_CAUSAL, HUNYUAN, LARGE, VIDEO, Case, attention_flops  # noqa: E402
from benchmarks.providers import FullSDPA, Nearby, Provider  # noqa: E402
from benchmarks.runner import _rel_err, gpu_input_sets, make_inputs  # noqa: E402
from nuwa_kernels.backends.triton.config import CANDIDATES  # noqa: E402
from nuwa_kernels.backends.triton.plan import BlockConfig, override_config, override_launch  # noqa: E402

DEVICE = "cuda"
REFERENCE_PROVIDER = "nearby-cuda"  # the rows' outputs are compared with this one's
# rows not run: the cuda backend's CUDA-core kernels take seconds per HunyuanVideo backward
SKIP = {("hunyuan", True): {"nearby-cuda"}}


def profile_sets() -> Dict[str, List[Case]]:
    """The named case lists (bfloat16; HunyuanVideo with its 24 heads of 128)."""
    bf = dict(dtype="bfloat16")
    hy = dict(heads=24, head_dim=128, dtype="bfloat16")
    return {
        "nuwa": [
            Case("nuwa-video", VIDEO, (3, 3, 3), False, **bf),
            Case("nuwa-video", VIDEO, (3, 3, 3), FRAME_CAUSAL, **bf),
            Case("nuwa-video", VIDEO, (3, 3, 3), False, border="shift", **bf),
            Case("nuwa-video", VIDEO, (3, 3, 3), False, backward=True, **bf),
            Case("nuwa-video", VIDEO, (3, 3, 3), True, backward=True, **bf),
        ],
        "large": [
            Case("video-large", LARGE, (3, 3, 3), False, backward=True, **bf),
            Case("video-large", LARGE, (7, 7, 7), False, **bf),
            Case("video-large", LARGE, (7, 7, 7), False, backward=True, **bf),
        ],
        "hunyuan": [
            Case("hunyuan", HUNYUAN, (18, 24, 24), False, **hy),
            Case("hunyuan", HUNYUAN, (18, 24, 24), FRAME_CAUSAL, **hy),
            Case("hunyuan", HUNYUAN, (18, 24, 24), False, backward=True, **hy),
        ],
    }


class TritonBlocks(Nearby):
    """The triton backend with its query-brick / key-tile sizes forced (``override_config``), and with a
    candidate's warps and stages too (``override_launch``; else the config table's)."""

    def __init__(self, block_m: int = 0, block_n: int = 0, candidate: Optional[str] = None):
        super().__init__("triton")
        self.launch = {}
        if candidate is not None:
            cfg = CANDIDATES[candidate]
            self.block = cfg.block
            self.launch = {"fwd": cfg.fwd, "dq": cfg.dq, "dkdv": cfg.dkdv}
            self.name = f"nearby-triton-{candidate}"
        else:
            self.block = BlockConfig(block_m, block_n)
            self.name = f"nearby-triton-m{block_m}n{block_n}"

    def run(self, q, k, v):
        with override_config(self.block), override_launch(**self.launch):
            return super().run(q, k, v)


def make_providers(names: List[str], case: Case, blocks: List[tuple] = (), candidates: List[str] = ()) -> List[Provider]:
    """``triton``/``cuda`` (nearby attention, the case's border), ``flash``/``cudnn`` (full SDPA), then
    one triton row per forced ``(block_m, block_n)`` in ``blocks`` and per ``config.CANDIDATES`` name in
    ``candidates``."""
    out: List[Provider] = []
    for n in names:
        if n in ("triton", "cuda", "cpu", "reference"):
            out.append(Nearby(n))  # the case's border
        elif n in ("flash", "cudnn"):
            out.append(FullSDPA(n))
        else:
            raise ValueError(f"--providers: unknown provider {n!r} (triton, cuda, cpu, reference, flash, cudnn)")
    out += [TritonBlocks(bm, bn) for bm, bn in blocks]
    out += [TritonBlocks(candidate=c) for c in candidates]
    skip = SKIP.get((case.label, case.backward), set())
    return [p for p in out if p.name not in skip]


def case_label(case: Case) -> str:
    return case.name + ("-shift" if case.border == "shift" else "")


def kernel_time(step: Callable[[], object], iters: int) -> Dict:
    """Device time per call summed over its kernels (``torch.profiler``), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per: Dict[str, List[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            per.setdefault(ev.name, []).append(ev.device_time / 1e3)  # us -> ms
    total = sum(sum(v) for v in per.values()) / iters
    top = sorted(((sum(v) / iters, len(v) / iters, k) for k, v in per.items()), reverse=True)[:6]
    return {"kernel_ms": total, "kernels": [{"name": k[:90], "calls": c, "ms": ms} for ms, c, k in top]}


def run_row(p: Provider, case: Case, inputs, profile_iters: int) -> Dict:
    row: Dict = {"case": case_label(case), "provider": p.name}
    ok, why = p.can_run(case, DEVICE, *inputs[0])
    if not ok:
        return {**row, "status": "skipped", "reason": why}
    args = [tuple(t.detach().requires_grad_(case.backward) for t in p.prepare(*s, case)) for s in inputs]
    state = {"i": 0}
    g = None
    if case.backward:
        g = torch.randn_like(p.run(*args[0]))

    def step():
        a = args[state["i"] % len(args)]
        state["i"] += 1
        out = p.run(*a)
        if case.backward:
            out.backward(g)
        return out

    t0 = time.perf_counter()
    step()  # compiles, plans
    torch.cuda.synchronize()
    row["first_call_s"] = round(time.perf_counter() - t0, 2)
    leaves = [t for a in args for t in a if t.requires_grad]
    row.update(measure.time_cuda(step, budget_ms=300.0, grad_to_none=leaves or None))
    row.update(kernel_time(step, 1 if row["median_ms"] > 50 else profile_iters))  # slow rows: one profiled call
    row["host_ms"] = max(0.0, row["median_ms"] - row["kernel_ms"])
    with torch.no_grad():
        row["out"] = p.to_grid(p.run(*[t.detach() for t in args[0]]), case).float()
    row["pairs"] = p.pairs(case)
    row["status"] = "ok"
    return row


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="nuwa,large,hunyuan", help="comma list of " + ", ".join(profile_sets()))
    ap.add_argument("--providers", default="triton,cuda,cudnn,flash")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no case after this many seconds")
    ap.add_argument("--profile-iters", type=int, default=3)
    ap.add_argument("--blocks", default="", help="extra triton rows with forced tiles, e.g. 32x32,64x32")
    ap.add_argument("--blocks-sets", default="nuwa,large", help="the sets that get the --blocks rows")
    ap.add_argument("--candidates", action="store_true",
                    help="extra triton rows: every config.CANDIDATES entry (large-window tiles) on --candidates-sets")
    ap.add_argument("--candidates-sets", default="hunyuan")
    ap.add_argument("--json", default=None, help="write every row (and the environment) here")
    args = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA device", file=sys.stderr)
        return 2
    sets = profile_sets()
    bad = [s for s in args.sets.split(",") if s not in sets]
    if bad:
        ap.error(f"--sets: unknown {bad}; choose from {sorted(sets)}")
    names = [n for n in args.providers.split(",") if n]
    cases = [(s, c) for s in args.sets.split(",") for c in sets[s]]
    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",") if b]
    block_sets = set(args.blocks_sets.split(","))
    cand_sets = set(args.candidates_sets.split(",")) if args.candidates else set()
    start = time.perf_counter()
    rows: List[Dict] = []
    print(f"{'case':58s} {'provider':22s} {'wall ms':>9s} {'kernel ms':>9s} {'host ms':>8s} "
          f"{'TFLOP/s':>8s} {'err vs cuda':>11s}  top kernel")
    for set_name, case in cases:
        label = case_label(case)
        if time.perf_counter() - start > args.budget_s:
            rows.append({"case": label, "status": "not run (budget)"})
            print(f"{label:58s} not run: --budget-s {args.budget_s:g} spent")
            continue
        inputs = make_inputs(case, DEVICE, seed=0, sets=gpu_input_sets(case))
        case_rows = []
        for p in make_providers(names, case, blocks if set_name in block_sets else (),
                                list(CANDIDATES) if set_name in cand_sets else ()):
            try:
                row = run_row(p, case, inputs, args.profile_iters)
            except Exception as e:  # noqa: BLE001  (a row's failure is reported, the run goes on)
                row = {"case": label, "provider": p.name, "status": "error",
                       "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            finally:
                p.release()
            case_rows.append(row)
            if row.get("status") == "ok":  # progress, in case a time limit stops the run mid-case
                print(f"  {label} {p.name}: {row['median_ms']:.3f} ms (kernels {row['kernel_ms']:.3f} ms)", flush=True)
        ref = next((r["out"] for r in case_rows if r.get("provider") == REFERENCE_PROVIDER and "out" in r), None)
        for r in case_rows:
            out = r.pop("out", None)
            if ref is not None and out is not None and r["provider"].startswith("nearby"):
                r["rel_err_vs_cuda"] = _rel_err(out, ref)
            if r.get("status") != "ok":
                print(f"{label:58s} {r['provider']:22s} {r['status']}: {r.get('reason', '')}")
                continue
            fl = attention_flops(r.pop("pairs"), case.head_dim, case.heads, case.batch, case.backward)
            r["useful_tflops"] = fl / (r["median_ms"] * 1e-3) / 1e12
            err = r.get("rel_err_vs_cuda")
            top = r["kernels"][0]["name"][:40] if r["kernels"] else ""
            print(f"{label:58s} {r['provider']:22s} {r['median_ms']:9.3f} {r['kernel_ms']:9.3f} "
                  f"{r['host_ms']:8.3f} {r['useful_tflops']:8.1f} "
                  f"{'' if err is None else f'{err:.1e}':>11s}  {top}")
        rows += case_rows
        del inputs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after every case: a run stopped by a time limit keeps what it measured
            _write_json(args.json, rows)
    if args.json:
        _write_json(args.json, rows)
    return 0


def _write_json(path: str, rows: List[Dict]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": measure.environment(DEVICE, os.getcwd()), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
