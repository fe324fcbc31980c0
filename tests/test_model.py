"""nuwa.modules and nuwa.model: attention modules against dense references, the encoder-decoder, training."""

from __future__ import annotations

import math

import pytest
import torch

from nuwa import (
    AxialAttention,
    FullAttention,
    NearbyAttention,
    NearbyCrossAttention,
    Nuwa,
    NuwaConfig,
    PositionalEmbedding3d,
    make_attention,
)
from nuwa.data import ColourTokenizer, MovingShapes, PALETTE
from nuwa.train import train

from oracle import oracle_mask, rel_err


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_attention(module, x, context=None, mask=None):
    """The module's attention written out densely in float64: projections, GQA, masked softmax, output."""
    B = x.shape[0]
    src = x if context is None else context
    q = module.to_q(x).flatten(1, 3).unflatten(-1, (module.heads, module.head_dim)).transpose(1, 2)
    k = module.to_k(src).flatten(1, 3).unflatten(-1, (module.num_kv_heads, module.head_dim)).transpose(1, 2)
    v = module.to_v(src).flatten(1, 3).unflatten(-1, (module.num_kv_heads, module.head_dim)).transpose(1, 2)
    group = module.heads // module.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * module.head_dim ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    out = torch.softmax(s, -1) @ v  # (B, heads, N, D)
    out = out.transpose(1, 2).reshape(B, *x.shape[1:4], -1)
    return module.to_out(out)


def rand_grid(B, grid, dim):
    return torch.randn(B, *grid, dim, dtype=torch.float64)


SELF_CASES = [
    ("video-k3-raster", (3, 4, 5), 3, True, "truncate", 4, 2),
    ("video-k322-shift", (3, 4, 4), (3, 2, 2), False, "shift", 4, 4),
    ("image-k13-raster-mqa", (1, 5, 6), (1, 3, 3), True, "truncate", 4, 1),
    ("frame-causal", (4, 3, 3), (2, 3, 3), (True, False, False), "truncate", 2, 2),
]


@pytest.mark.parametrize("grid,ks,causal,border,heads,kv_heads", [c[1:] for c in SELF_CASES], ids=[c[0] for c in SELF_CASES])
def test_nearby_attention_matches_dense(grid, ks, causal, border, heads, kv_heads):
    torch.manual_seed(0)
    attn = NearbyAttention(24, heads=heads, num_kv_heads=kv_heads, kernel_size=ks, causal=causal, border=border).double()
    x = rand_grid(2, grid, 24)
    want = dense_attention(attn, x, mask=oracle_mask(grid, grid, ks, causal, border))
    got = attn(x)
    assert got.shape == x.shape
    assert rel_err(got, want) < 1e-10
    g = torch.randn_like(want)
    params = [x.requires_grad_()] + list(attn.parameters())
    want = dense_attention(attn, x, mask=oracle_mask(grid, grid, ks, causal, border))
    for a, b in zip(torch.autograd.grad(attn(x), params, g), torch.autograd.grad(want, params, g)):
        assert rel_err(a, b) < 1e-10


def test_nearby_cross_attention_text_and_video_conditions():
    torch.manual_seed(0)
    x = rand_grid(2, (4, 6, 6), 16)
    # text-like condition on an (L, 1, 1) grid: kernel None on t sees the whole text
    text = rand_grid(2, (7, 1, 1), 12)
    attn = NearbyCrossAttention(16, context_dim=12, heads=2, kernel_size=(None, 1, 1)).double()
    got = attn(x, text)
    assert rel_err(got, dense_attention(attn, x, text)) < 1e-10  # == full attention to the text
    # video condition on a smaller grid: NÜWA centre mapping floor(i * Lk / Lq)
    video = rand_grid(2, (2, 3, 3), 12)
    attn = NearbyCrossAttention(16, context_dim=12, heads=4, num_kv_heads=2, kernel_size=(1, 3, 3)).double()
    mask = oracle_mask((4, 6, 6), (2, 3, 3), (1, 3, 3), False, "truncate")
    assert rel_err(attn(x, video), dense_attention(attn, x, video, mask)) < 1e-10
    with pytest.raises(ValueError, match="context"):
        attn(x)


