"""What is timed: nearby attention on each backend, and the baselines and peers it is compared with.

Every provider follows one protocol (:class:`Provider`):

* ``can_run(case, device) -> (ok, reason)``: cheap, before any input is made;
* ``prepare(q, k, v, case)``: converts grid-layout inputs ``(B, T, H, W, heads, D)`` to the provider's
  own layout (untimed; differentiable so the correctness gate can compare gradients) and returns the
  tuple of tensors that :meth:`Provider.run` takes;
* ``run(*args) -> out`` (timed) and ``to_grid(out, case)`` (back to grid layout, for the check);
* ``expected(q, k, v, case)``: the float64 result the provider must reproduce, usually
  ``nearby_attention(..., backend="reference")`` with the provider's own semantics;
* ``pairs(case)``: the (query, key) pairs the provider's function allows, for achieved GFLOP/s.

Families: ``nearby`` (this package), ``full`` (the baseline every speedup is measured against),
``axial``, ``masked`` (dense SDPA + boolean window mask), ``flex`` (FlexAttention + window mask_mod),
``natten`` (NATTEN's ``na3d``), ``nuwa-pytorch`` (``Sparse3DNA``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import nuwa_kernels
from nuwa_kernels.window import make_window_spec, window_mask

from .cases import Case, axial_pairs, full_pairs, window_pairs

Reason = Tuple[bool, str]
OK: Reason = (True, "")


def _grid_to_bhnd(t: Tensor) -> Tensor:
    """``(B, T, H, W, heads, D)`` -> contiguous ``(B, heads, N, D)``."""
    return t.flatten(1, 3).transpose(1, 2).contiguous()


def _bhnd_to_grid(t: Tensor, grid) -> Tensor:
    return t.transpose(1, 2).unflatten(1, tuple(grid))


def _reference(q, k, v, kernel_size, causal, border) -> Tensor:
    return nuwa_kernels.nearby_attention(
        q, k, v, kernel_size=kernel_size, causal=causal, border=border, backend="reference"
    )


class Provider:
    """Base class; see the module docstring for the protocol."""

    name = "?"
    family = "?"
    #: A slow provider runs only on cases with ``peers=True``.
    slow = False
    #: Seconds-long calls (NATTEN's eager path, the reference): on the CPU fewer repetitions suffice.
    few_reps = False
    #: The first call compiles (FlexAttention): two warm-up calls before the repetition count is estimated.
    compiles = False
    #: The dense-attention baseline that speedups divide by.
    baseline = False
    #: A short note for the table legend (what exactly is timed).
    note = ""

    def can_run(self, case: Case, device: str, q=None, k=None, v=None) -> Reason:
        """``(ok, reason)``; ``q, k, v`` are the real inputs when the runner has them (else a cheap probe)."""
        return OK

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, case: Case) -> Tuple[Tensor, ...]:
        return (q, k, v)

    def run(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def to_grid(self, out: Tensor, case: Case) -> Tensor:
        return out

    def expected(self, q: Tensor, k: Tensor, v: Tensor, case: Case) -> Tensor:
        return _reference(q, k, v, case.kernel_size, case.causal, case.border)

    def pairs(self, case: Case) -> int:
        return window_pairs(case.grid, case.kernel_size, case.causal, case.border)

    def extra(self, case: Case) -> Dict:
        """Extra per-row facts for the report (e.g. Triton's tile statistics)."""
        return {}

    def reuse_key(self, case: Case):
        """A key under which this provider's measurement is the same for several cases (full and
        axial attention do not depend on the window), or ``None``. The runner measures once per key."""
        return None

    def window_independent_key(self, case: Case, causal_key):
        """:meth:`reuse_key` for a provider whose cost ignores the window (only ``causal_key`` matters)."""
        return (self.name, case.grid, case.heads, case.head_dim, case.batch, case.dtype, causal_key, case.backward)

    def release(self) -> None:
        """Drop per-case state (masks, compiled blocks)."""


# ----------------------------------------------------------------------------------------------
# nuwa_kernels
# ----------------------------------------------------------------------------------------------


class Nearby(Provider):
    """``nuwa_kernels.nearby_attention(..., backend=<backend>)`` on grid-layout inputs."""

    family = "nearby"

    def __init__(self, backend: str, allow_interpreter: bool = False, border: Optional[str] = None):
        self.backend = backend
        self.name = f"nearby-{backend}" + (f"-{border}" if border else "")
        self.allow_interpreter = allow_interpreter
        # border="shift" overrides the case's border: NATTEN's semantics, for a like-for-like row
        self.border_override = border
        self.note = {
            "reference": "the PyTorch oracle backend (chunked gather)",
            "cpu": "fused C++/OpenMP kernel",
            "triton": "fused Triton kernels",
            "cuda": "fused CUDA kernels",
        }.get(backend, "")
        self.slow = self.few_reps = backend == "reference"
        if border:
            self.slow = True  # only on the peers cases, beside NATTEN
            self.note += f" with border={border!r} (NATTEN's semantics)"

    def can_run(self, case: Case, device: str, q=None, k=None, v=None) -> Reason:
        if self.backend == "triton" and device == "cpu" and not self.allow_interpreter:
            return False, "Triton runs on CUDA tensors; on the CPU only in the interpreter (not timed)"
        if self.backend == "reference" and device == "cpu" and case.backward:
            return (
                False,
                "the reference backend is the correctness oracle; on the CPU only its forward is timed",
            )
        limit = 20000 if device != "cpu" else 5000
        if self.backend == "reference" and case.tokens * case.heads * case.batch > limit * 8:
            return (
                False,
                "the reference backend is the correctness oracle; "
                f"timed only up to {limit:,} tokens x 8 heads here",
            )
        if q is None:  # a probe with the case's device, dtype and head dim
            q = torch.zeros(1, 1, 1, 1, 1, case.head_dim, device=device, dtype=case.torch_dtype)
            k = v = q
            ks, causal = 1, (case.causal if case.causal is not True else True)
        else:
            ks, causal = case.kernel_size, case.causal
        try:
            ok, why = nuwa_kernels.can_run(
                self.backend, q, k, v, kernel_size=ks, causal=causal, border=self._border(case)
            )
        except Exception as e:  # noqa: BLE001  (an unknown or unloadable backend)
            return False, f"{type(e).__name__}: {e}"
        return (True, "") if ok else (False, why or "can_run returned False")

    def run(self, q, k, v):
        return nuwa_kernels.nearby_attention(
            q,
            k,
            v,
            kernel_size=self.kernel_size,
            causal=self.causal,
            border=self.border,
            backend=self.backend,
        )

    def _border(self, case: Case) -> str:
        return self.border_override or case.border

    def prepare(self, q, k, v, case):
        self.kernel_size, self.causal, self.border = case.kernel_size, case.causal, self._border(case)
        return (q, k, v)

    def expected(self, q, k, v, case):
        return _reference(q, k, v, case.kernel_size, case.causal, self._border(case))

    def pairs(self, case):
        return window_pairs(case.grid, case.kernel_size, case.causal, self._border(case))

    def extra(self, case: Case) -> Dict:
        if self.backend != "triton":
            return {}
        return tile_stats(case, border=self._border(case))


def _tile_stats_fn():
    fn = getattr(nuwa_kernels, "tile_stats", None)
    if fn is None:
        try:
            from nuwa_kernels.backends.triton import tile_stats as fn
        except Exception:  # noqa: BLE001
            return None
    return fn


def tile_stats(case: Case, border: Optional[str] = None) -> Dict:
    """``nuwa_kernels.tile_stats`` for the case: the Triton schedule's useful and computed pairs per
    batch and head, ``ratio = computed / useful`` (``tile_*`` keys), or ``{}`` when unavailable."""
    fn = _tile_stats_fn()
    if fn is None:
        return {}
    kw = dict(causal=case.causal, border=border or case.border, backend="triton")
    try:
        try:
            stats = fn(case.grid, case.kernel_size, head_dim=case.head_dim, **kw)
        except TypeError:
            stats = fn(case.grid, case.kernel_size, **kw)
    except Exception as e:  # noqa: BLE001
        return {"tile_stats_error": f"{type(e).__name__}: {e}"}
    return {
        "tile_" + k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dict(stats).items()
    }


# ----------------------------------------------------------------------------------------------
# full attention (the baseline)
# ----------------------------------------------------------------------------------------------


class FullSDPA(Provider):
    """``F.scaled_dot_product_attention`` over all ``N`` tokens, ``is_causal=True`` for any causal case.

    ``kernel`` pins one SDPA backend with ``torch.nn.attention.sdpa_kernel`` (GPU: ``flash``,
    ``cudnn``); ``None`` lets PyTorch choose (CPU: its flash-attention CPU kernel).
    """

    family = "full"
    baseline = True

    def __init__(self, kernel: Optional[str] = None):
        self.kernel = kernel
        self.name = "full-sdpa" + (f"-{kernel}" if kernel else "")
        self.note = "full attention, F.scaled_dot_product_attention" + (
            f" pinned to {kernel}" if kernel else ""
        )

    def _backends(self):
        from torch.nn.attention import SDPBackend

        return {
            "flash": [SDPBackend.FLASH_ATTENTION],
            "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "math": [SDPBackend.MATH],
        }[self.kernel]

    def can_run(self, case, device, q=None, k=None, v=None):
        if self.kernel and device == "cpu" and self.kernel in ("cudnn", "efficient"):
            return False, f"SDPA's {self.kernel} backend is CUDA only"
        if self.kernel == "flash" and device != "cpu" and case.dtype == "float32":
            return False, "SDPA's flash backend needs float16/bfloat16 on CUDA"
        if device == "cpu" and case.tokens > 32768:
            return False, "full attention above 32,768 tokens is minutes per call on a CPU"
        return OK

    def prepare(self, q, k, v, case):
        self.is_causal = case.causal is not False
        return tuple(_grid_to_bhnd(t) for t in (q, k, v))

    def run(self, q, k, v):
        if self.kernel is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self._backends()):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)

    def to_grid(self, out, case):
        return _bhnd_to_grid(out, case.grid)

    def expected(self, q, k, v, case):
        o = F.scaled_dot_product_attention(
            *(_grid_to_bhnd(t) for t in (q, k, v)), is_causal=case.causal is not False
        )
        return _bhnd_to_grid(o, case.grid)

    def pairs(self, case):
        return full_pairs(case.tokens, case.causal)

    def reuse_key(self, case):
        return self.window_independent_key(case, case.causal is not False)


