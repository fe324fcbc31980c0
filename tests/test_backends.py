"""Every backend, through the public API, against the float64 oracle written from the contract.

The same parametrised cases run on each backend; a backend that cannot run here (not built, no GPU)
is skipped with its reason, except that CI sets ``NUWA_REQUIRE_BACKENDS`` (e.g. ``cpu,triton``) so a
backend that should have been built fails loudly instead of skipping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import nuwa_kernels as nk
from oracle import TOLERANCE, oracle_attention, random_grid_inputs, rel_err

BACKENDS = ("reference", "cpu", "triton", "cuda")
DTYPES = {
    "reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def device_for(backend: str) -> str:
    """The device a backend's tests run on; skips CUDA-only backends without a GPU."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def require_or_skip(backend: str, q, k, v, **kw) -> None:
    ok, why = nk.can_run(backend, q, k, v, **kw)
    if ok:
        return
    required = [b.strip() for b in os.environ.get("NUWA_REQUIRE_BACKENDS", "").split(",") if b.strip()]
    if backend in required:
        pytest.fail(f"backend {backend!r} is required here (NUWA_REQUIRE_BACKENDS) but cannot run: {why}")
    pytest.skip(f"{backend}: {why}")


@dataclass(frozen=True)
class Case:
    id: str
    q_grid: tuple
    kv_grid: tuple
    heads: int
    heads_kv: int
    D: int
    kernel_size: object = 3
    causal: object = False
    border: str = "truncate"
    B: int = 2

    def kw(self):
        return dict(kernel_size=self.kernel_size, causal=self.causal, border=self.border)


CASES = [
    Case("image-133", (1, 5, 6), (1, 5, 6), 2, 2, 16, (1, 3, 3)),
    Case("video-333-raster", (3, 4, 5), (3, 4, 5), 2, 1, 16, 3, True),
    Case("video-333-frame-causal", (3, 4, 5), (3, 4, 5), 2, 2, 16, 3, (True, False, False)),
    Case("even-shift", (3, 4, 5), (3, 4, 5), 4, 2, 16, (2, 4, 2), False, "shift"),
    Case("even-truncate-causal-hw", (2, 5, 4), (2, 5, 4), 2, 2, 16, (2, 3, 4), (False, True, True)),
    Case("none-text-like", (4, 1, 1), (4, 1, 1), 2, 2, 16, (None, 1, 1)),
    Case("none-mixed-raster", (2, 3, 4), (2, 3, 4), 2, 2, 16, (None, 2, None), True, "shift"),
    Case("k1-identity", (2, 3, 3), (2, 3, 3), 2, 2, 16, 1),
    Case("cross-up", (4, 6, 5), (2, 3, 7), 4, 2, 16, (3, 2, 5), (True, False, False), "shift"),
    Case("cross-down", (2, 3, 4), (3, 5, 6), 2, 1, 16, (2, 3, None)),
    Case("big-window-shift", (3, 4, 5), (3, 4, 5), 2, 2, 32, 7, False, "shift", 1),
]


def _inputs(case: Case, dtype, device, requires_grad=False):
    return random_grid_inputs(case.B, case.q_grid, case.kv_grid, case.heads, case.heads_kv, case.D,
                              dtype=dtype, device=device, requires_grad=requires_grad)


def _kw(case: Case):
    return dict(kernel_size=case.kernel_size, causal=case.causal, border=case.border)


def _params(with_dtype=True):
    out = []
    for backend in BACKENDS:
        for dtype in DTYPES[backend] if with_dtype else (None,):
            for case in CASES:
                marks = [pytest.mark.gpu] if backend == "cuda" else []
                did = f"{backend}-{str(dtype).replace('torch.', '')}-{case.id}" if with_dtype else f"{backend}-{case.id}"
                out.append(pytest.param(backend, dtype, case, id=did, marks=marks))
    return out


@pytest.mark.parametrize("backend,dtype,case", _params())
def test_forward_and_lse(backend, dtype, case):
    q, k, v = _inputs(case, dtype, device_for(backend))
    require_or_skip(backend, q, k, v, **_kw(case))
    out, lse = nk.nearby_attention(q, k, v, **_kw(case), return_lse=True, backend=backend)
    ref_out, ref_lse = oracle_attention(q.cpu(), k.cpu(), v.cpu(), **_kw(case))
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert lse.shape == ref_lse.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = TOLERANCE[dtype]
    assert rel_err(out.cpu(), ref_out) < tol
    assert rel_err(lse.cpu(), ref_lse) < tol


def _grad_dtype(backend):
    return torch.float64 if torch.float64 in DTYPES[backend] else torch.float32


