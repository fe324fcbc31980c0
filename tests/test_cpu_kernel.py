"""The fused C++ CPU kernel (``backend="cpu"``: ``nuwa_kernels::na3d_fwd`` / ``na3d_bwd`` on CPU).

Compared with the float64 oracle written from the contract (tests/oracle.py): outputs, LSE and
gradients, for every causal mode, both borders, odd/even/1/None kernel sizes, cross grids, grouped heads,
all four dtypes and strided inputs; plus gradcheck, opcheck, torch.compile and determinism.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from nuwa_kernels import _extension, _ops
from nuwa_kernels.backends import cpu
from nuwa_kernels.window import make_window_spec, window_mask
from oracle import TOLERANCE, oracle_attention, random_grid_inputs, rel_err

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason=f"{_extension.LOAD_ERROR}")


@dataclass(frozen=True)
class Case:
    id: str
    q_grid: tuple
    kv_grid: tuple = None  # None: the query grid
    kernel_size: object = 3
    causal: object = False
    border: str = "truncate"
    heads: int = 2
    heads_kv: int = 2
    D: int = 16
    B: int = 2

    @property
    def kv(self):
        return self.kv_grid or self.q_grid

    def spec(self):
        return make_window_spec(self.q_grid, self.kv, self.kernel_size, self.causal, self.border)

    def inputs(self, dtype, requires_grad=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        return random_grid_inputs(self.B, self.q_grid, self.kv, self.heads, self.heads_kv, self.D,
                                  dtype=dtype, requires_grad=requires_grad, generator=g)


CASES = [
    Case("video-333", (3, 5, 6)),
    Case("video-333-raster", (3, 5, 6), causal=True),
    Case("raster-even-shift-gqa", (3, 4, 7), kernel_size=(2, 4, 4), causal=True, border="shift", heads=4,
         heads_kv=2),
    Case("frame-causal", (4, 3, 5), causal=(True, False, False)),
    Case("hw-causal-shift-even", (2, 5, 6), kernel_size=(3, 2, 4), causal=(False, True, True),
         border="shift"),
    Case("all-axes-causal-none", (3, 3, 4), kernel_size=(2, None, 3), causal=(True, True, True)),
    Case("even-truncate", (3, 4, 6), kernel_size=(2, 4, 2)),
    Case("even-shift", (3, 4, 6), kernel_size=4, border="shift"),
    Case("k1-identity", (2, 3, 4), kernel_size=1),
    Case("none-full", (2, 3, 5), kernel_size=None),
    Case("none-raster-shift", (2, 3, 4), kernel_size=(None, 2, None), causal=True, border="shift"),
    Case("text-preset", (9, 1, 1), kernel_size=(None, 1, 1), causal=True),
    Case("image-preset", (1, 6, 7), kernel_size=(1, 3, 3)),
    Case("cross-4x6x5-to-2x3x7", (4, 6, 5), (2, 3, 7)),
    Case("cross-down-frame-causal", (4, 6, 5), (2, 3, 7), kernel_size=(3, 2, 5), causal=(True, False, False),
         border="shift"),
    Case("cross-up-gqa", (2, 3, 4), (3, 5, 6), kernel_size=(2, 3, None), heads=4, heads_kv=1),
    Case("big-window-shift", (3, 5, 9), kernel_size=7, border="shift", B=1),
    Case("gqa-4to1", (2, 4, 5), heads=4, heads_kv=1),
    Case("d84-tails", (2, 3, 5), D=84, B=1),  # 4 lane blocks + 1 + a scalar tail (float32)
    Case("d5-scalar", (2, 3, 5), kernel_size=(3, 3, 5), D=5),
]
HALF_CASES = ("video-333-raster", "cross-down-frame-causal", "even-shift", "d84-tails", "gqa-4to1")
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def run_cpu(case: Case, q, k, v, scale=None):
    scale = case.D ** -0.5 if scale is None else scale
    return cpu.forward(q, k, v, case.spec(), scale)


def run_oracle(case: Case, q, k, v, scale=None):
    return oracle_attention(q, k, v, case.kernel_size, case.causal, case.border, scale)


def _dtype_cases():
    out = []
    for c in CASES:
        for dt in (torch.float64, torch.float32):
            out.append(pytest.param(c, dt, id=f"{c.id}-{DTYPE_IDS[dt]}"))
        if c.id in HALF_CASES:
            for dt in (torch.float16, torch.bfloat16):
                out.append(pytest.param(c, dt, id=f"{c.id}-{DTYPE_IDS[dt]}"))
    return out


@pytest.mark.parametrize("case,dtype", _dtype_cases())
def test_forward_matches_oracle(case, dtype):
    q, k, v = case.inputs(dtype)
    out, lse = run_cpu(case, q, k, v)
    ref_out, ref_lse = run_oracle(case, q, k, v)
    assert out.dtype == dtype and out.shape == ref_out.shape and out.is_contiguous()
    assert lse.dtype == _ops.accum_dtype(dtype) and lse.shape == ref_lse.shape and lse.is_contiguous()
    assert rel_err(out, ref_out) < TOLERANCE[dtype]
    assert rel_err(lse, ref_lse) < TOLERANCE[_ops.accum_dtype(dtype)]


def _loss_grads(out, lse, inputs, g_out, g_lse):
    loss = (out.double() * g_out).sum() + (lse.double() * g_lse).sum()
    return torch.autograd.grad(loss, inputs)


def _assert_grads_match(out, lse, inputs, ref_out, ref_lse, ref_inputs, tol):
    """dQ, dK, dV of a random loss on (out, lse) against the same loss on the reference's outputs."""
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(ref_out.shape, dtype=torch.float64, generator=g)
    g_lse = torch.randn(ref_lse.shape, dtype=torch.float64, generator=g)
    got = _loss_grads(out, lse, inputs, g_out, g_lse)
    want = _loss_grads(ref_out, ref_lse, ref_inputs, g_out, g_lse)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradients_float64_match_oracle(case):
    """dQ, dK, dV through a loss on both the output and the LSE (delta = rowsum(dO * O) - dLSE)."""
    q, k, v = case.inputs(torch.float64, requires_grad=True)
    out, lse = run_cpu(case, q, k, v)
    ref_out, ref_lse = run_oracle(case, q, k, v)
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(ref_out.shape, dtype=torch.float64, generator=g)
    g_lse = torch.randn(ref_lse.shape, dtype=torch.float64, generator=g)
    got = _loss_grads(out, lse, (q, k, v), g_out, g_lse)
    want = _loss_grads(ref_out, ref_lse, (q, k, v), g_out, g_lse)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == torch.float64
        assert rel_err(a, b) < TOLERANCE[torch.float64], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id in HALF_CASES], ids=lambda c: c.id)
