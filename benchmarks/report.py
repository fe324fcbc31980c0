"""Markdown and JSON output of a benchmark run."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional


def _f(x, fmt="{:.3g}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return fmt.format(x)


def _ms(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _load(la) -> str:
    return "?" if not la else "/".join(f"{x:.1f}" for x in la)


def header(meta: Dict) -> str:
    v = meta["versions"]
    git = meta.get("git", {})
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [
        f"# nuwa-kernels benchmarks: {meta['device_name']} ({meta['device_slug']}), `--{meta['mode']}`",
        "",
        f"- date (UTC): {meta['date_utc']}; git commit: {git.get('commit') or '?'}"
        + (" (with uncommitted changes)" if git.get("dirty") else ""),
        f"- device: {meta['device']}, {meta['device_name']}; torch threads: {meta['threads']}"
        + (f" ({meta['threads_source']})" if meta.get("threads_source") else "")
        + f", {meta.get('physical_cores', '?')} physical cores, {meta['cpu_count']} logical CPUs; "
        f"load average (1, 5, 15 min) at start: "
        f"{_load(meta.get('load_average'))}, at end: {_load(meta.get('load_average_end'))}",
        f"- versions: {vers}",
        f"- command: `{meta.get('command', '')}`",
    ]
    if meta.get("partial"):
        lines.insert(1, "\n**Partial results: the run had not finished when this was written.**")
    mm = meta.get("matmul")
    if mm:
        runs = meta.get("matmul_runs") or [mm]
        lines.append(
            f"- GEMM ceiling: torch.mm {mm['dtype']} in this process, {mm['gflops']:.1f} GFLOP/s "
            f"({mm['n']}x{mm['n']}; the best of {len(runs)} measurements at the start, after each case "
            f"and at the end, each the fastest repetition on "
            + "/".join(mm.get("by_size", {str(mm["n"]): 0}))
            + " squares)"
        )
    lines.append(
        "- **median ms**: median over repetitions after warm-up. **speedup vs full**: the fastest "
        "full-attention row of the case that passed its check (SDPA; `is_causal=True` for causal cases) "
        "divided by this row. **useful GFLOP/s**: FLOPs the row's own function requires, over its "
        "median time: 4·D per allowed (query, key) pair and head forward (QKᵀ and PV), 12·D forward + "
        "backward (adds dV, dP, dQ, dK; the recomputation of QKᵀ that fused kernels do is not counted); "
        "allowed pairs are the window's for nearby rows, N² (N(N+1)/2 causal) for full attention, never "
        "the masked-out pairs a kernel also computes. **% of mm**: useful GFLOP/s over the GEMM ceiling. "
        "**peak mem**: extra memory at the call's peak beyond its inputs ("
        + ("CUDA allocator peak" if meta["device"] == "cuda" else "process RSS peak")
        + ")."
    )
    return "\n".join(lines)


def roofline_line(meta: Dict, rows: List[Dict]) -> Optional[str]:
    mm = meta.get("matmul")
    near = [r for r in _own_nearby(rows) if "useful_gflops" in r]
    if not mm or not near:
        return None
    best = max(near, key=lambda r: r["useful_gflops"])
    return (
        f"**Roofline**: torch.mm ceiling {mm['gflops']:.1f} GFLOP/s; best nearby-attention row reaches "
        f"{best['useful_gflops']:.1f} useful GFLOP/s = "
        f"{100 * best['useful_gflops'] / mm['gflops']:.1f}% of it "
        f"({best['provider']}, {best['case']})."
    )


def case_table(case: Dict, rows: List[Dict]) -> str:
    pct = case["useful_pairs_per_head"] / case["tokens"] ** 2 * 100
    title = (
        f"### {case['name']}\n\n{case['tokens']:,} tokens, window {tuple(case['kernel_size'])}, "
        f"{case['causal']}, {case['direction']}, {case['dtype']}, "
        f"batch {case['batch']} x {case['heads']} heads x D {case['head_dim']}; "
        f"allowed pairs per head {case['useful_pairs_per_head']:,} ({pct:.2f}% of N²)"
        + (
            f"; Triton schedule computes {case['triton_tile_ratio']:.2f}x the allowed pairs"
            if case.get("triton_tile_ratio")
            else ""
        )
        + "\n"
    )
    head = (
        "| provider | median ms | p20–p80 ms | speedup vs full | useful GFLOP/s | % of mm | peak mem MiB "
        "| check rel. err | note |"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|---|---|"
    lines = [title, head, sep]
    skipped = []
    for r in rows:
        if "median_ms" not in r:
            skipped.append(f"- {r['provider']}: {r.get('status')}: {r.get('reason', '')}")
            continue
        chk = r.get("check") or {}
        err = _f(chk.get("err"), "{:.1e}")
        if chk.get("grad_err") is not None:
            err += f" / grad {chk['grad_err']:.1e}"
        if r.get("status") != "ok":
            err = f"**{r.get('status')}** {err}"
        note = []
        if r.get("tile_ratio") is not None:
            note.append(f"tile ratio {_f(r['tile_ratio'], '{:.2f}')}")
        if r.get("speedup_baseline") == r["provider"]:
            note.append("baseline")
        if r.get("reused_from"):
            note.append("window-independent: measured once per grid")
        lines.append(
            f"| {r['provider']} | {_ms(r['median_ms'])} | {_ms(r.get('p20_ms'))}–{_ms(r.get('p80_ms'))} | "
            f"{_f(r.get('speedup_vs_full'), '{:.2f}x')} | {_f(r.get('useful_gflops'), '{:.1f}')} | "
            f"{_f(r.get('frac_of_mm') and 100 * r['frac_of_mm'], '{:.1f}')} | "
            f"{_f(r.get('peak_mem_mib'), '{:.1f}')} | "
            f"{err} | {', '.join(n for n in note if n)} |"
        )
    if skipped:
        lines += ["", "Not timed:", *skipped]
    return "\n".join(lines)


def sweep_table(sweep: List[Dict]) -> str:
    provs = []
    for r in sweep:
        if r["provider"] not in provs and "median_ms" in r:
            provs.append(r["provider"])
    toks = sorted({r["tokens"] for r in sweep})
    lines = [
        "## Scaling sweep (window 3x3x3, non-causal, forward): median ms / peak MiB",
        "",
        "| tokens | " + " | ".join(provs) + " |",
        "|---:|" + "---:|" * len(provs),
    ]
    for n in toks:
        cells = []
        for p in provs:
            r = next((r for r in sweep if r["tokens"] == n and r["provider"] == p), None)
            if r is None or "median_ms" not in r:
                cells.append("–")
            else:
                mem = r.get("peak_mem_mib")
                cells.append(
                    f"{_ms(r['median_ms'])} / {_f(mem, '{:.0f}')}"
                    + ("" if r.get("status") == "ok" else " (!)")
                )
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _own_nearby(rows: List[Dict]) -> List[Dict]:
    """Checked nearby rows with the case's own semantics: not the oracle, not the border="shift" rows."""
    return [
        r
        for r in rows
        if r.get("family") == "nearby"
        and r.get("status") == "ok"
        and r["provider"] != "nearby-reference"
        and not r["provider"].endswith("-shift")
    ]


