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


def _case_label(c: Dict) -> str:
    """A short tick label on four lines: ``video`` / ``10x21x21`` / ``(3,3,3) raster`` / ``fwd+bwd``."""
    grid = "x".join(map(str, c["grid"]))
    win = ",".join(map(str, c["kernel_size"]))
    kind = c["label"].replace("nuwa-", "")
    causal = "" if c["causal"] == "noncausal" else f" {c['causal']}"
    extra = "" if c.get("dtype") in (None, "float32") else f" {c['dtype']}"
    return f"{kind}\n{grid}\n({win}){causal}\n{c['direction']}{extra}"


def speedup_plot(meta: Dict, cases: List[Dict], rows: List[Dict], path: str) -> str:
    """Grouped bars: speedup over the fastest full attention, per case and provider (log scale); see
    :func:`speedup_figure`."""
    fig = speedup_figure(meta, cases, rows)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def speedup_figure(meta: Dict, cases: List[Dict], rows: List[Dict]):
    """The figure of :func:`speedup_plot`.

    Each case gets as many bar slots as it has measured providers (so cases with two rows stay
    compact), one colour per provider, the value on every bar; short three-line tick labels; the
    legend below the axes, where it cannot cover a bar."""
    provs: List[str] = []
    for r in rows:
        if r.get("speedup_vs_full") is not None and not r.get("baseline") and r["provider"] not in provs:
            provs.append(r["provider"])
    groups = []  # (case, [(provider, speedup), ...])
    for c in cases:
        bars = []
        for p in provs:
            r = next((r for r in rows if r["case"] == c["name"] and r["provider"] == p), None)
            if r and r.get("speedup_vs_full"):
                bars.append((p, r["speedup_vs_full"]))
        if bars:
            groups.append((c, bars))
    gap = 1.2
    units = sum(len(b) for _, b in groups) + gap * max(len(groups) - 1, 0)
    rotate = len(groups) > 16  # beyond that the labels are slanted
    fig_w = min(max(8.0, 1.5 + 0.34 * units, 1.5 + 1.05 * len(groups)), 24.0)
    fig, ax = plt.subplots(figsize=(fig_w, 5.6))
    cmap = plt.get_cmap("tab10" if len(provs) <= 10 else "tab20")
    colour = {p: cmap(j % cmap.N) for j, p in enumerate(provs)}
    x, ticks, labelled = 0.0, [], set()
    ys_all = [1.0]
    for c, bars in groups:
        xs = [x + i for i in range(len(bars))]
        for xi, (p, y) in zip(xs, bars):
            b = ax.bar([xi], [y], 0.85, color=colour[p], label=None if p in labelled else p)
            labelled.add(p)
            ax.bar_label(b, labels=[f"{y:.3g}"], fontsize=7, padding=1, rotation=90)
            ys_all.append(y)
        ticks.append((xs[0] + xs[-1]) / 2)
        x = xs[-1] + 1 + gap
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylim(min(ys_all) / 1.6, max(ys_all) * 3.0)  # head room for the value labels
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        [_case_label(c) for c, _ in groups], fontsize=8, rotation=30 if rotate else 0,
        ha="right" if rotate else "center",
    )
    ax.set_xlim(-1, max(x - gap, 1))
    ax.set_ylabel("speedup over full attention (x, log)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(f"speedup over full attention (SDPA; causal SDPA for causal cases) — {_title(meta)}", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = [labels.index(p) for p in provs if p in labels]
    ax.legend(
        [handles[i] for i in order], [labels[i] for i in order], loc="upper center",
        bbox_to_anchor=(0.5, -0.36 if rotate else -0.2), ncol=min(len(order), 5), fontsize=9, frameon=False,
    )
    fig.tight_layout()
    return fig


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
