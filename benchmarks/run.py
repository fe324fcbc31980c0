"""Command line: ``python -m benchmarks.run [--quick | --full | --tiny] [options]``.

Prints a Markdown table and writes ``<mode>.json``, ``<mode>.md``, ``<mode>-scaling.png`` and
``<mode>-speedup.png`` under ``benchmarks/results/<device-slug>/`` (or ``--out``). See
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    # budget_s: CPU timed seconds per row / GPU do_bench rep window (s)
    "tiny": dict(budget_s=0.05, min_reps=2, max_reps=5, slow_min_reps=1),
    "quick": dict(budget_s=1.0, min_reps=3, max_reps=20, slow_min_reps=1),
    "full": dict(budget_s=5.0, min_reps=3, max_reps=50, slow_min_reps=2),
}
GPU_BUDGET_S = {"tiny": 0.02, "quick": 0.2, "full": 0.5}


class _NoBar:
    """Stands in for ``tqdm`` when it is not installed."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass


def _case_dicts(cases) -> List[dict]:
    from .providers import tile_stats

    out = []
    for c in cases:
        d = c.to_dict()
        ts = tile_stats(c)  # the Triton schedule's computed / useful pairs (planning only, no GPU needed)
        if "tile_ratio" in ts:
            d["triton_tile_ratio"] = ts["tile_ratio"]
        out.append(d)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = ap.add_mutually_exclusive_group()
    m.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="the default: NÜWA image/video cases, each mode once (~3-4 min on a 2-core CPU)",
    )
    m.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="every grid x window x causal mode x direction (x dtype on GPU); tens of minutes",
    )
    m.add_argument(
        "--tiny",
        action="store_const",
        dest="mode",
        const="tiny",
        help="seconds: tiny grids, for the smoke test (numbers mean nothing)",
    )
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu"
    )
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    ap.add_argument(
        "--providers",
        default=None,
        help="comma list of provider names, families or prefixes (e.g. nearby,full,axial,flex)",
    )
    ap.add_argument(
        "--cases",
        default=None,
        help="comma list of substrings of case names; 'a+b' needs both (e.g. video+raster,image)",
    )
    ap.add_argument(
        "--name",
        default=None,
        help="file stem of the outputs (default: the mode): to split a long run into several commands",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: one per physical core; --tiny: 1); recorded in the results",
    )
    ap.add_argument("--no-sweep", action="store_true", help="skip the scaling sweep")
    ap.add_argument("--no-plots", action="store_true", help="write no PNGs")
    ap.add_argument(
        "--no-check", action="store_true", help="skip the correctness gate (no speedups reported)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed repetitions per row")
    ap.add_argument("--list", action="store_true", help="list the cases and providers, run nothing")
    ap.add_argument(
        "--allow-interpreter",
        action="store_true",
        help="let nearby-triton run on CPU tensors under TRITON_INTERPRET=1 (very slow)",
    )
    args = ap.parse_args(argv)
    args.mode = args.mode or "quick"
    return args


def _split(arg: Optional[str]) -> Optional[List[str]]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; ``None`` -> ``None``."""
    if arg is None:
        return None
    return [s.strip() for s in arg.split(",") if s.strip()]


def _reject(option: str, bad: List[str], valid: List[str], hint: str = "") -> int:
    """Print why ``option`` was refused and the valid names; the CLI's exit status 2 (a usage error)."""
    print(
        f"python -m benchmarks.run: error: {option}: unknown "
        + ("name" if len(bad) == 1 else "names")
        + " "
        + ", ".join(repr(b) for b in bad)
        + (f" ({hint})" if hint else "")
        + f"\nvalid {option} names:\n  "
        + "\n  ".join(valid),
        file=sys.stderr,
    )
    return 2


def _threads_for(args) -> int:
    """``--threads``, else 1 for ``--tiny`` (tiny ops: one thread avoids OpenMP stalls), else one per
    physical core."""
    from .measure import physical_cores

    if args.threads is not None:
        return args.threads
    return 1 if args.mode == "tiny" else physical_cores()


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (2: a usage error, such as an unknown name). The
    process's torch thread count is restored on return (the function is also called in-process)."""
    before = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(before)