def test_axial_and_full_attention_match_dense():
    torch.manual_seed(0)
    grid = (3, 4, 5)
    x = rand_grid(2, grid, 16)
    axial = AxialAttention(16, heads=4, num_kv_heads=2, causal=True).double()
    masks = [oracle_mask(grid, grid, ks, True, "truncate") for ks in ((None, 1, 1), (1, None, 1), (1, 1, None))]
    want = sum(dense_attention(axial, x, mask=m) for m in masks) / 3  # to_out is linear (no bias)
    assert rel_err(axial(x), want) < 1e-10
    full = FullAttention(16, heads=4, num_kv_heads=2, causal=True).double()
    n = math.prod(grid)
    assert rel_err(full(x), dense_attention(full, x, mask=torch.ones(n, n, dtype=torch.bool).tril())) < 1e-10
    # nearby attention with a whole-grid window is full attention (same weights)
    nearby = NearbyAttention(16, heads=4, num_kv_heads=2, kernel_size=None, causal=True).double()
    nearby.load_state_dict(full.state_dict())
    assert rel_err(nearby(x), full(x)) < 1e-10
    cond = rand_grid(2, (5, 1, 1), 8)
    full_x = FullAttention(16, heads=2, context_dim=8).double()
    assert rel_err(full_x(x, cond), dense_attention(full_x, x, cond)) < 1e-10


@pytest.mark.parametrize("kind", ["nearby", "axial", "full"])
def test_step_with_cache_equals_forward(kind):
    """Decoding position by position through a KV cache reproduces the full-grid forward."""
    torch.manual_seed(0)
    grid = (2, 3, 4)
    n = math.prod(grid)
    attn = make_attention(kind, 16, heads=4, num_kv_heads=2, kernel_size=(2, 3, 3), causal=True).double()
    x = rand_grid(2, grid, 16)
    want = attn(x).flatten(1, 3)
    cache = attn.make_cache(2, grid)
    rows = [attn.step(x.flatten(1, 3)[:, p : p + 1], torch.tensor([p]), grid, cache) for p in range(n)]
    assert rel_err(torch.cat(rows, 1), want) < 1e-10
    cross = make_attention(kind, 16, heads=2, context_dim=8, kernel_size=(None, 1, 1)).double()
    ctx = rand_grid(2, (5, 1, 1), 8)
    ccache = cross.context_cache(ctx)
    got = cross.step(x.flatten(1, 3)[:, 7:9], torch.tensor([7, 8]), grid, ccache)
    assert rel_err(got, cross(x, ctx).flatten(1, 3)[:, 7:9]) < 1e-10


def dense_with_globals(module, x, tokens, mask):
    """Dense float64 attention of ``module`` where every query also sees the global ``tokens`` `(B, S, dim)`."""
    B, S = x.shape[0], tokens.shape[1]
    q = module.to_q(x).flatten(1, 3).unflatten(-1, (module.heads, module.head_dim)).transpose(1, 2)
    src = torch.cat([tokens, x.flatten(1, 3)], dim=1)
    k = module.to_k(src).unflatten(-1, (module.num_kv_heads, module.head_dim)).transpose(1, 2)
    v = module.to_v(src).unflatten(-1, (module.num_kv_heads, module.head_dim)).transpose(1, 2)
    group = module.heads // module.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    full = torch.cat([torch.ones(mask.shape[0], S, dtype=torch.bool), mask], dim=1)
    s = ((q @ k.transpose(-1, -2)) * module.head_dim ** -0.5).masked_fill(~full, float("-inf"))
    out = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, *x.shape[1:4], -1)
    return module.to_out(out)


