"""Attention modules on 3D token grids, built on ``nuwa_kernels``.

Every module works on grid-layout activations `(B, T, H, W, dim)` (text is an `(L, 1, 1)` grid, an
image `(1, h, w)`, a video `(t, h, w)`), and all share one interface, so a model switches between
them by configuration (the NÜWA paper's ablation of nearby / axial / full attention):

* :class:`NearbyAttention`: 3D nearby attention (3DNA), self-attention or, with ``context_dim``,
  cross-attention to a condition grid of another size (NÜWA centre mapping, see
  ``docs/nearby_attention.md`` section 3); :class:`NearbyCrossAttention` is the cross form.
* :class:`AxialAttention`: each query attends along the three lines (t, h and w axes) through it; the
  three axis attentions are averaged.
* :class:`FullAttention`: every query attends to every key (raster-causal when ``causal=True``).

``forward(x, context=None)`` runs the whole grid. For autoregressive decoding with a key/value cache,
``make_cache`` / ``context_cache`` build a :class:`KVCache` and ``step`` runs a few new tokens: a
self-attention step writes the new keys into the cache and attends only to the window of the new
token (``nuwa_kernels.decode.nearby_attention_decode``: ``O(window)`` per step).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nuwa_kernels import merge_attentions, nearby_attention, nearby_attention_decode

__all__ = [
    "KVCache",
    "GridAttention",
    "NearbyAttention",
    "NearbyCrossAttention",
    "AxialAttention",
    "FullAttention",
    "ATTENTION_TYPES",
    "make_attention",
    "set_context_parallel",
    "PositionalEmbedding3d",
    "MLP",
]

Grid = Tuple[int, int, int]
KernelSize = Union[int, None, Sequence[Optional[int]]]
Causal = Union[bool, Sequence[bool]]


@dataclass
class KVCache:
    """Keys and values of one attention layer on a whole grid.

    Attributes:
        key: `(B, T, H, W, heads_kv, D)`.
        value: `(B, T, H, W, heads_kv, D)`.
    """

    key: Tensor
    value: Tensor

    @property
    def grid(self) -> Grid:
        return tuple(self.key.shape[1:4])  # type: ignore[return-value]

    def write(self, positions: Tensor, key: Tensor, value: Tensor) -> None:
        """Store `(B, n, heads_kv, D)` keys/values at flat raster ``positions`` `(n,)` (in place)."""
        B, T, H, W = self.key.shape[:4]
        self.key.view(B, T * H * W, *self.key.shape[4:])[:, positions] = key
        self.value.view(B, T * H * W, *self.value.shape[4:])[:, positions] = value


class GridAttention(nn.Module):
    """Multi-head attention on grid-layout tensors: projections, heads, grouped kv heads, output.

    Subclasses choose which keys each query sees by implementing :meth:`attend` (a whole grid) and
    :meth:`attend_decode` (a few queries against a cache).

    Args:
        dim: model width of the queries' grid.
        heads: query heads.
        head_dim: per-head width (default ``dim // heads``).
        num_kv_heads: key/value heads (grouped-query attention); default ``heads``.
        context_dim: width of the condition grid for cross-attention; ``None`` = self-attention.
        kernel_size: window `(kt, kh, kw)` (ints or ``None`` = whole axis), or one int for all axes.
        causal: ``False``, ``True`` (raster order, self-attention only) or per-axis `(t, h, w)` bools.
        border: ``"truncate"`` (NÜWA) or ``"shift"`` (NATTEN).
        backend: ``nuwa_kernels`` backend (``"auto"``, ``"cpu"``, ``"reference"``, ...).
        bias: bias in the projections.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        head_dim: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        context_dim: Optional[int] = None,
        kernel_size: KernelSize = 3,
        causal: Causal = False,
        border: str = "truncate",
        backend: str = "auto",
        bias: bool = False,
    ):
        super().__init__()
        head_dim = head_dim or dim // heads
        num_kv_heads = num_kv_heads or heads
        if heads % num_kv_heads != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if causal is True and context_dim is not None:
            raise ValueError("causal=True (raster order) is for self-attention; cross-attention takes per-axis causal")
        self.heads, self.head_dim, self.num_kv_heads = heads, head_dim, num_kv_heads
        self.is_cross = context_dim is not None
        self.kernel_size, self.causal, self.border, self.backend = kernel_size, causal, border, backend
        kv_in = context_dim if context_dim is not None else dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_k = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.to_v = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=bias)

    # -- the key pattern (subclasses) --------------------------------------------------------------

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`(B, T, H, W, heads, D)` queries against `(B, Tk, Hk, Wk, heads_kv, D)` keys/values."""
        raise NotImplementedError

    def attend_decode(self, q: Tensor, cache: KVCache, positions: Tensor, grid: Grid) -> Tensor:
        """`(B, n, heads, D)` queries at flat ``positions`` of ``grid`` against a cache."""
        raise NotImplementedError

    # -- shared plumbing ---------------------------------------------------------------------------

    def project_kv(self, source: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values `(..., heads_kv, D)` of grid (or token) activations `(..., dim)`."""
        k = self.to_k(source).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.to_v(source).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return k, v

    def global_kv(self, global_tokens: Optional[Tensor], batch: int) -> Optional[Tuple[Tensor, Tensor]]:
        """Keys and values `(B, S, heads_kv, D)` of the global tokens every query attends to, or ``None``.

        Only :class:`NearbyAttention` has global tokens; the other kinds refuse them.
        """
        if global_tokens is not None:
            raise ValueError(f"{type(self).__name__} takes no global tokens (NearbyAttention does)")
        return None

    def forward(self, x: Tensor, context: Optional[Tensor] = None, global_tokens: Optional[Tensor] = None) -> Tensor:
        """`x` `(B, T, H, W, dim)`; ``context`` `(B, Tc, Hc, Wc, context_dim)` for cross-attention;
        ``global_tokens`` `(B, S, kv_dim)` or `(S, kv_dim)`: tokens every query also attends to
        (:class:`NearbyAttention` only; ``kv_dim`` is ``context_dim`` for cross-attention, else ``dim``)."""
        if self.is_cross != (context is not None):
            raise ValueError(
                f"{type(self).__name__} is {'cross' if self.is_cross else 'self'}-attention: "
                f"{'pass' if self.is_cross else 'do not pass'} a context grid"
            )
        q = self.to_q(x).unflatten(-1, (self.heads, self.head_dim))
        k, v = self.project_kv(x if context is None else context)
        extra = self.global_kv(global_tokens, x.shape[0])
        out = self.attend(q, k, v) if extra is None else self.attend(q, k, v, *extra)
        return self.to_out(out.flatten(-2))

    def make_cache(self, batch: int, grid: Sequence[int], dtype=None, device=None) -> KVCache:
        """An empty self-attention cache on ``grid`` (zeros; filled by :meth:`step`)."""
        w = self.to_k.weight
        shape = (batch, *grid, self.num_kv_heads, self.head_dim)
        dtype, device = dtype or w.dtype, device or w.device
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def context_cache(self, context: Tensor) -> KVCache:
        """The fixed keys/values of a cross-attention context `(B, Tc, Hc, Wc, context_dim)`."""
        k, v = self.project_kv(context)
        return KVCache(k, v)

    def step(
        self, x: Tensor, positions: Tensor, grid: Sequence[int], cache: KVCache, global_tokens: Optional[Tensor] = None
    ) -> Tensor:
        """Decode `x` `(B, n, dim)`, new tokens at flat raster ``positions`` `(n,)` of ``grid``.

        Self-attention writes the new keys/values into ``cache`` first (so a token sees itself);
        cross-attention reads its fixed context cache. Returns `(B, n, dim)`.
        """
        grid = tuple(int(g) for g in grid)
        q = self.to_q(x).unflatten(-1, (self.heads, self.head_dim))
        if not self.is_cross:
            k, v = self.project_kv(x)
            cache.write(positions, k, v)
        extra = self.global_kv(global_tokens, x.shape[0])
        out = self.attend_decode(q, cache, positions, grid) if extra is None else \
            self.attend_decode(q, cache, positions, grid, *extra)
        return self.to_out(out.flatten(-2))


