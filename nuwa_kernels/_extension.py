"""Load the compiled extension ``nuwa_kernels._C`` when it was built; record why not otherwise."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401
except ImportError as exc:  # not built (NUWA_SKIP_EXT, no compiler) or broken
    _C = None
    LOAD_ERROR = f"the C++ extension nuwa_kernels._C is not built or failed to load ({exc})"


def loaded() -> bool:
    return _C is not None
