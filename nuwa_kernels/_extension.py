"""Load the compiled extension ``nuwa_kernels._C`` when it was built; record why not otherwise.

Set ``NUWA_KERNELS_NO_EXT=1`` to skip loading it (pure-Python mode: reference and Triton backends).

* ``LOAD_ERROR``: why the extension is not loaded (``None`` when it is), naming the cause;
* ``LOAD_FIX``: what to do about it;
* ``BUILD_INFO``: what ``setup.py`` built (``nuwa_kernels/_build_info.py``; empty when unknown);
* :func:`warn_fallback_once`: the one warning ``backend="auto"`` emits when it falls back to the slow
  ``reference`` on CPU because the extension is missing.
"""

from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (libtorch must be loaded before the extension)

REBUILD = "pip install --no-build-isolation --no-deps -e .  (or `make setup`)"

try:
    from ._build_info import BUILD as BUILD_INFO
except ImportError:  # not built by this project's setup.py (or an old build)
    BUILD_INFO: dict = {}

LOAD_ERROR: str | None = None
LOAD_FIX: str | None = None
_C = None
if os.environ.get("NUWA_KERNELS_NO_EXT", "0") not in ("", "0"):
    LOAD_ERROR = "the C++ extension nuwa_kernels._C was not loaded (NUWA_KERNELS_NO_EXT is set)"
    LOAD_FIX = "unset NUWA_KERNELS_NO_EXT"
elif BUILD_INFO.get("extension") is False:  # the last install skipped it (a leftover _C*.so is stale)
    LOAD_ERROR = "the C++ extension nuwa_kernels._C is not built (nuwa-kernels was installed with NUWA_SKIP_EXT=1)"
    LOAD_FIX = f"reinstall without NUWA_SKIP_EXT, with a C++ compiler: {REBUILD}"
else:
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:  # not built, or broken (e.g. built against another torch)
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C":
            LOAD_ERROR = "the C++ extension nuwa_kernels._C is not built"
            LOAD_FIX = f"build it (needs a C++ compiler): {REBUILD}"
        else:
            built_for = BUILD_INFO.get("torch")
            mismatch = (
                f"; it was built against torch {built_for}, this is torch {torch.__version__}"
                if built_for and built_for != torch.__version__
                else ""
            )
            LOAD_ERROR = f"the C++ extension nuwa_kernels._C failed to load ({exc}){mismatch}"
            LOAD_FIX = f"rebuild it against this torch: {REBUILD}"


def loaded() -> bool:
    return _C is not None


class ExtensionFallbackWarning(UserWarning):
    """``backend="auto"`` ran the slow ``reference`` backend because ``nuwa_kernels._C`` is missing."""


_warned = False


def warn_fallback_once(stacklevel: int = 2) -> None:
    """Warn once per process that ``auto`` falls back to ``reference`` for want of the extension."""
    global _warned
    if _warned or loaded():
        return
    try:  # never inside a torch.compile trace (the warning comes from the eager call)
        if torch.compiler.is_compiling():
            return
    except AttributeError:
        pass
    _warned = True
    warnings.warn(
        f"nuwa_kernels: backend='auto' is using the slow 'reference' backend on CPU because {LOAD_ERROR}. "
        f"Fix: {LOAD_FIX}. (Pass backend='reference' to silence this.)",
        ExtensionFallbackWarning,
        stacklevel=stacklevel + 1,
    )
