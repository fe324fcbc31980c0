"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu/``), forward and backward, OpenMP threads.

Runs ``nuwa_kernels::na3d_fwd`` / ``na3d_bwd`` on CPU tensors of dtype float32, float64, bfloat16 or
float16 (half types computed in float32), any strides, any head dim. Each query visits only the keys of
its window; backward is deterministic. Threads: ``torch.set_num_threads``.

When the inputs need gradients, autograd runs ``na3d_fwd_probs`` / ``na3d_bwd_probs`` instead: for small
windows the forward also keeps every pair's probability for the backward (activation memory of at most
``NUWA_CPU_PROBS`` times the query's size, default 1, at most 8, read at the first call; ``0`` keeps none and the
backward recomputes the scores).

Calls whose query, key and value hold at most 4 MiB together are taken as cache-resident: the kernels issue no
software prefetch for them and each thread takes the same tasks first every call. ``NUWA_CPU_PREFETCH=1`` (or
``0``) turns the prefetches on (off) for every call; read at every call. ``NUWA_CPU_SCRATCH_POISON=1`` fills the
kernels' per-thread scratch with NaN (otherwise left uninitialised: every kernel writes what it reads), for
debugging; read at every call.
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


def runner(spec: WindowSpec, scale: float):
    """:func:`forward` of one window as ``run(query, key, value)``, its op arguments built once (eager
    calls; the API's plans keep it)."""
    return _ops.prepared(_fused_ops.pair(), spec, scale)


def empty_cache() -> int:
    """Frees the CPU kernels' cached memory blocks and returns their bytes (like ``torch.cuda.empty_cache``).

    The fused CPU ops take their outputs and scratch of 256 KiB and more from a pool that keeps freed blocks
    (``csrc/cpu/block_pool.h``), so that repeated calls reuse mapped memory instead of page-faulting fresh
    pages in every call. The pool holds at most ``NUWA_CPU_POOL_MB`` megabytes (default 512, read at the
    first call; ``0`` turns it off).
    """
    if _fused_ops.load_error() is not None:
        return 0
    return int(torch.ops.nuwa_kernels.empty_cpu_pool())


def kernel_isa() -> str:
    """The vector instruction set the CPU kernels were compiled for (``-march`` at build time,
    ``NUWA_CPU_ARCH``): ``"avx512"`` (row-layout scores; float32, bfloat16 and float16 take the lane kernels
    for any head dim, rows padded with zeros to whole vectors), ``"avx2"`` (the lane kernels for head dims in
    whole vectors, the row kernels for the others), ``"generic"``; ``""`` when the extension is not loaded."""
    if _fused_ops.load_error() is not None:
        return ""
    return str(torch.ops.nuwa_kernels.cpu_kernel_isa())


def cached_bytes() -> int:
    """Bytes of the free blocks the CPU kernels' pool holds (see :func:`empty_cache`)."""
    if _fused_ops.load_error() is not None:
        return 0
    return int(torch.ops.nuwa_kernels.cpu_pool_cached_bytes())
