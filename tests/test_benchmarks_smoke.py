"""Smoke test of benchmarks/: the tiny run writes its outputs, every provider passes the gate.

Fast (well under a minute on 2 cores): tiny grids, 2 heads of 32, numbers that mean nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import run  # noqa: E402
from benchmarks.cases import FRAME_CAUSAL, Case, tiny_cases, window_pairs  # noqa: E402
import nuwa_kernels  # noqa: E402
from benchmarks.providers import Provider, all_providers, tile_stats  # noqa: E402
from benchmarks.runner import Settings, check_provider, run_case  # noqa: E402
from nuwa_kernels.window import make_window_spec, window_mask  # noqa: E402

DEVICE = "cpu"


@pytest.mark.parametrize(
    "grid,ks,causal,border",
    [
        ((1, 5, 7), (1, 3, 3), False, "truncate"),
        ((4, 5, 6), (3, 3, 3), True, "truncate"),
        ((4, 5, 6), (3, 2, 5), True, "shift"),
        ((4, 5, 6), (3, 3, 3), FRAME_CAUSAL, "truncate"),
        ((5, 4, 3), (2, 3, 4), (False, True, True), "shift"),
        ((3, 4, 5), (None, 1, 1), False, "truncate"),
    ],
    ids=["image", "raster", "raster-shift-even", "frame", "axes-ftt-shift", "text-preset"],
)
def test_window_pairs_matches_mask(grid, ks, causal, border):
    spec = make_window_spec(grid, grid, ks, causal, border)
    assert window_pairs(grid, ks, causal, border) == int(window_mask(spec).sum())
    stats = tile_stats(Case("t", grid, spec.kernel_size, causal, border=border))
    if "tile_useful" in stats:  # the Triton planner counts the same pairs
        assert stats["tile_useful"] == window_pairs(grid, ks, causal, border)


def test_tiny_run_writes_outputs(tmp_path, capsys):
    rc = run.main(
        [
            "--tiny",
            "--device",
            DEVICE,
            "--out",
            str(tmp_path),
            "--providers",
            "nearby-cpu,nearby-reference,full,axial,masked",
        ]
    )
    assert rc == 0
    names = ["tiny.json", "tiny.md"]
    try:
        import matplotlib  # noqa: F401

        names += ["tiny-scaling.png", "tiny-speedup.png"]
    except ImportError:
        pass
    for name in names:
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "tiny.json").read_text())
    meta = data["meta"]
    for key in ("device_name", "threads", "date_utc", "git", "versions", "matmul"):
        assert key in meta
    assert meta["versions"]["torch"] == torch.__version__
    assert {c["name"] for c in data["cases"]} == {c.name for c in tiny_cases(DEVICE)}
    rows = data["results"]
    assert rows and all(r["status"] in ("ok", "skipped", "error") for r in rows), rows
    timed = [r for r in rows if r["status"] == "ok"]
    assert {r["family"] for r in timed} >= {"nearby", "full", "axial", "masked"}
    for r in timed:
        assert r["median_ms"] > 0 and r["check"]["ok"] and r["useful_gflops"] > 0
        assert r["speedup_vs_full"] > 0
    assert data["sweep"] and all(r["tokens"] > 0 for r in data["sweep"])
    out = capsys.readouterr().out
    assert "| provider | median ms" in out and "Scaling sweep" in out and "Roofline" in out


_CASES = {
    "image": Case("tiny", (1, 6, 6), (1, 3, 3), False, heads=2, head_dim=32),
    "noncausal": Case("tiny", (3, 5, 5), (3, 3, 3), False, heads=2, head_dim=32),
    "raster": Case("tiny", (3, 5, 5), (3, 3, 3), True, heads=2, head_dim=32),
    "frame-bwd": Case("tiny", (3, 5, 5), (3, 3, 3), FRAME_CAUSAL, heads=2, head_dim=32, backward=True),
}


# allow_interpreter: nearby-triton runs under TRITON_INTERPRET=1 (set by conftest.py without a GPU).
_PROVIDERS = {p.name: p for p in all_providers(DEVICE, allow_interpreter=True)}


@pytest.mark.parametrize("provider", list(_PROVIDERS))
@pytest.mark.parametrize("case", list(_CASES), ids=list(_CASES))
def test_provider_agrees_with_reference(provider, case):
    """The correctness gate itself: each provider that can run the case matches its float64
    expectation (the reference backend with the provider's semantics)."""
    c = _CASES[case]
    if provider == "flex" and case != "image":
        pytest.skip("FlexAttention compiles per mask (~10 s each on 2 cores): one case is enough here")
    p = _PROVIDERS[provider]
    ok, why = p.can_run(c, DEVICE)
    if not ok:
        pytest.skip(why)
    res = check_provider(p, c, DEVICE)
    assert res["ok"], res


class _WrongWindow(Provider):
    """A provider that computes the wrong function (a 1x1x1 window): the gate must stop it."""

    name = "wrong-window"
    family = "nearby"

    def run(self, q, k, v):
        return nuwa_kernels.nearby_attention(q, k, v, kernel_size=1, backend="reference")


def test_gate_refuses_a_wrong_provider():
    case = Case("tiny", (2, 5, 5), (3, 3, 3), False, heads=2, head_dim=32)
    provs = [p for p in all_providers(DEVICE) if p.name in ("nearby-reference", "full-sdpa")] + [
        _WrongWindow()
    ]
    st = Settings(device=DEVICE, mode="tiny", budget_s=0.01, min_reps=1, max_reps=2)
    rows = {r["provider"]: r for r in run_case(case, provs, st)}
    bad = rows["wrong-window"]
    assert bad["status"] == "check failed" and not bad["check"]["ok"]
    assert "speedup_vs_full" not in bad
    assert rows["nearby-reference"]["status"] == "ok" and rows["nearby-reference"]["speedup_vs_full"] > 0


@pytest.mark.parametrize(
    "argv,valid",
    [
        (["--providers", "nosuch"], "nearby-cpu"),
        (["--providers", "nearby-cpu,nosuch"], "full-sdpa"),
        (["--cases", "nosuch"], "nuwa-video-10x21x21-w3x3x3-noncausal-fwd-float32"),
        (["--cases", "video+nosuch"], "nuwa-image-1x21x21-w1x3x3-noncausal-fwd-float32"),
        (["--providers", ","], "axial-sdpa"),
    ],
    ids=["provider", "one-bad-provider", "case", "case-and", "empty"],
)
def test_cli_rejects_unknown_names(argv, valid, capsys):
    """A typo in a name list is a usage error (exit 2) whose message lists the valid names, not an
    exit 0 with empty tables."""
    rc = run.main(["--device", DEVICE, "--list", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "unknown" in err and valid in err


def test_cli_typo_exits_nonzero_in_a_subprocess():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--device", DEVICE, "--cases", "vidoe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "'vidoe'" in proc.stderr and "valid --cases names" in proc.stderr


def test_default_threads_one_per_core(tmp_path, monkeypatch):
    """Without --threads a (non-tiny) run uses one thread per physical core and records it, with the
    CPU model, in the JSON and the Markdown."""
    from benchmarks import measure

    before = torch.get_num_threads()
    try:
        rc = run.main(
            [
                "--quick", "--device", DEVICE, "--out", str(tmp_path), "--providers", "nearby-cpu",
                "--cases", "nuwa-image+fwd-", "--no-sweep", "--no-plots", "--no-memory", "--budget", "0.01",
            ]
        )
        assert rc == 0
        meta = json.loads((tmp_path / "quick.json").read_text())["meta"]
        assert meta["threads"] == measure.physical_cores()
        assert torch.get_num_threads() == before  # restored when main returns
        assert meta["threads_source"].startswith("default")
        assert meta["cpu_model"] == measure.cpu_model()
        md = (tmp_path / "quick.md").read_text()
        assert f"torch threads: {meta['threads']}" in md and meta["cpu_model"] in md
        assert "against the GEMM ceiling" in md and "fwd % of mm" in md
    finally:
        torch.set_num_threads(before)


def test_useful_flops_convention():
    """4·D per allowed pair forward; forward + backward adds dV, dP, dQ, dK (8·D), not the recomputed
    QKᵀ."""
    from benchmarks.cases import attention_flops, full_pairs

    assert attention_flops(10, 64, 8, 2, backward=False) == 4 * 64 * 10 * 8 * 2
    assert attention_flops(10, 64, 8, 2, backward=True) == 12 * 64 * 10 * 8 * 2
    assert full_pairs(4, False) == 16 and full_pairs(4, True) == 10


def test_speedup_plot_layout():
    """The legend lies outside the axes (it cannot hide bars), tick labels do not overlap, every
    bar carries its value."""
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    provs = ["nearby-cpu", "axial-sdpa", "masked-sdpa", "flex", "natten", "nuwa-pytorch", "nearby-cpu-shift"]
    cases, rows = [], []
    shapes = [((1, 21, 21), (1, 3, 3), False), ((10, 21, 21), (3, 3, 3), False),
              ((10, 21, 21), (7, 7, 7), True)]
    for i, (grid, ks, causal) in enumerate(shapes * 3):
        c = Case(f"nuwa-video{i}", grid, ks, causal, backward=i % 2 == 1).to_dict()
        cases.append(c)
        rows.append({"case": c["name"], "provider": "full-sdpa", "baseline": True, "speedup_vs_full": 1.0})
        for j, p in enumerate(provs if i == 1 else provs[:2]):
            rows.append({"case": c["name"], "provider": p, "speedup_vs_full": 0.1 * (j + 1) * (i + 1)})
    meta = {"device_name": "test", "threads": 1, "versions": {"torch": torch.__version__}}
    fig = plots.speedup_figure(meta, cases, rows)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.y1 <= ax.get_window_extent(renderer).y0, "the legend overlaps the axes"
        labels = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) == len(cases)
        for a, b in zip(labels, labels[1:]):
            assert a.x1 <= b.x0, "tick labels overlap"
        assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 7
        n_bars = sum(1 for r in rows if not r.get("baseline"))
        assert sum(len(c.datavalues) for c in ax.containers) == n_bars
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_report_flags_shares_above_the_ceiling():
    """A useful rate above the GEMM ceiling cannot be real: the report says the machine was busy."""
    from benchmarks import report

    rows = [{"provider": "full-sdpa", "frac_of_mm": 1.32}, {"provider": "nearby-cpu", "frac_of_mm": 0.3}]
    note = report.over_ceiling_note(rows)
    assert note and "full-sdpa" in note and "nearby-cpu" not in note
    assert report.over_ceiling_note(rows[1:]) is None


def test_report_flags_a_busy_machine():
    from benchmarks import report

    meta = {"device": "cpu", "physical_cores": 2, "cpu_count": 2, "load_average": [1.2, 1, 1]}
    assert report.load_note(dict(meta, load_average_end=[2.5, 2, 1])) is None
    assert "10.8" in report.load_note(dict(meta, load_average_end=[10.8, 9, 5]))


def test_stride_tiles_benchmark_schedule(tmp_path):
    """benchmarks/stride_tiles.py: the schedule table, and the issue-10 target it documents
    (HunyuanVideo's grid with window (18, 24, 24) at the aligned stride: computed / useful <= 1.10)."""
    import json

    from benchmarks import stride_tiles

    assert stride_tiles.main(["--no-timing", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "stride_tiles.json").read_text())
    hunyuan = [r for r in data["schedule"] if r["case"].startswith("HunyuanVideo")]
    assert hunyuan and all(r["aligned_ratio"] <= 1.10 and r["uniform"] for r in hunyuan)
    assert all(r["exact_ratio"] >= 1.0 for r in data["schedule"])
    assert "stride = tile" in (tmp_path / "stride_tiles.md").read_text()


def test_gpu_profile_rows(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_profile.py's row pipeline on the CPU (its CUDA timers and profiler stubbed): every
    row timed, errors against the reference provider, FLOPs from the provider's own pairs, JSON out."""
    import benchmarks.gpu_profile as gp
    from benchmarks import measure

    case = Case("nuwa-video", (2, 4, 5), (3, 3, 3), False, heads=2, head_dim=16)
    monkeypatch.setattr(gp, "DEVICE", "cpu")
    monkeypatch.setattr(gp, "REFERENCE_PROVIDER", "nearby-reference")
    monkeypatch.setattr(gp, "profile_sets", lambda: {"nuwa": [case], "hunyuan": [case]})

    def fake_timer(fn, **kw):  # runs the call, reports 0.5 ms
        fn()
        return measure._summary([0.5] * 3)

    monkeypatch.setattr(gp.measure, "time_cuda", fake_timer)
    monkeypatch.setattr(gp, "kernel_time", lambda step, iters: {"kernel_ms": 0.2, "kernels": []})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    out = tmp_path / "profile.json"
    assert gp.main(["--sets", "nuwa", "--providers", "cpu,reference", "--candidates", "--candidates-sets",
                    "nuwa", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cand = [r for r in rows if r["provider"].startswith("nearby-triton-large-")]
    assert len(cand) == len(gp.CANDIDATES) and all(r["status"] in ("ok", "skipped") for r in cand)
    cpu_row = next(r for r in rows if r["provider"] == "nearby-cpu")
    assert cpu_row["status"] == "ok" and cpu_row["rel_err_vs_cuda"] < 1e-5
    assert cpu_row["host_ms"] == pytest.approx(0.3)
    pairs = window_pairs(case.grid, case.kernel_size)
    assert cpu_row["useful_tflops"] == pytest.approx(4 * 16 * pairs * 2 / 0.5e-3 / 1e12)
    with pytest.raises(SystemExit):
        gp.main(["--sets", "nope"])
    hunyuan = Case("hunyuan", (2, 2, 2), 3, backward=True)
    names = [p.name for p in gp.make_providers(["triton", "cuda", "cudnn"], hunyuan)]
    assert names == ["nearby-triton", "full-sdpa-cudnn"]


@pytest.mark.parametrize("layout", [[], ["--heads-contiguous"], ["--dtype", "bfloat16"]])
def test_cpu_gemm_rate_runs(layout, capsys):
    """benchmarks/cpu_gemm_rate.py on a tiny grid, both input layouts and a half dtype: a line per case with
    the share of torch.mm, forward and forward+backward (the script issue 13's figures come from)."""
    if "cpu" not in nuwa_kernels.available_backends():
        pytest.skip("the fused CPU kernel is not built")
    from benchmarks import cpu_gemm_rate

    cpu_gemm_rate.main(["--grid", "2,5,6", "--heads", "2", "--dim", "16", "--reps", "1", "--no-sdpa", "--bwd",
                        "--cases", "133,333c"] + layout)
    out = capsys.readouterr().out
    assert ("heads contiguous" in out) == ("--heads-contiguous" in layout)
    assert ("inputs bfloat16" in out) == ("bfloat16" in layout)
    lines = [ln for ln in out.splitlines() if " fwd " in ln]
    assert [ln.split()[0] for ln in lines] == ["133", "333c"]
    for ln in lines:
        assert "% of mm" in ln and "fwd+bwd" in ln


def test_cpu_gemm_rate_input_sets(monkeypatch, capsys):
    """--input-sets N: the timed calls take N independent input sets in turn (inputs from memory instead of the
    last call's caches), said in the header; fewer than one set is refused."""
    if "cpu" not in nuwa_kernels.available_backends():
        pytest.skip("the fused CPU kernel is not built")
    from benchmarks import cpu_gemm_rate

    rot = cpu_gemm_rate.Rotation(["a", "b", "c"])
    assert [rot.next() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    seen = {False: [], True: []}  # the (query, key, value) storages of the calls, by requires_grad
    real = nuwa_kernels.nearby_attention

    def spy(q, k, v, **kw):
        seen[q.requires_grad].append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(cpu_gemm_rate.nuwa_kernels, "nearby_attention", spy)
    cpu_gemm_rate.main(["--grid", "2,5,6", "--heads", "2", "--dim", "16", "--reps", "3", "--no-sdpa", "--bwd",
                        "--cases", "133", "--input-sets", "2"])
    for calls in seen.values():  # two sets in turn, each its own tensors
        assert len(set(calls)) == 2 and len({p for c in calls for p in c}) == 6
        assert all(calls[i] != calls[i + 1] for i in range(len(calls) - 1))
    out = capsys.readouterr().out
    assert "2 input sets in turn" in out
    lines = [ln for ln in out.splitlines() if " fwd " in ln]
    assert len(lines) == 1 and "% of mm" in lines[0] and "fwd+bwd" in lines[0]
    with pytest.raises(SystemExit):
        cpu_gemm_rate.main(["--input-sets", "0"])


def test_cpu_read_bound_runs(tmp_path, capsys):
    """benchmarks/cpu_read_bound.py on a tiny grid: the read-pattern stand-in builds, runs in both layouts
    with and without prefetches, and prints a time per layout beside the fused forward's; the stand-in
    refuses bad arguments instead of running them."""
    if "cpu" not in nuwa_kernels.available_backends():
        pytest.skip("the fused CPU kernel is not built")
    from benchmarks import cpu_read_bound

    if not cpu_read_bound.has_avx512() or cpu_read_bound.compiler() is None:
        pytest.skip("the read-pattern stand-in needs an AVX-512 CPU and a C compiler")
    cpu_read_bound.main(["--grid", "2,5,7", "--heads", "2", "--dim", "32", "--fmas", "0,64", "--reps", "2",
                         "--rounds", "1"])
    out = capsys.readouterr().out
    for label in ("no prefetch, 0 FMAs", "read pattern, prefetch, 0 FMAs", "read pattern, prefetch, 64 FMAs",
                  "all heads per block, prefetch, 64 FMAs", "fused forward (1,3,3)"):
        line = next(ln for ln in out.splitlines() if label in ln)
        times = [float(x) for x in re.findall(r"([0-9.]+) ms", line)]
        assert len(times) == 2 and all(t > 0 for t in times), line
    exe = cpu_read_bound.build(str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError):
        cpu_read_bound.run_pattern(exe, 70, 2, 24, 8, 0, 0, 1, True, 1)  # a head dim not in whole vectors
    assert cpu_read_bound.run_pattern(exe, 70, 2, 32, 8, 0, 16, 1, True, 1, all_heads=True) > 0


def test_cpu_read_bound_overlap_runs(tmp_path, capsys):
    """cpu_read_bound --overlap: prefetch_overlap.c builds and prints a time for both FMA operands and every
    schedule (FMAs alone, prefetches alone, burst, chunks); it refuses bad arguments."""
    from benchmarks import cpu_read_bound

    if not cpu_read_bound.has_avx512() or cpu_read_bound.compiler() is None:
        pytest.skip("the stand-in needs an AVX-512 CPU and a C compiler")
    exe = cpu_read_bound.build(str(tmp_path), source=cpu_read_bound.OVERLAP_SOURCE)
    table = cpu_read_bound.run_overlap(exe, 70, 2, 48, 1, 1)
    schedules = {"fmas-only", "prefetch-only", "burst", "chunks-48", "chunks-24", "chunks-16", "chunks-8",
                 "chunks-4"}
    assert set(table) == {"registers", "l1-loads"} and all(set(row) == schedules for row in table.values())
    assert all(t > 0 for row in table.values() for t in row.values())
    with pytest.raises(subprocess.CalledProcessError):
        cpu_read_bound.run_overlap(exe, 0, 2, 48, 1, 1)
    cpu_read_bound.main(["--overlap", "--grid", "2,5,7", "--heads", "2", "--fmas", "0,24", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith(("registers", "l1-loads"))]
    assert len(rows) == 2 and all(len(re.findall(r"[0-9]+\.[0-9]{3}", ln)) == 8 for ln in rows), out