# ----------------------------------------------------------------------------------------------
# axial attention (the NÜWA paper's "axis" baseline)
# ----------------------------------------------------------------------------------------------


def axial_attention(q: Tensor, k: Tensor, v: Tensor, causal) -> Tensor:
    """Attention along t, along h and along w (three SDPA passes), outputs summed.

    Inputs ``(B, heads, T, H, W, D)``; output the same. ``causal=True`` makes every pass causal
    (raster order restricted to one axis); per-axis bools make the chosen passes causal.
    """
    axes = (
        (True, True, True) if causal is True else (False, False, False) if causal is False else tuple(causal)
    )
    B, Hd, T, H, W, D = q.shape
    out = None
    for axis, c in zip((2, 3, 4), axes):
        # move the attended axis next to D: (..., L, D), then fold the other axes into the batch
        perm = [0, 1] + [a for a in (2, 3, 4) if a != axis] + [axis, 5]
        # 4-D (batch, heads, L, D) so that SDPA's fused CPU/GPU kernels apply (3-D falls back to math)
        qa, ka, va = (t.permute(*perm).flatten(0, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qa, ka, va, is_causal=c)
        shape = [q.shape[p] for p in perm]
        o = o.reshape(shape).permute(*[perm.index(i) for i in range(6)])  # a view whatever its strides
        out = o if out is None else out + o
    return out


class Axial(Provider):
    name = "axial-sdpa"
    family = "axial"
    note = "axial attention: SDPA along t, h and w, summed (the paper's 'axis' baseline)"

    def prepare(self, q, k, v, case):
        self.causal = case.causal
        # (B, T, H, W, heads, D) -> (B, heads, T, H, W, D), contiguous
        return tuple(t.permute(0, 4, 1, 2, 3, 5).contiguous() for t in (q, k, v))

    def run(self, q, k, v):
        return axial_attention(q, k, v, self.causal)

    def to_grid(self, out, case):
        return out.permute(0, 2, 3, 4, 1, 5)

    def expected(self, q, k, v, case):
        return self.to_grid(
            axial_attention(*(t.permute(0, 4, 1, 2, 3, 5) for t in (q, k, v)), case.causal), case
        )

    def pairs(self, case):
        return axial_pairs(case.grid, case.causal)

    def reuse_key(self, case):
        return self.window_independent_key(case, case.causal)


# ----------------------------------------------------------------------------------------------
# dense SDPA with the window as a boolean mask
# ----------------------------------------------------------------------------------------------


class MaskedSDPA(Provider):
    """``F.scaled_dot_product_attention(attn_mask=window_mask)``: the same function as nearby
    attention computed densely (the mask is built once per case, untimed)."""

    name = "masked-sdpa"
    family = "masked"
    note = "dense SDPA with the N x N boolean window mask"
    #: As slow as full attention or slower (the mask adds work, the backward takes SDPA's math path on
    #: the CPU): only on the peers cases.
    slow = True

    def __init__(self, max_tokens_cpu: int = 8192, max_tokens_gpu: int = 32768):
        self.max_tokens = {"cpu": max_tokens_cpu, "cuda": max_tokens_gpu}
        self.mask = None

    def can_run(self, case, device, q=None, k=None, v=None):
        limit = self.max_tokens.get(device, self.max_tokens["cpu"])
        if case.tokens > limit:
            return False, f"the N x N mask needs N <= {limit:,} here (N = {case.tokens:,})"
        return OK

    def prepare(self, q, k, v, case):
        spec = make_window_spec(case.grid, case.grid, case.kernel_size, case.causal, case.border)
        self.mask = window_mask(spec, device=q.device)
        return tuple(_grid_to_bhnd(t) for t in (q, k, v))

    def run(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)

    def to_grid(self, out, case):
        return _bhnd_to_grid(out, case.grid)

    def release(self):
        self.mask = None


# ----------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------

_compiled_flex = None


def _flex():
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # Every case (and its small check version) is a new mask_mod closure and shape: a recompile.
        # Dynamo's default limit (8) would silently fall back to the unfused eager path after that.
        for knob in (
            "cache_size_limit",
            "recompile_limit",
            "accumulated_cache_size_limit",
            "accumulated_recompile_limit",
        ):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 1024))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def window_mask_mod(case: Case, device):
    """A FlexAttention ``mask_mod`` built from the per-axis window tables of ``nuwa_kernels.window``."""
    from nuwa_kernels.window import spec_axis_bounds

    spec = make_window_spec(case.grid, case.grid, case.kernel_size, case.causal, case.border)
    T, H, W = case.grid
    lo = [spec_axis_bounds(spec, a, device=device)[0] for a in range(3)]
    hi = [spec_axis_bounds(spec, a, device=device)[1] for a in range(3)]
    raster = spec.raster_causal

    def mask_mod(b, h, q_idx, kv_idx):
        qt, qh, qw = q_idx // (H * W), (q_idx // W) % H, q_idx % W
        kt, kh, kw = kv_idx // (H * W), (kv_idx // W) % H, kv_idx % W
        ok = (kt >= lo[0][qt]) & (kt <= hi[0][qt])
        ok = ok & (kh >= lo[1][qh]) & (kh <= hi[1][qh])
        ok = ok & (kw >= lo[2][qw]) & (kw <= hi[2][qw])
        if raster:
            ok = ok & (kv_idx <= q_idx)
        return ok

    return mask_mod