class _GroupRef:
    """Holds a process group on a module: ``copy.deepcopy`` shares it (groups are process-wide
    handles), pickling drops it (an unpickled module runs single-process)."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {"group": None}


class NearbyAttention(GridAttention):
    """3D nearby attention (3DNA): each query sees the keys in a 3D window around it.

    Self-attention by default; with ``context_dim`` it is cross-attention to a condition grid of any
    size (the window is centred at ``floor(i * Lk / Lq)`` per axis; use ``kernel_size=None`` on an
    axis to see the whole axis, e.g. `(None, 1, 1)` for a text condition on an `(L, 1, 1)` grid).

    Args (beyond :class:`GridAttention`'s):
        stride: int or `(st, sh, sw)`: blocks of ``stride`` queries share one window (contract 3a;
            ``stride == kernel_size`` is blocked window attention).
        dilation: int or `(dt, dh, dw)`: windows over every ``dilation``-th position (contract 3a).
        num_global_tokens: learned global tokens (in the key/value input space, projected by ``to_k`` /
            ``to_v``) that every query attends to in the same softmax as its window (contract 5a):
            start-of-sequence or register tokens. Tokens passed to ``forward(..., global_tokens=)``
            are attended to as well (after the learned ones).
        process_group: a ``torch.distributed`` group: the module runs context-parallel; ``x`` is then
            this rank's shard of the grid along ``shard_axis`` (0 = frames, 1 = rows), shards in rank
            order. Self-attention exchanges the window's halo with the neighbouring ranks
            (:func:`nuwa_kernels.distributed.nearby_attention_cp`); cross-attention takes the whole
            (replicated) context on every rank and maps this rank's queries with the global grid.
        shard_axis: the sharded grid axis with ``process_group``.

    nuwa-pytorch's ``Sparse3DNA`` with its ``<bos>`` token is this module with ``border="truncate"``,
    ``causal=(True, True, True)`` for its ``causal=True``, its ``dilation`` and the ``<bos>`` activation
    passed as ``global_tokens`` (``tests/test_model.py`` checks the two agree).
    """

    def __init__(
        self,
        dim: int,
        *args,
        stride=1,
        dilation=1,
        num_global_tokens: int = 0,
        process_group=None,
        shard_axis: int = 0,
        **kwargs,
    ):
        super().__init__(dim, *args, **kwargs)
        if not isinstance(num_global_tokens, int) or num_global_tokens < 0:
            raise ValueError(f"num_global_tokens must be a non-negative int; got {num_global_tokens!r}")
        self.stride, self.dilation = stride, dilation
        self.global_tokens = (
            nn.Parameter(torch.randn(num_global_tokens, self.to_k.in_features) * 0.02) if num_global_tokens else None
        )
        self.set_process_group(process_group, shard_axis)

    def set_process_group(self, process_group, shard_axis: int = 0) -> None:
        """Run context-parallel over ``process_group`` (``None``: single process), sharded on ``shard_axis``."""
        if shard_axis not in (0, 1):
            raise ValueError(f"shard_axis must be 0 (frames) or 1 (rows); got {shard_axis!r}")
        self._group_ref, self.shard_axis = _GroupRef(process_group), shard_axis

    @property
    def process_group(self):
        """The ``torch.distributed`` group of context parallelism, or ``None``."""
        return self._group_ref.group

    def global_kv(self, global_tokens, batch):
        tokens = []
        if self.global_tokens is not None:
            tokens.append(self.global_tokens.expand(batch, *self.global_tokens.shape))
        if global_tokens is not None:
            if global_tokens.dim() == 2:
                global_tokens = global_tokens.expand(batch, *global_tokens.shape)
            if global_tokens.dim() != 3 or global_tokens.shape[-1] != self.to_k.in_features:
                raise ValueError(
                    f"global_tokens must be (B, S, {self.to_k.in_features}) or (S, {self.to_k.in_features}); "
                    f"got {tuple(global_tokens.shape)}"
                )
            tokens.append(global_tokens)
        if not tokens:
            return None
        return self.project_kv(torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0])

    def _window_kwargs(self):
        kw = dict(kernel_size=self.kernel_size, causal=self.causal, border=self.border, backend=self.backend)
        if self.stride != 1:
            kw["stride"] = self.stride
        if self.dilation != 1:
            kw["dilation"] = self.dilation
        return kw

    def attend(self, q, k, v, extra_k=None, extra_v=None):
        kw = self._window_kwargs()
        if extra_k is not None:
            kw.update(additional_keys=extra_k, additional_values=extra_v)
        if self.process_group is not None and not self.is_cross:
            from nuwa_kernels.distributed import nearby_attention_cp

            return nearby_attention_cp(q, k, v, **kw, group=self.process_group, axis=self.shard_axis)
        if self.process_group is not None:  # cross-attention: the query shard against the whole context
            from nuwa_kernels import Slab, nearby_attention_slab
            from nuwa_kernels.distributed import gather_lengths

            lengths, rank = gather_lengths(q.shape[1 + self.shard_axis], self.process_group, q.device)
            q_origin, q_full = [0, 0, 0], list(q.shape[1:4])
            q_origin[self.shard_axis], q_full[self.shard_axis] = sum(lengths[:rank]), sum(lengths)
            slab = Slab(tuple(q_origin), (0, 0, 0), tuple(q_full), tuple(k.shape[1:4]))
            return nearby_attention_slab(q, k, v, slab, **kw)
        return nearby_attention(q, k, v, **kw)

    def attend_decode(self, q, cache, positions, grid, extra_k=None, extra_v=None):
        if self.process_group is not None:
            raise NotImplementedError("cached decoding of a context-parallel NearbyAttention (use process_group=None)")
        kw = self._window_kwargs()
        kw.pop("backend")
        if ("stride" in kw or "dilation" in kw) and "stride" not in inspect.signature(nearby_attention_decode).parameters:
            raise NotImplementedError("cached decoding with stride or dilation (nearby_attention_decode lacks them)")
        out, lse = nearby_attention_decode(q, cache.key, cache.value, positions, grid, return_lse=True, **kw)
        if extra_k is None:
            return out
        # the global tokens: dense attention to S keys, merged exactly with the window through the lses
        group = self.heads // self.num_kv_heads
        ks = extra_k.repeat_interleave(group, dim=2).transpose(1, 2)  # (B, heads, S, D)
        vs = extra_v.repeat_interleave(group, dim=2).transpose(1, 2)
        s = (q.transpose(1, 2).to(lse.dtype) @ ks.transpose(-1, -2).to(lse.dtype)) * self.head_dim ** -0.5
        g_out = (torch.softmax(s, -1) @ vs.to(lse.dtype)).transpose(1, 2)  # (B, n, heads, D)
        g_lse = torch.logsumexp(s, -1).transpose(1, 2)
        return merge_attentions([out, g_out.to(out.dtype)], [lse, g_lse])[0]


class NearbyCrossAttention(NearbyAttention):
    """:class:`NearbyAttention` from a query grid to a condition grid (``context_dim`` required).

    Args:
        dim: query width; context_dim: condition width; kernel_size: default `(3, 3, 3)`; an axis set
            to ``None`` sees the whole condition axis (text-like conditions: `(None, 1, 1)`).
        Other arguments as in :class:`GridAttention`.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, **kwargs):
        super().__init__(dim, heads=heads, context_dim=context_dim, **kwargs)


