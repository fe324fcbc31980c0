"""The fused C++ op pair ``nuwa_kernels::na3d_fwd`` / ``na3d_bwd``, shared by the cpu and cuda backends.

The ops are declared in ``csrc/ops.cpp`` and implemented per dispatch key (CPU in ``csrc/cpu/``, CUDA in
``csrc/cuda/``); their autograd is C++ too (``csrc/autograd.cpp``). Registered here, once, when this module
is first imported and the extension loaded (both backends import it, so neither registers twice): the
fake kernels (:mod:`nuwa_kernels._ops`, and ``na3d_delta``'s and the CPU pair ``na3d_fwd_probs`` /
``na3d_bwd_probs``'s) and the Python kernel of
``na3d_bwd_recompute``, the differentiable backward the C++ autograd calls under ``create_graph=True``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, _ops

FWD_NAME = "nuwa_kernels::na3d_fwd"
BWD_NAME = "nuwa_kernels::na3d_bwd"
DELTA_NAME = "nuwa_kernels::na3d_delta"
RECOMPUTE_NAME = "nuwa_kernels::na3d_bwd_recompute"
FWD_PROBS_NAME = "nuwa_kernels::na3d_fwd_probs"
BWD_PROBS_NAME = "nuwa_kernels::na3d_bwd_probs"

_registered = False


def load_error() -> Optional[str]:
    """Why the fused ops are unavailable (the extension is not built or failed to load), else ``None``."""
    return _extension.LOAD_ERROR if not _extension.loaded() else None


def ensure_registered() -> bool:
    """Register the fused ops' fake kernels and the Python kernel of ``na3d_bwd_recompute`` once (their
    autograd is C++), and build the :class:`~nuwa_kernels._ops.OpPair`; ``False`` without the extension."""
    global _registered, _PAIR
    if not _extension.loaded():
        return False
    if not _registered:
        # autograd: C++ (csrc/autograd.cpp); its double-backward path calls na3d_bwd_recompute
        _ops.register_fakes(FWD_NAME, BWD_NAME)
        torch.library.register_fake(DELTA_NAME)(_fake_delta)
        torch.library.register_fake(FWD_PROBS_NAME)(_fake_fwd_probs)
        torch.library.register_fake(BWD_PROBS_NAME)(_fake_bwd_probs)
        torch.library.impl(RECOMPUTE_NAME, "CompositeImplicitAutograd")(_recompute)
        # built here, at import, not on first use: torch.compile guards on the module global, and a pair
        # created inside the first compiled call would make the next call recompile. Eager calls take
        # the C++ functions behind the OpOverloads (no OpOverload.__call__ on the host path).
        _PAIR = _ops.OpPair(fwd_op(), bwd_op(), fwd_op()._op, bwd_op()._op, delta, native_autograd=True)
        _registered = True
    return True


def device_and_dtype_error(backend: str, device_type: str, supported, query, key, value) -> Optional[str]:
    """Why ``backend`` (running on ``device_type`` for dtypes ``supported``) cannot take these tensors."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.device.type != device_type:
            return f"{name} is on device {t.device}, the {backend} backend needs {device_type.upper()} tensors"
    if query.dtype not in supported:
        return f"unsupported dtype {query.dtype}; the {backend} backend supports {', '.join(str(d) for d in supported)}"
    return None


def fwd_op():
    """``torch.ops.nuwa_kernels.na3d_fwd.default`` (the extension must be loaded)."""
    return torch.ops.nuwa_kernels.na3d_fwd.default


_PAIR: Optional["_ops.OpPair"] = None


def pair() -> "_ops.OpPair":
    """The fused :class:`~nuwa_kernels._ops.OpPair` (the C++ ops serve eager calls too; the extension must
    be loaded)."""
    if _PAIR is None:
        raise RuntimeError(f"the fused ops are not available: {load_error()}")
    return _PAIR


def _recompute(query, key, value, grad_out, grad_lse, *window_args_and_scale):
    """``(dq, dk, dv)`` as differentiable functions of the inputs and the incoming gradients (the C++
    autograd's backward under ``create_graph=True``): the reference's recomputation, differentiated."""
    grads = _ops._differentiable_backward(query, key, value, grad_out, grad_lse, window_args_and_scale)
    return tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (query, key, value)))


def _fake_fwd_probs(query, key, value, *window_args_and_scale):
    """``na3d_fwd_probs``: ``(out, lse, probs)``, ``probs`` 1-D with the CPU kernel's element count for these
    shapes (``na3d_probs_numel``; the shapes are specialised)."""
    out, lse = _ops._fake_fwd(query, key, value)
    n = torch.ops.nuwa_kernels.na3d_probs_numel.default(
        [int(s) for s in query.shape], [int(s) for s in key.shape], [int(s) for s in value.shape], query.dtype,
        *window_args_and_scale[:-1])
    return out, lse, query.new_empty((n,), dtype=_ops.accum_dtype(query.dtype))


def _fake_bwd_probs(grad_out, query, key, value, lse, grad_lse, probs, *window_args_and_scale):
    return _ops._fake_bwd(grad_out, query, key, value, lse, lse)


def _fake_delta(grad_out, out, grad_lse=None):
    return out.new_empty(out.shape[:-1], dtype=_ops.accum_dtype(out.dtype))


def delta(grad_out, out, grad_lse=None):
    """``rowsum(dO * O) - dLSE`` through ``nuwa_kernels::na3d_delta`` (one fused pass on CPU; float32, or
    float64 for float64 inputs): the backward's ``delta``, eager and compiled alike."""
    return torch.ops.nuwa_kernels.na3d_delta.default(grad_out, out, grad_lse)


def bwd_op():
    """``torch.ops.nuwa_kernels.na3d_bwd.default`` (the extension must be loaded)."""
    return torch.ops.nuwa_kernels.na3d_bwd.default


ensure_registered()