def _main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"python -m benchmarks.run: error: --threads must be >= 1; got {args.threads}", file=sys.stderr)
        return 2
    threads = _threads_for(args)
    torch.set_num_threads(threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = _NoBar

    from . import measure, report
    from .cases import CASE_SETS, select, sweep_cases, unmatched_patterns
    from .providers import all_providers, provider_names, select_providers, unknown_provider_patterns
    from .runner import Settings, run_case

    mode = args.mode
    case_pats, prov_pats = _split(args.cases), _split(args.providers)
    all_cases, all_sweep = CASE_SETS[mode](device), sweep_cases(mode, device)
    if case_pats is not None:
        bad = unmatched_patterns(all_cases + all_sweep, case_pats)
        if bad or not case_pats:
            return _reject(
                "--cases",
                bad or [args.cases],
                [c.name for c in all_cases + all_sweep],
                f"substrings of the --{mode} case names on {device}; 'a+b' needs both",
            )
    if prov_pats is not None:
        device_provs = all_providers(device, args.allow_interpreter)
        bad = unknown_provider_patterns(device_provs, prov_pats)
        if bad or not prov_pats:
            known = provider_names()
            return _reject(
                "--providers",
                bad or [args.providers],
                sorted({p.name for p in device_provs} | {p.family for p in device_provs}),
                "names, families or name prefixes"
                + (
                    f"; not on {device}: {', '.join(repr(b) for b in bad if b in known)}"
                    if any(b in known for b in bad)
                    else ""
                ),
            )
    cases = select(all_cases, case_pats)
    provs = select_providers(all_providers(device, args.allow_interpreter), prov_pats)
    sweep = [] if args.no_sweep else select(all_sweep, case_pats)
    if not cases and not sweep:
        print(
            "python -m benchmarks.run: error: nothing to run (--cases selects only sweep grids and "
            "--no-sweep drops them)",
            file=sys.stderr,
        )
        return 2
    sweep_provs = [  # full, axial and the fused nearby backends (not the oracle, not the shift variants)
        p
        for p in provs
        if p.family in ("full", "axial", "nearby")
        and p.name != "nearby-reference"
        and not getattr(p, "border_override", None)
    ]
    if args.list:
        print("cases:\n  " + "\n  ".join(c.name for c in cases))
        print("sweep:\n  " + "\n  ".join(c.name for c in sweep))
        print("providers:\n  " + "\n  ".join(f"{p.name}: {p.note}" for p in provs))
        return 0

    st = Settings(device=device, mode=mode, memory=not args.no_memory, check=not args.no_check, **MODES[mode])
    if device == "cuda":
        st.budget_s = GPU_BUDGET_S[mode]
    if args.budget is not None:
        st.budget_s = args.budget
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", measure.device_slug(device))

    t_start = time.time()
    meta = measure.environment(device, ROOT)
    meta["mode"] = mode
    meta["threads_source"] = (
        "--threads"
        if args.threads is not None
        else "--tiny default (1)"
        if mode == "tiny"
        else "default: one per physical core"
    )
    meta["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    mm_dtype = torch.float32 if device == "cpu" else torch.bfloat16

    def mm_rate(budget_s: float) -> dict:
        return measure.matmul_rate(device, mm_dtype, n=512 if mode == "tiny" else None, budget_s=budget_s)

    # The ceiling is measured at the start, briefly after every case and at the end; the best of all
    # counts, so that one measurement disturbed by load cannot inflate the "% of mm" column.
    meta["matmul"] = mm_rate(0.2 if mode == "tiny" else 1.0)
    meta["matmul_runs"] = [meta["matmul"]]
    mm = meta["matmul"]["gflops"]
    print(
        f"[benchmarks] {meta['device_name']}, {meta['threads']} threads, torch {torch.__version__}; "
        f"torch.mm ceiling {mm:.1f} GFLOP/s; {len(cases)} cases x {len(provs)} providers, "
        f"{len(sweep)} sweep grids -> {out_dir}",
        file=sys.stderr,
    )

    stem = args.name or mode
    gate: dict = {}
    reuse: dict = {}
    rows, sweep_rows = [], []
    total = len(cases) * len(provs) + len(sweep) * len(sweep_provs)
    with tqdm(total=total, desc="benchmarks", unit="row", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(msg):
            bar.set_postfix_str(msg[-70:], refresh=True)

        def checkpoint():
            # Partial results after every case, so a run that is killed (a time limit) keeps what it had.
            meta["partial"] = True
            report.write(out_dir, stem, meta, _case_dicts(cases), rows, sweep_rows)

        for c in cases:
            rows += run_case(c, provs, st, gate, progress, mm, reuse)
            if mode != "tiny":
                meta["matmul_runs"].append(mm_rate(0.3))
            bar.update(len(provs))
            checkpoint()
        for c in sweep:
            for r in run_case(c, sweep_provs, st, gate, progress, mm, reuse):
                r["tokens"] = c.tokens
                sweep_rows.append(r)
            bar.update(len(sweep_provs))
            checkpoint()
    meta["partial"] = False
    # The ceiling again at the end (the machine's load may have changed); the larger one counts.
    meta["matmul_runs"].append(mm_rate(0.2 if mode == "tiny" else 1.0))
    meta["matmul"] = max(meta["matmul_runs"], key=lambda m: m["gflops"])
    for r in rows + sweep_rows:
        if "useful_gflops" in r:
            r["frac_of_mm"] = r["useful_gflops"] / meta["matmul"]["gflops"]
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    meta["settings"] = {
        k: getattr(st, k)
        for k in ("budget_s", "min_reps", "max_reps", "slow_min_reps", "input_sets", "memory", "check")
    }
    case_dicts = _case_dicts(cases)
    paths = report.write(out_dir, stem, meta, case_dicts, rows, sweep_rows)
    if not args.no_plots:
        try:
            from . import plots
        except ImportError as e:
            print(f"[benchmarks] no plots: {e} (pip install matplotlib)", file=sys.stderr)
        else:
            paths.update(plots.write(out_dir, stem, meta, case_dicts, rows, sweep_rows))
    print(report.markdown(meta, case_dicts, rows, sweep_rows))
    print(
        f"[benchmarks] {meta['elapsed_s']} s; wrote " + ", ".join(os.path.relpath(p) for p in paths.values()),
        file=sys.stderr,
    )
    failed = [r for r in rows + sweep_rows if r.get("status") == "check failed"]
    if failed:
        print(
            "[benchmarks] correctness gate FAILED for: " + ", ".join(sorted({r["provider"] for r in failed})),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
