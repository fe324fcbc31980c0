"""Load the compiled extension ``nuwa_kernels._C`` when it was built; record why not otherwise.

Set ``NUWA_KERNELS_NO_EXT=1`` to skip loading it (pure-Python mode: reference and Triton backends).
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (libtorch must be loaded before the extension)

LOAD_ERROR: str | None = None
_C = None
if os.environ.get("NUWA_KERNELS_NO_EXT", "0") not in ("", "0"):
    LOAD_ERROR = "the C++ extension nuwa_kernels._C was not loaded (NUWA_KERNELS_NO_EXT is set)"
else:
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:  # not built (NUWA_SKIP_EXT, no compiler) or broken
        LOAD_ERROR = f"the C++ extension nuwa_kernels._C is not built or failed to load ({exc})"


def loaded() -> bool:
    return _C is not None
