"""pytest-benchmark suite over the same cases and providers as ``python -m benchmarks.run``.

    pytest benchmarks/test_bench.py --benchmark-only                  # the --quick cases
    NUWA_BENCH_SET=full pytest benchmarks/test_bench.py --benchmark-only
    pytest benchmarks/test_bench.py --benchmark-only -k "video and nearby-cpu"
    pytest benchmarks/test_bench.py --benchmark-only --benchmark-json out.json

Each test skips with the provider's reason when it cannot run the case, and fails when the provider
does not pass the correctness gate (its output against the float64 expectation on the case's small
version) — a provider whose check fails is never timed. On CUDA each round is synchronised.
(Not collected by the default ``pytest`` run: ``testpaths`` is ``tests/``.)
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.cases import CASE_SETS
from benchmarks.providers import all_providers
from benchmarks.runner import _detached, check_provider, make_inputs

DEVICE = os.environ.get("NUWA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SET = os.environ.get("NUWA_BENCH_SET", "quick")
CASES = CASE_SETS[SET](DEVICE)
PROVIDERS = all_providers(DEVICE)
_gate: dict = {}


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bench(benchmark, case, provider):
    if provider.slow and not case.peers:
        pytest.skip("slow provider: only on the cases marked peers=True")
    inputs = make_inputs(case, DEVICE, seed=0)[0]
    ok, why = provider.can_run(case, DEVICE, *inputs)
    if not ok:
        pytest.skip(why)
    key = (provider.name, case.check_case())
    if key not in _gate:
        _gate[key] = check_provider(provider, case, DEVICE)
    gate = _gate[key]
    assert gate["ok"], f"correctness gate failed, not timing: {gate}"

    with torch.no_grad():
        args = _detached(provider.prepare(*inputs, case), case.backward)
    dout = None
    if case.backward:
        dout = torch.randn_like(provider.run(*args))

    def step():
        out = provider.run(*args)
        if case.backward:
            out.backward(dout)
            for t in args:
                t.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(
        case=case.name, provider=provider.name, tokens=case.tokens, threads=torch.get_num_threads()
    )
    rounds = 2 if provider.slow and DEVICE == "cpu" else 5
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    provider.release()