class AxialAttention(GridAttention):
    """Axial attention: the mean of three attentions, along the t, the h and the w line of a query.

    Implemented with nearby windows `(None, 1, 1)`, `(1, None, 1)` and `(1, 1, None)` (``kernel_size``
    is ignored); with ``causal=True`` each line is cut at the query in raster order. For cross-attention
    the lines pass through the query's mapped centre on the condition grid.
    """

    AXIS_KERNELS = ((None, 1, 1), (1, None, 1), (1, 1, None))

    def attend(self, q, k, v):
        outs = [
            nearby_attention(q, k, v, kernel_size=ks, causal=self.causal, border=self.border, backend=self.backend)
            for ks in self.AXIS_KERNELS
        ]
        return sum(outs) / 3

    def attend_decode(self, q, cache, positions, grid):
        outs = [
            nearby_attention_decode(q, cache.key, cache.value, positions, grid, ks, self.causal, self.border)
            for ks in self.AXIS_KERNELS
        ]
        return sum(outs) / 3


class FullAttention(GridAttention):
    """Full (dense) attention over the flattened grid: ``F.scaled_dot_product_attention``.

    ``causal=True`` is ``is_causal`` on the raster order. Per-axis causal flags use nearby attention
    with a whole-axis window (``kernel_size=None``). ``kernel_size`` and ``border`` are ignored.
    """

    def attend(self, q, k, v):
        if not isinstance(self.causal, bool):
            return nearby_attention(q, k, v, kernel_size=None, causal=self.causal, backend=self.backend)
        heads = q.shape[4]
        group = heads // k.shape[4]
        qs = q.flatten(1, 3).transpose(1, 2)  # (B, heads, N, D)
        ks = k.flatten(1, 3).transpose(1, 2).repeat_interleave(group, dim=1)
        vs = v.flatten(1, 3).transpose(1, 2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=self.causal)
        return out.transpose(1, 2).reshape(*q.shape[:5], v.shape[-1])

    def attend_decode(self, q, cache, positions, grid):
        # The "window" is the whole grid: a full-attention step costs O(N), as full attention does.
        return nearby_attention_decode(q, cache.key, cache.value, positions, grid, None, self.causal)