def test_gradients_low_precision_match_oracle(case, dtype):
    q, k, v = case.inputs(dtype, requires_grad=True)
    out, lse = run_cpu(case, q, k, v)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = run_oracle(case, qd, kd, vd)
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(ref_out.shape, dtype=torch.float64, generator=g)
    g_lse = torch.randn(ref_lse.shape, dtype=torch.float64, generator=g)
    got = _loss_grads(out, lse, (q, k, v), g_out.to(dtype).double(), g_lse)
    want = _loss_grads(ref_out, ref_lse, (qd, kd, vd), g_out.to(dtype).double(), g_lse)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOLERANCE[dtype], name


GRADCHECK_CASES = [c for c in CASES if c.id in ("video-333-raster", "cross-up-gqa", "even-shift")]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck_float64(case):
    small = Case(case.id, tuple(min(x, 3) for x in case.q_grid), tuple(min(x, 3) for x in case.kv),
                 case.kernel_size, case.causal, case.border, case.heads // case.heads_kv, 1, D=3, B=1)
    q, k, v = small.inputs(torch.float64, requires_grad=True)

    def f(q, k, v):
        out, lse = run_cpu(small, q, k, v, scale=0.7)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# strides: the fused path reads any strides, no hidden contiguous copy
# ----------------------------------------------------------------------------------------------


STRIDED = {
    "bhnd-permuted": lambda t: t.permute(0, 5, 1, 2, 3, 4).contiguous().permute(0, 2, 3, 4, 5, 1),
    "heads-major": lambda t: t.permute(0, 4, 1, 2, 3, 5).contiguous().permute(0, 2, 3, 4, 1, 5),
    "d-stride-2": lambda t: torch.stack([t, torch.full_like(t, float("nan"))], dim=-1).flatten(-2)[..., ::2],
    "w-sliced": lambda t: torch.cat([t, torch.full_like(t, float("nan"))], dim=3)[:, :, :, : t.shape[3]],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("layout", list(STRIDED))
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("video-333-raster", "cross-up-gqa")],
                         ids=lambda c: c.id)
def test_strided_inputs(case, layout, dtype):
    q, k, v = case.inputs(dtype)
    qs, ks, vs = (STRIDED[layout](x) for x in (q, k, v))
    assert torch.equal(qs, q) or torch.allclose(qs.double(), q.double())
    if layout != "w-sliced":
        assert not qs.is_contiguous()
    out, lse = run_cpu(case, qs, ks, vs)
    ref_out, ref_lse = run_oracle(case, q, k, v)
    assert rel_err(out, ref_out) < TOLERANCE[dtype]
    assert rel_err(lse, ref_lse) < TOLERANCE[_ops.accum_dtype(dtype)]
    # gradients through strided inputs (and a strided, expanded grad_out) equal the contiguous ones
    qs, ks, vs = (x.detach().requires_grad_() for x in (qs, ks, vs))
    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (qs, ks, vs))
    go = torch.randn(out.shape[:-1], dtype=torch.float32).to(dtype)[..., None].expand(out.shape)
    g1 = torch.autograd.grad(run_cpu(case, qs, ks, vs)[0], (qs, ks, vs), go)
    g2 = torch.autograd.grad(run_cpu(case, qc, kc, vc)[0], (qc, kc, vc), go.contiguous())
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_expanded_batch_key():
    """A key/value broadcast over the batch (stride 0) reads the same data for every batch."""
    case = Case("bcast", (2, 3, 4), heads=2, heads_kv=1)
    q, k, v = case.inputs(torch.float64)
    k1, v1 = k[:1].expand_as(k), v[:1].expand_as(v)
    out, lse = run_cpu(case, q, k1, v1)
    ref_out, ref_lse = run_oracle(case, q, k1.contiguous(), v1.contiguous())
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


def test_blocked_queries_big_window():
    """A window wider than the per-thread score budget splits query rows into blocks."""
    case = Case("blocked", (1, 24, 100), kernel_size=None, heads=1, heads_kv=1, D=8, B=1)
    q, k, v = case.inputs(torch.float64)
    out, lse = run_cpu(case, q, k, v, scale=0.3)
    mask = window_mask(case.spec())
    s = torch.einsum("qd,kd->qk", q.reshape(-1, 8), k.reshape(-1, 8)) * 0.3
    s = s.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref_out = torch.softmax(s, -1) @ v.reshape(-1, 8)
    assert rel_err(out.reshape(-1, 8), ref_out) < 1e-12
    assert rel_err(lse.reshape(-1), ref_lse) < 1e-12


# ----------------------------------------------------------------------------------------------
# op registration: opcheck, torch.compile, determinism, errors
# ----------------------------------------------------------------------------------------------


def _op_args(case: Case, dtype=torch.float32):
    q, k, v = case.inputs(dtype)
    return (q, k, v, *_ops.spec_op_args(case.spec()), 0.25)


@pytest.mark.parametrize("case", [CASES[1], CASES[14]], ids=lambda c: c.id)
def test_opcheck_fwd(case):
    q, k, v, *rest = _op_args(case, torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.nuwa_kernels.na3d_fwd.default, (q, k, v, *rest))


