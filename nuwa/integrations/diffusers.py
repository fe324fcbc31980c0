"""Drop-in 3D nearby attention for diffusers video transformers (attention processors).

:func:`apply_nearby_attention` swaps the self-attention processors of a diffusers 3D video transformer
for processors that call :func:`nuwa_kernels.nearby_sdpa` on the model's latent token grid; the rest of
the model (projections, QK norms, rotary embeddings, cross-attention, MLPs) runs unchanged.

Supported models:

* ``WanTransformer3DModel`` (Wan 2.1/2.2): its self-attention (``attn1``) is over the video tokens
  alone, in raster order ``(frame, row, column)``; text enters through a separate cross-attention
  (``attn2``), which is left as it is. The natural fit for 3DNA.
* ``CogVideoXTransformer3DModel``: *joint* attention over ``[text tokens, video tokens]``. Text queries
  keep full attention to every token; video queries attend to **all text tokens plus the 3D window** of
  video tokens around them. The two parts are computed separately (dense attention to the text, nearby
  attention on the video grid, each with its log-sum-exp) and merged exactly:
  ``out = (e^{lse_t} out_t + e^{lse_v} out_v) / (e^{lse_t} + e^{lse_v})``, i.e. one softmax over
  the union of the keys.

The latent grid `(T, H, W)` after patchifying is read from the model's input by a forward pre-hook,
so one model runs any resolution. With ``kernel_size=None`` the processors reproduce the original
model (``tests/test_integration_diffusers.py``).

Example::

    handle = apply_nearby_attention(transformer, kernel_size=(3, 7, 7))
    out = transformer(latents, timestep, prompt_embeds).sample
    handle.remove()  # back to the original processors
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nuwa_kernels import nearby_attention, nearby_sdpa

__all__ = [
    "apply_nearby_attention",
    "NearbyAttentionHandle",
    "NearbyWanAttnProcessor",
    "NearbyCogVideoXAttnProcessor",
]


@dataclass
class _GridState:
    """The latent token grid of the current forward call, shared by a model's processors."""

    grid: Optional[Tuple[int, int, int]] = None

    def require(self) -> Tuple[int, int, int]:
        if self.grid is None:
            raise RuntimeError(
                "the nearby attention processor does not know the token grid: call the transformer itself "
                "(its forward pre-hook records the grid), not the attention module alone, or set handle.state.grid"
            )
        return self.grid


@dataclass
class _NearbyOptions:
    kernel_size: Any = 3
    border: str = "truncate"
    backend: str = "auto"