class Flex(Provider):
    """Compiled ``flex_attention`` with a block mask from :func:`window_mask_mod` (block mask built
    once per case, untimed; the first call's compile is warm-up)."""

    name = "flex"
    family = "flex"
    slow = True
    compiles = True
    note = "torch.compile(flex_attention) with the window as mask_mod"

    def __init__(self):
        self.block_mask = None

    def can_run(self, case, device, q=None, k=None, v=None):
        try:
            from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
        except ImportError as e:
            return False, f"FlexAttention unavailable: {e}"
        if device == "cpu" and case.backward:
            return False, "FlexAttention has no backward on CPU"
        return OK

    def prepare(self, q, k, v, case):
        from torch.nn.attention.flex_attention import create_block_mask

        n = case.tokens
        kw = {"_compile": True} if n > 16384 else {}
        self.block_mask = create_block_mask(
            window_mask_mod(case, q.device), None, None, n, n, device=q.device, **kw
        )
        return tuple(_grid_to_bhnd(t) for t in (q, k, v))

    def run(self, q, k, v):
        return _flex()(q, k, v, block_mask=self.block_mask)

    def to_grid(self, out, case):
        return _bhnd_to_grid(out, case.grid)

    def release(self):
        self.block_mask = None


# ----------------------------------------------------------------------------------------------
# NATTEN
# ----------------------------------------------------------------------------------------------