@pytest.mark.parametrize("case", [CASES[1], CASES[14]], ids=lambda c: c.id)
def test_opcheck_bwd(case):
    q, k, v, *rest = _op_args(case, torch.float64)
    out, lse = torch.ops.nuwa_kernels.na3d_fwd(q, k, v, *rest)
    go = torch.randn_like(out)
    delta = (go * out).sum(-1)
    torch.library.opcheck(torch.ops.nuwa_kernels.na3d_bwd.default, (go, q, k, v, lse, delta, *rest))


def test_torch_compile_fullgraph_forward_backward():
    case = CASES[3]
    spec = case.spec()
    q, k, v = case.inputs(torch.float32, requires_grad=True)

    def f(q, k, v):
        out, lse = cpu.forward(q, k, v, spec, 0.25)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    assert torch.allclose(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph():
    """The default (inductor) backend too: the op stays a single extern call, no graph break."""
    case = CASES[1]
    spec = case.spec()
    q, k, v = case.inputs(torch.float32, requires_grad=True)

    def f(q, k, v):
        out, lse = cpu.forward(q, k, v, spec, 0.25)
        return (out * out).sum() + lse.sum()

    loss_c = torch.compile(f, fullgraph=True)(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    grads_e = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_deterministic_and_thread_count_invariant():
    """Bitwise-identical results run to run and for 1 vs 2 threads (no atomics, fixed orders)."""
    case = CASES[2]
    q, k, v = case.inputs(torch.float32, requires_grad=True)

    def run():
        out, lse = run_cpu(case, q, k, v)
        return (out, lse, *torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v)))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run()
        torch.set_num_threads(2)
        b = run()
        c = run()
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(y, z)


def test_empty_batch():
    case = Case("empty", (2, 3, 4), B=0)
    q, k, v = case.inputs(torch.float32, requires_grad=True)
    out, lse = run_cpu(case, q, k, v)
    assert out.shape == (0, 2, 3, 4, 2, 16) and lse.shape == (0, 2, 3, 4, 2)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_bwd_reads_strided_lse_delta_and_other_dtypes():
    """lse/delta with any strides (and grad_out in another dtype) give the same gradients."""
    case = CASES[2]
    q, k, v, *rest = _op_args(case, torch.float32)
    out, lse = torch.ops.nuwa_kernels.na3d_fwd(q, k, v, *rest)
    go = torch.randn_like(out)
    delta = (go * out).sum(-1)
    ref = torch.ops.nuwa_kernels.na3d_bwd(go, q, k, v, lse, delta, *rest)
    heads_first = lambda t: t.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0)  # noqa: E731
    got = torch.ops.nuwa_kernels.na3d_bwd(go.double(), q, k, v, heads_first(lse), heads_first(delta).double(),
                                          *rest)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_empty_key_grid_gives_zero_output():
    """Only reachable through the op (the API rejects it): no key, out = 0, lse = -inf, zero grads."""
    q = torch.randn(1, 2, 3, 4, 2, 8)
    k = torch.randn(1, 0, 3, 4, 2, 8)
    spec_args = ([3, 3, 3], [False, False, False], False, False, [1, 1, 1], [], 0.5)
    out, lse = torch.ops.nuwa_kernels.na3d_fwd(q, k, k, *spec_args)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = torch.ops.nuwa_kernels.na3d_bwd(torch.ones_like(out), q, k, k, lse, lse, *spec_args)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == k.shape


def test_kernel_checks_are_clear():
    """A second line of defence behind the API's validation: TORCH_CHECK with the argument named."""
    case = CASES[0]
    q, k, v, *rest = _op_args(case)
    k3, v3 = (x[..., :1, :].repeat(1, 1, 1, 1, 3, 1) for x in (k, v))  # 2 heads over 3 kv heads
    with pytest.raises(RuntimeError, match="heads_kv"):
        torch.ops.nuwa_kernels.na3d_fwd(q, k3, v3, *rest)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.nuwa_kernels.na3d_fwd(q, k[..., :8], v, *rest)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.nuwa_kernels.na3d_fwd(q, k.double(), v, *rest)


# ----------------------------------------------------------------------------------------------
# the backend module and the public API
# ----------------------------------------------------------------------------------------------


def test_can_run_reasons():
    case = CASES[0]
    q, k, v = case.inputs(torch.float32)
    assert cpu.can_run(q, k, v, case.spec()) == (True, "")
    ok, why = cpu.can_run(q.to("meta"), k.to("meta"), v.to("meta"), case.spec())
    assert not ok and "CPU" in why
    ok, why = cpu.can_run(q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64), case.spec())
    assert not ok and "dtype" in why


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("video-333-raster", "cross-down-frame-causal",
                                                               "none-raster-shift")], ids=lambda c: c.id)
def test_public_api_backend_cpu(case):
    nk = pytest.importorskip("nuwa_kernels")
    if not hasattr(nk, "nearby_attention"):
        pytest.skip("nuwa_kernels.nearby_attention is not available yet")
    q, k, v = case.inputs(torch.float64, requires_grad=True)
    out, lse = nk.nearby_attention(q, k, v, kernel_size=case.kernel_size, causal=case.causal,
                                   border=case.border, return_lse=True, backend="cpu")
    ref_out, ref_lse = run_oracle(case, q, k, v)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    g_out = torch.randn_like(ref_out)
    got = torch.autograd.grad((out * g_out).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g_out).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


# ----------------------------------------------------------------------------------------------
# Lane kernels (queries in vector lanes: key grid with the query's H and W, head dims in whole
# vectors): blocks that span rows and frames, several blocks and tasks per head, grouped heads sharing
# the rings, float64 lanes, key grids that differ in T only; the row kernels take the rest.
# ----------------------------------------------------------------------------------------------

