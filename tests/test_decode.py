"""nuwa_kernels.decode.nearby_attention_decode: decode rows equal rows of the full-grid attention."""

from __future__ import annotations

import pytest
import torch

from nuwa_kernels import nearby_attention
from nuwa_kernels import nearby_attention_decode

from oracle import oracle_attention, random_grid_inputs, rel_err


pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    # id, q_grid, kv_grid, heads, heads_kv, kernel_size, causal, border
    ("raster-causal-k3", (3, 4, 5), (3, 4, 5), 2, 2, 3, True, "truncate"),
    ("raster-causal-k4-shift-gqa", (3, 5, 4), (3, 5, 4), 4, 2, 4, True, "shift"),
    ("raster-causal-k2-image", (1, 6, 7), (1, 6, 7), 2, 1, (1, 3, 2), True, "truncate"),
    ("raster-causal-full", (2, 3, 3), (2, 3, 3), 2, 2, None, True, "truncate"),
    ("axial-t", (4, 3, 3), (4, 3, 3), 2, 2, (None, 1, 1), True, "truncate"),
    ("noncausal-shift", (3, 4, 4), (3, 4, 4), 3, 1, (3, 2, 3), False, "shift"),
    ("per-axis-causal", (4, 3, 5), (4, 3, 5), 2, 2, (2, 3, 3), (True, False, False), "truncate"),
    ("cross-video-to-video", (4, 6, 6), (2, 3, 3), 2, 2, 3, False, "truncate"),
    ("cross-text", (3, 4, 4), (7, 1, 1), 2, 1, (None, 1, 1), False, "truncate"),
    ("cross-image-shift", (2, 5, 5), (1, 3, 4), 2, 2, (1, 3, 3), False, "shift"),
]


