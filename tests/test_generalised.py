"""Contract sections 3a (stride, dilation), 5a (additional keys, merge_attentions), 6 (SDPA keywords,
second-order gradients) and slabs, on every backend against the float64 oracle."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import nuwa_kernels as nk
from nuwa_kernels import window as win
from oracle import TOLERANCE, oracle_attention, random_grid_inputs, rel_err
from test_backends import BACKENDS, DTYPES, device_for, require_or_skip


@dataclass(frozen=True)
class GCase:
    id: str
    grid: tuple
    kernel_size: object
    stride: object = 1
    dilation: object = 1
    causal: object = False
    border: str = "truncate"
    heads: int = 2
    heads_kv: int = 1
    extra: int = 0  # additional tokens
    kv_grid: tuple = None

    def kw(self):
        return dict(kernel_size=self.kernel_size, causal=self.causal, border=self.border, stride=self.stride,
                    dilation=self.dilation)


GCASES = [
    GCase("stride-shift", (3, 6, 7), (3, 4, 3), (1, 2, 3), border="shift"),
    GCase("stride-truncate-raster", (4, 5, 6), 3, (2, 1, 2), causal=True),
    GCase("stride-causal-axes", (5, 4, 6), (3, 3, 4), (3, 2, 2), causal=(True, False, True)),
    GCase("blocked", (4, 4, 6), (2, 4, 3), (2, 4, 3), border="shift"),
    GCase("dilation-truncate", (4, 7, 6), (3, 3, 3), 1, (2, 2, 3)),
    GCase("dilation-shift-causal-t", (5, 6, 7), (2, 3, 3), 1, (1, 2, 2), causal=(True, False, False), border="shift"),
    GCase("dilation-raster", (3, 5, 6), 3, 1, (1, 2, 2), causal=True),
    GCase("stride-dilation", (4, 8, 9), (3, 3, 3), (1, 2, 3), (2, 2, 2), border="shift"),
    GCase("extra-tokens", (3, 4, 5), 3, extra=3),
    GCase("extra-raster-stride-dilation", (3, 6, 6), (3, 3, 2), (1, 3, 2), (1, 2, 1), causal=True, extra=2),
    GCase("extra-cross", (2, 3, 5), (1, 3, 3), extra=4, kv_grid=(3, 4, 4)),
    GCase("none-window-extra", (2, 3, 4), (None, 1, 3), (1, 1, 3), extra=1, border="shift"),
]


def _inputs(case: GCase, dtype, device, requires_grad=True):
    q, k, v = random_grid_inputs(2, case.grid, case.kv_grid or case.grid, case.heads, case.heads_kv, 16,
                                 dtype=dtype, device=device, requires_grad=requires_grad)
    extra = {}
    if case.extra:
        mk = lambda: torch.randn(2, case.extra, case.heads_kv, 16).to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
        extra = dict(additional_keys=mk(), additional_values=mk())
    return q, k, v, extra


@pytest.mark.parametrize("case", GCASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_generalised_forward_and_grads(backend, case):
    device = device_for(backend)
    dtype = torch.float64 if torch.float64 in DTYPES[backend] else torch.float32
    q, k, v, extra = _inputs(case, dtype, device)
    require_or_skip(backend, q, k, v, kernel_size=case.kernel_size, causal=case.causal, border=case.border,
                    stride=case.stride)
    out, lse = nk.nearby_attention(q, k, v, return_lse=True, backend=backend, **case.kw(), **extra)
    leaves = [q, k, v, *extra.values()]
    dleaves = [t.detach().double().requires_grad_() for t in leaves]
    dextra = dict(zip(extra.keys(), dleaves[3:]))
    ref_out, ref_lse = oracle_attention(*dleaves[:3], **case.kw(), **dextra)
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) < tol
    assert rel_err(lse, ref_lse) < tol
    g_out, g_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    grads = torch.autograd.grad((out, lse), leaves, (g_out.to(out.dtype), g_lse.to(lse.dtype)))
    ref = torch.autograd.grad((ref_out, ref_lse), dleaves, (g_out, g_lse))
    for name, g, r in zip(("dq", "dk", "dv", "dak", "dav"), grads, ref):
        assert rel_err(g, r) < tol * 10, name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_half_precision_stride_dilation(backend):
    case = GCASES[7]
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, _ = _inputs(case, dtype, "cpu", requires_grad=False)
        require_or_skip(backend, q, k, v)
        out = nk.nearby_attention(q, k, v, backend=backend, **case.kw())
        ref, _ = oracle_attention(q, k, v, **case.kw())
        assert rel_err(out, ref) < TOLERANCE[dtype]


# --- worked examples of section 3a, Python and C++ window maths ------------------------------------

WORKED = [  # (k, s, causal, shift, windows for i = 0..7 on an axis of 8)
    (4, 2, False, True, [(0, 3), (0, 3), (1, 4), (1, 4), (3, 6), (3, 6), (4, 7), (4, 7)]),
    (4, 4, False, True, [(0, 3)] * 4 + [(4, 7)] * 4),
    (3, 2, False, False, [(0, 2), (0, 2), (2, 4), (2, 4), (4, 6), (4, 6), (6, 7), (6, 7)]),
    (3, 2, True, False, [(0, 0), (0, 1), (1, 2), (1, 3), (3, 4), (3, 5), (5, 6), (5, 7)]),
]


@pytest.mark.parametrize("k,s,causal,shift,expected", WORKED)
def test_stride_worked_examples(k, s, causal, shift, expected):
    assert [win.axis_window(i, 8, 8, k, causal, shift, s) for i in range(8)] == expected
    lo, hi = win.axis_bounds(8, 8, k, causal, shift, stride=s)
    assert list(zip(lo.tolist(), hi.tolist())) == expected
    if hasattr(torch.ops.nuwa_kernels, "window_table"):
        table, _ = torch.ops.nuwa_kernels.window_table(8, 8, k, causal, shift, s)
        assert [tuple(r) for r in table.tolist()] == expected


def test_dilation_worked_example():
    q = torch.randn(1, 1, 1, 8, 1, 8, dtype=torch.float64)
    from oracle import oracle_axis_keys

    assert [oracle_axis_keys(i, 8, 8, 3, False, "truncate", 1, 2) for i in range(8)] == [
        [0, 2], [1, 3], [0, 2, 4], [1, 3, 5], [2, 4, 6], [3, 5, 7], [4, 6], [5, 7]]
    # a value that is one-hot per key position shows exactly which keys a query averages
    v = torch.eye(8, dtype=torch.float64).reshape(1, 1, 1, 8, 1, 8)
    k = torch.zeros_like(q)
    out = nk.nearby_attention(q, k, v, kernel_size=(1, 1, 3), dilation=(1, 1, 2), backend="reference")
    seen = [sorted(torch.nonzero(out[0, 0, 0, i, 0] > 0).flatten().tolist()) for i in range(8)]
    assert seen == [[0, 2], [1, 3], [0, 2, 4], [1, 3, 5], [2, 4, 6], [3, 5, 7], [4, 6], [5, 7]]


@pytest.mark.parametrize("k,s,causal,shift", [(5, 3, False, True), (5, 2, True, False), (6, 4, False, False)])
def test_header_matches_python_with_stride_and_slab(k, s, causal, shift):
    if not hasattr(torch.ops.nuwa_kernels, "window_table"):
        pytest.skip("extension not built")
    full = 13
    for q0, nq, k0, nk_ in [(0, 13, 0, 13), (4, 5, 1, 10), (9, 4, 6, 7)]:
        table, inv = torch.ops.nuwa_kernels.window_table(nq, nk_, k, causal, shift, s, [q0, k0, full, full])
        lo, hi = win.axis_bounds(full, full, k, causal, shift, stride=s, q_origin=q0, k_origin=k0, q_count=nq,
                                 k_count=nk_)
        assert table[:, 0].tolist() == lo.tolist() and table[:, 1].tolist() == hi.tolist()
        for j in range(nk_):
            qs = [i for i in range(nq) if lo[i] <= j <= hi[i]]
            first, last = inv[j].tolist()
            assert (list(range(first, last + 1)) if first <= last else []) == qs


# --- slabs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("causal,border,stride,dilation", [
    (True, "truncate", 1, 1), ((True, False, False), "shift", (2, 1, 1), 1), (False, "shift", 1, (2, 1, 1)),
    (False, "truncate", (1, 2, 1), (1, 2, 1)),
])
@pytest.mark.parametrize("axis", [0, 1])
def test_slab_equals_rows_of_the_whole_grid(backend, causal, border, stride, dilation, axis):
    device = device_for(backend)
    dtype = torch.float64 if backend != "triton" else torch.float32
    grid = (6, 7, 5)
    q, k, v = random_grid_inputs(1, grid, grid, 2, 1, 16, dtype=dtype, device=device, requires_grad=True)
    kw = dict(kernel_size=3, causal=causal, border=border, stride=stride, dilation=dilation)
    spec_ok, why = nk.can_run(backend, q, k, v, kernel_size=3)
    if not spec_ok:
        require_or_skip(backend, q, k, v)
    full_out, full_lse = nk.nearby_attention(q, k, v, return_lse=True, backend="reference", **kw)
    q_lo, q_hi = 2, 4
    k_lo, k_hi = win.needed_key_range(grid, 3, causal, border, stride, dilation, axis, q_lo, q_hi)
    sl = lambda t, a, b: t.narrow(1 + axis, a, b - a + 1)  # noqa: E731
    origin = lambda x: tuple(x if a == axis else 0 for a in range(3))  # noqa: E731
    slab = nk.Slab(origin(q_lo), origin(k_lo), grid, grid)
    try:
        out, lse = nk.nearby_attention_slab(sl(q, q_lo, q_hi), sl(k, k_lo, k_hi), sl(v, k_lo, k_hi), slab,
                                            return_lse=True, backend=backend, **kw)
    except nk.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    tol = TOLERANCE[dtype]
    assert rel_err(out, sl(full_out, q_lo, q_hi)) < tol
    assert rel_err(lse, sl(full_lse, q_lo, q_hi)) < tol
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    full_g = torch.zeros_like(full_out)
    sl(full_g, q_lo, q_hi).copy_(g)
    rdq, rdk, rdv = torch.autograd.grad(full_out, (q, k, v), full_g)
    assert rel_err(dq, rdq) < tol * 10 and rel_err(dk, rdk) < tol * 10 and rel_err(dv, rdv) < tol * 10


def test_needed_key_range_covers_every_window():
    grid = (9, 4, 4)
    for kw in [dict(kernel_size=3), dict(kernel_size=(4, 3, 3), border="shift", stride=(2, 1, 1)),
               dict(kernel_size=3, dilation=(3, 1, 1)), dict(kernel_size=5, causal=True),
               dict(kernel_size=(5, 3, 3), causal=(True, False, False), stride=(3, 1, 1))]:
        from oracle import oracle_mask

        mask = oracle_mask(grid, grid, kw.get("kernel_size"), kw.get("causal", False), kw.get("border", "truncate"),
                           kw.get("stride", 1), kw.get("dilation", 1)).reshape(9, 16, 9, 16)
        for lo_q in range(9):
            for hi_q in range(lo_q, 9):
                lo, hi = win.needed_key_range(grid, axis=0, q_lo=lo_q, q_hi=hi_q, **kw)
                used = mask[lo_q:hi_q + 1].any(1).any(0).any(-1).nonzero().flatten()
                assert lo <= int(used.min()) and int(used.max()) <= hi
                assert lo == int(used.min()) and hi == int(used.max())


# --- additional keys and merge_attentions -------------------------------------------------------------


def test_merge_attentions_is_exact_and_differentiable():
    q, k, v = random_grid_inputs(2, (2, 3, 4), (2, 3, 4), 2, 2, 8, requires_grad=True)
    ak = torch.randn(2, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    av = torch.randn(2, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    o1, l1 = nk.nearby_attention(q, k, v, 3, return_lse=True, backend="reference")
    o2, l2 = nk.nearby_attention(q, ak[:, None, None], av[:, None, None], None, return_lse=True,
                                 backend="reference")
    out, lse = nk.merge_attentions([o1, o2], [l1, l2])
    ref_out, ref_lse = oracle_attention(q, k, v, 3, additional_keys=ak, additional_values=av)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b, c, d: nk.merge_attentions([a, b], [c, d]),
                                    (o1.detach().requires_grad_(), o2.detach().requires_grad_(),
                                     l1.detach().requires_grad_(), l2.detach().requires_grad_()))
    # a part that saw no key (lse = -inf) contributes nothing and makes no NaN
    out, lse = nk.merge_attentions([o1, torch.zeros_like(o1)], [l1, torch.full_like(l1, float("-inf"))])
    assert torch.allclose(out, o1) and torch.allclose(lse, l1)


def test_merge_attentions_bad_input():
    o = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="lses"):
        nk.merge_attentions([o], [torch.zeros(2, 4)])
    with pytest.raises(ValueError):
        nk.merge_attentions([o, o], [torch.zeros(2, 3)])
    with pytest.raises(TypeError):
        nk.merge_attentions(o, torch.zeros(2, 3))


def test_zero_additional_tokens_is_plain_attention():
    q, k, v = random_grid_inputs(1, (2, 3, 4), (2, 3, 4), 2, 1, 8)
    empty = torch.zeros(1, 0, 1, 8, dtype=torch.float64)
    out = nk.nearby_attention(q, k, v, 3, additional_keys=empty, additional_values=empty)
    assert torch.equal(out, nk.nearby_attention(q, k, v, 3))


# --- nearby_sdpa as a drop-in ---------------------------------------------------------------------------


def test_sdpa_keywords_and_layout():
    B, heads, hkv, D, grid = 2, 4, 2, 8, (2, 3, 4)
    N = 24
    q = torch.randn(B, heads, N, D, dtype=torch.float64)
    k = torch.randn(B, hkv, N, D, dtype=torch.float64)
    v = torch.randn(B, hkv, N, D, dtype=torch.float64)
    ak = torch.randn(B, hkv, 3, D, dtype=torch.float64)
    av = torch.randn(B, hkv, 3, D, dtype=torch.float64)
    out = nk.nearby_sdpa(q, k, v, grid, kernel_size=3, is_causal=True, attn_mask=None, dropout_p=0.0,
                         enable_gqa=True, stride=(1, 1, 2), dilation=(1, 1, 2), additional_keys=ak,
                         additional_values=av)
    to_grid = lambda t: t.transpose(1, 2).unflatten(1, grid)  # noqa: E731
    ref, _ = oracle_attention(to_grid(q), to_grid(k), to_grid(v), 3, True, stride=(1, 1, 2), dilation=(1, 1, 2),
                              additional_keys=ak.transpose(1, 2), additional_values=av.transpose(1, 2))
    assert rel_err(out, ref.flatten(1, 3).transpose(1, 2)) < 1e-12
    # whole-axis windows equal SDPA itself, keywords and all
    full = nk.nearby_sdpa(q, k, v, grid, kernel_size=None, attn_mask=None, dropout_p=0.0, enable_gqa=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, enable_gqa=True)
    assert torch.allclose(full, sdpa, atol=1e-12)


def test_sdpa_rejects_masks_and_dropout():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="attn_mask"):
        nk.nearby_sdpa(q, q, q, (1, 2, 3), attn_mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        nk.nearby_sdpa(q, q, q, (1, 2, 3), dropout_p=0.1)


# --- second-order gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_double_backward_is_exact(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend != "triton" else torch.float32
    q, k, v = random_grid_inputs(1, (2, 3, 3), (2, 3, 3), 2, 1, 16, dtype=dtype, device=device, requires_grad=True)
    kw = dict(kernel_size=(2, 3, 3), causal=True, stride=(1, 1, 2))
    require_or_skip(backend, q, k, v, kernel_size=kw["kernel_size"], stride=kw["stride"])

    def penalty(fn_backend, q, k, v):
        out, lse = nk.nearby_attention(q, k, v, return_lse=True, backend=fn_backend, **kw)
        loss = (out.sin().sum() + lse.cos().sum())
        g = torch.autograd.grad(loss, (q, k, v), create_graph=True)
        return sum((x ** 2).sum() for x in g)

    got = torch.autograd.grad(penalty(backend, q, k, v), (q, k, v))
    dq, dk, dv = (t.detach().double().requires_grad_() for t in (q, k, v))

    def oracle_penalty(q, k, v):
        out, lse = oracle_attention(q, k, v, **kw)
        loss = (out.sin().sum() + lse.cos().sum())
        g = torch.autograd.grad(loss, (q, k, v), create_graph=True)
        return sum((x ** 2).sum() for x in g)

    ref = torch.autograd.grad(oracle_penalty(dq, dk, dv), (dq, dk, dv))
    for a, b in zip(got, ref):
        assert rel_err(a, b) < (1e-10 if dtype == torch.float64 else 1e-4)


def test_gradgradcheck_cpu():
    q, k, v = random_grid_inputs(1, (1, 3, 3), (1, 3, 3), 1, 1, 4, requires_grad=True)
    ok, _ = nk.can_run("cpu", q, k, v)
    backend = "cpu" if ok else "reference"
    fn = lambda q, k, v: nk.nearby_attention(q, k, v, (1, 3, 3), causal=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


# --- bad input ------------------------------------------------------------------------------------------


def test_generalised_bad_input():
    q, k, v = random_grid_inputs(1, (2, 4, 4), (2, 4, 4), 2, 1, 8)
    with pytest.raises(ValueError, match="stride"):
        nk.nearby_attention(q, k, v, 3, stride=4)
    with pytest.raises(ValueError, match="stride"):
        nk.nearby_attention(q, k, v, (None, 3, 3), stride=(2, 1, 1))
    with pytest.raises(ValueError, match="stride"):
        nk.nearby_attention(q, k, v, 3, stride=0)
    with pytest.raises(TypeError, match="stride"):
        nk.nearby_attention(q, k, v, 3, stride=1.5)
    with pytest.raises(ValueError, match="dilation"):
        nk.nearby_attention(q, k, v, 3, dilation=(1, 0, 1))
    with pytest.raises(TypeError, match="dilation"):
        nk.nearby_attention(q, k, v, 3, dilation="2")
    qc, kc, vc = random_grid_inputs(1, (2, 4, 4), (2, 5, 4), 2, 1, 8)
    with pytest.raises(ValueError, match="dilation"):
        nk.nearby_attention(qc, kc, vc, 3, dilation=(1, 2, 1))
    nk.nearby_attention(qc, kc, vc, 3, dilation=(2, 1, 2))  # equal lengths on the dilated axes: fine
    ak = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="additional_values"):
        nk.nearby_attention(q, k, v, 3, additional_keys=ak)
    with pytest.raises(ValueError, match="additional_keys"):
        nk.nearby_attention(q, k, v, 3, additional_values=ak)
    for bad, what in ((torch.randn(2, 3, 1, 8, dtype=torch.float64), "batch"),
                      (torch.randn(1, 3, 2, 8, dtype=torch.float64), "heads_kv"),
                      (torch.randn(1, 3, 1, 4, dtype=torch.float64), "head dim")):
        with pytest.raises(ValueError, match=what):
            nk.nearby_attention(q, k, v, 3, additional_keys=bad, additional_values=bad)
    with pytest.raises(TypeError, match="additional_keys"):
        nk.nearby_attention(q, k, v, 3, additional_keys=ak.float(), additional_values=ak)


def test_numpy_ints_and_huge_windows():
    q, k, v = random_grid_inputs(1, (2, 3, 4), (2, 3, 4), 1, 1, 8)
    ref = nk.nearby_attention(q, k, v, (1, 3, 3))
    assert torch.equal(nk.nearby_attention(q, k, v, (np.int64(1), np.int32(3), 3)), ref)
    whole = nk.nearby_attention(q, k, v, None)
    assert torch.equal(nk.nearby_attention(q, k, v, 2 ** 63), whole)
    assert torch.equal(nk.nearby_attention(q, k, v, 2 ** 63, stride=2 ** 62), nk.nearby_attention(q, k, v, None))
    qs = q.flatten(1, 3).transpose(1, 2)
    assert nk.nearby_sdpa(qs, qs, qs, (np.int64(2), 3, 4)).shape == qs.shape
    with pytest.raises(ValueError, match="kernel_size"):
        nk.nearby_attention(q, k, v, -(2 ** 63))


def test_compile_fullgraph_with_generalised_arguments():
    q, k, v = random_grid_inputs(1, (3, 4, 6), (3, 4, 6), 2, 2, 16, dtype=torch.float32, requires_grad=True)
    ak = torch.randn(1, 3, 2, 16, requires_grad=True)
    backend = "cpu" if nk.can_run("cpu", q, k, v)[0] else "reference"

    def f(q, k, v, ak):
        return nk.nearby_attention(q, k, v, (3, 3, 3), causal=True, stride=(1, 2, 1), dilation=(1, 1, 2),
                                   additional_keys=ak, additional_values=ak, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v, ak)
    ref = f(q, k, v, ak)
    assert rel_err(out, ref) < 1e-6
    g = torch.autograd.grad(out.sum(), (q, k, v, ak))
    r = torch.autograd.grad(ref.sum(), (q, k, v, ak))
    for a, b in zip(g, r):
        assert rel_err(a, b) < 1e-6


def test_strided_causal_cross_axis_without_keys_is_an_error():
    """Section 4 (every query sees a key) under section 3a: a strided causal cross-attention axis whose
    block leader's window starts past a query's own centre is refused, naming stride."""
    q, _, _ = random_grid_inputs(1, (3, 4, 5), (3, 4, 5), 2, 1, 16)
    _, k, v = random_grid_inputs(1, (2, 6, 3), (2, 6, 3), 2, 1, 16)
    with pytest.raises(ValueError, match="stride"):
        nk.nearby_attention(q, k, v, 3, causal=(False, True, False), stride=(1, 3, 1))
    nk.nearby_attention(q, k, v, 3, causal=(False, True, False), stride=(1, 2, 1))  # every query keeps a key