LANE_CASES = [
    Case("lanes-video-333-many-blocks", (4, 9, 11), heads=1, heads_kv=1, D=32, B=1),
    Case("lanes-raster-gqa", (3, 7, 13), causal=True, heads=4, heads_kv=2, D=32, B=1),
    Case("lanes-777-shift", (5, 8, 9), kernel_size=7, border="shift", heads=2, heads_kv=1, D=16, B=1),
    Case("lanes-even-frame-causal", (5, 6, 10), kernel_size=(2, 4, 3), causal=(True, False, False), D=64, B=1),
    Case("lanes-image-133", (1, 17, 19), kernel_size=(1, 3, 3), heads=1, heads_kv=1, D=16, B=2),
    Case("lanes-kv-frames-differ", (6, 5, 7), (3, 5, 7), kernel_size=(3, 3, 5), heads=2, heads_kv=2, D=16, B=1),
    Case("lanes-w1-text", (40, 1, 1), kernel_size=(None, 1, 1), causal=True, heads=1, heads_kv=1, D=16, B=1),
    # head dims of 3 and 8 vectors: row_scores' and the row products' loops over chunks of the head dim
    Case("lanes-d48", (3, 7, 9), heads=2, heads_kv=1, D=48, B=1),
    Case("lanes-d128-raster", (3, 5, 9), causal=True, heads=1, heads_kv=1, D=128, B=1),
    # the image window with D=64: P V reads the value rows in place in the grid's interior and from the
    # ring at its borders (the ring starting afresh after the blocks in place)
    Case("lanes-image-133-d64", (2, 9, 23), kernel_size=(1, 3, 3), heads=4, heads_kv=2, D=64, B=2),
    Case("lanes-image-133-d64-raster", (1, 13, 21), kernel_size=(1, 3, 3), causal=True, heads=2, heads_kv=2, D=64,
         B=1),
    Case("lanes-image-133-d64-kv-frames", (2, 9, 23), (4, 9, 23), kernel_size=(1, 3, 3), heads=2, heads_kv=1, D=64,
         B=1),
    # small windows with D=64: the key pass stores dS for the query pass (DsStore)
    Case("lanes-ds-store-gqa", (4, 9, 11), heads=4, heads_kv=2, D=64, B=2),
    Case("lanes-ds-store-raster", (3, 7, 13), kernel_size=(3, 3, 5), causal=True, heads=2, heads_kv=2, D=64, B=1),
    # a 7-wide window: the store takes 5.7x the query's elements (at most 8x)
    Case("lanes-ds-store-777", (7, 9, 11), kernel_size=7, heads=2, heads_kv=1, D=64, B=1),
    # NATTEN's shifted windows with D=64: a block's runs are longer than any one query's window, and each
    # group of four queries computes only its own part of a run (the rest of the group's scores 0)
    Case("lanes-image-133-d64-shift", (2, 9, 23), kernel_size=(1, 3, 3), border="shift", heads=2, heads_kv=1, D=64,
         B=1),
    Case("lanes-335-d64-shift-raster", (3, 7, 13), kernel_size=(3, 3, 5), causal=True, border="shift", heads=2,
         heads_kv=2, D=64, B=1),
    # head dims not in whole vectors: with AVX-512 the float lanes pack rows with zero tails (40 -> 48,
    # 24 -> 32, 20 -> 32, each row's last vector stored in part; 100 -> 112: a chunk of four vectors and one
    # of three): the backward's sweep over kept probabilities (the image window), the two passes with a dS
    # store (27 pairs > 24 elements, 105 > 100: no probabilities kept) and without one (343 > 8 x 20);
    # float64 and the AVX2 build run the row kernels
    Case("lanes-padded-d40-image-gqa", (2, 9, 23), kernel_size=(1, 3, 3), heads=4, heads_kv=2, D=40, B=2),
    Case("lanes-padded-d24-333-shift-raster", (3, 7, 13), causal=True, border="shift", heads=2, heads_kv=2, D=24,
         B=1),
    Case("lanes-padded-d100-357", (4, 7, 9), kernel_size=(3, 5, 7), heads=2, heads_kv=1, D=100, B=1),
    Case("lanes-padded-d20-777-shift", (5, 8, 9), kernel_size=7, border="shift", heads=2, heads_kv=1, D=20, B=1),
    # past 4 MiB in float32 (prefetches, tasks from the shared counter, heads spread: 160-byte rows)
    Case("lanes-padded-d40-large", (5, 16, 16), kernel_size=(1, 3, 3), heads=8, heads_kv=8, D=40, B=1),
]
PADDED_CASES = LANE_CASES[17:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("case", LANE_CASES, ids=lambda c: c.id)
def test_lane_kernels_forward_backward(case, dtype):
    q, k, v = case.inputs(dtype, requires_grad=True)
    out, lse = run_cpu(case, q, k, v)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = run_oracle(case, qd, kd, vd)
    assert rel_err(out, ref_out) < TOLERANCE[dtype]
    assert rel_err(lse, ref_lse) < TOLERANCE[_ops.accum_dtype(dtype)]
    _assert_grads_match(out, lse, (q, k, v), ref_out, ref_lse, (qd, kd, vd), TOLERANCE[dtype])


HALF_LARGE = Case("lanes-half-large", (5, 16, 16), kernel_size=(1, 3, 3), heads=32, heads_kv=32, D=64, B=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", [LANE_CASES[9], LANE_CASES[1], CASES[18], CASES[19], HALF_LARGE],
                         ids=lambda c: c.id)
def test_half_outputs_are_the_float_kernels_rounded(case, dtype):
    """A half-type call computes in float32 from inputs that float32 holds exactly, so its output is the
    float32 call's on the same values, rounded to nearest even: bitwise, in the lane kernels (D = 64 and
    32: the vectorised stores) and the row kernels (D = 84, 5: vector and scalar tails), NaN where it is
    NaN (its bits are c10's scalar rule, 0x7FC0 for bfloat16, not those of ``Tensor.to``). A rounding that
    truncated would differ in about half the elements. The case past 4 MiB also takes the non-temporal
    stores of out, dQ, dK and dV (AVX-512 builds), its gradients checked against the float32 kernel's."""
    q, k, v = case.inputs(dtype)
    q[0, 0, 0, 0, 0, 0] = float("nan")  # one NaN query row: its outputs are NaN
    out, lse = run_cpu(case, q, k, v)
    ref_out, ref_lse = run_cpu(case, q.float(), k.float(), v.float())
    want = ref_out.to(dtype)
    assert out.dtype == dtype and int(out.isnan().sum()) == case.D
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(0.0).view(torch.int16), want.nan_to_num(0.0).view(torch.int16))
    assert torch.allclose(lse, ref_lse, rtol=0, atol=0, equal_nan=True)
    if case is HALF_LARGE:  # past 4 MiB: out, dQ, dK and dV go out with non-temporal stores (AVX-512)
        assert out.numel() * out.element_size() > 4 << 20
        q[0, 0, 0, 0, 0, 0] = 0.0
        qh, kh, vh = (x.clone().requires_grad_() for x in (q, k, v))
        qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
        g_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
        g_lse = torch.randn(q.shape[:-1], dtype=torch.float64)
        oh, lh = run_cpu(case, qh, kh, vh)
        of, lf = run_cpu(case, qf, kf, vf)
        assert torch.equal(oh, of.to(dtype))
        grads_half = _loss_grads(oh, lh, (qh, kh, vh), g_out, g_lse)
        grads_float = _loss_grads(of, lf, (qf, kf, vf), g_out, g_lse)
        for gh, gf in zip(grads_half, grads_float):
            assert gh.dtype == dtype and rel_err(gh, gf) < TOLERANCE[dtype]


