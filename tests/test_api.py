"""The public API: bad input (contract section 9), dispatch, autocast, empty inputs."""

from __future__ import annotations

import pytest
import torch

import nuwa_kernels as nk
from nuwa_kernels.backends import ENV_VAR
from oracle import TOLERANCE, oracle_attention, random_grid_inputs, rel_err


def grid_inputs(B=1, grid=(2, 3, 4), heads=2, heads_kv=2, D=8, dtype=torch.float32):
    return random_grid_inputs(B, grid, grid, heads, heads_kv, D, dtype=dtype)


def call(q, k, v, **kw):
    kw.setdefault("backend", "reference")
    return nk.nearby_attention(q, k, v, **kw)


# ------------------------------------------------------------------ bad tensors
def _bad_tensor_cases():
    q, k, v = grid_inputs()
    r = torch.randn
    return [
        ("q-ndim", (q[0], k, v), ValueError, "query"),
        ("k-ndim", (q, k[0], v), ValueError, "key"),
        ("v-ndim", (q, k, v.unsqueeze(0)), ValueError, "value"),
        ("batch", (q, r(2, 2, 3, 4, 2, 8), r(2, 2, 3, 4, 2, 8)), ValueError, "batch"),
        ("head-dim", (q, r(1, 2, 3, 4, 2, 4), v), ValueError, "head_dim"),
        ("dv", (q, k, r(1, 2, 3, 4, 2, 4)), ValueError, "value"),
        ("kv-grid", (q, k, r(1, 2, 3, 5, 2, 8)), ValueError, "value"),
        ("kv-heads", (q, k, r(1, 2, 3, 4, 1, 8)), ValueError, "value"),
        ("gqa", (r(1, 2, 3, 4, 3, 8), k, v), ValueError, "heads"),
        ("dtype-mix", (q, k.double(), v), TypeError, "dtype"),
        ("int", (q.long(), k.long(), v.long()), TypeError, "floating"),
        ("complex", (q.to(torch.complex64), k, v), TypeError, "floating"),
        ("bool", (q > 0, k, v), TypeError, "floating"),
        ("not-tensor", (q.tolist(), k, v), TypeError, "query"),
        ("device", (q, k.to("meta"), v), ValueError, "device"),
        ("empty-key-grid", (q, r(1, 0, 3, 4, 2, 8), r(1, 0, 3, 4, 2, 8)), ValueError, "key grid"),
        ("zero-head-dim", (r(1, 2, 3, 4, 2, 0), r(1, 2, 3, 4, 2, 0), r(1, 2, 3, 4, 2, 0)), ValueError, "head_dim"),
    ]


@pytest.mark.parametrize("case", _bad_tensor_cases(), ids=lambda c: c[0])
def test_bad_tensors(case):
    _, args, exc, match = case
    with pytest.raises(exc, match=match):
        call(*args)


# ------------------------------------------------------------------ bad arguments
BAD_ARGS = [
    ("kernel-zero", dict(kernel_size=0), ValueError, "kernel_size"),
    ("kernel-negative", dict(kernel_size=-3), ValueError, "kernel_size"),
    ("kernel-float", dict(kernel_size=3.0), TypeError, "kernel_size"),
    ("kernel-str", dict(kernel_size="3"), TypeError, "kernel_size"),
    ("kernel-bool", dict(kernel_size=True), TypeError, "kernel_size"),
    ("kernel-len2", dict(kernel_size=(3, 3)), ValueError, "kernel_size"),
    ("kernel-len4", dict(kernel_size=(3, 3, 3, 3)), ValueError, "kernel_size"),
    ("kernel-inner-zero", dict(kernel_size=(3, 0, 3)), ValueError, "kernel_size"),
    ("kernel-inner-float", dict(kernel_size=(3, 1.5, 3)), TypeError, "kernel_size"),
    ("border", dict(border="reflect"), ValueError, "border"),
    ("border-none", dict(border=None), ValueError, "border"),
    ("causal-len2", dict(causal=(True, False)), ValueError, "causal"),
    ("causal-int", dict(causal=1), TypeError, "causal"),
    ("causal-str", dict(causal="raster"), TypeError, "causal"),
    ("causal-ints", dict(causal=(1, 0, 0)), ValueError, "causal"),
    ("scale-str", dict(scale="0.1"), TypeError, "scale"),
    ("scale-nan", dict(scale=float("nan")), ValueError, "scale"),
    ("backend", dict(backend="flash"), ValueError, "backend"),
    ("return-lse", dict(return_lse="yes"), TypeError, "return_lse"),
]