@pytest.mark.parametrize("backend,dtype,case", _params(with_dtype=False))
def test_gradients(backend, dtype, case):
    """dq, dk, dv (also through the LSE) against the oracle's autograd gradients."""
    dtype = _grad_dtype(backend)
    q, k, v = _inputs(case, dtype, device_for(backend), requires_grad=True)
    require_or_skip(backend, q, k, v, **_kw(case))
    out, lse = nk.nearby_attention(q, k, v, **_kw(case), return_lse=True, backend=backend)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
    qc, kc, vc = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = oracle_attention(qc, kc, vc, **_kw(case))
    ref = torch.autograd.grad((ref_out, ref_lse), (qc, kc, vc), (g_out.cpu().double(), g_lse.cpu().double()))
    for name, g, r in zip("qkv", grads, ref):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert rel_err(g.cpu(), r) < TOLERANCE[dtype] * 4, f"grad {name}"


HALF_GRAD_CASES = [c for c in CASES if c.id in ("video-333-raster", "cross-up", "even-shift")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_GRAD_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_gradients(backend, case, dtype):
    """Half-precision gradients within the contract's bounds of the float64 oracle's."""
    q, k, v = _inputs(case, dtype, device_for(backend), requires_grad=True)
    require_or_skip(backend, q, k, v, **_kw(case))
    out = nk.nearby_attention(q, k, v, **_kw(case), backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qc, kc, vc = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(oracle_attention(qc, kc, vc, **_kw(case))[0], (qc, kc, vc), g.cpu().double())
    for name, gr, r in zip("qkv", grads, ref):
        assert gr.dtype == dtype
        assert rel_err(gr.cpu(), r) < TOLERANCE[dtype] * 2, f"grad {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Permuted and sliced views (as from a (B, heads, N, D) tensor) give the same answer."""
    dtype = _grad_dtype(backend)
    device = device_for(backend)
    B, grid, heads, D = 2, (2, 3, 5), 4, 16
    N = grid[0] * grid[1] * grid[2]
    base = torch.randn(B, heads, N, 2 * D, dtype=dtype, device=device)
    q = base[..., :D].transpose(1, 2).unflatten(1, grid)  # non-contiguous, sliced
    kv = torch.randn(B, 2 * heads, N, D, dtype=dtype, device=device)
    k = kv[:, ::2].transpose(1, 2).unflatten(1, grid)  # every other head
    v = torch.randn(B, *grid, D, heads, dtype=dtype, device=device).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    require_or_skip(backend, q, k, v, kernel_size=(2, 3, 3), causal=True)
    out = nk.nearby_attention(q, k, v, kernel_size=(2, 3, 3), causal=True, backend=backend)
    ref, _ = oracle_attention(q.cpu(), k.cpu(), v.cpu(), kernel_size=(2, 3, 3), causal=True)
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearby_sdpa_matches_nearby_attention(backend):
    dtype = _grad_dtype(backend)
    device = device_for(backend)
    grid, kv_grid = (2, 3, 4), (2, 2, 3)
    q = torch.randn(2, 4, 24, 16, dtype=dtype, device=device)
    k = torch.randn(2, 2, 12, 16, dtype=dtype, device=device)
    v = torch.randn(2, 2, 12, 16, dtype=dtype, device=device)
    to_grid = lambda t, g: t.transpose(1, 2).unflatten(1, g)  # noqa: E731
    require_or_skip(backend, to_grid(q, grid), to_grid(k, kv_grid), to_grid(v, kv_grid), kernel_size=(1, 3, 3))
    out = nk.nearby_sdpa(q, k, v, grid, kv_grid, kernel_size=(1, 3, 3), is_causal=(True, False, False), scale=0.3, backend=backend)
    ref = nk.nearby_attention(to_grid(q, grid), to_grid(k, kv_grid), to_grid(v, kv_grid), kernel_size=(1, 3, 3),
                              causal=(True, False, False), scale=0.3, backend="reference")
    assert out.shape == (2, 4, 24, 16)
    assert rel_err(out.cpu(), ref.flatten(1, 3).transpose(1, 2).cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_window_equals_sdpa(backend):
    """kernel_size=None everywhere is full attention; with causal=True it is SDPA's is_causal."""
    dtype = _grad_dtype(backend)
    device = device_for(backend)
    q, k, v = (torch.randn(1, 3, 24, 16, dtype=dtype, device=device) for _ in range(3))
    grid = (2, 3, 4)
    to_grid = lambda t: t.transpose(1, 2).unflatten(1, grid)  # noqa: E731
    require_or_skip(backend, to_grid(q), to_grid(k), to_grid(v), kernel_size=None)
    for causal in (False, True):
        out = nk.nearby_sdpa(q, k, v, grid, kernel_size=None, is_causal=causal, backend=backend)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        assert rel_err(out.cpu(), ref.cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = device_for(backend)
    q = torch.randn(0, 2, 3, 4, 2, 16, device=device, requires_grad=True)
    out, lse = nk.nearby_attention(q, q, q, return_lse=True, backend="auto")
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    out.sum().backward()
    assert q.grad.shape == q.shape
