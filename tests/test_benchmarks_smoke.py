"""Smoke test of benchmarks/: the tiny run writes its outputs, every provider passes the gate.

Fast (well under a minute on 2 cores): tiny grids, 2 heads of 32, numbers that mean nothing.
"""

from __future__ import annotations

import json
import os
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
