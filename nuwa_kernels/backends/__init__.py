"""Backends of nearby attention and the rule that picks one.

Every backend module exposes the same three names:

* ``NAME``: the string users pass as ``backend=``;
* ``can_run(query, key, value, spec) -> tuple[bool, str]``: whether it can run this call, and the
  reason (naming the cause: not built, wrong device, unsupported dtype or head dim) when it cannot;
* ``forward(query, key, value, spec, scale) -> tuple[Tensor, Tensor]``: ``(out, lse)``, differentiable
  through the backend's registered ``torch.library`` ops.

and may expose ``runner(spec, scale)``: ``forward`` of one window as ``run(query, key, value)``, its op
arguments built once (``_ops.prepared``), which the API's plans keep for repeated calls.

The ``auto`` rule (documented in the README and docs/DESIGN.md, measured on an H200): on CUDA tensors try
``triton``, then ``cuda``, then ``reference``, except for small calls (a small window and at most
:data:`SMALL_CALL_QUERY_HEADS` query rows) where ``cuda`` comes first (see :func:`_auto_order`); on CPU
tensors try ``cpu``, then ``reference``; on any other device ``reference``.
The ``NUWA_KERNELS_BACKEND`` environment variable, when set, replaces ``auto``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Tuple

from torch import Tensor

from .. import _extension
from ..window import WindowSpec

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "NUWA_KERNELS_BACKEND"
# Query rows (batch x tokens x heads) up to which a small-window call on CUDA goes to the cuda backend
# first: measured on an H200 (benchmarks/results/h200/), the CUDA kernels win forward + backward on NÜWA's
# 10x21x21 grid with 8 heads (35,280 rows: 0.62 ms against Triton's 1.16 ms, 0.40 against 0.97
# raster-causal), while Triton wins from 16x32x32 x 8 heads on (131,072 rows: 0.087 ms forward against
# 0.284, 0.94 forward + backward against 1.30).
SMALL_CALL_QUERY_HEADS = 65536

_MODULES = {
    "reference": ".reference",
    "cpu": ".cpu",
    "cuda": ".cuda",
    "triton": ".triton",
}
_loaded: Dict[str, ModuleType] = {}


class BackendUnavailableError(ValueError, RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def load_backends() -> None:
    """Import every backend module once, at package import (never while ``torch.compile`` traces).

    Backend modules import cheaply and never fail: a backend whose library or build is missing
    imports anyway and reports the reason from ``can_run``.
    """
    for name, module in _MODULES.items():
        if name in _loaded:
            continue
        try:
            mod = importlib.import_module(module, __name__)
            missing = [attr for attr in ("can_run", "forward") if not hasattr(mod, attr)]
            _loaded[name] = mod if not missing else _unavailable(name, f"its module lacks {missing}")
        except ImportError as exc:  # a broken optional dependency must not break the package
            _loaded[name] = _unavailable(name, f"its module failed to import ({exc})")


def _unavailable(name: str, why: str) -> ModuleType:
    stub = ModuleType(f"{__name__}.{name}")
    stub.NAME = name
    stub.can_run = lambda query, key, value, spec: (False, why)

    def forward(query, key, value, spec, scale):
        raise BackendUnavailableError(f"backend={name!r} cannot run: {why}")

    stub.forward = forward
    return stub


def get_backend(name: str) -> ModuleType:
    if name not in _loaded:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}; got {name!r}")
    return _loaded[name]


def can_run(name: str, query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec) -> Tuple[bool, str]:
    """Whether backend ``name`` can run this call, and why not."""
    return get_backend(name).can_run(query, key, value, spec)


def _auto_order(query: Tensor, spec: WindowSpec) -> Tuple[str, ...]:
    """``auto``'s order for a call. On CUDA tensors: ``triton`` first (tensor-core tiles; on an H200 it
    is 3-12x faster than the ``cuda`` backend from 16x32x32 x 8 heads up, and on HunyuanVideo's 18x24x24
    window), except ``cuda`` first for small calls: a small window (a query sees at most
    ``backends.triton.config.SMALL_WINDOW_KEYS`` = 512 keys, e.g. NÜWA's 3x3x3) and at most
    :data:`SMALL_CALL_QUERY_HEADS` query rows, where the CUDA kernels score exactly the allowed pairs
    and their lighter launch path wins forward + backward."""
    order = AUTO_ORDER.get(query.device.type, ("reference",))
    if query.device.type == "cuda":
        from .triton.config import window_class

        rows = query.shape[0] * query.shape[1] * query.shape[2] * query.shape[3] * query.shape[4]
        if rows <= SMALL_CALL_QUERY_HEADS and window_class(spec) == "small":
            return ("cuda", "triton", "reference")
    return order


def select_backend(requested: str, query: Tensor, key: Tensor, value: Tensor, spec: WindowSpec) -> ModuleType:
    """Resolve ``requested`` (``"auto"`` or a backend name) to a backend module that can run the call.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: an explicitly requested backend cannot run this call.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKEND_NAMES}; got {requested!r}")
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"{ENV_VAR} must be one of {('auto',) + BACKEND_NAMES}; got {requested!r}")
    if requested != "auto":
        module = get_backend(requested)
        ok, why = module.can_run(query, key, value, spec)
        if not ok:
            raise BackendUnavailableError(f"backend={requested!r} cannot run this call: {why}")
        return module
    for name in _auto_order(query, spec):
        module = get_backend(name)
        if module.can_run(query, key, value, spec)[0]:
            return module
        if name == "cpu":  # one warning per process when the reason is a missing nuwa_kernels._C
            _extension.warn_fallback_once(stacklevel=4)
    return get_backend("reference")
