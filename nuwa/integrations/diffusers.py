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
  video tokens around them, in one softmax: the text keys/values are ``additional_keys`` /
  ``additional_values`` of :func:`nuwa_kernels.nearby_attention` (contract section 5a).

``apply_nearby_attention(..., process_group=group, shard_axis=0)`` runs a Wan model context-parallel:
each rank computes its frames (rows) of the latent grid and the attention exchanges only the window's
halo with the neighbouring ranks (:mod:`nuwa_kernels.distributed`; ``docs/distributed.md``).

The latent grid `(T, H, W)` after patchifying is read from the model's input by a forward pre-hook,
so one model runs any resolution. With ``kernel_size=None`` the processors reproduce the original
model (``tests/test_integration_diffusers.py``).

Example::

    handle = apply_nearby_attention(transformer, kernel_size=(3, 7, 7))
    out = transformer(latents, timestep, prompt_embeds).sample
    handle.remove()  # back to the original processors
"""

from __future__ import annotations

import math
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
    """The latent token grid of the current forward call, shared by a model's processors.

    With context parallelism (``group`` set) ``grid`` is the global grid, ``lengths`` every rank's
    shard length along ``axis`` and ``local`` this rank's part of the grid.
    """

    grid: Optional[Tuple[int, int, int]] = None
    group: Any = None
    axis: int = 0
    lengths: Optional[List[int]] = None

    @property
    def offset(self) -> int:
        import torch.distributed as dist

        return sum(self.lengths[: dist.get_rank(self.group)])

    @property
    def local(self) -> Tuple[int, int, int]:
        import torch.distributed as dist

        g = list(self.require())
        g[self.axis] = self.lengths[dist.get_rank(self.group)]
        return tuple(g)  # type: ignore[return-value]

    def take(self, x: Tensor, dim: int) -> Tensor:
        """This rank's tokens of a tensor whose ``dim`` holds the global grid's tokens in raster order."""
        local = self.local
        return x.unflatten(dim, self.require()).narrow(dim + self.axis, self.offset, local[self.axis]).flatten(dim, dim + 2)

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
    stride: Any = 1
    dilation: Any = 1

    def window(self) -> dict:
        """The window keyword arguments of the ``nuwa_kernels`` calls."""
        kw = dict(kernel_size=self.kernel_size, border=self.border, backend=self.backend)
        if self.stride != 1:
            kw["stride"] = self.stride
        if self.dilation != 1:
            kw["dilation"] = self.dilation
        return kw


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
        st = self.state
        if st.group is not None:  # context parallel: this rank's tokens, halo exchange with its neighbours
            from nuwa_kernels.distributed import nearby_attention_cp

            local = st.local
            out = nearby_attention_cp(
                query.unflatten(1, local), key.unflatten(1, local), value.unflatten(1, local),
                **self.options.window(), group=st.group, axis=st.axis, shard_lengths=st.lengths,
            ).flatten(1, 3)  # (B, N_local, heads, D)
        else:
            out = nearby_sdpa(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), st.require(),
                **self.options.window(),
            ).transpose(1, 2)  # (B, N, heads, D)
        out = out.flatten(2, 3).type_as(query)
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
        # video queries: the text tokens as additional keys of nearby attention on the video grid (one
        # softmax over all text keys and the window; contract section 5a)
        grid = self.state.require()
        as_grid = lambda t: t.transpose(1, 2).unflatten(1, grid)  # noqa: E731  (B, T, H, W, heads, D)
        out_video = nearby_attention(
            as_grid(q[:, :, L:]), as_grid(k[:, :, L:]), as_grid(v[:, :, L:]), **self.options.window(),
            additional_keys=k[:, :, :L].transpose(1, 2), additional_values=v[:, :, :L].transpose(1, 2),
        ).flatten(1, 3).transpose(1, 2)  # (B, heads, Nv, D)

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
    cp_hooks: List[Any] = field(default_factory=list)

    def remove(self) -> None:
        for module, processor in self.originals:
            module.set_processor(processor)
        if self.hook is not None:
            self.hook.remove()
        for h in self.cp_hooks:
            h.remove()
        self.originals, self.hook, self.cp_hooks = [], None, []


def _wan_context_parallel(model: nn.Module, state: _GridState) -> List[Any]:
    """Hooks that run a ``WanTransformer3DModel`` context-parallel (every rank gets the whole input):
    the rotary tables, per-token timestep embeddings (Wan 2.2 TI2V) and the patch tokens entering the
    first block are cut to this rank's shard, everything token-wise then runs on the shard, and the
    output projection's tokens are gathered back into the whole grid (as diffusers' ``_cp_plan``
    splits and gathers, but along frames or rows so that the attention exchanges only a halo). Every
    parameter's gradient is then this rank's share (sum across ranks, as data parallelism does)."""
    from nuwa_kernels.distributed import gather_shards

    def is_global(t) -> bool:
        return isinstance(t, Tensor) and t.dim() >= 2 and t.shape[1] == math.prod(state.require())

    def cut_rope(mod, args, out):
        return tuple(state.take(t, 1) for t in out)

    def cut_timesteps(mod, args, kwargs, out):
        # (temb, timestep_proj, ...): per-token ones are (B, N, ...) with Wan 2.2 TI2V
        return tuple(state.take(t, 1) if i < 2 and t is not None and t.dim() == 3 and is_global(t) else t
                     for i, t in enumerate(out))

    def cut_tokens(mod, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not is_global(hidden):
            return None
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": state.take(hidden, 1)}
        return (state.take(hidden, 1), *args[1:]), kwargs

    def gather(mod, args, out):
        full = gather_shards(out.unflatten(1, state.local), 1 + state.axis, state.group, state.lengths)
        return full.flatten(1, 3)

    return [
        model.rope.register_forward_hook(cut_rope),
        model.condition_embedder.register_forward_hook(cut_timesteps, with_kwargs=True),
        model.blocks[0].register_forward_pre_hook(cut_tokens, with_kwargs=True),
        model.proj_out.register_forward_hook(gather),
    ]


def _validate_options(kernel_size, border, backend) -> None:
    """Refuse bad options when the processors are installed, not at the first forward: the package's
    own checks (``TypeError`` / ``ValueError`` naming the argument)."""
    from nuwa_kernels.window import BORDERS, normalize_kernel_size

    normalize_kernel_size(kernel_size, (1, 1, 1))  # the grid only resolves None; any grid validates
    if not isinstance(border, str) or border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}; got {border!r}")
    from nuwa_kernels.backends import BACKEND_NAMES

    backends = ("auto",) + BACKEND_NAMES
    if not isinstance(backend, str) or backend not in backends:
        raise ValueError(f"backend must be one of {backends}; got {backend!r}")


def apply_nearby_attention(
    model: nn.Module,
    kernel_size=3,
    border: str = "truncate",
    backend: str = "auto",
    *,
    stride=1,
    dilation=1,
    process_group=None,
    shard_axis: int = 0,
) -> NearbyAttentionHandle:
    """Route the video self-attention of a diffusers 3D video transformer to ``nuwa_kernels``.

    Args:
        model: a ``WanTransformer3DModel`` or ``CogVideoXTransformer3DModel``.
        kernel_size: window `(kt, kh, kw)` on the latent token grid (after patchifying), an int for all
            axes, or ``None`` on an axis for the whole axis (``None`` everywhere = the original model).
        border: ``"truncate"`` (NÜWA) or ``"shift"`` (NATTEN, every query sees a full window).
        backend: ``nuwa_kernels`` backend.
        stride, dilation: ``nuwa_kernels`` stride and dilation (contract section 3a), int or per axis.
        process_group: a ``torch.distributed`` group to run the model context-parallel over (Wan):
            every rank passes the same whole input; each rank runs the blocks on its shard of the latent
            grid along ``shard_axis`` (0 = frames, 1 = rows; even shards), the attention exchanges only
            the window's halo with the neighbouring ranks, and the output is gathered, so every rank
            returns the whole output. Launch with ``torchrun`` (docs/distributed.md).
        shard_axis: the latent grid axis sharded with ``process_group``.

    Returns:
        a :class:`NearbyAttentionHandle`; ``handle.remove()`` undoes the change.
    """
    name = type(model).__name__
    if name not in _MODELS:
        raise TypeError(f"apply_nearby_attention supports {sorted(_MODELS)}; got {name}")
    grid_of, modules_of, processor_cls = _MODELS[name]
    _validate_options(kernel_size, border, backend)
    if process_group is not None and name != "WanTransformer3DModel":
        raise ValueError(f"process_group (context parallelism) supports WanTransformer3DModel; got {name}")
    if shard_axis not in (0, 1):
        raise ValueError(f"shard_axis must be 0 (frames) or 1 (rows); got {shard_axis!r}")
    state = _GridState(group=process_group, axis=shard_axis)
    options = _NearbyOptions(kernel_size, border, backend, stride, dilation)
    handle = NearbyAttentionHandle(model, state, options)
    for module in modules_of(model):
        handle.originals.append((module, module.processor))
        module.set_processor(processor_cls(state, options))

    def record_grid(mod, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        state.grid = grid_of(mod, hidden)
        if state.group is not None:
            from nuwa_kernels.distributed import even_shard_lengths
            import torch.distributed as dist

            state.lengths = even_shard_lengths(state.grid[state.axis], dist.get_world_size(state.group))

    handle.hook = model.register_forward_pre_hook(record_grid, with_kwargs=True)
    if process_group is not None:
        handle.cp_hooks = _wan_context_parallel(model, state)
    return handle