def _short_case(c: Dict) -> str:
    grid = "x".join(map(str, c["grid"]))
    win = ",".join(map(str, c["kernel_size"]))
    kind = c["label"].replace("nuwa-", "")
    extra = "" if (c["heads"], c["head_dim"], c["batch"]) == (8, 64, 1) else (
        f", b{c['batch']} h{c['heads']} d{c['head_dim']}"
    )
    return f"{kind} {grid}, ({win}), {c['causal']}, {c['dtype']}{extra}"


def gemm_table(meta: Dict, cases: List[Dict], rows: List[Dict]) -> Optional[str]:
    """Per case (grid, window, causal mode, dtype): the fastest nearby backend's time, useful GFLOP/s,
    share of the GEMM ceiling and speedup over full attention, forward and forward + backward side by
    side."""
    mm = (meta.get("matmul") or {}).get("gflops")
    groups: Dict[tuple, Dict[str, Dict]] = {}
    order: List[tuple] = []
    for c in cases:
        key = (_short_case(c), c["border"])
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key][c["direction"]] = c
    lines = [
        "## Nearby attention against the GEMM ceiling and full attention",
        "",
        "The fastest checked nearby backend per case. GFLOP/s are useful FLOPs (4·D per allowed pair "
        "forward, 12·D forward + backward); % of mm is their share of the torch.mm ceiling"
        + (f" ({mm:.1f} GFLOP/s)" if mm else "")
        + "; speedup is over full attention (causal SDPA for the causal cases), same process.",
        "",
        "| case | backend | fwd ms | fwd GFLOP/s | fwd % of mm | fwd speedup "
        "| fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd % of mm | fwd+bwd speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    any_row = False
    for key in order:
        cells, backends = [], []
        for direction in ("fwd", "fwd+bwd"):
            c = groups[key].get(direction)
            near = _own_nearby([r for r in rows if c and r["case"] == c["name"]])
            if not near:
                cells += ["–"] * 4
                continue
            any_row = True
            best = min(near, key=lambda r: r["median_ms"])
            backends.append(best["provider"].replace("nearby-", ""))
            cells += [
                _ms(best["median_ms"]),
                _f(best.get("useful_gflops"), "{:.1f}"),
                _f(best.get("frac_of_mm") and 100 * best["frac_of_mm"], "{:.0f}%"),
                _f(best.get("speedup_vs_full"), "{:.1f}x"),
            ]
        name = key[0] + ("" if key[1] == "truncate" else f", border={key[1]}")
        lines.append(f"| {name} | {'/'.join(dict.fromkeys(backends)) or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if any_row else None


def over_ceiling_note(rows: List[Dict]) -> Optional[str]:
    """A warning when a row's useful rate exceeds the GEMM ceiling (a disturbed measurement)."""
    over = sorted({r["provider"] for r in rows if (r.get("frac_of_mm") or 0) > 1.0})
    if not over:
        return None
    return (
        "**Warning**: rows of " + ", ".join(over) + " exceed 100% of the GEMM ceiling, which no "
        "attention kernel can: the machine was busy during a measurement. Rerun on a quiet machine."
    )


def load_note(meta: Dict) -> Optional[str]:
    """A warning when the 1-minute load average at the start or the end exceeds the cores + 1: other
    work competed for the cores, so times are inflated and the GEMM ceiling may read low."""
    cores = meta.get("physical_cores") or meta.get("cpu_count")
    loads = [la[0] for la in (meta.get("load_average"), meta.get("load_average_end")) if la]
    if meta.get("device") != "cpu" or not cores or not loads or max(loads) <= cores + 1:
        return None
    return (
        f"**Warning**: the load average reached {max(loads):.1f} on {cores} cores: other work competed "
        "for the CPU during this run, so times and shares of the GEMM ceiling are unreliable. Rerun on a "
        "quiet machine before quoting them."
    )


def summary_table(cases: List[Dict], rows: List[Dict]) -> Optional[str]:
    """One line per case: the fastest checked nearby row, the full-attention baseline, the fastest
    other checked row (axial, masked, Flex, NATTEN, nuwa-pytorch)."""
    lines = [
        "## Summary",
        "",
        "| case | fastest nearby | ms | full attention ms | speedup | fastest other | ms |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    any_row = False
    for c in cases:
        rs = [r for r in rows if r["case"] == c["name"] and r.get("status") == "ok"]
        near = _own_nearby(rs)
        if not near:
            continue
        any_row = True
        best = min(near, key=lambda r: r["median_ms"])
        base = next((r for r in rs if r["provider"] == best.get("speedup_baseline")), None)
        others = [r for r in rs if r["family"] not in ("nearby", "full")]
        other = min(others, key=lambda r: r["median_ms"]) if others else None
        lines.append(
            f"| {c['name']} | {best['provider']} | {_ms(best['median_ms'])} | "
            f"{_ms(base['median_ms']) if base else '–'} | {_f(best.get('speedup_vs_full'), '{:.2f}x')} | "
            f"{other['provider'] if other else '–'} | {_ms(other['median_ms']) if other else '–'} |"
        )
    return "\n".join(lines) if any_row else None


def markdown(meta: Dict, cases: List[Dict], rows: List[Dict], sweep: List[Dict]) -> str:
    parts = [header(meta), ""]
    rl = roofline_line(meta, rows)
    if rl:
        parts += [rl, ""]
    for note in (load_note(meta), over_ceiling_note(rows + sweep)):
        if note:
            parts += [note, ""]
    gemm = gemm_table(meta, cases, rows)
    if gemm:
        parts += [gemm, ""]
    summ = summary_table(cases, rows)
    if summ:
        parts += [summ, ""]
    for c in cases:
        parts += [case_table(c, [r for r in rows if r["case"] == c["name"]]), ""]
    if sweep:
        parts += [sweep_table(sweep), ""]
    legend = {}
    for r in rows + sweep:
        if r.get("note"):
            legend[r["provider"]] = r["note"]
    if legend:
        parts += ["Providers:", *[f"- `{k}`: {v}" for k, v in legend.items()], ""]
    return "\n".join(parts)


def write(
    out_dir: str, mode: str, meta: Dict, cases: List[Dict], rows: List[Dict], sweep: List[Dict]
) -> Dict[str, str]:
    """Write ``<mode>.json`` and ``<mode>.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{mode}.json"), "md": os.path.join(out_dir, f"{mode}.md")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "cases": cases, "results": rows, "sweep": sweep}, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(meta, cases, rows, sweep))
    return paths
