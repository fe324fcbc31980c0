"""NATTEN 0.21.7 as an external oracle: its na3d equals border="shift" with per-axis causal masks.

NATTEN installs here as pure Python (its FlexAttention backend, CPU, forward only). The setup script
installs it; this test skips only when it cannot be imported.
"""

from __future__ import annotations

import pytest
import torch

import nuwa_kernels as nk
from oracle import rel_err

natten = pytest.importorskip("natten", reason="natten==0.21.7 is not installed (pip install --no-build-isolation natten==0.21.7)")

CASES = [
    ((3, 5, 5), (3, 3, 3), (False, False, False)),
    ((4, 6, 5), (3, 5, 3), (True, False, False)),
    ((4, 4, 6), (2, 4, 5), (False, True, True)),
    ((3, 4, 4), (3, 4, 4), (True, True, True)),
]


@pytest.mark.parametrize("grid,ks,causal", CASES, ids=lambda x: str(x))
def test_matches_natten_na3d(grid, ks, causal):
    torch.manual_seed(sum(grid) + sum(ks))
    q, k, v = (torch.randn(1, *grid, 2, 32) for _ in range(3))
    try:
        ref = natten.na3d(q, k, v, kernel_size=ks, is_causal=causal)
    except Exception as exc:  # pragma: no cover - NATTEN backend unavailable on this platform
        pytest.skip(f"natten.na3d cannot run here: {exc}")
    for backend in ("reference", "cpu"):
        if not nk.can_run(backend, q, k, v, kernel_size=ks, causal=causal, border="shift")[0]:
            continue
        out = nk.nearby_attention(q, k, v, kernel_size=ks, causal=causal, border="shift", backend=backend)
        assert rel_err(out, ref) < 1e-5, backend


GENERALISED = [  # (grid, kernel_size, stride, dilation, causal)
    ((4, 6, 8), (2, 3, 4), (1, 2, 2), 1, (False, False, False)),
    ((4, 8, 6), (3, 3, 3), 1, (1, 2, 2), (False, False, False)),
    ((6, 8, 8), (3, 4, 4), (3, 2, 4), (2, 2, 1), (False, True, False)),
    ((5, 6, 9), (3, 3, 3), (3, 3, 3), (1, 1, 3), (True, False, False)),
]


@pytest.mark.parametrize("grid,ks,stride,dilation,causal", GENERALISED, ids=lambda x: str(x))
def test_matches_natten_stride_dilation_additional_keys(grid, ks, stride, dilation, causal):
    """Contract 3a/5a: stride, dilation and additional keys equal NATTEN's na3d on the shift border."""
    torch.manual_seed(sum(grid) + sum(ks))
    q, k, v = (torch.randn(1, *grid, 2, 32) for _ in range(3))
    ak, av = torch.randn(1, 3, 2, 32), torch.randn(1, 3, 2, 32)
    kw = dict(kernel_size=ks, stride=stride, dilation=dilation)
    try:
        ref = natten.na3d(q, k, v, is_causal=causal, **kw)
        ref_extra = natten.na3d(q, k, v, is_causal=causal, additional_keys=ak, additional_values=av, **kw)
    except Exception as exc:  # pragma: no cover - NATTEN backend unavailable on this platform
        pytest.skip(f"natten.na3d cannot run here: {exc}")
    for backend in ("reference", "cpu"):
        if not nk.can_run(backend, q, k, v)[0]:
            continue
        out = nk.nearby_attention(q, k, v, causal=causal, border="shift", backend=backend, **kw)
        assert rel_err(out, ref) < 1e-5, backend
        out = nk.nearby_attention(q, k, v, causal=causal, border="shift", backend=backend, additional_keys=ak,
                                  additional_values=av, **kw)
        assert rel_err(out, ref_extra) < 1e-5, backend
