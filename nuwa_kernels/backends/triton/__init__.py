"""The ``triton`` backend: fused Triton kernels for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``, which is how CI runs them).

* :mod:`.plan`: host-side tiling plan (brick shapes, per-axis window tables, tile lists).
* :mod:`.fwd`: forward kernel (online softmax, LSE out).
* :mod:`.bwd`: FlashAttention-2 style backward (``dQ`` sweep over key tiles, deterministic ``dK/dV``
  sweep over the inverse neighbourhood, GQA summed inside the program).
* :mod:`.stats`: :func:`tile_stats` (useful vs computed pairs of the forward schedule).

Ops: ``nuwa_kernels::triton_fwd`` / ``nuwa_kernels::triton_bwd`` (schemas in ``_ops.py``).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import _ops
from ...window import WindowSpec, spec_from_op_args
from ._common import HAS_TRITON, INTERPRET, TRITON_IMPORT_ERROR

NAME = "triton"
MAX_BATCH_HEADS = 65535  # launch grid axis 1 is (batch x heads)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

__all__ = ["NAME", "can_run", "forward", "tile_stats", "aligned_stride", "delta", "clear_plan_cache",
           "SUPPORTED_DTYPES"]


def can_run(query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec) -> Tuple[bool, str]:
    """Whether the Triton kernels can run this call, and the reason when they cannot."""
    if not HAS_TRITON:
        return False, f"triton is not importable ({TRITON_IMPORT_ERROR})"
    devices = {t.device.type for t in (query, key, value)}
    if len(devices) != 1:
        return False, f"query, key and value are on different devices ({sorted(devices)})"
    dev = query.device.type
    if dev == "cpu":
        if not INTERPRET:
            return False, (
                "the triton backend runs CUDA tensors; CPU tensors only under the Triton interpreter "
                "(TRITON_INTERPRET=1 set before nuwa_kernels is imported)"
            )
    elif dev != "cuda":
        return False, f"the triton backend runs CUDA tensors (or CPU under TRITON_INTERPRET=1); got device {dev!r}"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in SUPPORTED_DTYPES:
            extra = " (float64 is not supported by tl.dot; use backend='cpu' or 'reference')" if t.dtype == torch.float64 else ""
            return False, f"{name} dtype {t.dtype} is not supported by the triton backend: needs float16, bfloat16 or float32{extra}"
    if not (query.dtype == key.dtype == value.dtype):
        return False, f"query/key/value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
    if query.dim() != 6 or key.dim() != 6 or value.dim() != 6:
        return False, "the triton backend takes grid-layout tensors (B, T, H, W, heads, D)"
    d = query.shape[-1]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM):
        return False, (
            f"head_dim D={d} is not supported by the triton backend (head dim must be "
            f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM})"
        )
    if key.shape[-1] != d:
        return False, f"key head_dim {key.shape[-1]} differs from query head_dim {d}"
    if value.shape[-1] != d:
        return False, f"value head_dim (Dv={value.shape[-1]}) must equal the query head_dim (D={d}) in the triton backend"
    if query.shape[0] * query.shape[4] > MAX_BATCH_HEADS:
        return False, (
            f"batch x heads = {query.shape[0] * query.shape[4]} exceeds {MAX_BATCH_HEADS}, the CUDA grid's "
            "second dimension that the triton kernels launch over"
        )
    return True, ""


_CALLS: dict = {}


def _plan_for(query, key, window_args):
    """``(plan, launch)`` of one call, cached on everything that decides them (grids, window arguments,
    head dim, dtype, device, the thread's config override): a repeated call costs one dict lookup.

    ``launch`` maps ``"fwd"``/``"dq"``/``"dkdv"`` to ``(num_warps, num_stages)`` from the config table
    (:mod:`.config`); under the interpreter the blocks are as large as the grids allow.
    """
    from .plan import current_launch_override, current_override, get_plan, interpreter_config

    override = current_override()
    launch_override = current_launch_override()
    kernel_size, causal_axes, raster, shift, stride, slab = window_args
    ckey = (tuple(query.shape[1:4]), tuple(key.shape[1:4]), tuple(kernel_size), tuple(causal_axes), bool(raster),
            bool(shift), tuple(stride), tuple(slab), query.shape[-1], query.dtype, query.device, override,
            launch_override)
    hit = _CALLS.get(ckey)
    if hit is not None:
        return hit
    from .config import config_for

    spec = spec_from_op_args(query.shape[1:4], key.shape[1:4], *window_args)
    entry = config_for(spec, query.shape[-1], query.dtype, query.device)
    launch = {"fwd": entry.fwd, "dq": entry.dq, "dkdv": entry.dkdv}
    if override is not None:
        block = override
    elif INTERPRET:
        block = interpreter_config(_numel3(spec.q_grid), _numel3(spec.kv_grid))
        launch = {"fwd": (4, 1), "dq": (4, 1), "dkdv": (4, 1)}
    else:
        block = entry.block
    if launch_override is not None:
        launch.update(dict(launch_override))
    hit = _CALLS[ckey] = (get_plan(spec, block), launch)
    return hit


def clear_plan_cache() -> None:
    """Drop every cached Triton plan, launch decision and device table.

    Plans keep the device tables a launch reads (window bounds, tile lists); a CUDA graph captured
    around a Triton call replays those exact tensors, so only call this when no such graph will be
    replayed again. Before capturing, run the call once eagerly (warm-up): that compiles the one
    kernel variant the config table picks and builds the plan and its device tables, so the capture
    itself only launches.
    """
    from .plan import clear_plan_cache as _clear

    _CALLS.clear()
    _clear()


def _fwd_impl(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale):
    from .fwd import launch_forward

    plan, launch = _plan_for(query, key, (kernel_size, causal_axes, raster_causal, shift_border, stride, slab))
    return launch_forward(query, key, value, plan, scale, launch["fwd"])


def _bwd_impl(grad_out, query, key, value, lse, delta, kernel_size, causal_axes, raster_causal, shift_border, stride,
              slab, scale):
    from .bwd import launch_backward

    plan, launch = _plan_for(query, key, (kernel_size, causal_axes, raster_causal, shift_border, stride, slab))
    return launch_backward(grad_out, query, key, value, lse, delta, plan, scale, launch)


def _numel3(g) -> int:
    return int(g[0]) * int(g[1]) * int(g[2])


PAIR = _ops.define_python_ops(NAME, _fwd_impl, _bwd_impl, delta=lambda g, o, dl: delta(g, o, dl))  # fused delta
triton_fwd, triton_bwd = PAIR.fwd, PAIR.bwd


def forward(query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec, scale: float) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of nearby attention through ``nuwa_kernels::triton_fwd`` (differentiable).

    Args:
        query: ``(B, T, H, W, heads, D)``; key: ``(B, Tk, Hk, Wk, heads_kv, D)``;
            value: ``(B, Tk, Hk, Wk, heads_kv, D)``; any strides, float16/bfloat16/float32.
        spec: normalised window (``window.make_window_spec``); scale: resolved softmax scale.
    Returns:
        ``out (B, T, H, W, heads, D)`` contiguous in the input dtype, ``lse (B, T, H, W, heads)`` float32.
    """
    return _ops.call(PAIR, query, key, value, *_ops.spec_op_args(spec), float(scale))


def runner(spec: WindowSpec, scale: float):
    """:func:`forward` of one window as ``run(query, key, value)``, its op arguments built once (eager
    calls; the API's plans keep it)."""
    return _ops.prepared(PAIR, spec, scale)


def tile_stats(*args, **kwargs):
    """See :func:`nuwa_kernels.backends.triton.stats.tile_stats`."""
    from .stats import tile_stats as _tile_stats

    return _tile_stats(*args, **kwargs)


def aligned_stride(*args, **kwargs):
    """See :func:`nuwa_kernels.backends.triton.stats.aligned_stride`."""
    from .stats import aligned_stride as _aligned_stride

    return _aligned_stride(*args, **kwargs)


def delta(grad_out: Tensor, out: Tensor, grad_lse=None) -> Tensor:
    """``rowsum(grad_out * out) - grad_lse`` (float32) in one fused Triton kernel (:func:`.bwd.delta`)."""
    from .bwd import delta as _delta

    return _delta(grad_out, out, grad_lse)
