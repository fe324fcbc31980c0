"""The fixed launch-configuration table of the Triton kernels (no autotuning by default).

A call's configuration is a pure function of four keys, so a first call compiles exactly one variant
per kernel and a CUDA-graph capture never benchmarks:

* ``arch``: the GPU's compute capability, ``90`` for sm_90 and newer, ``80`` for everything else
  (sm_80, sm_86, sm_89);
* ``head_dim``: the head dim rounded up to a power of two (``BLOCK_D``; 16..256);
* ``dtype``: ``"half"`` (float16 and bfloat16) or ``"fp32"``;
* ``window``: ``"small"`` when a query sees at most :data:`SMALL_WINDOW_KEYS` keys (NÜWA's own 3x3x3,
  1x3x3, 7x7x7 windows), else ``"large"`` (HunyuanVideo's 18x24x24, whole axes).

Each entry fixes the tiling (query-brick and key-tile sizes, :class:`~.plan.BlockConfig`) and
``(num_warps, num_stages)`` per kernel (forward, ``dQ``, ``dK/dV``). The rules behind the numbers
(docs/DESIGN.md, "Triton launch configurations"):

* large windows, half precision: 64-token bricks on the ``M`` side of every product (query bricks in
  the forward and ``dQ``, key bricks in ``dK/dV``, whose four products all have the key brick as ``M``),
  so sm_90 runs every product on ``wgmma`` (one warpgroup: ``M = 64``); 32-token tiles on the other
  side (forward/``dQ``: packed from the brick's window union when that saves pairs, HunyuanVideo's
  18x24x24 on 30x48x80 1.45 instead of 1.60 with box tiles); 3 pipeline stages (2 at D=256, for
  shared memory);
* small windows: 16-token bricks and 16-token key tiles, packed from each brick's window union
  when that saves pairs (``computed / useful`` 3.7 for 3x3x3 on 10x21x21 against 7.0 with 32x32
  box tiles, 4.75 for 1x3x3 on 1x32x32); ``wgmma`` needs ``M >= 64`` so these run ``mma.sync``
  (m16n8k16) on both architectures; 2 warps;
* float32: 32x32 tiles (16x16 for small windows), IEEE ``tl.dot`` is an FMA loop, TF32 when
  ``torch.backends.cuda.matmul.allow_tf32`` is set;
* warps grow with the head dim so that the float32 accumulators fit in registers without spilling
  (``scripts/triton_aot_check.py`` checks zero spills and zero local memory for every entry with
  ``D <= 128``).

``NUWA_TRITON_AUTOTUNE=1`` asks for benchmarking instead: the first call of each (kernel, shape key)
times the table entry's warps/stages neighbours and keeps the fastest (never during CUDA-graph
capture, where the table entry is used).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ...window import WindowSpec
from .plan import BlockConfig

__all__ = [
    "SMALL_WINDOW_KEYS",
    "AUTOTUNE_ENV",
    "LaunchConfig",
    "TABLE",
    "arch_key",
    "dtype_key",
    "head_dim_block",
    "window_class",
    "lookup",
    "config_for",
    "all_configs",
    "autotune_requested",
    "CANDIDATES",
]

SMALL_WINDOW_KEYS = 512
AUTOTUNE_ENV = "NUWA_TRITON_AUTOTUNE"

WarpsStages = Tuple[int, int]


@dataclass(frozen=True)
class LaunchConfig:
    """One row of the table.

    Attributes:
        name: short id used in cubin file names (``<window>-m<block_m>n<block_n>-w<warps>``).
        block: the tiling: ``block_m`` tokens per query brick (forward/``dQ``) and per key brick
            (``dK/dV``), ``block_n`` tokens per key tile (forward/``dQ``) and per query tile (``dK/dV``).
        fwd, dq, dkdv: ``(num_warps, num_stages)`` of each kernel.
        mma: the tensor-core instruction the sm_90 half-precision build must use (``"wgmma"`` or
            ``"mma"``; ``"fma"`` for IEEE float32).
    """

    name: str
    block: BlockConfig
    fwd: WarpsStages
    dq: WarpsStages
    dkdv: WarpsStages
    mma: str

    def warps_stages(self, kernel: str) -> WarpsStages:
        return {"fwd": self.fwd, "dq": self.dq, "dkdv": self.dkdv}[kernel]


def _cfg(window: str, bm: int, bn: int, fwd: WarpsStages, dq: WarpsStages, dkdv: WarpsStages, mma: str,
         bwd_tile: Optional[int] = None):
    warps = (fwd[0], dq[0], dkdv[0])
    sep = "x" if max(warps) >= 10 else ""
    name = f"{window}-m{bm}n{bn}" + (f"t{bwd_tile}" if bwd_tile else "") + "-w" + sep.join(map(str, warps))
    return LaunchConfig(name, BlockConfig(bm, bn, bwd_tile=bwd_tile), fwd, dq, dkdv, mma)


def _build_table() -> Dict[Tuple[int, int, str, str], LaunchConfig]:
    t: Dict[Tuple[int, int, str, str], LaunchConfig] = {}
    for arch in (80, 90):
        for d in (16, 32, 64, 128, 256):
            stages = 2 if d == 256 else 3
            if arch == 90:
                # half precision, large windows: M = 64 on every product (wgmma); the dK/dV sweep walks
                # 16-query tiles (its two float32 accumulators leave no registers for wider ones)
                w_f = 8 if d == 256 else 4
                w_kv = 8 if d >= 128 else 4
                # dQ at D=128: 8 warps (two warpgroups split N; 4 warps spill with packed tiles in triton 3.6)
                w_q = 8 if d >= 128 else 4
                t[(arch, d, "half", "large")] = _cfg("large", 64, 32, (w_f, stages), (w_q, stages), (w_kv, stages),
                                                     "wgmma" if d >= 64 else "mma", bwd_tile=16)
            else:
                # sm_80 has no wgmma: 32-token bricks (fewer wasted pairs, no spills in 4 warps)
                w = 8 if d == 256 else 4
                t[(arch, d, "half", "large")] = _cfg("large", 32, 32, (w, stages), (w, stages), (w, stages), "mma",
                                                     bwd_tile=16)
            # half precision, small windows: 16-token bricks and tiles (mma.sync m16n8k16)
            w_s = 4 if d == 256 else 2
            t[(arch, d, "half", "small")] = _cfg("small", 16, 16, (w_s, 2), (w_s, 2), (4, 2), "mma")
            # float32 (IEEE FMA loops, or TF32 mma when allowed): 16-token bricks and tiles except on
            # sm_90's large windows (32x32); sm_80 has half the registers per FMA-heavy thread to spare
            ws = 4 if d >= 128 else 2
            kvs = (4, 2) if d >= 128 or arch == 90 else (2, 2)
            # sm_90's ptxas caps the 2-warp dQ at 128 registers and spills with packed key tiles: 4 warps
            wq = 4 if d >= 128 or arch == 90 else 2
            small32 = _cfg("small", 16, 16, (ws, 2), (wq, 2), kvs, "fma")
            t[(arch, d, "fp32", "small")] = small32
            if arch == 90:
                w32 = 8 if d >= 128 else 4
                kv32 = (8, 1) if d >= 128 else (8, 2)
                # D=128: one stage in the forward and 16 warps in dQ (8 warps spill with packed key tiles)
                f32 = (w32, 1) if d >= 128 else (w32, 2)
                q32 = (16, 2) if d >= 128 else (w32, 2)
                t[(arch, d, "fp32", "large")] = _cfg("large", 32, 32, f32, q32, kv32, "fma")
            else:
                t[(arch, d, "fp32", "large")] = small32
    return t


TABLE: Dict[Tuple[int, int, str, str], LaunchConfig] = _build_table()


def _candidates() -> Dict[str, LaunchConfig]:
    cands = [
        _cfg("large", 64, 64, (8, 3), (8, 3), (8, 3), "wgmma", bwd_tile=16),
        _cfg("large", 128, 32, (8, 3), (8, 3), (8, 3), "wgmma", bwd_tile=16),
        _cfg("large", 128, 64, (8, 2), (8, 2), (8, 2), "wgmma", bwd_tile=16),
        _cfg("large", 64, 128, (8, 2), (8, 2), (8, 2), "wgmma", bwd_tile=16),
    ]
    return {c.name: c for c in cands}


# Large-window alternatives for sm_90 half precision that the table does not use yet. On an H200 the
# table's 64x32 tiles reached about a tenth of the tensor-core rate on HunyuanVideo's 18x24x24 window
# (benchmarks/results/h200/); these wider tiles (more work per wgmma and per loaded key tile, two
# warpgroups where M = 128) are what the next GPU session times: `scripts/triton_aot_check.py
# --candidates` compiles them (registers, spills, wgmma), `benchmarks/gpu_profile.py --candidates` times
# them (`plan.override_config` + `plan.override_launch`). A winner that stays spill-free and keeps the
# tile ratio under 1.5 replaces the table's entry.
CANDIDATES: Dict[str, LaunchConfig] = _candidates()


def arch_key(device: Optional[torch.device] = None) -> int:
    """``90`` on sm_90 and newer, else ``80`` (also without a GPU: the interpreter, ``tile_stats``)."""
    if device is None or getattr(device, "type", "cpu") != "cuda" or not torch.cuda.is_available():
        return 90
    return _arch_of(device.index if device.index is not None else torch.cuda.current_device())


_ARCH: Dict[int, int] = {}


def _arch_of(index: int) -> int:
    a = _ARCH.get(index)
    if a is None:
        major, _ = torch.cuda.get_device_capability(index)
        a = _ARCH[index] = 90 if major >= 9 else 80
    return a


def dtype_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def head_dim_block(head_dim: int) -> int:
    """``BLOCK_D``: the head dim rounded up to a power of two, at least 16."""
    return max(16, 1 << max(int(head_dim) - 1, 0).bit_length())


def window_class(spec: WindowSpec) -> str:
    """``"small"`` when a query sees at most :data:`SMALL_WINDOW_KEYS` keys, else ``"large"``
    (from the normalised kernel size and the global key grid; no tensor work)."""
    keys = 1
    for k, lk in zip(spec.kernel_size, spec.k_full):
        keys *= min(int(k), int(lk))
    return "small" if keys <= SMALL_WINDOW_KEYS else "large"


def lookup(arch: int, head_dim: int, dtype: torch.dtype, window: str) -> LaunchConfig:
    return TABLE[(90 if arch >= 90 else 80, head_dim_block(head_dim), dtype_key(dtype), window)]


def config_for(spec: WindowSpec, head_dim: int, dtype: torch.dtype, device=None) -> LaunchConfig:
    """The table entry of one call."""
    return lookup(arch_key(device), head_dim, dtype, window_class(spec))


def all_configs(arch: int, head_dim: int, dtype: torch.dtype) -> Dict[str, LaunchConfig]:
    """Every entry the table can return for ``(arch, head_dim, dtype)``, by window class."""
    return {w: lookup(arch, head_dim, dtype, w) for w in ("small", "large")}


def autotune_requested() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")
