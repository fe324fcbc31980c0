"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu/``), forward and backward, OpenMP threads.

Runs ``nuwa_kernels::na3d_fwd`` / ``na3d_bwd`` on CPU tensors of dtype float32, float64, bfloat16 or
float16 (half types computed in float32), any strides, any head dim. Each query visits only the keys of
its window; backward is deterministic. Threads: ``torch.set_num_threads``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _ops
from ..window import WindowSpec
from . import _fused_ops

NAME = "cpu"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def can_run(query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec) -> Tuple[bool, str]:
    """Whether the fused CPU kernel can run this call, and the reason when it cannot."""
    err = _fused_ops.load_error()
    if err is not None:
        return False, err
    err = _fused_ops.device_and_dtype_error(NAME, "cpu", SUPPORTED_DTYPES, query, key, value)
    return (False, err) if err else (True, "")


def forward(
    query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec, scale: float
) -> Tuple[Tensor, Tensor]:
    """``(out, lse)``: ``out (B, T, H, W, heads, Dv)`` in the input dtype, ``lse (B, T, H, W, heads)`` in
    the accumulation dtype; differentiable with respect to ``query``, ``key`` and ``value``."""
    return _ops.call(_fused_ops.pair(), query, key, value, *_ops.spec_op_args(spec), float(scale))