PREFETCH_CASES = [  # the lane kernels (forward with kept probabilities and the sweep; recomputed scores for
    # (7,7,7)), below and past the 4 MiB of inputs where the prefetches and the shared schedule start, and the
    # row kernels (D = 24)
    Case("pf-image-133", (1, 21, 21), kernel_size=(1, 3, 3), heads=8, heads_kv=8, D=64, B=1),
    Case("pf-video-333-raster", (3, 16, 16), causal=True, heads=8, heads_kv=8, D=64, B=1),
    Case("pf-777-gqa", (3, 16, 16), kernel_size=7, heads=8, heads_kv=4, D=64, B=1),
    Case("pf-rows-d24", (3, 16, 16), heads=8, heads_kv=8, D=24, B=2),
]


@pytest.mark.parametrize("case", [LANE_CASES[i] for i in (0, 1, 9, 13)] + PREFETCH_CASES[1:2],
                         ids=lambda c: c.id)
def test_lane_kernels_thread_count_invariant(case):
    """The lane kernels cut each head into more tasks with more threads (different block alignment), and
    hand them out owner first for small inputs, from one counter past 4 MiB (pf-video-333-raster):
    results stay bitwise identical."""
    q, k, v = case.inputs(torch.float32, requires_grad=True)

    def run():
        out, lse = run_cpu(case, q, k, v)
        return (out, lse, *torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v)))

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)


def test_lane_tables_follow_the_window_geometry():
    """The lane kernels keep each window geometry's entry tables (and pair-store rows) across calls:
    geometries alternating on one grid (window sizes, causal modes, borders, key grids) each get theirs."""
    grid = (3, 7, 13)
    cases = [Case("tables-333", grid, D=64, B=1), Case("tables-335", grid, kernel_size=(3, 3, 5), D=64, B=1),
             Case("tables-raster", grid, causal=True, D=64, B=1), Case("tables-shift", grid, border="shift", D=64, B=1),
             Case("tables-kv-frames", grid, (2, 7, 13), D=64, B=1)]
    for _ in range(2):
        for case in cases:
            q, k, v = case.inputs(torch.float64, requires_grad=True)
            out, lse = run_cpu(case, q, k, v)
            qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
            ref_out, ref_lse = run_oracle(case, qd, kd, vd)
            assert rel_err(out, ref_out) < TOLERANCE[torch.float64], case.id
            _assert_grads_match(out, lse, (q, k, v), ref_out, ref_lse, (qd, kd, vd), TOLERANCE[torch.float64])


# The probabilities the CPU forward keeps for the backward (na3d_fwd_probs / na3d_bwd_probs: small windows,
# what csrc/autograd.cpp calls for CPU tensors that need gradients).
PROBS_CASES = [LANE_CASES[12], LANE_CASES[13], Case("probs-image-133", (1, 13, 21), kernel_size=(1, 3, 3), D=64, B=1)]


def _probs_numel(q, k, v, rest):
    return torch.ops.nuwa_kernels.na3d_probs_numel(list(q.shape), list(k.shape), list(v.shape), q.dtype, *rest[:-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", PROBS_CASES, ids=lambda c: c.id)
def test_probs_pair_matches_the_recomputing_backward(case, dtype):
    """Forward: the same out and lse as na3d_fwd, and probabilities that sum to one per query (the elements
    of no pair are 0). Backward: the same gradients as na3d_bwd (which recomputes them), also when every
    element of no pair is NaN (the key pass must not read them)."""
    q, k, v, *rest = _op_args(case, dtype)
    out, lse, probs = torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)
    ref_out, ref_lse = torch.ops.nuwa_kernels.na3d_fwd(q, k, v, *rest)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert probs.dtype == dtype and probs.dim() == 1 and probs.numel() == _probs_numel(q, k, v, rest) > 0
    assert torch.equal(probs, torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)[2])  # all of it written
    queries = lse.numel()
    assert (probs >= 0).all()
    assert abs(probs.double().sum().item() - queries) < TOLERANCE[dtype] * queries
    g = torch.Generator().manual_seed(3)
    go = torch.randn(out.shape, dtype=dtype, generator=g)
    glse = torch.randn(lse.shape, dtype=dtype, generator=g)
    poisoned = probs.masked_fill(probs == 0, float("nan"))
    for grad_lse in (glse, None):  # na3d_bwd_probs forms delta = rowsum(dO * O) - dLSE itself
        delta = (go * out).sum(-1) - (grad_lse if grad_lse is not None else 0)
        want = torch.ops.nuwa_kernels.na3d_bwd(go, q, k, v, lse, delta, *rest)
        for p in (probs, poisoned):
            got = torch.ops.nuwa_kernels.na3d_bwd_probs(go, q, k, v, lse, grad_lse, p, *rest)
            for a, b in zip(got, want):
                assert torch.isfinite(a).all()
                assert rel_err(a, b) < TOLERANCE[dtype]