ATTENTION_TYPES = {"nearby": NearbyAttention, "axial": AxialAttention, "full": FullAttention}


def make_attention(kind: str, *args, **kwargs) -> GridAttention:
    """Build ``"nearby"``, ``"axial"`` or ``"full"`` attention with the shared constructor arguments."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention must be one of {tuple(ATTENTION_TYPES)}; got {kind!r}")
    return ATTENTION_TYPES[kind](*args, **kwargs)


def set_context_parallel(model: nn.Module, process_group, shard_axis: int = 0) -> int:
    """Make every :class:`NearbyAttention` in ``model`` context-parallel over ``process_group``
    (``None`` undoes it); returns how many modules changed.

    The model's grid activations are then each rank's shard along ``shard_axis``; cross-attention
    contexts stay whole (replicated) on every rank. Everything that acts token by token (projections,
    MLPs, norms) needs nothing more. Positional embeddings must be those of the shard's global
    positions (slice the global table). Axial and full attention over a sharded grid are not
    context-parallel: they raise.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, NearbyAttention):
            m.set_process_group(process_group, shard_axis)
            n += 1
        elif isinstance(m, GridAttention) and process_group is not None:
            raise ValueError(f"{type(m).__name__} cannot run context-parallel (only NearbyAttention can)")
    return n


