"""PNG plots of a run: time and memory vs tokens (log-log), and speedup bars."""

from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402


def _title(meta: Dict) -> str:
    return f"{meta['device_name']} ({meta['threads']} threads), torch {meta['versions']['torch']}"


def scaling_plot(meta: Dict, sweep: List[Dict], path: str) -> str:
    """Two panels: median time and peak extra memory vs tokens, one line per provider, log-log."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    provs = []
    for r in sweep:
        if r["provider"] not in provs:
            provs.append(r["provider"])
    for p in provs:
        pts = sorted(
            (r["tokens"], r) for r in sweep if r["provider"] == p and r.get("status") in ("ok", "unchecked")
        )
        if not pts:
            continue
        xs = [n for n, _ in pts]
        axes[0].plot(xs, [r["median_ms"] for _, r in pts], marker="o", label=p)
        mem = [(n, r.get("peak_mem_mib")) for n, r in pts if r.get("peak_mem_mib")]
        if mem:
            axes[1].plot([n for n, _ in mem], [m for _, m in mem], marker="o", label=p)
    toks = sorted({r["tokens"] for r in sweep})
    for ax, ylab in zip(axes, ("median time (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(toks)
        ax.set_xticklabels([f"{n:,}" for n in toks], rotation=30, fontsize=8)
        ax.set_xlabel("tokens (T x H x W)")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"window 3x3x3, forward — {_title(meta)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_plot(meta: Dict, cases: List[Dict], rows: List[Dict], path: str) -> str:
    """Grouped bars: speedup over the fastest full attention, per case and provider (log scale)."""
    provs = []
    for r in rows:
        if r.get("speedup_vs_full") is not None and not r.get("baseline") and r["provider"] not in provs:
            provs.append(r["provider"])
    names = [
        c["name"] for c in cases if any(r["case"] == c["name"] and r.get("speedup_vs_full") for r in rows)
    ]
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(names) * max(1, len(provs)) ** 0.5 + 3), 4.8))
    width = 0.8 / max(len(provs), 1)
    for j, p in enumerate(provs):
        ys = []
        for n in names:
            r = next((r for r in rows if r["case"] == n and r["provider"] == p), None)
            ys.append(r.get("speedup_vs_full") if r and r.get("speedup_vs_full") else 0)
        ax.bar([i + (j - (len(provs) - 1) / 2) * width for i in range(len(names))], ys, width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("speedup over full attention (x)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(_title(meta), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(
    out_dir: str, mode: str, meta: Dict, cases: List[Dict], rows: List[Dict], sweep: List[Dict]
) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    if sweep:
        paths["scaling"] = scaling_plot(meta, sweep, os.path.join(out_dir, f"{mode}-scaling.png"))
    if rows:
        paths["speedup"] = speedup_plot(meta, cases, rows, os.path.join(out_dir, f"{mode}-speedup.png"))
    return paths