@pytest.mark.parametrize(
    "grid,ks,causal,border,stride,dilation",
    [
        ((4, 5, 6), (3, 3, 4), False, "shift", (2, 1, 2), 1),
        ((5, 4, 4), 3, True, "truncate", 1, (2, 1, 2)),
        ((4, 6, 4), (2, 3, 3), (True, False, False), "truncate", (1, 3, 1), (1, 2, 1)),
    ],
)
def test_nearby_attention_stride_dilation_global_tokens(grid, ks, causal, border, stride, dilation):
    """Stride, dilation and global tokens (learned and given) against dense attention with the oracle mask."""
    torch.manual_seed(0)
    attn = NearbyAttention(
        16, heads=4, num_kv_heads=2, kernel_size=ks, causal=causal, border=border, stride=stride, dilation=dilation,
        num_global_tokens=2,
    ).double()
    x = rand_grid(2, grid, 16)
    given = torch.randn(2, 3, 16, dtype=torch.float64)
    mask = oracle_mask(grid, grid, ks, causal, border, stride, dilation)
    learned = attn.global_tokens.expand(2, -1, -1)
    want = dense_with_globals(attn, x, torch.cat([learned, given], 1), mask)
    got = attn(x, global_tokens=given)
    assert rel_err(got, want) < 1e-10
    params = [x.requires_grad_(), given.requires_grad_()] + list(attn.parameters())
    g = torch.randn_like(got)
    want = dense_with_globals(attn, x, torch.cat([attn.global_tokens.expand(2, -1, -1), given], 1), mask)
    for a, b in zip(torch.autograd.grad(attn(x, global_tokens=given), params, g), torch.autograd.grad(want, params, g)):
        assert rel_err(a, b) < 1e-10
    # without the given tokens: the learned ones only
    assert rel_err(attn(x), dense_with_globals(attn, x, learned, mask)) < 1e-10


def test_global_tokens_in_cached_decoding():
    torch.manual_seed(0)
    grid = (2, 3, 3)
    attn = NearbyAttention(16, heads=4, num_kv_heads=2, kernel_size=(2, 3, 3), causal=True, num_global_tokens=1).double()
    x = rand_grid(2, grid, 16)
    given = torch.randn(2, 2, 16, dtype=torch.float64)
    want = attn(x, global_tokens=given).flatten(1, 3)
    cache = attn.make_cache(2, grid)
    rows = [attn.step(x.flatten(1, 3)[:, p : p + 1], torch.tensor([p]), grid, cache, global_tokens=given) for p in range(18)]
    assert rel_err(torch.cat(rows, 1), want) < 1e-10
    with pytest.raises(ValueError, match="global tokens"):
        AxialAttention(16, heads=2)(x.float(), global_tokens=given.float())


def _sparse3dna():
    """``nuwa_pytorch.nuwa_pytorch.Sparse3DNA`` without the package ``__init__`` (it imports torchvision),
    as ``benchmarks/providers.py`` loads it."""
    import importlib
    import importlib.util
    import sys
    import types

    try:
        if "nuwa_pytorch.nuwa_pytorch" not in sys.modules:
            spec = importlib.util.find_spec("nuwa_pytorch")
            if spec is None or not spec.submodule_search_locations:
                pytest.skip("nuwa-pytorch is not installed")
            if "nuwa_pytorch" not in sys.modules:
                pkg = types.ModuleType("nuwa_pytorch")
                pkg.__path__ = list(spec.submodule_search_locations)
                sys.modules["nuwa_pytorch"] = pkg
        return importlib.import_module("nuwa_pytorch.nuwa_pytorch").Sparse3DNA
    except ImportError as e:
        pytest.skip(f"nuwa-pytorch not importable: {type(e).__name__}: {e}")


