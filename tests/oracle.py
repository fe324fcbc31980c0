"""A float64 dense-mask oracle written from docs/nearby_attention.md alone (small grids only).

Deliberately independent of ``nuwa_kernels.window``: it re-reads the contract with plain Python
loops, so a mistake in the package's window maths cannot hide in both places.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch


def oracle_axis_keys(
    i: int, lq: int, lk: int, k: Optional[int], causal: bool, border: str, stride: int = 1, dilation: int = 1
) -> list[int]:
    """Allowed key coordinates on one axis for query coordinate ``i`` (contract sections 3 and 3a)."""
    if dilation > 1:  # the query's own group, as an axis of its own
        assert lq == lk
        g = i % dilation
        lg = math.ceil((lq - g) / dilation)
        sub = oracle_axis_keys(i // dilation, lg, lg, k, causal, border, stride, 1)
        return [g + dilation * a for a in sub]
    if causal:
        leader = min((i // stride) * stride + stride - 1, lq - 1)
        start = 0 if k is None else max(math.floor(leader * lk / lq) - k + 1, 0)
        return list(range(start, math.floor(i * lk / lq) + 1))
    leader = min((i // stride) * stride + stride // 2, lq - 1)
    c = math.floor(leader * lk / lq)
    if k is None:
        return list(range(lk))
    left = k // 2
    right = k - 1 - left
    if border == "truncate":
        return [j for j in range(lk) if c - left <= j <= c + right]
    if k >= lk:
        return list(range(lk))
    start = min(max(c - left, 0), lk - k)
    return list(range(start, start + k))


def _triple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * 3


def oracle_mask(q_grid, kv_grid, kernel_size=3, causal=False, border="truncate", stride=1, dilation=1) -> torch.Tensor:
    """Dense ``(Nq, Nk)`` boolean mask of allowed pairs."""
    ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 3
    st, dl = _triple(stride), _triple(dilation)
    if isinstance(causal, bool):
        axes, raster = (False, False, False), causal
    else:
        axes, raster = tuple(causal), False
    T, H, W = q_grid
    Tk, Hk, Wk = kv_grid
    nq, nk = T * H * W, Tk * Hk * Wk
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for t in range(T):
        kt = oracle_axis_keys(t, T, Tk, ks[0], axes[0], border, st[0], dl[0])
        for h in range(H):
            kh = oracle_axis_keys(h, H, Hk, ks[1], axes[1], border, st[1], dl[1])
            for w in range(W):
                kw = oracle_axis_keys(w, W, Wk, ks[2], axes[2], border, st[2], dl[2])
                qi = (t * H + h) * W + w
                for a in kt:
                    for b in kh:
                        for c in kw:
                            ki = (a * Hk + b) * Wk + c
                            if raster and ki > qi:
                                continue
                            mask[qi, ki] = True
    return mask


def oracle_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size=3,
    causal=False,
    border: str = "truncate",
    scale: Optional[float] = None,
    stride=1,
    dilation=1,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` in float64 for grid-layout inputs ``(B, T, H, W, heads, D)``; additional keys
    ``(B, S, heads_kv, D)`` are appended as keys every query sees (section 5a)."""
    B, T, H, W, heads, D = query.shape
    _, Tk, Hk, Wk, heads_kv, _ = key.shape
    q = query.double().reshape(B, T * H * W, heads, D).transpose(1, 2)
    k = key.double().reshape(B, Tk * Hk * Wk, heads_kv, D).transpose(1, 2)
    v = value.double().reshape(B, Tk * Hk * Wk, heads_kv, value.shape[-1]).transpose(1, 2)
    group = heads // heads_kv
    mask = oracle_mask((T, H, W), (Tk, Hk, Wk), kernel_size, causal, border, stride, dilation).to(query.device)
    if additional_keys is not None:
        k = torch.cat([k, additional_keys.double().transpose(1, 2)], 2)
        v = torch.cat([v, additional_values.double().transpose(1, 2)], 2)
        extra = torch.ones(mask.shape[0], additional_keys.shape[1], dtype=torch.bool, device=mask.device)
        mask = torch.cat([mask, extra], 1)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    out = out.transpose(1, 2).reshape(B, T, H, W, heads, value.shape[-1])
    lse = lse.transpose(1, 2).reshape(B, T, H, W, heads)
    return out, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64; NaN anywhere gives ``inf``."""
    x = x.double()
    ref = ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


# Contract section 8 bounds, by input dtype.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def random_grid_inputs(
    B: int,
    q_grid: Sequence[int],
    kv_grid: Sequence[int],
    heads: int,
    heads_kv: int,
    D: int,
    dtype=torch.float64,
    device="cpu",
    requires_grad: bool = False,
    generator: Optional[torch.Generator] = None,
):
    """Fresh random ``(q, k, v)`` in grid layout."""
    mk = lambda *s: torch.randn(*s, dtype=torch.float32, device="cpu", generator=generator).to(  # noqa: E731
        device=device, dtype=dtype
    ).requires_grad_(requires_grad)
    q = mk(B, *q_grid, heads, D)
    k = mk(B, *kv_grid, heads_kv, D)
    v = mk(B, *kv_grid, heads_kv, D)
    return q, k, v