@pytest.mark.parametrize("case", BAD_ARGS, ids=lambda c: c[0])
def test_bad_arguments(case):
    _, kw, exc, match = case
    q, k, v = grid_inputs()
    with pytest.raises(exc, match=match):
        call(q, k, v, **kw)


def test_raster_causal_needs_equal_grids():
    q = torch.randn(1, 2, 3, 4, 2, 8)
    k = torch.randn(1, 2, 3, 2, 2, 8)
    with pytest.raises(ValueError, match="causal"):
        call(q, k, k, causal=True)
    call(q, k, k, causal=(True, True, True))  # per-axis causality is fine across grids


SDPA_BAD = [
    ("grid-product", dict(grid=(2, 3, 5)), ValueError, "grid"),
    ("grid-len", dict(grid=(6, 4)), ValueError, "grid"),
    ("grid-float", dict(grid=(2.0, 3, 4)), TypeError, "grid"),
    ("kv-grid-product", dict(grid=(2, 3, 4), kv_grid=(1, 3, 4)), ValueError, "kv_grid"),
]


@pytest.mark.parametrize("case", SDPA_BAD, ids=lambda c: c[0])
def test_sdpa_bad_grid(case):
    _, kw, exc, match = case
    q = torch.randn(1, 2, 24, 8)
    with pytest.raises(exc, match=match):
        nk.nearby_sdpa(q, q, q, **kw)


def test_sdpa_bad_rank():
    q = torch.randn(1, 2, 24, 8)
    with pytest.raises(ValueError, match="key"):
        nk.nearby_sdpa(q, q[0], q, (2, 3, 4))


# ------------------------------------------------------------------ valid edge cases
def test_empty_batch_returns_empty():
    q = torch.randn(0, 2, 3, 4, 2, 8)
    out, lse = nk.nearby_attention(q, q, q, return_lse=True)
    assert out.shape == (0, 2, 3, 4, 2, 8) and lse.shape == (0, 2, 3, 4, 2)
    o = nk.nearby_sdpa(torch.randn(0, 2, 24, 8), torch.randn(0, 2, 24, 8), torch.randn(0, 2, 24, 8), (2, 3, 4))
    assert o.shape == (0, 2, 24, 8)


def test_kernel_size_list_and_none_accepted():
    q, k, v = grid_inputs(dtype=torch.float64)
    out = call(q, k, v, kernel_size=[None, 3, 2])
    ref, _ = oracle_attention(q, k, v, kernel_size=(None, 3, 2))
    assert rel_err(out, ref) < 1e-12


def test_default_scale_and_custom_scale():
    q, k, v = grid_inputs(dtype=torch.float64)
    for scale in (None, 0.05, 2):
        out = call(q, k, v, scale=scale)
        assert rel_err(out, oracle_attention(q, k, v, scale=scale)[0]) < 1e-12


