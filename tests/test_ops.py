"""torch.library registration: opcheck, gradcheck, torch.compile(fullgraph=True) with no recompiles."""

from __future__ import annotations

import pytest
import torch

import nuwa_kernels as nk
from nuwa_kernels import _ops
from nuwa_kernels.backends import reference
from oracle import oracle_attention, random_grid_inputs, rel_err
from test_backends import device_for, require_or_skip

SETTINGS = [
    pytest.param(([3, 3, 3], [False, False, False], True, False, [1, 1, 1], []), id="raster"),
    pytest.param(([2, 3, 7], [True, False, False], False, True, [1, 1, 1], []), id="frame-causal-shift"),
    pytest.param(([3, 3, 3], [False, True, False], False, True, [2, 1, 3], []), id="stride-shift"),
    pytest.param(([1, 4, 5], [False, True, True], False, False, [1, 1, 1], [0, 1, 0, 0, 0, 0, 2, 6, 5, 2, 6, 5]),
                 id="hw-causal-even-slab"),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_opcheck_reference(setting):
    q, k, v = random_grid_inputs(2, (2, 3, 4), (2, 3, 4), 4, 2, 8, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(reference.FWD_OP, (q, k, v, *setting, 0.4))
    with torch.no_grad():
        out, lse = reference.FWD_OP(q, k, v, *setting, 0.4)
    g = torch.randn_like(out)
    delta = (g * out).sum(-1)
    torch.library.opcheck(reference.BWD_OP, (g, q.detach(), k.detach(), v.detach(), lse, delta, *setting, 0.4))


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=(3, 2, None), causal=True),
        dict(kernel_size=(2, 3, 3), causal=(True, False, True), border="shift"),
        dict(kernel_size=3, causal=False, border="truncate"),
    ],
    ids=["raster", "per-axis-shift", "plain"],
)
def test_gradcheck_reference_float64(kw):
    q, k, v = random_grid_inputs(1, (2, 3, 4), (2, 3, 4), 2, 1, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: nk.nearby_attention(q, k, v, **kw, return_lse=True, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_reference_cross_grid():
    q, k, v = random_grid_inputs(1, (3, 2, 4), (2, 3, 2), 2, 2, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: nk.nearby_attention(q, k, v, kernel_size=(2, 1, 3), causal=(False, True, False), backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_compile_fullgraph_forward_backward_no_recompile(backend):
    device = device_for(backend)
    dtype = torch.float32
    q, k, v = random_grid_inputs(1, (2, 3, 4), (2, 3, 4), 2, 1, 16, dtype=dtype, device=device, requires_grad=True)
    require_or_skip(backend, q, k, v)
    torch._dynamo.reset()

    def block(q, k, v):
        return nk.nearby_attention(q * 1.5, k, v, kernel_size=(2, 3, 3), causal=True, backend=backend).sin().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # fresh inputs of the same shape must not recompile
            q, k, v = random_grid_inputs(1, (2, 3, 4), (2, 3, 4), 2, 1, 16, dtype=dtype, device=device, requires_grad=True)
            loss = compiled(q, k, v)
            grads = torch.autograd.grad(loss, (q, k, v))
            qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
            ref = (oracle_attention(qd * 1.5, kd, vd, kernel_size=(2, 3, 3), causal=True)[0]).sin().sum()
            ref_grads = torch.autograd.grad(ref, (qd, kd, vd))
            assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
            for g, r in zip(grads, ref_grads):
                assert rel_err(g.cpu(), r) < 1e-4


def test_compile_inductor_sdpa_reference():
    """The default inductor backend too, through nearby_sdpa."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 24, 8, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: nk.nearby_sdpa(q, k, v, (2, 3, 4), is_causal=True, backend="reference"), fullgraph=True)
    out = fn(q, k, v)
    out.sum().backward()
    ref = nk.nearby_sdpa(q, k, v, (2, 3, 4), is_causal=True, backend="reference")
    assert rel_err(out, ref) < 1e-6
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_fake_kernels_match_real_outputs():
    q, k, v = random_grid_inputs(2, (2, 3, 4), (1, 3, 2), 4, 2, 8, dtype=torch.float64)
    fake = _ops._fake_fwd(q, k, v, [3, 3, 3], [True, False, False], False, False, [1, 1, 1], [], 0.3)
    real = reference.FWD_OP(q, k, v, [3, 3, 3], [True, False, False], False, False, [1, 1, 1], [], 0.3)
    for f, r in zip(fake, real):
        assert f.shape == r.shape and f.dtype == r.dtype and f.stride() == r.stride()