@pytest.mark.parametrize("causal,dilation", [(False, 1), (True, 1), (False, 2), (True, (1, 2, 1))])
def test_reproduces_nuwa_pytorch_sparse3dna_with_its_bos_token(causal, dilation):
    """nuwa-pytorch 0.7.8's ``Sparse3DNA`` (talking heads set to the identity) on ``[<bos>; video]`` equals
    NearbyAttention with the ``<bos>`` activation as a global token; its ``causal`` is per-axis causal on
    all three axes."""
    Sparse3DNA = _sparse3dna()
    torch.manual_seed(0)
    dim, heads, dh, grid, ks = 16, 2, 8, (3, 4, 4), (3, 3, 3)
    ref = Sparse3DNA(dim=dim, video_shape=grid, kernel_size=ks, dilation=dilation, heads=heads, dim_head=dh, causal=causal)
    ours = NearbyAttention(
        dim, heads=heads, head_dim=dh, kernel_size=ks, dilation=dilation, bias=True,
        causal=(True, True, True) if causal else False,
    )
    inner = heads * dh
    with torch.no_grad():
        ref.talking_heads.weight.copy_(torch.eye(heads)[:, :, None, None])
        ours.to_q.weight.copy_(ref.to_q.weight)
        ours.to_k.weight.copy_(ref.to_kv.weight[:inner])
        ours.to_v.weight.copy_(ref.to_kv.weight[inner:])
        ours.to_out.weight.copy_(ref.to_out.weight)
        ours.to_out.bias.copy_(ref.to_out.bias)
        for lin in (ours.to_q, ours.to_k, ours.to_v):
            lin.bias.zero_()
    x = torch.randn(2, 1 + math.prod(grid), dim)
    want = ref(x)[:, 1:]
    got = ours(x[:, 1:].unflatten(1, grid), global_tokens=x[:, :1]).flatten(1, 3)
    assert rel_err(got, want) < 1e-5


def test_global_tokens_and_context_parallel_arguments():
    with pytest.raises(ValueError, match="num_global_tokens"):
        NearbyAttention(16, heads=2, num_global_tokens=-1)
    attn = NearbyAttention(16, heads=2, num_global_tokens=1)
    with pytest.raises(ValueError, match="global_tokens"):
        attn(torch.randn(1, 2, 2, 2, 16), global_tokens=torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="shard_axis"):
        NearbyAttention(16, heads=2, process_group=object(), shard_axis=2)
    from nuwa.modules import set_context_parallel

    group = object()  # any handle: nothing communicates until a forward
    model = torch.nn.Sequential(NearbyAttention(16, heads=2), NearbyCrossAttention(16, context_dim=8, heads=2))
    assert set_context_parallel(model, group, 1) == 2
    assert model[0].process_group is group and model[1].shard_axis == 1
    import copy

    assert copy.deepcopy(model)[0].process_group is group  # groups are shared, not copied
    assert set_context_parallel(model, None) == 2 and model[0].process_group is None
    with pytest.raises(ValueError, match="AxialAttention"):
        set_context_parallel(torch.nn.Sequential(AxialAttention(16, heads=2)), group)
    with pytest.raises(ValueError, match="nearby"):
        Nuwa(NuwaConfig.tiny(attention="full", encoder_layers=1, decoder_layers=1)).set_context_parallel(group)