def _avx512_build() -> bool:
    """Whether this build's CPU kernels use AVX-512 (row_scores; the float lanes then take any head dim)."""
    return cpu.kernel_isa() == "avx512"


def test_kernel_isa_is_the_builds():
    """The op reports the instruction set the kernels were compiled for: AVX2 for the portable build
    (x86-64-v3), AVX-512 for a native build on a CPU that has it."""
    from nuwa_kernels import _build_info

    arch = str(_build_info.BUILD.get("cpu_arch", ""))
    isa = cpu.kernel_isa()
    assert isa in ("avx512", "avx2", "generic")
    if arch == "x86-64-v3":
        assert isa == "avx2"
    elif arch == "native" and platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        assert (isa == "avx512") == (" avx512f" in flags)


@pytest.mark.skipif(not _avx512_build(), reason="the float lanes pad head dims only in AVX-512 builds")
@pytest.mark.parametrize("case", [PADDED_CASES[0]], ids=lambda c: c.id)
def test_padded_head_dims_keep_probabilities(case):
    """Head dims not in whole vectors run the lanes in float32 (rows padded with zeros): the forward keeps
    the probabilities and the backward's sweep over them gives the gradients of the two-pass backward that
    recomputes them (na3d_bwd)."""
    q, k, v, *rest = _op_args(case, torch.float32)
    out, lse, probs = torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)
    assert probs.numel() == _probs_numel(q, k, v, rest) > 0
    ref_out, ref_lse = torch.ops.nuwa_kernels.na3d_fwd(q, k, v, *rest)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    delta = (go * out).sum(-1)
    want = torch.ops.nuwa_kernels.na3d_bwd(go, q, k, v, lse, delta, *rest)
    got = torch.ops.nuwa_kernels.na3d_bwd_probs(go, q, k, v, lse, None, probs, *rest)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOLERANCE[torch.float32]


def test_probs_pair_opcheck():
    case = PROBS_CASES[0]
    q, k, v, *rest = _op_args(case, torch.float64)
    torch.library.opcheck(torch.ops.nuwa_kernels.na3d_fwd_probs.default, (q, k, v, *rest))
    out, lse, probs = torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)
    go = torch.randn_like(out)
    for grad_lse in (torch.randn_like(lse), None):
        torch.library.opcheck(torch.ops.nuwa_kernels.na3d_bwd_probs.default,
                              (go, q, k, v, lse, grad_lse, probs, *rest))


def test_probs_pair_sizes_and_errors():
    """No probabilities where the lanes do not keep them (a (7,7,7) window: 5.7x the query's size, over the
    default bound; (3,3,3) with D = 24: 27 pairs against 24 elements per query; head dims not in whole
    vectors in float64, or without AVX-512); probabilities of another call are refused."""
    big = LANE_CASES[14]
    small_d = Case("probs-small-dim", (4, 9, 11), D=24, B=1)
    odd = Case("probs-odd-dim", (2, 9, 11), kernel_size=(1, 3, 3), D=20, B=1)
    for case, dtype in ((big, torch.float32), (small_d, torch.float32), (odd, torch.float64)) + (
            () if _avx512_build() else ((odd, torch.float32),)):
        q, k, v, *rest = _op_args(case, dtype)
        assert _probs_numel(q, k, v, rest) == 0
        assert torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)[2].numel() == 0
    q, k, v, *rest = _op_args(PROBS_CASES[0])
    out, lse, probs = torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)
    for bad in (probs[:-1], probs[:0]):
        with pytest.raises(RuntimeError, match="probs"):
            torch.ops.nuwa_kernels.na3d_bwd_probs(out, q, k, v, lse, None, bad, *rest)
    with pytest.raises(RuntimeError, match="grad_lse must have shape"):
        torch.ops.nuwa_kernels.na3d_bwd_probs(out, q, k, v, lse, lse[..., :1], probs, *rest)


def test_probs_bound_from_the_environment():
    """NUWA_CPU_PROBS=0: the forward keeps no probabilities and autograd's backward recomputes them (the
    same gradients); NUWA_CPU_PROBS=1 keeps those of (3,3,3) (0.43x the query) but not of (7,7,7) (5.7x);
    NUWA_CPU_PROBS=8 keeps (7,7,7)'s too, except where the backward's sweep over them would need more
    scratch than its bound (NÜWA's 10x21x21 grid: 6.5 MiB per thread)."""
    code = """
import torch, nuwa_kernels as nk
from nuwa_kernels import _ops
q = torch.randn(1, 7, 9, 11, 2, 64, dtype=torch.float64)
for ks in (3, 7):
    args = _ops.spec_op_args(nk.window.make_window_spec(q.shape[1:4], q.shape[1:4], ks)) + (0.125,)
    print(torch.ops.nuwa_kernels.na3d_fwd_probs(q, q, q, *args)[2].numel() > 0)
shape = [1, 10, 21, 21, 8, 64]
args = _ops.spec_op_args(nk.window.make_window_spec(shape[1:4], shape[1:4], 7))
print(torch.ops.nuwa_kernels.na3d_probs_numel(shape, shape, shape, torch.float32, *args) > 0)
"""
    for bound, want in (("0", ["False", "False", "False"]), ("1", ["True", "False", "False"]),
                        ("8", ["True", "True", "False"])):
        res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUWA_CPU_PROBS=bound),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == want, bound


