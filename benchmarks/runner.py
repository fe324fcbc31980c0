"""The benchmark loop: inputs, the correctness gate, timing, memory, and per-row figures.

Used by the CLI (``benchmarks/run.py``), the pytest-benchmark suite and the smoke test.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import measure
from .cases import Case, attention_flops
from .providers import Provider

# Relative-error bounds of the correctness gate (docs/nearby_attention.md, section 8), output and
# gradients alike.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


@dataclass
class Settings:
    """How hard to measure: per (case, provider) time budget and repetition bounds."""

    device: str = "cpu"
    mode: str = "quick"
    budget_s: float = 1.5  # CPU: wall seconds of timed repetitions per row; GPU: do_bench's rep (s)
    min_reps: int = 3
    max_reps: int = 30
    slow_min_reps: int = 1  # slow peers (NATTEN's 4 s calls) on the CPU
    input_sets: int = 2  # CPU: rotated input sets (GPU: enough sets to exceed the L2 cache)
    memory: bool = True
    check: bool = True
    seed: int = 0


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if not torch.isfinite(a).all():
        return float("nan")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def make_inputs(case: Case, device: str, seed: int, sets: int = 1) -> List[Tuple[torch.Tensor, ...]]:
    """``sets`` independent ``(q, k, v)`` triples of shape ``case.shape()``, standard normal."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(sets):
        out.append(
            tuple(
                torch.randn(case.shape(), generator=g, device=device, dtype=case.torch_dtype)
                for _ in range(3)
            )
        )
    return out


def gpu_input_sets(case: Case, l2_bytes: int = 60 << 20, cap: int = 8) -> int:
    """Rotate enough input sets that one pass over all of them exceeds twice the L2 cache."""
    per_set = 3 * math.prod(case.shape()) * torch.tensor([], dtype=case.torch_dtype).element_size()
    return int(max(1, min(cap, math.ceil(2 * l2_bytes / per_set))))


# ----------------------------------------------------------------------------------------------
# the correctness gate
# ----------------------------------------------------------------------------------------------


def check_provider(provider: Provider, case: Case, device: str, seed: int = 1234) -> Dict:
    """Run ``provider`` on ``case.check_case()`` (fresh random inputs in the case's dtype) and compare
    its output, and with ``case.backward`` its gradients, with ``provider.expected`` computed in
    float64 from the same rounded inputs. Returns ``{"ok", "err", "grad_err", "tol", "check_grid"}``."""
    cc = case.check_case()
    tol = TOLERANCE[cc.dtype]
    ((q, k, v),) = make_inputs(cc, device, seed)
    bwd = cc.backward
    xs = [t.clone().requires_grad_(bwd) for t in (q, k, v)]
    out = provider.to_grid(provider.run(*provider.prepare(*xs, cc)), cc)
    x64 = [t.detach().double().requires_grad_(bwd) for t in (q, k, v)]
    exp = provider.expected(*x64, cc)
    res = {"check_grid": list(cc.grid), "tol": tol, "err": _rel_err(out, exp), "grad_err": None}
    if tuple(out.shape) != tuple(exp.shape):
        res.update(ok=False, reason=f"output shape {tuple(out.shape)} != expected {tuple(exp.shape)}")
        return res
    if bwd:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        dout = torch.randn(exp.shape, generator=g, device=device, dtype=torch.float64)
        out.backward(dout.to(out.dtype))
        exp.backward(dout)
        errs = []
        for a, b in zip(xs, x64):
            if b.grad is None:
                continue
            errs.append(_rel_err(a.grad, b.grad) if a.grad is not None else float("nan"))
        res["grad_err"] = max(errs) if errs else None
    errs = [res["err"]] + ([res["grad_err"]] if res["grad_err"] is not None else [])
    ok = all(e == e and e <= tol for e in errs)  # e == e rejects NaN
    res["ok"] = ok
    if not ok:
        res["reason"] = f"relative error {max(errs):.3g} > {tol:g} against the float64 expectation"
    return res


# ----------------------------------------------------------------------------------------------
# one row
# ----------------------------------------------------------------------------------------------


def _detached(args, requires_grad: bool):
    return tuple(t.detach().requires_grad_(requires_grad) if t.is_floating_point() else t for t in args)


def measure_row(
    provider: Provider, case: Case, inputs: Sequence[Tuple[torch.Tensor, ...]], st: Settings
) -> Dict:
    """Prepare ``provider`` on every input set (untimed), time ``run`` (and backward), measure memory."""
    device = st.device
    bwd = case.backward
    with torch.no_grad():
        arg_sets = [_detached(provider.prepare(*s, case), bwd) for s in inputs]
    state = {"i": 0}
    douts: List[Optional[torch.Tensor]] = [None] * len(arg_sets)
    if bwd:  # one forward for the output's shape and dtype; a random output gradient per input set
        o = provider.run(*arg_sets[0])
        shape, dtype = o.shape, o.dtype
        del o
        for j in range(len(arg_sets)):
            g = torch.Generator(device=device).manual_seed(st.seed + 7 + j)
            douts[j] = torch.randn(shape, generator=g, device=device, dtype=dtype)

    def step():
        i = state["i"] % len(arg_sets)
        state["i"] += 1
        a = arg_sets[i]
        out = provider.run(*a)
        if bwd:
            out.backward(douts[i])
        return out

    def drop_grads():
        for a in arg_sets:
            for t in a:
                t.grad = None

    if device == "cuda":
        leaves = [t for a in arg_sets for t in a if t.requires_grad]
        t = measure.time_cuda(step, budget_ms=st.budget_s * 1e3, grad_to_none=leaves or None)
        t["threads"] = torch.get_num_threads()
    else:
        min_reps = st.slow_min_reps if provider.few_reps else st.min_reps
        t = measure.time_cpu(
            step,
            budget_s=st.budget_s,
            min_reps=min_reps,
            max_reps=st.max_reps,
            warmup=2 if provider.compiles else 1,
            after=drop_grads if bwd else None,
            measure_memory=st.memory,
        )
    row = dict(t)
    if st.memory and "peak_mem_mib" not in row:
        drop_grads()
        state["i"] = 0
        row.update(measure.peak_memory(step, device))
        drop_grads()
    row.update(provider.extra(case))
    del arg_sets, douts
    return row


