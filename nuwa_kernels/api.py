"""Public API: :func:`nearby_attention` and :func:`nearby_sdpa`.

Each call validates every input (contract section 9) before any kernel runs, normalises the
semantic arguments into a :class:`~nuwa_kernels.window.WindowSpec`, picks a backend and calls it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import BACKEND_NAMES, ENV_VAR, get_backend, select_backend
from .window import (
    CausalArg,
    IntTriple,
    KernelSizeArg,
    Slab,
    WindowSpec,
    dilation_groups,
    _is_int,
    _sig,
    make_window_spec,
    normalize_dilation,
    spec_and_dilation,
)

__all__ = [
    "nearby_attention",
    "nearby_sdpa",
    "nearby_attention_slab",
    "merge_attentions",
    "can_run",
    "available_backends",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_tensors(query, key, value, layout: str) -> None:
    """Types, dtypes, devices and ranks of the three inputs."""
    ndim = 6 if layout == "grid" else 4
    shape_doc = {
        "grid": ("(B, T, H, W, heads, D)", "(B, Tk, Hk, Wk, heads_kv, D)", "(B, Tk, Hk, Wk, heads_kv, Dv)"),
        "sdpa": ("(B, heads, N, D)", "(B, heads_kv, Nk, D)", "(B, heads_kv, Nk, Dv)"),
    }[layout]
    for name, t, doc in zip(("query", "key", "value"), (query, key, value), shape_doc):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {doc}; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64); got {t.dtype}"
            )
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {doc}; got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have the dtype of query ({query.dtype}); got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on the device of query ({query.device}); got {t.device}")


def _check_shapes(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Shape agreement in grid layout (B, T, H, W, heads, D)."""
    B, heads, D = query.shape[0], query.shape[4], query.shape[5]
    for name, t in (("key", key), ("value", value)):
        if t.shape[0] != B:
            raise ValueError(f"{name} batch size must equal query's ({B}); got {t.shape[0]}")
    if key.shape[5] != D:
        raise ValueError(f"key head_dim must equal query's ({D}); got {key.shape[5]}")
    if value.shape[5] != D:
        raise ValueError(f"value head_dim (Dv) must equal query's head_dim ({D}) in this version; got {value.shape[5]}")
    if value.shape[1:5] != key.shape[1:5]:
        raise ValueError(
            f"value grid and heads_kv must equal key's {tuple(key.shape[1:5])}; got {tuple(value.shape[1:5])}"
        )
    if D < 1:
        raise ValueError(f"query head_dim must be positive; got {D}")
    heads_kv = key.shape[4]
    if heads < 1 or heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(
            f"query heads ({heads}) must be a positive multiple of key/value heads (heads_kv={heads_kv})"
        )
    if query.numel() and math.prod(key.shape[1:4]) == 0:
        raise ValueError(f"key grid must be non-empty when query is non-empty; got key grid {tuple(key.shape[1:4])}")


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}: {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return scale


def _autocast(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[str]]:
    """Under ``torch.autocast``, cast float16/bfloat16/float32 inputs to the autocast dtype (as SDPA does)."""
    if not isinstance(query, Tensor):
        return query, key, value, None
    dev = query.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return query, key, value, None
    target = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(target) if isinstance(t, Tensor) and t.dtype in _FLOAT_DTYPES[:3] else t  # noqa: E731
    return cast(query), cast(key), cast(value), dev


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------


def _validated_spec(query, key, value, kernel_size, causal, border, stride=1, slab=None) -> WindowSpec:
    """Validate grid-layout inputs and the semantic arguments; return the normalised window spec."""
    _check_tensors(query, key, value, "grid")
    _check_shapes(query, key, value)
    return make_window_spec(query.shape[1:4], key.shape[1:4], kernel_size, causal, border, stride, slab)


def _check_slab(slab, query: Tensor, key: Tensor) -> Optional[Slab]:
    if slab is None:
        return None
    if not isinstance(slab, Slab):
        raise TypeError(f"slab must be a nuwa_kernels.window.Slab or None; got {type(slab).__name__}")
    for name, origin, full, local in (("q", slab.q_origin, slab.q_full, query.shape[1:4]),
                                      ("k", slab.k_origin, slab.k_full, key.shape[1:4])):
        for a in range(3):
            if not (0 <= origin[a] and origin[a] + local[a] <= full[a]):
                raise ValueError(
                    f"slab.{name}_origin {tuple(origin)} with the local grid {tuple(local)} must lie inside "
                    f"slab.{name}_full {tuple(full)}"
                )
    return slab


def _check_additional(additional_keys, additional_values, key: Tensor, value: Tensor) -> bool:
    """Section 5a checks; ``True`` when there are additional keys to attend to."""
    if additional_keys is None and additional_values is None:
        return False
    if additional_keys is None or additional_values is None:
        missing = "additional_values" if additional_values is None else "additional_keys"
        raise ValueError(f"additional_keys and additional_values go together; {missing} is missing")
    for name, t, ref, doc in (("additional_keys", additional_keys, key, "(B, S, heads_kv, D)"),
                              ("additional_values", additional_values, value, "(B, S, heads_kv, Dv)")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {doc}; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions {doc}; got shape {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of key/value ({ref.dtype}); got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on the device of key/value ({ref.device}); got {t.device}")
        for dim, what in ((0, "batch size"), (2, "heads_kv"), (3, "head dim")):
            if t.shape[dim] != ref.shape[{0: 0, 2: 4, 3: 5}[dim]]:
                raise ValueError(
                    f"{name} {what} must equal {'key' if ref is key else 'value'}'s "
                    f"({ref.shape[{0: 0, 2: 4, 3: 5}[dim]]}); got {t.shape[dim]} (shape {tuple(t.shape)})"
                )
    if additional_keys.shape[1] != additional_values.shape[1]:
        raise ValueError(
            f"additional_values must hold as many tokens as additional_keys ({additional_keys.shape[1]}); got "
            f"{additional_values.shape[1]}"
        )
    return additional_keys.shape[1] > 0


def _empty_result(query: Tensor, key: Tensor, value: Tensor, *extra: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Outputs for empty inputs, still attached to the autograd graph (gradients are empty)."""
    from ._ops import accum_dtype

    out = query.new_zeros((*query.shape[:-1], value.shape[-1]))
    lse = query.new_full(query.shape[:-1], float("-inf"), dtype=accum_dtype(query.dtype))
    inputs = [t for t in (query, key, value, *extra) if t is not None]
    if any(t.requires_grad for t in inputs):
        out = out + sum(t.sum() for t in inputs) * 0
    return out, lse


def _run(module, query, key, value, spec: WindowSpec, scale: float, autocast_dev) -> Tuple[Tensor, Tensor]:
    if autocast_dev is not None:
        with torch.autocast(autocast_dev, enabled=False):
            return module.forward(query, key, value, spec, scale)
    return module.forward(query, key, value, spec, scale)


# Validated plans of plain calls (no slab, no additional keys), keyed on everything validation and
# backend choice read: shapes, dtypes, devices and the semantic arguments. A repeated call (a model's
# layers, a training loop) then costs one dictionary lookup on the host path.
_PLANS: Dict[tuple, tuple] = {}
_PLANS_MAX = 1024


def _plan_key(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation):
    if not (type(query) is Tensor and type(key) is Tensor and type(value) is Tensor):
        return None  # tensor subclasses (fake, functional) are validated every time
    # hashed once, by the lookup in _attend (an unhashable argument raises TypeError there)
    # plain ints, bools and None stand for themselves (no _sig call on the common arguments); any other
    # value goes through _sig, whose tuples never equal them. The environment variable only matters to
    # backend="auto" (select_backend), and is read there only.
    return (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device, key.device,
            value.device, kernel_size if type(kernel_size) is int else _sig(kernel_size),
            causal if type(causal) is bool else _sig(causal), border, scale if scale is None else _sig(scale),
            backend, stride if type(stride) is int else _sig(stride),
            dilation if type(dilation) is int else _sig(dilation),
            _env_backend() if type(backend) is str and backend == "auto" else None)


# NUWA_KERNELS_BACKEND as os.environ holds it (encoded; None when unset): one dictionary lookup. Read
# through os.environ.get, the variable cost 4-27 us a call right after a kernel had swept the caches
# (2-core EPYC, NÜWA's grids), as much as the rest of the plan lookup.
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
except AttributeError:  # not CPython's os._Environ
    _ENV_KEY = None


def _env_backend():
    """``NUWA_KERNELS_BACKEND``'s value in ``os.environ`` (encoded on POSIX), or ``None`` when unset."""
    data = getattr(os.environ, "_data", None) if _ENV_KEY is not None else None
    return data.get(_ENV_KEY) if data is not None else os.environ.get(ENV_VAR)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _planned_run(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation):
    """The prepared op (``run(query, key, value) -> (out, lse)``) of a plain call whose plan is cached and
    runs as it is: no autocast, no ``torch.compile``, no dilation, non-empty; else ``None``."""
    if torch.compiler.is_compiling() or type(query) is not Tensor:
        return None
    dev = query.device.type
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return None  # the full path casts (before any key is built)
    pkey = _plan_key(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation)
    if pkey is None:
        return None
    try:
        plan = _PLANS.get(pkey)
    except TypeError:  # an unhashable argument
        return None
    return plan[4] if plan is not None else None


def _attend(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation,
            additional_keys, additional_values, slab, autocast_dev) -> Tuple[Tensor, Tensor]:
    """The op on grid-layout tensors: validation, dilation groups, additional keys; ``(out, lse)``."""
    plain = slab is None and additional_keys is None and additional_values is None
    pkey = _plan_key(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation) \
        if plain and not torch.compiler.is_compiling() else None
    try:
        plan = _PLANS.get(pkey) if pkey is not None else None
    except TypeError:  # an unhashable argument (e.g. a list inside a list): validated every time
        pkey = plan = None
    if plan is not None:
        spec, dil, scale, module, _ = plan
        extra = False
    else:
        _check_tensors(query, key, value, "grid")
        _check_shapes(query, key, value)
        slab = _check_slab(slab, query, key)
        spec, dil = spec_and_dilation(query.shape[1:4], key.shape[1:4], kernel_size, causal, border, stride,
                                      dilation, slab)
        extra = _check_additional(additional_keys, additional_values, key, value)
        scale = _resolve_scale(scale, query.shape[-1])
        module = select_backend(backend, query, key, value, spec)
        if pkey is not None:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            # the prepared op of _public_call's host path (calls that run as they are; backends with a runner)
            runs_as_is = dil == (1, 1, 1) and query.numel() > 0 and hasattr(module, "runner")
            _PLANS[pkey] = (spec, dil, scale, module, module.runner(spec, scale) if runs_as_is else None)
    if query.numel() == 0:
        return _empty_result(query, key, value, additional_keys, additional_values)
    if dil == (1, 1, 1):
        if autocast_dev is None:  # the common case, without _run's indirection (host path)
            out, lse = module.forward(query, key, value, spec, scale)
        else:
            out, lse = _run(module, query, key, value, spec, scale, autocast_dev)
    else:
        out, lse = _dilated(module, query, key, value, spec, dil, kernel_size, causal, border, stride, scale,
                            autocast_dev)
    if extra:
        # Every query also sees the S additional tokens: full cross-attention to a (1, 1, S) grid on the
        # same backend, merged exactly with the window result through the two LSEs (docs/DESIGN.md).
        ak, av = additional_keys[:, None, None], additional_values[:, None, None]
        xspec = make_window_spec(query.shape[1:4], ak.shape[1:4], None)
        xmodule = select_backend(backend, query, ak, av, xspec)
        xout, xlse = _run(xmodule, query, ak, av, xspec, scale, autocast_dev)
        out, lse = merge_attentions([out, xout], [lse, xlse])
    return out, lse


def _dilated(module, query, key, value, spec: WindowSpec, dil, kernel_size, causal, border, stride, scale,
             autocast_dev) -> Tuple[Tensor, Tensor]:
    """Dilation (section 3a): every group of interleaved positions is an ordinary call on strided views
    (the kernels take strides), its results written back into the interleaved output."""
    from ._ops import accum_dtype

    slab = spec.slab
    q_org = slab.q_origin if slab is not None else (0, 0, 0)
    k_org = slab.k_origin if slab is not None else (0, 0, 0)
    groups_q = [dilation_groups(query.shape[1 + a], dil[a], q_org[a], spec.q_full[a]) for a in range(3)]
    groups_k = [{g[0]: g for g in dilation_groups(key.shape[1 + a], dil[a], k_org[a], spec.k_full[a])}
                for a in range(3)]
    out = query.new_zeros((*query.shape[:-1], value.shape[-1]))
    lse = query.new_full(query.shape[:-1], float("-inf"), dtype=accum_dtype(query.dtype))
    for gt, gh, gw in itertools.product(*groups_q):
        qg = (gt, gh, gw)
        kg = tuple(groups_k[a].get(qg[a][0]) for a in range(3))
        if any(x is None for x in kg):
            continue  # this rank's key slab holds none of the group's keys
        qs = tuple(slice(g[1], None, d) for g, d in zip(qg, dil))
        ks = tuple(slice(g[1], None, d) for g, d in zip(kg, dil))
        qv, kv, vv = query[(slice(None),) + qs], key[(slice(None),) + ks], value[(slice(None),) + ks]
        sub = Slab(tuple(g[3] for g in qg), tuple(g[3] for g in kg), tuple(g[4] for g in qg), tuple(g[4] for g in kg))
        trivial = sub.q_origin == sub.k_origin == (0, 0, 0) and sub.q_full == tuple(qv.shape[1:4]) and \
            sub.k_full == tuple(kv.shape[1:4])
        gspec = make_window_spec(qv.shape[1:4], kv.shape[1:4], kernel_size, causal, border, stride,
                                 None if trivial else sub)
        o, l = _run(module, qv, kv, vv, gspec, scale, autocast_dev)
        out[(slice(None),) + qs] = o
        lse[(slice(None),) + qs] = l
    return out, lse


def merge_attentions(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Merge attention results over disjoint key sets of the same queries into the result over their
    union, exactly: ``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) * out_i``.

    Args:
        outputs: ``out_i`` of shape ``(..., Dv)``, all the same shape and dtype.
        lses: ``lse_i`` of shape ``(...)`` (natural log), ``-inf`` where a part saw no key.

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``outputs``, ``lse`` in float32 (float64 for float64
        outputs). Differentiable with respect to every ``out_i`` and ``lse_i``.
    """
    from ._ops import accum_dtype

    if not isinstance(outputs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError("merge_attentions takes a list of outputs and a list of lses")
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"outputs and lses must be non-empty lists of the same length; got {len(outputs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if not isinstance(o, Tensor) or not isinstance(l, Tensor):
            raise TypeError(f"outputs[{i}] and lses[{i}] must be tensors")
        if o.shape != outputs[0].shape or o.dtype != outputs[0].dtype:
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)} / {o.dtype}; expected "
                             f"{tuple(outputs[0].shape)} / {outputs[0].dtype}")
        if l.shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {tuple(o.shape[:-1])} (the output's without Dv); got {tuple(l.shape)}")
    acc = accum_dtype(outputs[0].dtype)
    lses = [l.to(acc) for l in lses]
    # Elementwise (a logsumexp over a stacked leading dim is a slow strided reduction on CPU).
    top = lses[0]
    for l in lses[1:]:
        top = torch.maximum(top, l)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows that saw no key stay 0, not NaN
    weights = [torch.exp(l - top) for l in lses]
    total = sum(weights[1:], weights[0])
    lse = top + torch.log(total)
    out = sum((w[..., None] * o.to(acc) for w, o in zip(weights[1:], outputs[1:])), weights[0][..., None] * outputs[0].to(acc))
    out = out / total.clamp_min(torch.finfo(acc).tiny)[..., None]
    return out.to(outputs[0].dtype), lse


def nearby_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
    *,
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """3D nearby attention (NÜWA's 3DNA) on grid-layout tensors.

    Each query token attends only to the key tokens in a ``(kt, kh, kw)`` window around its (mapped)
    position; see ``docs/nearby_attention.md`` for the exact window rules.

    Args:
        query: ``(B, T, H, W, heads, D)``, any strides.
        key: ``(B, Tk, Hk, Wk, heads_kv, D)``; the key grid may differ from the query grid
            (cross-attention; window centre ``floor(i * Lk / Lq)`` per axis). ``heads % heads_kv == 0``.
        value: ``(B, Tk, Hk, Wk, heads_kv, Dv)`` with ``Dv == D``.
        kernel_size: an int, or ``(kt, kh, kw)`` of ints or ``None`` (``None`` = the whole axis).
            Default ``3``. NÜWA presets: images ``(1, 3, 3)``, video ``(3, 3, 3)``, text ``(None, 1, 1)``.
        causal: ``False`` (default); ``True`` for raster-order causality (``flat(key) <= flat(query)``,
            self-attention grids only); or ``(t, h, w)`` bools for per-axis causal windows.
        border: ``"truncate"`` (default; NÜWA: border queries see fewer keys) or ``"shift"``
            (NATTEN: windows shift inwards so every query sees ``k`` keys per axis).
        scale: score scale; default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores.
        backend: ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``. ``auto``
            picks the fastest backend that can run the call (override with ``NUWA_KERNELS_BACKEND``);
            an explicit backend that cannot run raises :class:`BackendUnavailableError` saying why.
        stride: int or ``(st, sh, sw)``, default 1: blocks of ``s`` queries share the window of the
            block's leader (``1 <= s <= k``; ``stride == kernel_size`` is blocked window attention).
        dilation: int or ``(dt, dh, dw)``, default 1: a query sees only keys ``d`` apart, in its own group
            of interleaved positions (needs equal query and key lengths on a dilated axis).
        additional_keys, additional_values: ``(B, S, heads_kv, D)`` / ``(B, S, heads_kv, Dv)`` or ``None``:
            ``S`` tokens every query also attends to (text, start or register tokens), in one softmax
            with its window, unmasked; differentiable.

    Returns:
        ``out (B, T, H, W, heads, Dv)`` in the input dtype, and with ``return_lse`` also
        ``lse (B, T, H, W, heads)`` (natural log; float32, float64 for float64 inputs).
    """
    return _public_call(query, key, value, kernel_size, causal, border, scale, return_lse, backend, stride, dilation,
                        additional_keys, additional_values, None)


def nearby_attention_slab(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    slab: Slab,
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
    *,
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """:func:`nearby_attention` of a slab of queries against a slab of keys of larger global grids
    (context parallelism, tiled inference of grids too large for one call).

    ``query`` is the part of the global query grid ``slab.q_full`` that starts at ``slab.q_origin``;
    ``key``/``value`` the part of the global key grid ``slab.k_full`` that starts at ``slab.k_origin``.
    The result equals those rows of :func:`nearby_attention` on the global tensors (windows, borders,
    strides, dilation groups and raster order all follow the global grids) provided the key slab holds
    every key the queries' windows reach (:func:`nuwa_kernels.window.needed_key_range`); keys outside
    the slab are treated as absent. Other arguments as in :func:`nearby_attention`.
    """
    return _public_call(query, key, value, kernel_size, causal, border, scale, return_lse, backend, stride, dilation,
                        additional_keys, additional_values, slab)


def _public_call(query, key, value, kernel_size, causal, border, scale, return_lse, backend, stride, dilation,
                 additional_keys, additional_values, slab):
    """The shared body of the public grid-layout functions: autocast, then :func:`_attend`; a repeated plain
    call goes straight to its plan's prepared op. The host path runs right after the previous call's kernels
    have swept the caches, where every Python step costs microseconds: NÜWA (1,3,3) forward, 2-core EPYC,
    two threads, in-process alternation, nearby_attention over the op called directly 45-72 us -> 23
    (10x21x21) and 8 -> 3 (1x21x21)."""
    plain = slab is None and additional_keys is None and additional_values is None
    if plain and return_lse.__class__ is bool:
        run = _planned_run(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation)
        if run is not None:
            out, lse = run(query, key, value)
            return (out, lse) if return_lse else out
    query, key, value, autocast_dev = _autocast(query, key, value)
    if autocast_dev is not None:
        additional_keys, additional_values = _autocast_extra(autocast_dev, additional_keys, additional_values)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    out, lse = _attend(query, key, value, kernel_size, causal, border, scale, backend, stride, dilation,
                       additional_keys, additional_values, slab, autocast_dev)
    return (out, lse) if return_lse else out


def _autocast_extra(autocast_dev, *tensors):
    if autocast_dev is None:
        return tensors
    target = torch.get_autocast_dtype(autocast_dev)
    return tuple(t.to(target) if isinstance(t, Tensor) and t.dtype in _FLOAT_DTYPES[:3] else t for t in tensors)


def _check_grid(name: str, grid, n: int) -> Tuple[int, int, int]:
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 3:
        raise ValueError(f"{name} must be a 3-tuple (T, H, W); got {grid!r}")
    if not all(_is_int(g) for g in grid):
        raise TypeError(f"{name} must hold non-negative ints (T, H, W); got {grid!r}")
    grid = tuple(int(g) for g in grid)
    if any(g < 0 for g in grid):
        raise ValueError(f"{name} must hold non-negative ints (T, H, W); got {grid!r}")
    if math.prod(grid) != n:
        raise ValueError(f"{name} {tuple(grid)} must multiply to the sequence length {n}; got {math.prod(grid)}")
    return (grid[0], grid[1], grid[2])


def nearby_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    grid: Sequence[int],
    kv_grid: Optional[Sequence[int]] = None,
    kernel_size: KernelSizeArg = 3,
    is_causal: CausalArg = False,
    border: str = "truncate",
    scale: Optional[float] = None,
    backend: str = "auto",
    *,
    stride: IntTriple = 1,
    dilation: IntTriple = 1,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> Tensor:
    """Nearby attention as a drop-in beside ``F.scaled_dot_product_attention``.

    Args:
        query: ``(B, heads, N, D)`` with ``N == T * H * W`` tokens in raster order.
        key, value: ``(B, heads_kv, Nk, D)`` with ``Nk == prod(kv_grid)``.
        grid: the query grid ``(T, H, W)``.
        kv_grid: the key/value grid; defaults to ``grid``.
        kernel_size, border, scale, backend: as in :func:`nearby_attention`.
        is_causal: ``True`` for raster-order causality (what ``is_causal=True`` means for SDPA on the
            flattened sequence), or per-axis ``(t, h, w)`` bools.
        stride, dilation: as in :func:`nearby_attention`.
        additional_keys, additional_values: ``(B, heads_kv, S, D)`` / ``(B, heads_kv, S, Dv)`` (SDPA layout)
            tokens every query also attends to, or ``None``.
        attn_mask, dropout_p, enable_gqa: SDPA's arguments, accepted so that this replaces
            ``F.scaled_dot_product_attention`` in existing code: ``attn_mask`` must be ``None`` and
            ``dropout_p`` 0 (the window is the mask; anything else raises ``ValueError``); grouped heads
            always work, whatever ``enable_gqa`` says.

    Returns:
        ``(B, heads, N, Dv)`` (a strided view of a ``(B, N, heads, Dv)`` buffer, so
        ``out.transpose(1, 2).reshape(B, N, heads * Dv)`` is free).
    """
    if attn_mask is not None:
        raise ValueError(
            "attn_mask must be None for nearby_sdpa: the window (kernel_size, is_causal, stride, dilation) is "
            "the mask; pass additional_keys/additional_values for tokens every query sees"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float (0.0); got {type(dropout_p).__name__}: {dropout_p!r}")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 for nearby_sdpa (attention dropout is not supported); got {dropout_p}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool; got {enable_gqa!r}")
    query, key, value, _ = _autocast(query, key, value)
    _check_tensors(query, key, value, "sdpa")
    grid = _check_grid("grid", grid, query.shape[2])
    kv_grid = grid if kv_grid is None else kv_grid
    kv_grid = _check_grid("kv_grid", kv_grid, key.shape[2])
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value sequence length must equal key's ({key.shape[2]}); got {value.shape[2]}")
    to_grid = lambda t, g: t.transpose(1, 2).unflatten(1, g)  # noqa: E731  (a view, no copy)
    out = nearby_attention(
        to_grid(query, grid),
        to_grid(key, kv_grid),
        to_grid(value, kv_grid),
        kernel_size=kernel_size,
        causal=is_causal,
        border=border,
        scale=scale,
        backend=backend,
        stride=stride,
        dilation=dilation,
        additional_keys=_sdpa_extra("additional_keys", additional_keys),
        additional_values=_sdpa_extra("additional_values", additional_values),
    )
    return out.flatten(1, 3).transpose(1, 2)


def _sdpa_extra(name: str, t: Optional[Tensor]) -> Optional[Tensor]:
    """``(B, heads_kv, S, D)`` -> ``(B, S, heads_kv, D)`` (a view)."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-d tensor (B, heads_kv, S, D) in nearby_sdpa; got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return t.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# introspection
# ----------------------------------------------------------------------------------------------


def can_run(
    backend: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: KernelSizeArg = 3,
    causal: CausalArg = False,
    border: str = "truncate",
    *,
    stride: IntTriple = 1,
) -> Tuple[bool, str]:
    """Whether ``backend`` can run this grid-layout call, and the reason when it cannot."""
    spec = _validated_spec(query, key, value, kernel_size, causal, border, stride)
    return get_backend(backend).can_run(query, key, value, spec)


def available_backends(
    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 64
) -> Dict[str, Tuple[bool, str]]:
    """``{backend: (can_run, reason)}`` for a small probe call on ``device`` with ``dtype``."""
    q = torch.zeros(1, 1, 2, 2, 1, head_dim, device=device, dtype=dtype)
    return {name: can_run(name, q, q, q) for name in BACKEND_NAMES}