def test_probs_pair_through_autograd_retain_graph():
    """Autograd takes the probabilities path for CPU tensors that need gradients; a second backward of the
    same graph (retain_graph) reads them again: the same gradients, and those of the oracle."""
    case = PROBS_CASES[0]
    q, k, v = case.inputs(torch.float64, requires_grad=True)
    out, lse = run_cpu(case, q, k, v)
    g_out = torch.randn_like(out)
    loss = (out * g_out).sum() + lse.sum()
    first = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    second = torch.autograd.grad(loss, (q, k, v))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = run_oracle(case, qd, kd, vd)
    want = torch.autograd.grad((ref_out * g_out).sum() + ref_lse.sum(), (qd, kd, vd))
    for a, b in zip(first, want):
        assert rel_err(a, b) < TOLERANCE[torch.float64]


SWEEP_CASES = [
    Case("sweep-133", (3, 11, 13), kernel_size=(1, 3, 3), heads=1, heads_kv=1, D=64, B=1),
    Case("sweep-133-raster-gqa", (2, 9, 17), kernel_size=(1, 3, 3), causal=True, heads=2, heads_kv=1, D=64, B=1),
    Case("sweep-133-kv-frames", (2, 9, 11), (6, 9, 11), kernel_size=(1, 3, 3), heads=1, heads_kv=1, D=64, B=1),
    Case("sweep-333-fewer-kv-frames", (5, 6, 7), (2, 6, 7), causal=(True, False, False), heads=1, heads_kv=1, D=64,
         B=1),
    Case("sweep-335-batch", (4, 6, 9), kernel_size=(3, 3, 5), heads=1, heads_kv=1, D=64, B=2),
]


@pytest.mark.parametrize("case", SWEEP_CASES, ids=lambda c: c.id)
def test_probs_sweep_across_chunks(case):
    """na3d_bwd_probs sweeps each (batch, kv head) in chunks, one per task; a chunk's keys read the dS of
    queries in the neighbouring chunks, which its task recomputes. With 1 to 5 threads (1 to 10 chunks per
    head, their edges at other blocks) the gradients are bitwise the same, and those of the recomputing
    backward (na3d_bwd), with key grids of more or fewer frames than the query's too."""
    q, k, v, *rest = _op_args(case, torch.float64)
    out, lse, probs = torch.ops.nuwa_kernels.na3d_fwd_probs(q, k, v, *rest)
    assert probs.numel() > 0
    g = torch.Generator().manual_seed(5)
    go = torch.randn(out.shape, dtype=out.dtype, generator=g)
    glse = torch.randn(lse.shape, dtype=lse.dtype, generator=g)
    want = torch.ops.nuwa_kernels.na3d_bwd(go, q, k, v, lse, (go * out).sum(-1) - glse, *rest)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            # NaN gradients first: memory they leave behind and the next call reuses shows unwritten elements
            poisoned = torch.ops.nuwa_kernels.na3d_bwd_probs(go * float("nan"), q, k, v, lse, glse, probs, *rest)
            del poisoned
            results.append(torch.ops.nuwa_kernels.na3d_bwd_probs(go, q, k, v, lse, glse, probs, *rest))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)
    for a, b in zip(results[0], want):
        assert rel_err(a, b) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("kernel_size", [3, (1, 3, 3)], ids=["333", "133"])
@pytest.mark.parametrize("layout", ["contiguous", "head-major-kv"])
def test_lane_kernels_large_output(layout, kernel_size):
    """An output and gradients beyond the caches (over 4 MiB: non-temporal stores on AVX-512 builds, the
    kept probabilities' too), value rows read with other strides too; the image window reads its rows in
    place where they are evenly spaced: the same results as the oracle."""
    case = Case("lanes-large", (5, 16, 16), kernel_size=kernel_size, heads=16, heads_kv=16, D=64, B=1)
    q, k, v = case.inputs(torch.float32)
    if layout == "head-major-kv":
        k, v = (x.permute(0, 4, 1, 2, 3, 5).contiguous().permute(0, 2, 3, 4, 1, 5) for x in (k, v))
    assert q.numel() * 4 > 4 << 20
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = run_cpu(case, q, k, v)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = run_oracle(case, qd, kd, vd)
    assert rel_err(out, ref_out) < TOLERANCE[torch.float32]
    assert rel_err(lse, ref_lse) < TOLERANCE[torch.float32]
    # dQ, dK, dV beyond the caches too (non-temporal stores in both backward passes)
    _assert_grads_match(out, lse, (q, k, v), ref_out, ref_lse, (qd, kd, vd), TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "expanded"])
def test_fused_delta_matches_the_formula(dtype, layout):
    """``nuwa_kernels::na3d_delta`` (the eager backward's ``rowsum(dO * O) - dLSE``, one pass on CPU)
    against the formula in float64, with and without a gradient on the LSE, for any gradient layout."""
    from nuwa_kernels.backends import _fused_ops

    g = torch.Generator().manual_seed(5)
    out = torch.randn(2, 3, 4, 5, 3, 40, generator=g).to(dtype)
    dout = torch.randn(2, 3, 4, 5, 3, 40, generator=g).to(dtype)
    if layout == "strided":
        dout = dout.transpose(1, 3).contiguous().transpose(1, 3)
    elif layout == "expanded":  # out.sum().backward() hands the op an expanded scalar
        dout = torch.randn(1, generator=g).to(dtype).expand(out.shape)
    dlse = torch.randn(2, 3, 4, 5, 3, generator=g)
    want = (dout.double() * out.double()).sum(-1)
    for grad_lse in (None, dlse):
        got = _fused_ops.delta(dout, out, grad_lse)
        expect = want if grad_lse is None else want - grad_lse.double()
        assert got.dtype == _ops.accum_dtype(dtype) and got.shape == out.shape[:-1]
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err(got, expect) < tol


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="reads x86 machine code with objdump")
def test_compiled_kernels_keep_their_prefetches():
    """The built extension holds the kernels' software prefetches (GCC 12 once deleted them silently)."""
    import nuwa_kernels._C as ext

    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ext.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert asm.count("prefetcht1") >= 8, "no software prefetch left in the CPU kernels"


