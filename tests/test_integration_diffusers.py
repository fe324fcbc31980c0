"""nuwa.integrations.diffusers: nearby attention inside real diffusers video transformers (tiny, random)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (pip install --no-build-isolation diffusers==0.42.1)"
)
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402

from nuwa.integrations.diffusers import apply_nearby_attention  # noqa: E402

from oracle import oracle_mask, rel_err  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()


def tiny_cogvideox(seed=0):
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True,
    ).eval()


def wan_inputs(B=2, frames=3, size=8):
    return dict(
        hidden_states=torch.randn(B, 4, frames, size, size),  # latent grid (3, 4, 4) after 1x2x2 patches
        timestep=torch.tensor([10, 500][:B]),
        encoder_hidden_states=torch.randn(B, 5, 16),
        return_dict=False,
    )


def cog_inputs(model, B=2, frames=3, size=8):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = (frames, size // 2, size // 2)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (grid[1], grid[2])), (grid[1], grid[2]), grid[0])
    return dict(
        hidden_states=torch.randn(B, frames, 4, size, size),
        encoder_hidden_states=torch.randn(B, 6, 16),
        timestep=torch.tensor([10, 500][:B]),
        image_rotary_emb=rope,
        return_dict=False,
    )


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_whole_axis_window_reproduces_the_model(family):
    model = tiny_wan() if family == "wan" else tiny_cogvideox()
    inputs = wan_inputs() if family == "wan" else cog_inputs(model)
    with torch.no_grad():
        want = model(**inputs)[0]
        handle = apply_nearby_attention(model, kernel_size=None)
        got = model(**inputs)[0]
        assert handle.state.grid == (3, 4, 4)
        handle.remove()
        again = model(**inputs)[0]
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    assert torch.equal(again, want)  # remove() restores the original processors


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_small_window_forward_backward(family):
    model = tiny_wan() if family == "wan" else tiny_cogvideox()
    inputs = wan_inputs() if family == "wan" else cog_inputs(model)
    with torch.no_grad():
        full = model(**inputs)[0]
    apply_nearby_attention(model, kernel_size=(1, 3, 3))
    out = model(**inputs)[0]
    assert out.shape == full.shape and torch.isfinite(out).all()
    assert (out - full).abs().max() > 1e-4  # the window changes the result
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "attn1" in n and p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "to_q.weight" in n or "to_k.weight" in n)


@pytest.mark.parametrize("ks", [(1, 3, 3), (2, 1, None), 3])
def test_wan_layer_matches_masked_dense_attention(ks):
    """One attn1 layer: nearby processor == the original processor given the oracle's dense mask."""
    model = tiny_wan()
    x5 = torch.randn(2, 4, 3, 8, 8)
    grid = (3, 4, 4)
    rope = model.rope(x5)
    hidden = torch.randn(2, 48, 16)
    attn = model.blocks[0].attn1
    mask = oracle_mask(grid, grid, ks, False, "truncate")
    with torch.no_grad():
        want = attn(hidden, None, mask, rope)
        handle = apply_nearby_attention(model, kernel_size=ks)
        handle.state.grid = grid
        got = attn(hidden, None, None, rope)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("ks,stride,dilation", [((3, 4, 4), (1, 2, 2), 1), ((2, 3, 3), 1, (1, 2, 2))])
def test_wan_layer_stride_dilation(ks, stride, dilation):
    """stride / dilation reach the kernels: one attn1 layer against the oracle's dense mask."""
    model = tiny_wan()
    grid = (3, 4, 4)
    rope = model.rope(torch.randn(2, 4, 3, 8, 8))
    hidden = torch.randn(2, 48, 16)
    attn = model.blocks[0].attn1
    mask = oracle_mask(grid, grid, ks, False, "shift", stride, dilation)
    with torch.no_grad():
        want = attn(hidden, None, mask, rope)
        handle = apply_nearby_attention(model, kernel_size=ks, border="shift", stride=stride, dilation=dilation)
        handle.state.grid = grid
        got = attn(hidden, None, None, rope)
    assert rel_err(got, want) < 1e-5


def test_context_parallel_needs_wan():
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        apply_nearby_attention(tiny_cogvideox(), process_group=object())


def test_cogvideox_layer_matches_masked_dense_attention():
    """Joint attention: text rows full, video rows = all text + the video window (one softmax; the text
    tokens enter nearby attention as additional keys)."""
    model = tiny_cogvideox()
    grid, L, ks = (3, 4, 4), 6, (1, 3, 3)
    inputs = cog_inputs(model)
    video, text = torch.randn(2, 48, 32), torch.randn(2, L, 32)
    n = L + 48
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[L:, L:] = oracle_mask(grid, grid, ks, False, "truncate")
    attn = model.transformer_blocks[0].attn1
    with torch.no_grad():
        dense = mask.expand(2, n, n)  # (B, N, N): the original processor repeats it per head
        want_v, want_t = attn(video, text, attention_mask=dense, image_rotary_emb=inputs["image_rotary_emb"])
        handle = apply_nearby_attention(model, kernel_size=ks)
        handle.state.grid = grid
        got_v, got_t = attn(video, text, image_rotary_emb=inputs["image_rotary_emb"])
    assert rel_err(got_t, want_t) < 1e-5 and rel_err(got_v, want_v) < 1e-5


def test_rejects_unknown_models():
    with pytest.raises(TypeError, match="supports"):
        apply_nearby_attention(torch.nn.Linear(2, 2))


def test_wan_fused_projections():
    model = tiny_wan()
    inputs = wan_inputs()
    with torch.no_grad():
        want = model(**inputs)[0]
        for block in model.blocks:
            block.attn1.fuse_projections()
        assert model.blocks[0].attn1.fused_projections
        apply_nearby_attention(model, kernel_size=None)
        got = model(**inputs)[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(kernel_size=(0, 3, 3)), ValueError),
        (dict(kernel_size=(3, 3)), ValueError),
        (dict(kernel_size=-1), ValueError),
        (dict(kernel_size=2.5), TypeError),
        (dict(kernel_size=3, border="wrap"), ValueError),
        (dict(kernel_size=3, backend="gpu"), ValueError),
    ],
    ids=["zero-axis", "two-axes", "negative", "float", "border", "backend"],
)
def test_apply_validates_at_apply_time(kwargs, error):
    """Bad options raise when the processors are installed (not at the first forward), and nothing
    is changed on the model."""
    model = tiny_wan()
    before = [b.attn1.processor for b in model.blocks]
    with pytest.raises(error):
        apply_nearby_attention(model, **kwargs)
    assert [b.attn1.processor for b in model.blocks] == before
    assert not model._forward_pre_hooks