@pytest.mark.parametrize("q_grid,kv_grid,heads,heads_kv,ks,causal,border", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode_rows_equal_full_attention(q_grid, kv_grid, heads, heads_kv, ks, causal, border):
    B, D = 2, 8
    q, k, v = random_grid_inputs(B, q_grid, kv_grid, heads, heads_kv, D, dtype=torch.float64)
    full = nearby_attention(q, k, v, kernel_size=ks, causal=causal, border=border)
    ref, ref_lse = oracle_attention(q, k, v, kernel_size=ks, causal=causal, border=border)
    assert rel_err(full, ref) < 1e-12  # the API itself agrees with the oracle here

    n_q = q_grid[0] * q_grid[1] * q_grid[2]
    # every position, one at a time (as in generation), then all at once, then per-batch positions
    q_flat = q.reshape(B, n_q, heads, D)
    for p in range(n_q):
        out = nearby_attention_decode(q_flat[:, p : p + 1], k, v, p, q_grid, ks, causal, border)
        assert out.shape == (B, 1, heads, D)
        assert rel_err(out[:, 0], ref.reshape(B, n_q, heads, D)[:, p]) < 1e-12, p
    out, lse = nearby_attention_decode(
        q_flat, k, v, torch.arange(n_q), q_grid, ks, causal, border, return_lse=True
    )
    assert rel_err(out, ref.reshape(B, n_q, heads, D)) < 1e-12
    assert rel_err(lse, ref_lse.reshape(B, n_q, heads)) < 1e-12
    perm = torch.stack([torch.randperm(n_q) for _ in range(B)])  # (B, n): each batch its own order
    q_perm = torch.stack([q_flat[b, perm[b]] for b in range(B)])
    out = nearby_attention_decode(q_perm, k, v, perm, q_grid, ks, causal, border)
    want = torch.stack([ref.reshape(B, n_q, heads, D)[b, perm[b]] for b in range(B)])
    assert rel_err(out, want) < 1e-12


def test_decode_float32_strided_cache_and_scale():
    q_grid = (3, 4, 4)
    q, k, v = random_grid_inputs(1, q_grid, q_grid, 4, 2, 16, dtype=torch.float32)
    # a cache that is a permuted view of a (B, heads, N, D) buffer, as some caches are stored
    k_view = k.reshape(1, 48, 2, 16).transpose(1, 2).contiguous().transpose(1, 2).reshape(1, 3, 4, 4, 2, 16)
    k_strided = k.permute(0, 4, 1, 2, 3, 5).contiguous().permute(0, 2, 3, 4, 1, 5)
    assert not k_strided.is_contiguous()
    ref, _ = oracle_attention(q, k, v, kernel_size=3, causal=True, scale=0.3)
    for kk in (k_view, k_strided):
        out = nearby_attention_decode(q.reshape(1, 48, 4, 16), kk, v, torch.arange(48), kernel_size=3, causal=True, scale=0.3)
        assert out.dtype == torch.float32
        assert rel_err(out, ref.reshape(1, 48, 4, 16)) < 1e-5


def test_decode_ignores_cache_outside_window():
    """Raster causality: entries after the query (not generated yet) may be garbage, even NaN."""
    grid = (2, 4, 4)
    q, k, v = random_grid_inputs(2, grid, grid, 2, 2, 8, dtype=torch.float64)
    ref, _ = oracle_attention(q, k, v, kernel_size=3, causal=True)
    p = 13
    k_bad, v_bad = k.clone().reshape(2, 32, 2, 8), v.clone().reshape(2, 32, 2, 8)
    k_bad[:, p + 1 :] = float("nan")
    v_bad[:, p + 1 :] = float("nan")
    out = nearby_attention_decode(
        q.reshape(2, 32, 2, 8)[:, p : p + 1], k_bad.reshape(k.shape), v_bad.reshape(v.shape), p,
        kernel_size=3, causal=True,
    )
    assert torch.isfinite(out).all()
    assert rel_err(out[:, 0], ref.reshape(2, 32, 2, 8)[:, p]) < 1e-12


def test_decode_gathers_only_the_window():
    """The work of a step is O(window): the same call on a 100x larger grid reads as many keys."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(grid):
        q, k, v = random_grid_inputs(1, grid, grid, 2, 2, 8, dtype=torch.float32)
        n = grid[0] * grid[1] * grid[2]
        with FlopCounterMode(display=False) as fc:
            nearby_attention_decode(q.reshape(1, n, 2, 8)[:, -1:], k, v, n - 1, kernel_size=3, causal=True)
        return fc.get_total_flops()

    small, large = flops((3, 4, 4)), flops((30, 40, 4))
    assert small > 0 and small == large


def test_decode_backward_matches_full():
    grid = (2, 3, 4)
    q, k, v = random_grid_inputs(1, grid, grid, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    ref, _ = oracle_attention(q, k, v, kernel_size=(2, 3, 3), causal=True)
    g = torch.randn_like(ref)
    gq_ref, gk_ref, gv_ref = torch.autograd.grad(ref, (q, k, v), g)
    out = nearby_attention_decode(q.reshape(1, 24, 2, 8), k, v, torch.arange(24), kernel_size=(2, 3, 3), causal=True)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), g.reshape(1, 24, 2, 8))
    assert rel_err(gq, gq_ref) < 1e-12 and rel_err(gk, gk_ref) < 1e-12 and rel_err(gv, gv_ref) < 1e-12


def test_decode_empty():
    k = torch.randn(0, 2, 2, 2, 1, 4)
    out = nearby_attention_decode(torch.randn(0, 1, 2, 4), k, k, 0)
    assert out.shape == (0, 1, 2, 4)
    k = torch.randn(1, 2, 2, 2, 1, 4)
    out = nearby_attention_decode(torch.randn(1, 0, 2, 4), k, k, torch.zeros(0, dtype=torch.long))
    assert out.shape == (1, 0, 2, 4)


def _inputs():
    return torch.randn(1, 1, 4, 8), torch.randn(1, 2, 3, 3, 2, 8), torch.randn(1, 2, 3, 3, 2, 8)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(query=torch.randn(1, 4, 8)), ValueError, "query"),
        (dict(query=torch.randn(1, 1, 4, 8).long()), TypeError, "query"),
        (dict(key_cache=torch.randn(1, 2, 3, 3, 8)), ValueError, "key_cache"),
        (dict(key_cache=torch.randn(1, 2, 3, 3, 2, 8).double()), TypeError, "dtype"),
        (dict(key_cache=torch.randn(2, 2, 3, 3, 2, 8)), ValueError, "batch"),
        (dict(key_cache=torch.randn(1, 2, 3, 3, 2, 4)), ValueError, "head_dim"),
        (dict(key_cache=torch.randn(1, 2, 3, 3, 3, 8), value_cache=torch.randn(1, 2, 3, 3, 3, 8)), ValueError, "heads"),
        (dict(value_cache=torch.randn(1, 2, 3, 4, 2, 8)), ValueError, "value_cache"),
        (dict(positions=18), ValueError, "positions"),
        (dict(positions=-1), ValueError, "positions"),
        (dict(positions=1.5), TypeError, "positions"),
        (dict(positions=torch.tensor([0.0])), TypeError, "positions"),
        (dict(positions=torch.tensor([0, 1])), ValueError, "positions"),
        (dict(grid=(2, 3)), ValueError, "grid"),
        (dict(grid=(2, 0, 3)), ValueError, "grid"),
        (dict(grid=(4, 3, 3), causal=True), ValueError, "causal"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(kernel_size=(3, 3)), ValueError, "kernel_size"),
        (dict(kernel_size=2.0), TypeError, "kernel_size"),
        (dict(border="wrap"), ValueError, "border"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(scale="big"), TypeError, "scale"),
    ],
)
def test_decode_bad_input(change, exc, match):
    q, k, v = _inputs()
    args = dict(query=q, key_cache=k, value_cache=v, positions=3, grid=None, kernel_size=3, causal=False)
    args.update(change)
    with pytest.raises(exc, match=match):
        nearby_attention_decode(**args)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 4, 3), causal=True, stride=(1, 2, 3)),
    dict(kernel_size=(2, 3, 3), causal=(True, False, False), border="shift", stride=(2, 1, 1), dilation=(1, 2, 2)),
    dict(kernel_size=(None, 3, 2), causal=True, dilation=(2, 1, 3)),
], ids=["stride-raster", "stride-dilation-frame-causal", "dilation-raster-none"])
def test_decode_stride_dilation_additional_keys(kw):
    from oracle import oracle_attention

    grid = (3, 5, 6)
    q, k, v = (torch.randn(2, *grid, 4, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[..., :2, :], v[..., :2, :]
    ak, av = torch.randn(2, 3, 2, 8, dtype=torch.float64), torch.randn(2, 3, 2, 8, dtype=torch.float64)
    ref_out, ref_lse = oracle_attention(q, k, v, additional_keys=ak, additional_values=av, **kw)
    pos = torch.tensor([[0, 17, 44, 89], [3, 30, 59, 61]])
    qn = q.flatten(1, 3)[torch.arange(2)[:, None], pos]
    out, lse = nearby_attention_decode(qn, k, v, pos, return_lse=True, additional_keys=ak, additional_values=av,
                                          **kw)
    ref_rows = ref_out.flatten(1, 3)[torch.arange(2)[:, None], pos]
    assert torch.allclose(out, ref_rows, atol=1e-12)
    assert torch.allclose(lse, ref_lse.flatten(1, 3)[torch.arange(2)[:, None], pos], atol=1e-12)