@pytest.mark.parametrize("case", PREFETCH_CASES, ids=lambda c: c.id)
def test_prefetch_switch_changes_no_bit(case, monkeypatch):
    """NUWA_CPU_PREFETCH (read at every call) turns the kernels' software prefetches on (1), off (0) or
    leaves them to the inputs' size (unset): outputs, lse and gradients are bitwise the same either way,
    and those of the oracle."""
    q, k, v = case.inputs(torch.float32, requires_grad=True)
    g_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    g_lse = torch.randn(q.shape[:-1], dtype=torch.float64)
    results = []
    for mode in ("1", "0", None):
        if mode is None:
            monkeypatch.delenv("NUWA_CPU_PREFETCH", raising=False)
        else:
            monkeypatch.setenv("NUWA_CPU_PREFETCH", mode)
        out, lse = run_cpu(case, q, k, v)
        results.append((out, lse) + _loss_grads(out, lse, (q, k, v), g_out, g_lse))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = run_oracle(case, qd, kd, vd)
    assert rel_err(results[0][0], ref_out) < TOLERANCE[torch.float32]
    want = _loss_grads(ref_out, ref_lse, (qd, kd, vd), g_out, g_lse)
    for got, w in zip(results[0][2:], want):
        assert rel_err(got, w) < TOLERANCE[torch.float32]


SCRATCH_CASES = [LANE_CASES[i] for i in (1, 2, 9, 11, 12, 13, 15, 16, 17, 18, 19, 20)] + [
    c for c in CASES if c.id in ("cross-down-frame-causal", "d84-tails", "d5-scalar", "none-raster-shift")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", SCRATCH_CASES, ids=lambda c: c.id)
def test_scratch_is_written_before_it_is_read(case, dtype, monkeypatch):
    """The kernels' per-thread scratch (rings, packed rows, score blocks) is not zeroed: with it filled with
    NaN (NUWA_CPU_SCRATCH_POISON=1) every output, lse and gradient is still finite and the oracle's, in
    the lane kernels (rows in place and rings at the grid's borders, the dS store, kept probabilities,
    grouped heads, 7-wide windows) and the row kernels. A ring that left its rows outside the grid unwritten
    would put NaN into every border query's result."""
    monkeypatch.setenv("NUWA_CPU_SCRATCH_POISON", "1")
    q, k, v = case.inputs(dtype, requires_grad=True)
    out, lse = run_cpu(case, q, k, v)
    g_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    g_lse = torch.randn(q.shape[:-1], dtype=torch.float64)
    grads = _loss_grads(out, lse, (q, k, v), g_out, g_lse)
    for t in (out, lse, *grads):
        assert bool(torch.isfinite(t).all())
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = run_oracle(case, qd, kd, vd)
    assert rel_err(out, ref_out) < TOLERANCE[dtype]
    assert rel_err(lse, ref_lse) < TOLERANCE[_ops.accum_dtype(dtype)]
    for got, want in zip(grads, _loss_grads(ref_out, ref_lse, (qd, kd, vd), g_out, g_lse)):
        assert rel_err(got, want) < TOLERANCE[dtype]


def test_outputs_come_from_the_block_pool_and_behave_as_tensors():
    """Freed outputs go back to the pool and the next call reuses them (no page faults); pooled tensors
    resize, and the values are right whatever memory they land in."""
    cpu.empty_cache()
    case = Case("pool", (4, 16, 16), heads=4, D=64, B=1)  # 256 KiB outputs: pooled
    q, k, v = case.inputs(torch.float32)
    out, _ = run_cpu(case, q, k, v)
    ptr, want = out.data_ptr(), out.clone()
    del out
    assert cpu.cached_bytes() >= 4 * 16 * 16 * 4 * 64 * 4
    out2, _ = run_cpu(case, q, k, v)
    assert out2.data_ptr() == ptr
    assert torch.equal(out2, want)
    out2.resize_(2, 1 << 20)  # a pooled storage grows like any other
    out2.fill_(1.0)
    assert float(out2.sum()) == 2 * (1 << 20)
    del out2
    assert cpu.empty_cache() > 0 and cpu.cached_bytes() == 0


def test_block_pool_can_be_turned_off():
    code = ("import torch, nuwa_kernels as nk\nfrom nuwa_kernels.backends import cpu\n"
            "q = torch.randn(1, 4, 16, 16, 4, 64)\n"
            "o = nk.nearby_attention(q, q, q, kernel_size=3, backend='cpu'); del o\n"
            "print(cpu.cached_bytes())")
    env = dict(os.environ, NUWA_CPU_POOL_MB="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_block_pool_across_fork():
    """A forked child (DataLoader workers) reuses the blocks its parent cached, and the two processes'
    results stay their own (the pool's memory is private, copy-on-write)."""
    code = """
import os, torch, nuwa_kernels as nk
from nuwa_kernels.backends import cpu
torch.set_num_threads(1)
q = torch.randn(1, 4, 16, 16, 4, 64)
want = nk.nearby_attention(q, q, q, kernel_size=3, backend='cpu')
o = nk.nearby_attention(q, q, q, kernel_size=3, backend='cpu'); del o
assert cpu.cached_bytes() > 0
pid = os.fork()
if pid == 0:
    got = nk.nearby_attention(2 * q, q, q, kernel_size=3, backend='cpu')
    ref = nk.nearby_attention(2 * q, q, q, kernel_size=3, backend='reference')
    os._exit(0 if torch.allclose(got, ref, atol=1e-5) else 1)
got = nk.nearby_attention(q, q, q, kernel_size=3, backend='cpu')
_, status = os.waitpid(pid, 0)
assert status == 0, status
assert torch.equal(got, want)
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