def _rope_wan(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's rotary embedding on `(B, N, heads, D)` (the same formula as ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class NearbyWanAttnProcessor:
    """Self-attention of a ``WanAttention`` (``attn1``) as 3D nearby attention on the video token grid."""

    def __init__(self, state: _GridState, options: _NearbyOptions):
        self.state, self.options = state, options

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "NearbyWanAttnProcessor is for Wan's self-attention (attn1): it takes no encoder_hidden_states "
                "and no attention_mask"
            )
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # (B, N, heads, D)
        if rotary_emb is not None:
            query, key = _rope_wan(query, *rotary_emb), _rope_wan(key, *rotary_emb)
        o = self.options
        out = nearby_sdpa(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.state.require(),
            kernel_size=o.kernel_size, border=o.border, backend=o.backend,
        )  # (B, heads, N, D)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class NearbyCogVideoXAttnProcessor:
    """CogVideoX joint attention with 3D nearby attention among the video tokens.

    Text queries attend to every token (as before); a video query attends to every text token and to
    the video tokens in its 3D window, under one softmax (merged through the log-sum-exps).
    """

    def __init__(self, state: _GridState, options: _NearbyOptions):
        self.state, self.options = state, options

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ValueError("NearbyCogVideoXAttnProcessor does not take an attention_mask")
        from diffusers.models.embeddings import apply_rotary_emb

        L = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B = x.shape[0]
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k, v = (t.view(B, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # video tokens only, as CogVideoXAttnProcessor2_0
            q = torch.cat([q[:, :, :L], apply_rotary_emb(q[:, :, L:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :L], apply_rotary_emb(k[:, :, L:], image_rotary_emb)], dim=2)

        # text queries: full attention over text + video
        out_text = F.scaled_dot_product_attention(q[:, :, :L], k, v)
        # video queries: dense part over the text keys, nearby part over the video grid
        qv = q[:, :, L:]
        scale = qv.shape[-1] ** -0.5
        s = (qv.float() @ k[:, :, :L].float().transpose(-1, -2)) * scale  # (B, heads, Nv, L), L is small
        lse_t = torch.logsumexp(s, dim=-1)
        out_t = torch.softmax(s, dim=-1) @ v[:, :, :L].float()
        grid = self.state.require()
        as_grid = lambda t: t.transpose(1, 2).unflatten(1, grid)  # noqa: E731  (B, T, H, W, heads, D)
        o = self.options
        out_v, lse_v = nearby_attention(
            as_grid(qv), as_grid(k[:, :, L:]), as_grid(v[:, :, L:]),
            kernel_size=o.kernel_size, border=o.border, scale=scale, return_lse=True, backend=o.backend,
        )
        out_v = out_v.flatten(1, 3).transpose(1, 2).float()  # (B, heads, Nv, D)
        lse_v = lse_v.flatten(1, 3).transpose(1, 2).float()  # (B, heads, Nv)
        lse = torch.logaddexp(lse_t, lse_v)
        out_video = out_t * torch.exp(lse_t - lse)[..., None] + out_v * torch.exp(lse_v - lse)[..., None]

        out = torch.cat([out_text, out_video.to(out_text.dtype)], dim=2)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, L:], out[:, :L]  # (hidden_states, encoder_hidden_states), as the original


def _wan_grid(model: nn.Module, hidden_states: Tensor) -> Tuple[int, int, int]:
    _, _, frames, height, width = hidden_states.shape  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    return (frames // pt, height // ph, width // pw)


def _cogvideox_grid(model: nn.Module, hidden_states: Tensor) -> Tuple[int, int, int]:
    _, frames, _, height, width = hidden_states.shape  # (B, F, C, H, W)
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    return (frames // pt, height // p, width // p)


_MODELS = {
    # class name: (grid from input, which attention modules, processor class)
    "WanTransformer3DModel": (_wan_grid, lambda m: [b.attn1 for b in m.blocks], NearbyWanAttnProcessor),
    "CogVideoXTransformer3DModel": (
        _cogvideox_grid,
        lambda m: [b.attn1 for b in m.transformer_blocks],
        NearbyCogVideoXAttnProcessor,
    ),
}


@dataclass
class NearbyAttentionHandle:
    """What :func:`apply_nearby_attention` changed; :meth:`remove` restores the original processors."""

    model: nn.Module
    state: _GridState
    options: _NearbyOptions
    originals: List[Tuple[nn.Module, Any]] = field(default_factory=list)
    hook: Any = None

    def remove(self) -> None:
        for module, processor in self.originals:
            module.set_processor(processor)
        if self.hook is not None:
            self.hook.remove()
        self.originals, self.hook = [], None


def apply_nearby_attention(
    model: nn.Module, kernel_size=3, border: str = "truncate", backend: str = "auto"
) -> NearbyAttentionHandle:
    """Route the video self-attention of a diffusers 3D video transformer to ``nuwa_kernels``.

    Args:
        model: a ``WanTransformer3DModel`` or ``CogVideoXTransformer3DModel``.
        kernel_size: window `(kt, kh, kw)` on the latent token grid (after patchifying), an int for all
            axes, or ``None`` on an axis for the whole axis (``None`` everywhere = the original model).
        border: ``"truncate"`` (NÜWA) or ``"shift"`` (NATTEN, every query sees a full window).
        backend: ``nuwa_kernels`` backend.

    Returns:
        a :class:`NearbyAttentionHandle`; ``handle.remove()`` undoes the change.
    """
    name = type(model).__name__
    if name not in _MODELS:
        raise TypeError(f"apply_nearby_attention supports {sorted(_MODELS)}; got {name}")
    grid_of, modules_of, processor_cls = _MODELS[name]
    state, options = _GridState(), _NearbyOptions(kernel_size, border, backend)
    handle = NearbyAttentionHandle(model, state, options)
    for module in modules_of(model):
        handle.originals.append((module, module.processor))
        module.set_processor(processor_cls(state, options))

    def record_grid(mod, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        state.grid = grid_of(mod, hidden)

    handle.hook = model.register_forward_pre_hook(record_grid, with_kwargs=True)
    return handle