def test_attention_rejects_bad_config():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NearbyAttention(16, heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention"):
        make_attention("sparse", 16)
    with pytest.raises(ValueError, match="causal"):
        NearbyAttention(16, heads=2, context_dim=8, causal=True)


def test_positional_embedding_3d():
    pe = PositionalEmbedding3d((4, 5, 6), 8)
    table = pe((3, 4, 5))
    assert table.shape == (3, 4, 5, 8)
    t, h, w = 2, 1, 3
    assert torch.equal(table[t, h, w], pe.t.weight[t] + pe.h.weight[h] + pe.w.weight[w])
    pos = torch.tensor([0, 17, 59])
    assert torch.allclose(pe.at(pos, (3, 4, 5)), table.reshape(60, 8)[pos])
    with pytest.raises(ValueError, match="max_grid"):
        pe((5, 1, 1))


def test_presets():
    paper = NuwaConfig.paper()
    assert (paper.dim, paper.heads, paper.decoder_layers, paper.target_grid) == (1280, 20, 24, (10, 21, 21))
    with torch.device("meta"):  # one layer each (building 24 + 24 takes long on a busy CPU)
        model = Nuwa(NuwaConfig.paper(encoder_layers=1, decoder_layers=1))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = 1280
    assert count(model.encoder[0]) == 12 * d * d + 9 * d  # attention 4 d^2, MLP 8 d^2 (+ biases, norms)
    assert count(model.decoder[0]) == 16 * d * d + 11 * d  # + cross-attention 4 d^2
    tiny = NuwaConfig.tiny()
    assert tiny.dim == 32 and tiny.decoder_layers == 2


@pytest.mark.parametrize("kind", ["nearby", "axial", "full"])
def test_decoder_is_raster_causal_and_uses_the_condition(kind):
    torch.manual_seed(0)
    model = Nuwa(NuwaConfig.tiny(attention=kind)).double().eval()
    cond = torch.randint(0, 32, (1, 2, 3, 3))  # a small video condition
    target = torch.randint(0, 16, (1, 2, 3, 4))
    logits = model(cond, target).flatten(1, 3)
    assert logits.shape == (1, 24, 16)
    p = 9
    changed = target.clone().flatten()
    changed[p] = (changed[p] + 1) % 16
    logits2 = model(cond, changed.view_as(target)).flatten(1, 3)
    diff = (logits2 - logits).abs().amax(-1)[0]
    # position q predicts target q from targets < q: token p changes only the logits after p
    assert diff[: p + 1].max() == 0
    assert diff[p + 1 :].max() > 1e-6
    cond2 = (cond + 1) % 32
    assert (model(cond2, target) - model(cond, target)).abs().max() > 1e-6


def test_loss_and_gradients_text_image_video_conditions():
    torch.manual_seed(0)
    model = Nuwa(NuwaConfig.tiny())
    target = torch.randint(0, 16, (2, 2, 4, 4))
    for cond in (torch.randint(0, 32, (2, 5, 1, 1)), torch.randint(0, 32, (2, 1, 4, 4)), torch.randint(0, 32, (2, 3, 4, 4))):
        loss = model.loss(cond, target)
        assert abs(loss.item() - math.log(16)) < 0.5  # near uniform at initialisation
        model.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert model.encoder[0].attn.to_q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target"):
        model(torch.randint(0, 32, (2, 5, 1, 1)), torch.randn(2, 2, 4, 4))


def test_colour_tokenizer_and_data():
    tok = ColourTokenizer()
    noisy = PALETTE + 0.2 * torch.rand(PALETTE.shape) - 0.1
    assert torch.equal(tok.encode(noisy), torch.arange(8))
    data = MovingShapes(frames=3, size=6)
    caps, video = data.sample(5, torch.Generator().manual_seed(0))
    assert caps.shape == (5, 6, 1, 1) and video.shape == (5, 3, 6, 6)
    assert caps.max() < data.condition_vocab_size and video.max() < 8
    assert ((video > 0).flatten(1).sum(1) >= 3 * 3).all()  # a shape of >= 3 pixels in each frame
    caps2, video2 = data.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(caps, caps2) and torch.equal(video, video2)


def test_training_loss_falls():
    data = MovingShapes(frames=2, size=6)
    result = train("nearby", steps=25, batch_size=8, lr=3e-3, data=data, seed=0, progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert result.losses[0] > 1.8  # ~log(8) at initialisation
    assert last < 0.75 * first, (first, last)
    assert result.eval_loss < 0.8 * first
