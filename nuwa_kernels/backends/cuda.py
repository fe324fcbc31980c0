"""The ``cuda`` backend: fused CUDA C++ kernels (``csrc/cuda/``), forward and backward.

Runs ``nuwa_kernels::na3d_fwd`` / ``na3d_bwd`` on CUDA tensors of dtype float16, bfloat16 or float32
(softmax and accumulation in float32; float32 inputs use no TF32), head dims that are multiples of 8 in
``[8, 256]`` with ``Dv == D``, any strides (no hidden copies), every window setting of the contract
(both borders, raster and per-axis causality, cross grids, grouped heads). The backward is
deterministic: dK/dV walk each key's inverse neighbourhood, no atomics. Extra memory beyond the
outputs: none.

The op pair, its fake kernels and autograd are shared with the ``cpu`` backend
(:mod:`nuwa_kernels.backends._fused_ops`); the CUDA dispatch key picks these kernels.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from .. import _ops
from ..window import WindowSpec
from . import _fused_ops

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 8
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8


@torch.compiler.assume_constant_result
def kernels_error() -> str | None:
    """Why the CUDA kernels are unavailable in this build, or ``None`` when they are registered.

    Fixed for the life of the process (the extension loads once), so it is computed once and
    ``torch.compile`` takes it as a constant (it asks the dispatcher, which dynamo cannot trace)."""
    return _kernels_error()


@functools.lru_cache(maxsize=None)
def _kernels_error() -> str | None:
    err = _fused_ops.load_error()
    if err is not None:
        return err
    try:
        has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(_fused_ops.FWD_NAME, "CUDA")
    except RuntimeError:  # the op itself is not declared (csrc/ops.cpp missing from the build)
        return f"the op {_fused_ops.FWD_NAME} is not registered by nuwa_kernels._C"
    if not has_cuda_kernel:
        return (
            "nuwa_kernels._C was built without the CUDA kernels (torch is a CPU build, nvcc/CUDA_HOME was "
            "not found, or NUWA_SKIP_CUDA was set); reinstall with a CUDA build of torch and nvcc"
        )
    return None


def can_run(query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec) -> Tuple[bool, str]:
    """Whether the fused CUDA kernels can run this call, and the reason when they cannot."""
    err = kernels_error()
    if err is not None:
        return False, err
    err = _fused_ops.device_and_dtype_error(NAME, "cuda", SUPPORTED_DTYPES, query, key, value)
    if err:
        return False, err
    d = query.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0):
        return False, (
            f"unsupported head dim {d}; the cuda backend needs a multiple of {HEAD_DIM_MULTIPLE} in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        )
    if value.shape[-1] != d:
        dv = value.shape[-1]
        return False, f"value head dim Dv={dv} differs from D={d}; the cuda backend needs Dv == D"
    return True, ""


def forward(
    query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec, scale: float
) -> Tuple[Tensor, Tensor]:
    """``(out, lse)``: ``out (B, T, H, W, heads, D)`` in the input dtype, ``lse (B, T, H, W, heads)`` in
    float32; differentiable with respect to ``query``, ``key`` and ``value``."""
    return _ops.call(_fused_ops.pair(), query, key, value, *_ops.spec_op_args(spec), float(scale))


def runner(spec: WindowSpec, scale: float):
    """:func:`forward` of one window as ``run(query, key, value)``, its op arguments built once (eager
    calls; the API's plans keep it)."""
    return _ops.prepared(_fused_ops.pair(), spec, scale)