# ----------------------------------------------------------------------------------------------
# a whole case
# ----------------------------------------------------------------------------------------------


def run_case(
    case: Case,
    providers: Sequence[Provider],
    st: Settings,
    gate_cache: Optional[Dict] = None,
    progress: Optional[Callable[[str], None]] = None,
    mm_gflops: Optional[float] = None,
    reuse_cache: Optional[Dict] = None,
) -> List[Dict]:
    """Every provider on ``case``: skip (with the reason), gate, time. Returns one row per provider.

    ``gate_cache`` keeps correctness-gate results per (provider, check case); ``reuse_cache`` keeps the
    rows of window-independent providers (full, axial attention) per :meth:`Provider.reuse_key`, so
    that they are measured once for all windows of a grid (the row says ``reused_from``)."""
    gate_cache = {} if gate_cache is None else gate_cache
    reuse_cache = {} if reuse_cache is None else reuse_cache
    device = st.device
    sets = st.input_sets if device == "cpu" else gpu_input_sets(case)
    inputs = make_inputs(case, device, st.seed, sets)
    rows = []
    for p in providers:
        if progress:
            progress(f"{case.name} | {p.name}")
        row = {
            "case": case.name,
            "provider": p.name,
            "family": p.family,
            "note": p.note,
            "baseline": p.baseline,
        }
        rows.append(row)
        t_row = time.perf_counter()
        key = p.reuse_key(case)
        if key is not None and key in reuse_cache:
            row.update({k: v for k, v in reuse_cache[key].items() if k not in row})
            row["reused_from"] = reuse_cache[key]["case"]
            continue
        _run_one(p, case, inputs, st, gate_cache, row)
        row["wall_s"] = round(time.perf_counter() - t_row, 2)
        if key is not None:
            reuse_cache[key] = dict(row)
    del inputs
    annotate(case, providers, rows, mm_gflops)
    return rows


def _run_one(p: Provider, case: Case, inputs, st: Settings, gate_cache: Dict, row: Dict) -> None:
    """Fill ``row`` for provider ``p`` on ``case``: skipped / error / check failed / ok + figures."""
    device = st.device
    if p.slow and not case.peers and st.mode != "tiny":
        row.update(
            status="skipped",
            reason="slow provider: run only on the cases marked peers (see docs/benchmarks.md)",
        )
        return
    try:
        ok, why = p.can_run(case, device, *inputs[0])
    except Exception as e:  # noqa: BLE001
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        row.update(status="skipped", reason=why)
        return
    if st.check:
        key = (p.name, case.check_case())
        if key not in gate_cache:
            try:
                gate_cache[key] = check_provider(p, case, device)
            except Exception as e:  # noqa: BLE001
                gate_cache[key] = {
                    "ok": False,
                    "error": True,
                    "reason": f"check raised {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                }
            finally:
                p.release()
        gate = gate_cache[key]
        row["check"] = {k: v for k, v in gate.items() if k != "error"}
        if gate.get("error"):
            row.update(status="error", reason=gate["reason"])
            return
    try:
        row.update(measure_row(p, case, inputs, st))
        if not st.check:
            row.update(status="unchecked", reason="--no-check: no correctness gate, so no speedup")
        elif row["check"]["ok"]:
            row["status"] = "ok"
        else:
            row.update(status="check failed", reason=row["check"].get("reason", ""))
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        row.update(status="error", reason=f"{type(e).__name__}: {msg}")
        row["traceback"] = traceback.format_exc(limit=3)
    finally:
        p.release()
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def annotate(case: Case, providers: Sequence[Provider], rows: List[Dict], mm_gflops: Optional[float]) -> None:
    """Add pairs, useful GFLOP/s, fraction of the matmul ceiling, and the speedup over the fastest
    full-attention baseline that passed its check. No speedup for a row that failed its check."""
    by_name = {p.name: p for p in providers}
    base = [r for r in rows if r.get("baseline") and r.get("status") == "ok"]
    best = min(base, key=lambda r: r["median_ms"]) if base else None
    for r in rows:
        if "median_ms" not in r:
            continue
        p = by_name[r["provider"]]
        pairs = p.pairs(case)
        flops = attention_flops(pairs, case.head_dim, case.heads, case.batch, case.backward)
        r["pairs_per_head"] = pairs
        r["useful_gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
        if mm_gflops:
            r["frac_of_mm"] = r["useful_gflops"] / mm_gflops
        if r.get("status") == "ok" and best is not None:
            r["speedup_vs_full"] = best["median_ms"] / r["median_ms"]
            r["speedup_baseline"] = best["provider"]