class Natten(Provider):
    """NATTEN's ``na3d`` (``na2d`` for one-frame grids with a one-frame window); semantics
    ``border="shift"`` with per-axis causal windows. Its own default backend (the pure-Python install
    has only FlexAttention: forward only on CPU, about 4 s a call on the NÜWA video grid)."""

    name = "natten"
    family = "natten"
    slow = True
    few_reps = True

    def __init__(self):
        from importlib.metadata import PackageNotFoundError, version

        try:  # the import itself is deferred to the first can_run (it is slow)
            self.version = version("natten")
            self.note = f"NATTEN {self.version} na3d (border='shift' semantics)"
        except PackageNotFoundError:
            self.version = None
        self.error = "not installed"
        self._imported = False

    def _import(self) -> bool:
        if self.version is not None and not self._imported:
            try:
                import warnings

                import natten.functional  # noqa: F401

                # NATTEN's CPU path calls flex_attention eagerly, which warns on every call.
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")

                self._imported = True
            except Exception as e:  # noqa: BLE001
                self.version, self.error = None, f"{type(e).__name__}: {e}"
        return self.version is not None

    def can_run(self, case, device, q=None, k=None, v=None):
        if not self._import():
            return False, f"natten unavailable ({self.error})"
        if case.causal is True:
            return False, "NATTEN has no raster-order causality (only per-axis is_causal)"
        ks = self._kernel(case)
        if any(k > L for k, L in zip(ks, case.grid[3 - len(ks) :])):
            return False, f"NATTEN needs kernel_size <= grid on every axis ({case.kernel_size} > {case.grid})"
        if any(k < 2 for k in ks):
            return False, f"NATTEN needs kernel_size >= 2 on every attended axis ({case.kernel_size})"
        if device == "cpu" and case.backward:
            return False, "NATTEN's CPU (FlexAttention) backend is forward only"
        if device == "cpu" and case.tokens * case.heads * case.batch > 5000 * 8:
            return (
                False,
                "NATTEN's CPU path (eager FlexAttention) materialises N x N scores: "
                "only up to 5,000 tokens x 8 heads",
            )
        return OK

    @staticmethod
    def _image(case) -> bool:
        """Run ``na2d`` on (H, W) with the frames folded into the batch when the t window is one frame
        (one-frame grids, or ``kt == 1``: each frame attends only to itself, causal or not). ``na3d``
        needs ``2 <= k <= L`` on every axis."""
        return case.grid[0] == 1 or case.kernel_size[0] == 1

    def _kernel(self, case):
        return tuple(case.kernel_size[1:]) if self._image(case) else tuple(case.kernel_size)

    def _causal(self, case):
        return (False, False, False) if case.causal is False else tuple(case.causal)

    def prepare(self, q, k, v, case):
        self.image = self._image(case)
        self.kernel_size = self._kernel(case)
        self.is_causal = self._causal(case)[1:] if self.image else self._causal(case)
        if self.image:  # (B, T, H, W, heads, D) -> (B * T, H, W, heads, D)
            return tuple(t.flatten(0, 1) for t in (q, k, v))
        return (q, k, v)

    def run(self, q, k, v):
        from natten.functional import na2d, na3d

        if self.image:
            return na2d(q, k, v, kernel_size=self.kernel_size, is_causal=self.is_causal)
        return na3d(q, k, v, kernel_size=self.kernel_size, is_causal=self.is_causal)

    def to_grid(self, out, case):
        return out.unflatten(0, (case.batch, case.grid[0])) if out.dim() == 5 else out

    def expected(self, q, k, v, case):
        return _reference(q, k, v, case.kernel_size, self._causal(case), "shift")

    def pairs(self, case):
        return window_pairs(case.grid, case.kernel_size, self._causal(case), "shift")


