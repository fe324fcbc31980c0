"""hypothesis fuzzing of every runnable backend against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nuwa_kernels as nk
from oracle import TOLERANCE, oracle_attention, rel_err
from test_backends import device_for

axis_len = st.integers(1, 4)
kernel = st.one_of(st.none(), st.integers(1, 5))
causal = st.one_of(st.booleans(), st.tuples(st.booleans(), st.booleans(), st.booleans()))


@st.composite
def calls(draw, head_dims=(1, 2, 3, 8)):
    q_grid = tuple(draw(axis_len) for _ in range(3))
    c = draw(causal)
    cross = c is not True and draw(st.booleans())
    kv_grid = tuple(draw(axis_len) for _ in range(3)) if cross else q_grid
    heads_kv = draw(st.integers(1, 2))
    heads = heads_kv * draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, 2)),
        q_grid=q_grid,
        kv_grid=kv_grid,
        heads=heads,
        heads_kv=heads_kv,
        D=draw(st.sampled_from(head_dims)),
        kernel_size=draw(st.one_of(kernel, st.tuples(kernel, kernel, kernel))),
        causal=c,
        border=draw(st.sampled_from(["truncate", "shift"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _run(backend, dtype, call, grads):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(call["seed"])
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(grads)  # noqa: E731
    q = mk(call["B"], *call["q_grid"], call["heads"], call["D"])
    k = mk(call["B"], *call["kv_grid"], call["heads_kv"], call["D"])
    v = mk(call["B"], *call["kv_grid"], call["heads_kv"], call["D"])
    kw = dict(kernel_size=call["kernel_size"], causal=call["causal"], border=call["border"], scale=call["scale"])
    ok, why = nk.can_run(backend, q, k, v, kernel_size=kw["kernel_size"], causal=kw["causal"], border=kw["border"])
    if not ok:
        pytest.skip(f"{backend}: {why}")
    out, lse = nk.nearby_attention(q, k, v, **kw, return_lse=True, backend=backend)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_(grads) for t in (q, k, v))
    ref_out, ref_lse = oracle_attention(qd, kd, vd, **kw)
    tol = TOLERANCE[dtype]
    assert rel_err(out.cpu(), ref_out) < tol
    assert rel_err(lse.cpu(), ref_lse) < tol
    if grads:
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), g.to(device=device, dtype=dtype))
        ref = torch.autograd.grad(ref_out, (qd, kd, vd), g)
        for a, b in zip(got, ref):
            assert rel_err(a.cpu(), b) < tol * 4


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@fuzz(120)
@given(call=calls())
def test_fuzz_reference_float64(call):
    _run("reference", torch.float64, call, grads=True)


@fuzz(120)
@given(call=calls())
def test_fuzz_cpu_float64(call):
    _run("cpu", torch.float64, call, grads=True)


@fuzz(40)
@given(call=calls())
def test_fuzz_cpu_bfloat16(call):
    _run("cpu", torch.bfloat16, call, grads=False)


@fuzz(25)
@given(call=calls(head_dims=(16,)))
def test_fuzz_triton_float32(call):
    _run("triton", torch.float32, call, grads=True)


@pytest.mark.gpu
@fuzz(60)
@given(call=calls(head_dims=(32, 64)))
def test_fuzz_cuda_float16(call):
    _run("cuda", torch.float16, call, grads=True)
