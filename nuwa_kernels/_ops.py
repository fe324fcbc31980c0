"""torch.library plumbing shared by every backend: op schemas, fake kernels and autograd.

Each backend exposes one forward and one backward op with the same schema:

* ``nuwa_kernels::na3d_fwd`` / ``na3d_bwd``: the fused C++ kernels, declared in ``csrc/ops.cpp``
  (``TORCH_LIBRARY``), implemented for the CPU and CUDA dispatch keys in C++.
* ``nuwa_kernels::reference_fwd`` / ``reference_bwd`` and ``triton_fwd`` / ``triton_bwd``: declared
  here from Python with :func:`torch.library.custom_op`.

The fake (meta) kernels and the autograd formula are registered from Python, once, for all of them
(:func:`register_fake_and_autograd`), as in PyTorch's extension-cpp. Outputs are always freshly
allocated and contiguous: ``out (B, T, H, W, heads, Dv)``, ``lse (B, T, H, W, heads)`` in the
accumulation dtype, and gradients shaped like their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

# stride: (st, sh, sw); slab: [] or q_origin(3), k_origin(3), q_full(3), k_full(3) (window.Slab).
FWD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, int[] kernel_size, bool[] causal_axes, "
    "bool raster_causal, bool shift_border, int[] stride, int[] slab, float scale) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor lse, Tensor delta, "
    "int[] kernel_size, bool[] causal_axes, bool raster_causal, bool shift_border, int[] stride, int[] slab, "
    "float scale) -> (Tensor, Tensor, Tensor)"
)
N_WINDOW_ARGS = 6  # kernel_size, causal_axes, raster_causal, shift_border, stride, slab

FwdFn = Callable[..., Tuple[Tensor, Tensor]]
BwdFn = Callable[..., Tuple[Tensor, Tensor, Tensor]]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax/accumulation dtype: float64 for float64 inputs, float32 otherwise (also the LSE dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(query, key, value, *window_args_and_scale):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    lse = query.new_empty(query.shape[:-1], dtype=accum_dtype(query.dtype))
    return out, lse


def _fake_bwd(grad_out, query, key, value, lse, delta, *window_args_and_scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def eager_delta(grad_out: Tensor, out: Tensor, grad_lse) -> Tensor:
    """``delta = rowsum(dO * O) - dLSE`` in the accumulation dtype (PyTorch ops; backends may fuse it)."""
    acc = accum_dtype(out.dtype)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    return delta if grad_lse is None else delta - grad_lse.to(acc)


@dataclass(frozen=True)
class OpPair:
    """One backend's forward/backward ops and how eager calls run them.

    Attributes:
        fwd, bwd: the registered ops (``torch.library``: fake kernels, autograd, ``torch.compile``).
        fwd_eager, bwd_eager: what an eager call runs below autograd: the op itself for C++ ops, the
            Python implementation for Python custom ops (no dispatcher round trip on the host path).
        delta: ``(grad_out, out, grad_lse) -> delta`` for the backward.
        native_autograd: the forward op has its own (C++) autograd kernel, so an eager call with
            gradients just calls ``fwd_eager`` (the fused ops, csrc/autograd.cpp).
    """

    fwd: Callable
    bwd: Callable
    fwd_eager: Callable
    bwd_eager: Callable
    delta: Callable = eager_delta
    native_autograd: bool = False


def register_fake_and_autograd(fwd_name: str, bwd_name: str) -> None:
    """Register the shared fake kernels and the autograd formula for one backend's op pair.

    The backward is FlashAttention-style: ``delta = rowsum(dO * O) - dLSE`` is formed here (so a loss
    on the returned LSE is differentiated correctly) and the backend's ``bwd`` op recomputes the
    probabilities from the LSE.

    Second order (``create_graph=True``, e.g. gradient penalties): the fused ``bwd`` ops are not
    themselves differentiable, so under grad mode the backward is instead computed by differentiating a
    pure-PyTorch recomputation of the op (:func:`nuwa_kernels.backends.reference.differentiable_forward`),
    which makes double backward exact on every backend (at reference speed and memory).

    The fused C++ pair has the same formula in C++ (csrc/autograd.cpp) and registers only its fakes.
    """
    register_fakes(fwd_name, bwd_name)
    bwd_op = _resolve(bwd_name)

    def setup_context(ctx, inputs, output):
        query, key, value = inputs[:3]
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.args = tuple(list(a) if isinstance(a, (list, tuple)) else a for a in inputs[3:])

    def backward(ctx, grad_out, grad_lse):
        # The registered autograd is what torch.compile traces (fake tensors): delta from traceable
        # PyTorch ops here; eager calls take _EagerCall and the backend's fused delta.
        return _backward(bwd_op, eager_delta, ctx.saved_tensors, ctx.args, grad_out, grad_lse) + (None,) * len(ctx.args)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _backward(bwd_op, delta_fn, saved, args, grad_out, grad_lse) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one op pair: the fused ``bwd`` op, or under grad mode (``create_graph=True``) a
    differentiable recomputation (exact second order)."""
    query, key, value, out, lse = saved
    if torch.is_grad_enabled():
        return tuple(_differentiable_backward(query, key, value, grad_out, grad_lse, args))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return tuple(bwd_op(grad_out, query, key, value, lse, delta_fn(grad_out, out, grad_lse), *args))