# ------------------------------------------------------------------ dispatch
def test_explicit_backend_that_cannot_run_says_why():
    q, k, v = grid_inputs()
    with pytest.raises(nk.BackendUnavailableError, match="cuda"):
        nk.nearby_attention(q, k, v, backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    q, k, v = grid_inputs()
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(nk.BackendUnavailableError):
        nk.nearby_attention(q, k, v)  # auto now means cuda, which cannot run on CPU tensors
    monkeypatch.setenv(ENV_VAR, "reference")
    out = nk.nearby_attention(q, k, v)
    assert rel_err(out, oracle_attention(q, k, v)[0]) < TOLERANCE[torch.float32]
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        nk.nearby_attention(q, k, v)


def test_available_backends_reports_reasons():
    table = nk.available_backends("cpu")
    assert set(table) == {"reference", "cpu", "cuda", "triton"}
    assert table["reference"] == (True, "")
    ok, why = table["cuda"]
    assert not ok and why


def test_auto_on_cpu_picks_a_cpu_backend():
    from nuwa_kernels.backends import select_backend
    from nuwa_kernels.window import make_window_spec

    q, k, v = grid_inputs()
    spec = make_window_spec((2, 3, 4), (2, 3, 4))
    chosen = select_backend("auto", q, k, v, spec).NAME
    assert chosen == ("cpu" if nk.can_run("cpu", q, k, v)[0] else "reference")


@pytest.mark.parametrize(
    "grid,heads,kernel_size,first",
    [
        ((10, 21, 21), 8, 3, "cuda"),  # NÜWA video, 35,280 query rows: the CUDA kernels win fwd + bwd
        ((1, 21, 21), 8, (1, 3, 3), "cuda"),
        ((16, 32, 32), 8, 3, "triton"),  # 131,072 rows: Triton 3x faster (H200)
        ((10, 21, 21), 8, (18, 21, 21), "triton"),  # a large window
    ],
)
def test_auto_order_on_cuda_follows_the_measured_rule(grid, heads, kernel_size, first):
    """The rule itself (no GPU needed: it reads only the device type and the shape)."""
    from types import SimpleNamespace

    from nuwa_kernels.backends import SMALL_CALL_QUERY_HEADS, _auto_order
    from nuwa_kernels.window import make_window_spec

    q = SimpleNamespace(device=torch.device("cuda", 0), shape=(1, *grid, heads, 64))
    order = _auto_order(q, make_window_spec(grid, grid, kernel_size))
    assert order[0] == first and set(order) == {"cuda", "triton", "reference"} and order[-1] == "reference"
    assert SMALL_CALL_QUERY_HEADS >= 10 * 21 * 21 * 8


# ------------------------------------------------------------------ the host path of repeated calls
def _counting_plan(monkeypatch, api):
    """The one plan in a fresh api._PLANS, its prepared op wrapped to count its calls."""
    (pkey, plan), = api._PLANS.items()
    assert plan[4] is not None, "a plain call's plan keeps a prepared op"
    calls = []

    def run(q, k, v):
        calls.append(1)
        return plan[4](q, k, v)

    api._PLANS[pkey] = (*plan[:4], run)
    return calls


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_repeated_calls_take_the_plans_prepared_op(monkeypatch, backend):
    """A repeated plain call runs its plan's prepared op, with the full path's results (values, lse,
    gradients); autocast, other arguments and a bad return_lse still take the full path."""
    from nuwa_kernels import api

    q, k, v = grid_inputs()
    if not nk.can_run(backend, q, k, v)[0]:
        pytest.skip(f"{backend} cannot run here")
    monkeypatch.setattr(api, "_PLANS", {})
    first, first_lse = nk.nearby_attention(q, k, v, kernel_size=(1, 3, 3), return_lse=True, backend=backend)
    calls = _counting_plan(monkeypatch, api)
    out, lse = nk.nearby_attention(q, k, v, kernel_size=(1, 3, 3), return_lse=True, backend=backend)
    assert calls == [1] and torch.equal(out, first) and torch.equal(lse, first_lse)
    ref, ref_lse = oracle_attention(q, k, v, kernel_size=(1, 3, 3))
    assert rel_err(out, ref) < TOLERANCE[torch.float32] and rel_err(lse, ref_lse) < TOLERANCE[torch.float32]
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(out)
    grads = torch.autograd.grad(nk.nearby_attention(qg, kg, vg, kernel_size=(1, 3, 3), backend=backend),
                                (qg, kg, vg), go)
    assert calls == [1, 1]
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(oracle_attention(qr, kr, vr, kernel_size=(1, 3, 3))[0], (qr, kr, vr), go)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOLERANCE[torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plan is float32's: the full path casts
        assert nk.nearby_attention(q, k, v, kernel_size=(1, 3, 3), backend=backend).dtype == torch.bfloat16
    nk.nearby_attention(q, k, v, kernel_size=(1, 3, 3), causal=True, backend=backend)  # another plan
    with pytest.raises(TypeError, match="return_lse"):
        nk.nearby_attention(q, k, v, kernel_size=(1, 3, 3), return_lse=1, backend=backend)
    assert calls == [1, 1]


def test_compiled_call_after_a_cached_plan():
    """torch.compile(fullgraph=True) over a plain call whose eager plan (with its prepared op) is cached:
    the traced call takes the registered ops, not the eager host path, and gives the eager results."""
    q, k, v = (t.requires_grad_() for t in grid_inputs())
    backend = "cpu" if nk.can_run("cpu", q, k, v)[0] else "reference"

    def f(q, k, v):
        return nk.nearby_attention(q, k, v, kernel_size=(1, 3, 3), backend=backend)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert rel_err(compiled, eager) < 1e-6
    for a, b in zip(torch.autograd.grad(compiled.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
        assert rel_err(a, b) < 1e-6


def test_repeated_auto_calls_read_the_environment_variable(monkeypatch):
    """backend="auto" plans are keyed on NUWA_KERNELS_BACKEND as it is at each call."""
    from nuwa_kernels import api

    q, k, v = grid_inputs()
    monkeypatch.setattr(api, "_PLANS", {})
    monkeypatch.delenv(ENV_VAR, raising=False)
    nk.nearby_attention(q, k, v)
    assert api._env_backend() is None
    (auto_plan,) = api._PLANS.values()
    monkeypatch.setenv(ENV_VAR, "reference")
    assert api._env_backend() in ("reference", b"reference")
    nk.nearby_attention(q, k, v)
    assert len(api._PLANS) == 2
    assert {p[3].NAME for p in api._PLANS.values()} == {auto_plan[3].NAME, "reference"}
    monkeypatch.delenv(ENV_VAR)
    nk.nearby_attention(q, k, v)  # the first plan again
    assert len(api._PLANS) == 2
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        nk.nearby_attention(q, k, v)


# ------------------------------------------------------------------ autocast
def test_autocast_casts_like_sdpa():
    q, k, v = grid_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nk.nearby_attention(q, k.to(torch.bfloat16), v, causal=True)
    assert out.dtype == torch.bfloat16
    ref, _ = oracle_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


def test_autocast_backward():
    q, k, v = grid_inputs(dtype=torch.float32)
    q.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nk.nearby_attention(q, k, v)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_package_works_without_the_extension():
    """Without nuwa_kernels._C the package imports, the reference runs, and `cpu` says why not."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, nuwa_kernels as nk\n"
        "ok, why = nk.available_backends('cpu')['cpu']\n"
        "assert not ok and 'NUWA_KERNELS_NO_EXT' in why, why\n"
        "q = torch.randn(1, 2, 3, 4, 2, 8)\n"
        "out = nk.nearby_attention(q, q, q, causal=True)\n"
        "assert torch.isfinite(out).all()\n"
        "try:\n"
        "    nk.nearby_attention(q, q, q, backend='cpu')\n"
        "    raise SystemExit('expected BackendUnavailableError')\n"
        "except nk.BackendUnavailableError as exc:\n"
        "    assert 'not loaded' in str(exc)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NUWA_KERNELS_NO_EXT="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