class PositionalEmbedding3d(nn.Module):
    """Learnable positional embedding: separate tables for t, h and w, summed (NÜWA's three vocabularies).

    Args:
        max_grid: the largest `(T, H, W)` grid the tables cover.
        dim: embedding width.
    """

    def __init__(self, max_grid: Sequence[int], dim: int):
        super().__init__()
        self.max_grid = tuple(int(g) for g in max_grid)
        self.t = nn.Embedding(self.max_grid[0], dim)
        self.h = nn.Embedding(self.max_grid[1], dim)
        self.w = nn.Embedding(self.max_grid[2], dim)
        for table in (self.t, self.h, self.w):
            nn.init.normal_(table.weight, std=0.02)

    def _check(self, grid: Sequence[int]) -> None:
        if any(g > m for g, m in zip(grid, self.max_grid)):
            raise ValueError(f"grid {tuple(grid)} exceeds the positional tables' max_grid {self.max_grid}")

    def forward(self, grid: Sequence[int]) -> Tensor:
        """`(T, H, W, dim)` embeddings of every position of ``grid``."""
        self._check(grid)
        T, H, W = grid
        dev = self.t.weight.device
        return (
            self.t(torch.arange(T, device=dev))[:, None, None]
            + self.h(torch.arange(H, device=dev))[None, :, None]
            + self.w(torch.arange(W, device=dev))[None, None, :]
        )

    def at(self, positions: Tensor, grid: Sequence[int]) -> Tensor:
        """`(n, dim)` embeddings of flat raster ``positions`` `(n,)` of ``grid``."""
        self._check(grid)
        _, H, W = grid
        return self.t(positions // (H * W)) + self.h((positions // W) % H) + self.w(positions % W)


class MLP(nn.Module):
    """Transformer feed-forward: ``Linear -> GELU -> Linear``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