class _EagerCall(torch.autograd.Function):
    """Eager-mode autograd of an op pair, without the registered-autograd wrapper of ``torch.library``
    (which costs tens of microseconds a call on the host path). The same :func:`_backward`; under
    ``torch.compile`` the registered op is used instead (see :func:`call`)."""

    @staticmethod
    def forward(ctx, pair: OpPair, query, key, value, args):
        # ``args``: the window arguments and scale as one tuple (one autograd.Function argument, not
        # seven: apply's per-argument bookkeeping is part of the host path)
        with torch._C._AutoDispatchBelowAutograd():
            out, lse = pair.fwd_eager(query, key, value, *args)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.pair, ctx.args = pair, args
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        pair = ctx.pair
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = _backward(pair.bwd_eager, pair.delta, ctx.saved_tensors, ctx.args, grad_out, grad_lse)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                grads = _backward(pair.bwd_eager, pair.delta, ctx.saved_tensors, ctx.args, grad_out, grad_lse)
        return (None, *grads, None)


def call(pair: OpPair, query: Tensor, key: Tensor, value: Tensor, *args) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of an op pair, differentiable: the registered op while compiling (fake kernels,
    traceable autograd), a lean eager path otherwise (no autograd work when no input needs gradients)."""
    if torch.compiler.is_compiling():
        return pair.fwd(query, key, value, *args)
    return _eager(pair, query, key, value, args)


def _eager(pair: OpPair, query: Tensor, key: Tensor, value: Tensor, args: tuple) -> Tuple[Tensor, Tensor]:
    """:func:`call` outside ``torch.compile``."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        if pair.native_autograd:  # the op's own (C++) autograd kernel records the node
            return pair.fwd_eager(query, key, value, *args)
        return _EagerCall.apply(pair, query, key, value, args)
    with torch._C._AutoDispatchBelowAutograd():
        return pair.fwd_eager(query, key, value, *args)


def prepared(pair: OpPair, spec, scale: float) -> Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """``run(query, key, value) -> (out, lse)``: :func:`call` of one window, its op arguments built once, for
    eager calls only (the caller checks ``torch.compiler.is_compiling()``). The API keeps one per validated
    plan (``api._PLANS``): a repeated call then runs no Python but the plan lookup and this."""
    args = (*spec_op_args(spec), float(scale))
    return lambda query, key, value: _eager(pair, query, key, value, args)


def register_fakes(fwd_name: str, bwd_name: str) -> None:
    """Register the shared fake kernels of one backend's op pair (its autograd lives elsewhere)."""
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)


def _differentiable_backward(query, key, value, grad_out, grad_lse, args):
    """``(dq, dk, dv)`` as a differentiable function of the inputs and the incoming gradients."""
    from .backends.reference import differentiable_forward

    inputs = [t for t in (query, key, value)]
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        out, lse = differentiable_forward(*leaves, *args)
        outs, grads = [], []
        for o, g in ((out, grad_out), (lse, grad_lse)):
            if g is not None:
                outs.append(o)
                grads.append(g)
        return torch.autograd.grad(outs, leaves, grads, create_graph=True, allow_unused=True)


def _resolve(name: str):
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


def define_python_ops(prefix: str, fwd_impl: FwdFn, bwd_impl: BwdFn, device_types: Sequence[str] | None = None,
                      delta: Callable = eager_delta) -> OpPair:
    """Declare ``nuwa_kernels::{prefix}_fwd`` / ``_bwd`` as Python custom ops with the shared schema,
    register fake kernels and autograd, and return the :class:`OpPair` (eager calls run the Python
    implementations directly)."""
    fwd_name, bwd_name = f"nuwa_kernels::{prefix}_fwd", f"nuwa_kernels::{prefix}_bwd"
    torch.library.custom_op(fwd_name, fwd_impl, mutates_args=(), device_types=device_types, schema=FWD_SCHEMA)
    torch.library.custom_op(bwd_name, bwd_impl, mutates_args=(), device_types=device_types, schema=BWD_SCHEMA)
    register_fake_and_autograd(fwd_name, bwd_name)
    return OpPair(_resolve(fwd_name), _resolve(bwd_name), fwd_impl, bwd_impl, delta)


def spec_op_args(spec) -> tuple:
    """The window arguments of the ops (all but the tensors and ``scale``) from a
    :class:`~nuwa_kernels.window.WindowSpec`."""
    return (list(spec.kernel_size), list(spec.causal_axes), spec.raster_causal, spec.shift_border,
            list(spec.stride), spec.slab_args())
