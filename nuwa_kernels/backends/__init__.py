"""Backends of nearby attention and the rule that picks one.

Every backend module exposes the same three names:

* ``NAME``: the string users pass as ``backend=``;
* ``can_run(query, key, value, spec) -> tuple[bool, str]``: whether it can run this call, and the
  reason (naming the cause: not built, wrong device, unsupported dtype or head dim) when it cannot;
* ``forward(query, key, value, spec, scale) -> tuple[Tensor, Tensor]``: ``(out, lse)``, differentiable
  through the backend's registered ``torch.library`` ops.

The ``auto`` rule (documented in the README): on CUDA tensors try ``triton``, then ``cuda``, then
``reference``, except for small windows (at most 512 keys per query) where ``cuda`` comes first
(exact pairs; see :func:`_auto_order`); on CPU tensors try ``cpu``, then ``reference``; on any other
device ``reference``.
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
    """``auto``'s order for a call. On CUDA tensors: ``triton`` first for large windows (its
    64-token tiles run on tensor cores, ``wgmma`` on sm_90); ``cuda`` first for small windows (a query
    sees at most ``backends.triton.config.SMALL_WINDOW_KEYS`` = 512 keys, e.g. NÜWA's 3x3x3 and 7x7x7),
    where the CUDA kernels score exactly the allowed pairs while Triton's 16-token tiles still score
    about 1.9-4.8x more (``tile_stats``)."""
    order = AUTO_ORDER.get(query.device.type, ("reference",))
    if query.device.type == "cuda":
        from .triton.config import window_class

        if window_class(spec) == "small":
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