# ----------------------------------------------------------------------------------------------
# nuwa-pytorch's Sparse3DNA
# ----------------------------------------------------------------------------------------------


def import_sparse3dna():
    """``nuwa_pytorch.nuwa_pytorch.Sparse3DNA`` without running the package ``__init__`` (which
    imports torchvision): a stub package module points at the installed folder."""
    if "nuwa_pytorch.nuwa_pytorch" not in sys.modules:
        spec = importlib.util.find_spec("nuwa_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("nuwa-pytorch is not installed")
        if "nuwa_pytorch" not in sys.modules:
            pkg = types.ModuleType("nuwa_pytorch")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["nuwa_pytorch"] = pkg
    return importlib.import_module("nuwa_pytorch.nuwa_pytorch").Sparse3DNA


class NuwaPytorch(Provider):
    """nuwa-pytorch 0.7.8 ``Sparse3DNA`` (the module: q/kv/out projections and talking heads set to the
    identity, plus its always-visible BOS key), on ``x = [0 (BOS); q]``. Semantics: truncate window
    plus one extra key (zero key, zero value); its ``causal=True`` is per-axis causal on all axes, so
    only non-causal cases run."""

    name = "nuwa-pytorch"
    family = "nuwa-pytorch"
    slow = True
    few_reps = True

    def __init__(self):
        from importlib.metadata import PackageNotFoundError, version

        try:  # the import itself is deferred to the first can_run
            self.version = version("nuwa-pytorch")
            self.note = f"nuwa-pytorch {self.version} Sparse3DNA module (incl. identity projections, BOS key)"
        except PackageNotFoundError:
            self.version = None
        self.cls = None
        self.error = "not installed"
        self.module = None

    def _import(self) -> bool:
        if self.version is not None and self.cls is None:
            try:
                self.cls = import_sparse3dna()
            except Exception as e:  # noqa: BLE001
                self.version, self.error = None, f"{type(e).__name__}: {e}"
        return self.cls is not None

    def can_run(self, case, device, q=None, k=None, v=None):
        if not self._import():
            return False, f"nuwa-pytorch not importable ({self.error})"
        if case.causal is not False:
            return False, "Sparse3DNA's causal mode is per-axis causal on (t, h, w), not raster/frame"
        if case.grid[1] != case.grid[2]:
            return False, "Sparse3DNA needs square frames (H == W)"
        if any(k % 2 == 0 for k in case.kernel_size):
            return False, "Sparse3DNA needs odd kernel sizes"
        if case.dtype != "float32":
            return False, "Sparse3DNA mixes a float32 softmax with module weights (float32 only)"
        if case.batch * case.heads * case.tokens * math.prod(case.kernel_size) * case.head_dim > 1.25e8:
            return False, "its unfolded (N, window, D) keys and values would take over 1 GB"
        return OK

    def prepare(self, q, k, v, case):
        heads, D = case.heads, case.head_dim
        dim = heads * D
        m = self.cls(
            dim=dim,
            video_shape=case.grid,
            kernel_size=tuple(case.kernel_size),
            heads=heads,
            dim_head=D,
            causal=False,
        )
        with torch.no_grad():
            eye = torch.eye(dim)
            m.to_q.weight.copy_(eye)
            m.to_kv.weight.copy_(torch.cat([eye, eye]))
            m.talking_heads.weight.copy_(torch.eye(heads)[:, :, None, None])
            m.to_out.weight.copy_(eye)
            m.to_out.bias.zero_()
        self.module = m.to(device=q.device, dtype=q.dtype).requires_grad_(False)
        x = q.flatten(1, 3).flatten(2)  # (B, N, heads * D)
        x = torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
        return (x,)

    def run(self, x):
        return self.module(x)

    def to_grid(self, out, case):
        # drop the BOS row (it attends only to itself)
        return out[:, 1:].unflatten(2, (case.heads, case.head_dim)).unflatten(1, tuple(case.grid))

    def expected(self, q, k, v, case):
        # the module uses x for q, k and v; the extra BOS key/value is zero
        spec = make_window_spec(case.grid, case.grid, case.kernel_size, False, "truncate")
        mask = window_mask(spec, device=q.device)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        x = _grid_to_bhnd(q)
        kv = torch.cat([torch.zeros_like(x[:, :, :1]), x], dim=2)
        return _bhnd_to_grid(F.scaled_dot_product_attention(x, kv, kv, attn_mask=mask), case.grid)

    def pairs(self, case):
        return window_pairs(case.grid, case.kernel_size, False, "truncate") + case.tokens

    def release(self):
        self.module = None


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------


def all_providers(device: str, allow_interpreter: bool = False) -> List[Provider]:
    """Every provider for ``device`` (``cpu`` or ``cuda``), in table order; skips are decided per case."""
    provs: List[Provider] = [Nearby(b, allow_interpreter) for b in ("cpu", "triton", "cuda", "reference")]
    provs += [Nearby(b, allow_interpreter, border="shift") for b in ("cpu", "triton", "cuda")]
    if device == "cpu":
        provs.append(FullSDPA())
    else:
        provs += [FullSDPA("flash"), FullSDPA("cudnn")]
    provs += [Axial(), MaskedSDPA(), Flex(), Natten(), NuwaPytorch()]
    return provs


def _matches(p: Provider, pattern: str) -> bool:
    return p.name == pattern or p.family == pattern or p.name.startswith(pattern)


def select_providers(provs: Sequence[Provider], patterns: Optional[Sequence[str]]) -> List[Provider]:
    """Providers whose name or family matches one of ``patterns`` (exact, or a prefix)."""
    if not patterns:
        return list(provs)
    return [p for p in provs if any(_matches(p, s) for s in patterns)]


def unknown_provider_patterns(provs: Sequence[Provider], patterns: Sequence[str]) -> List[str]:
    """The ``--providers`` entries that select none of ``provs`` (the CLI refuses them)."""
    return [s for s in patterns if not any(_matches(p, s) for p in provs)]


def provider_names() -> List[str]:
    """Every provider name and family on any device (for error messages)."""
    out = set()
    for device in ("cpu", "cuda"):
        for p in all_providers(device):
            out |= {p.name, p.family}
    return sorted(out)
