"""Context parallelism for 3D nearby attention: one grid sharded across the ranks of a process group.

:func:`nearby_attention_cp` (contract section 6a) runs :func:`nuwa_kernels.nearby_attention` on a
``(T, H, W)`` grid whose frames (``axis=0``) or rows (``axis=1``) are split into contiguous shards,
one per rank of a ``torch.distributed`` group, in rank order. Full attention needs every key, so
context-parallel full attention (Ulysses, ring attention) all-gathers keys/values or passes every
block around a ring. A nearby window reaches only a few frames (rows) beyond the shard, so a rank
fetches just that *halo* from the rank(s) that own it:

1. A small all-gather of per-rank metadata (shard length, the other dimensions, a digest of the
   arguments): every rank learns the global grid and every rank's offset, and any disagreement
   (a rank passing other shapes, window, causal mode, ...) raises the same ``ValueError`` on every
   rank instead of a hang or a wrong result.
2. From the window maths (``window.needed_key_range``, the single source of truth) every rank
   computes, for every rank, the global key interval its queries reach. What rank ``p`` sends to rank
   ``r`` is the part of ``p``'s shard inside ``r``'s interval: usually a few boundary frames to the
   two neighbours, several ranks when shards are shorter than the halo, nothing beyond the window.
3. Point-to-point ``batch_isend_irecv`` (gloo, NCCL, ...) exchanges those K/V slices (key and value
   packed into one message per peer); the local key slab is ``left halo + own shard + right halo``.
4. ``nearby_attention_slab`` computes this rank's queries against the slab with the windows,
   borders, strides, dilation groups and raster causality of the *global* grid.
5. Backward: the gradients of the halo rows go back to their owners (point-to-point again) and are
   added there to the owner's own key/value gradients.

With ``overlap=True`` the queries whose windows stay inside the own shard are computed while the
halo is in flight; the boundary queries wait for it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "nearby_attention_cp",
    "even_shard_lengths",
    "shard",
    "gather_shards",
    "gather_lengths",
    "shard_bounds",
    "halo_plan",
    "HaloPlan",
    "cp_traffic_bytes",
]

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


# ----------------------------------------------------------------------------------------------
# the window maths and the slab op this module builds on (window.py, api.py)
# ----------------------------------------------------------------------------------------------


def _needed_key_range(
    grid, kernel_size, causal, border, stride, dilation, axis, q_lo, q_hi
) -> Tuple[int, int]:
    from .window import needed_key_range

    return needed_key_range(grid, kernel_size, causal, border, stride, dilation, axis, q_lo, q_hi)


def _slab_attention(query, key, value, q_origin, k_origin, grid, **kwargs):
    from .api import nearby_attention_slab
    from .window import Slab

    return nearby_attention_slab(
        query, key, value, Slab(tuple(q_origin), tuple(k_origin), tuple(grid), tuple(grid)), **kwargs
    )


# ----------------------------------------------------------------------------------------------
# planning (pure Python, no communication: every rank computes the same plan)
# ----------------------------------------------------------------------------------------------


def shard_bounds(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """Inclusive global ``(lo, hi)`` of each rank's shard, for shard ``lengths`` in rank order."""
    out, off = [], 0
    for n in lengths:
        out.append((off, off + int(n) - 1))
        off += int(n)
    return out


@dataclass(frozen=True)
class HaloPlan:
    """What one rank receives and sends along the sharded axis (global coordinates, inclusive).

    Attributes:
        rank: this rank (in the group).
        own: this rank's shard ``(lo, hi)``.
        slab: the key slab ``(lo, hi)``: the union of the own shard and the keys its queries reach.
        recv: ``(peer, lo, hi)`` pieces of the slab owned by other ranks, in rank (= coordinate) order.
        send: ``(peer, lo, hi)`` pieces of the own shard that other ranks' windows reach.
    """

    rank: int
    own: Tuple[int, int]
    slab: Tuple[int, int]
    recv: Tuple[Tuple[int, int, int], ...]
    send: Tuple[Tuple[int, int, int], ...]


def _needs(grid, kernel_size, causal, border, stride, dilation, axis, bounds) -> List[Tuple[int, int]]:
    """Per rank: the global key interval its queries reach, joined with its own shard."""
    try:
        return list(
            _needs_cached(
                tuple(grid),
                _canon(kernel_size),
                _canon(causal),
                border,
                _canon(stride),
                _canon(dilation),
                axis,
                tuple(bounds),
            )
        )
    except TypeError:  # unhashable arguments: let the window maths raise its own clear error
        return _needs_uncached(grid, kernel_size, causal, border, stride, dilation, axis, bounds)


@functools.lru_cache(maxsize=256)
def _needs_cached(grid, kernel_size, causal, border, stride, dilation, axis, bounds):
    return tuple(_needs_uncached(grid, kernel_size, causal, border, stride, dilation, axis, bounds))


def _needs_uncached(
    grid, kernel_size, causal, border, stride, dilation, axis, bounds
) -> List[Tuple[int, int]]:
    out = []
    for lo, hi in bounds:
        k_lo, k_hi = _needed_key_range(grid, kernel_size, causal, border, stride, dilation, axis, lo, hi)
        out.append((min(k_lo, lo), max(k_hi, hi)))
    return out


def halo_plan(
    grid: Sequence[int],
    lengths: Sequence[int],
    rank: int,
    axis: int = 0,
    kernel_size=3,
    causal=False,
    border: str = "truncate",
    stride=1,
    dilation=1,
) -> HaloPlan:
    """The exchange plan of ``rank`` for shards of ``lengths`` along ``axis`` of the global ``grid``."""
    bounds = shard_bounds(lengths)
    needs = _needs(tuple(grid), kernel_size, causal, border, stride, dilation, axis, bounds)
    return _plan_from(rank, bounds, needs)


def _plan_from(rank, bounds, needs) -> HaloPlan:
    own = bounds[rank]
    slab = needs[rank]
    recv, send = [], []
    for p, (lo, hi) in enumerate(bounds):
        if p == rank:
            continue
        a, b = max(lo, slab[0]), min(hi, slab[1])
        if a <= b:
            recv.append((p, a, b))
        a, b = max(own[0], needs[p][0]), min(own[1], needs[p][1])
        if a <= b:
            send.append((p, a, b))
    return HaloPlan(rank, own, slab, tuple(recv), tuple(send))


def cp_traffic_bytes(
    grid: Sequence[int],
    world: int,
    axis: int,
    kernel_size,
    causal=False,
    border: str = "truncate",
    stride=1,
    dilation=1,
    heads_kv: int = 1,
    head_dim: int = 64,
    batch: int = 1,
    itemsize: int = 2,
    lengths: Optional[Sequence[int]] = None,
) -> List[int]:
    """Bytes of K and V each rank *sends* in one forward of :func:`nearby_attention_cp` (even shards
    by default; the backward sends the same amount of gradients back)."""
    grid = tuple(int(g) for g in grid)
    if lengths is None:
        n = grid[axis]
        lengths = [n // world + (1 if r < n % world else 0) for r in range(world)]
    bounds = shard_bounds(lengths)
    needs = _needs(grid, kernel_size, causal, border, stride, dilation, axis, bounds)
    per_row = batch * heads_kv * 2 * head_dim * itemsize * grid[0] * grid[1] * grid[2] // grid[axis]
    out = []
    for r in range(world):
        plan = _plan_from(r, bounds, needs)
        out.append(sum(hi - lo + 1 for _, lo, hi in plan.send) * per_row)
    return out


# ----------------------------------------------------------------------------------------------
# communication
# ----------------------------------------------------------------------------------------------


def _p2p(op, tensor: Tensor, peer: int, group) -> "dist.P2POp":
    """A point-to-point op with ``peer`` given as a rank *in* ``group``."""
    if _P2P_GROUP_PEER:
        return dist.P2POp(op, tensor, group=group, group_peer=peer)
    global_peer = peer if group is None or group is dist.group.WORLD else dist.get_global_rank(group, peer)
    return dist.P2POp(op, tensor, global_peer, group)


_P2P_GROUP_PEER = "group_peer" in inspect.signature(dist.P2POp.__init__).parameters if dist.is_available() else False


def _comm_device(group, ref: Tensor) -> torch.device:
    backend = dist.get_backend(group)
    return ref.device if str(backend) != "gloo" or ref.device.type == "cpu" else torch.device("cpu")


def _narrow(t: Tensor, axis: int, lo: int, n: int) -> Tensor:
    return t.narrow(1 + axis, lo, n)


def _pack(key: Tensor, value: Tensor, axis: int, lo: int, n: int, device) -> Tensor:
    return torch.cat([_narrow(key, axis, lo, n), _narrow(value, axis, lo, n)], dim=-1).contiguous().to(device)


class _Pending:
    """Work handles of an exchange in flight, and the buffers they use."""

    def __init__(self):
        self.works = []
        self.keep: List[Tensor] = []

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.keep = [], []


def _exchange(send: Sequence[Tuple[int, Tensor]], recv: Sequence[Tuple[int, Tensor]], group) -> _Pending:
    pending = _Pending()
    ops = [_p2p(dist.irecv, buf, peer, group) for peer, buf in recv]
    ops += [_p2p(dist.isend, buf, peer, group) for peer, buf in send]
    if ops:
        pending.works = dist.batch_isend_irecv(ops)
        pending.keep = [b for _, b in send] + [b for _, b in recv]
    return pending


def _start_halo(
    key: Tensor, value: Tensor, plan: HaloPlan, axis: int, group
) -> Tuple[_Pending, List[Tensor]]:
    """Posts the sends and receives of ``plan``; returns the work and the receive buffers."""
    dev = _comm_device(group, key)
    own_lo = plan.own[0]
    with torch.no_grad():
        sends = [(p, _pack(key, value, axis, lo - own_lo, hi - lo + 1, dev)) for p, lo, hi in plan.send]
    recvs = []
    for p, lo, hi in plan.recv:
        shape = list(key.shape)
        shape[1 + axis] = hi - lo + 1
        shape[-1] = key.shape[-1] + value.shape[-1]
        recvs.append((p, torch.empty(shape, dtype=key.dtype, device=dev)))
    return _exchange(sends, recvs, group), [b for _, b in recvs]


class _HaloSlab(torch.autograd.Function):
    """Waits for the halo and assembles the key/value slab ``left halo + own shard + right halo``.

    Backward: the gradient rows of the halo go back to their owners (point-to-point), and the rows
    this rank sent come back as gradients and are added to the own key/value gradients.
    """

    @staticmethod
    def forward(ctx, key: Tensor, value: Tensor, plan: HaloPlan, axis: int, group, pending: _Pending, bufs):
        pending.wait()
        ctx.plan, ctx.axis, ctx.group = plan, axis, group
        ctx.d, ctx.shape_k, ctx.shape_v, ctx.dtype = key.shape[-1], key.shape, value.shape, key.dtype
        ctx.dev, ctx.out_dev = _comm_device(group, key), key.device
        d = key.shape[-1]
        left = [b.to(key.device) for (_, lo, _), b in zip(plan.recv, bufs) if lo < plan.own[0]]
        right = [b.to(key.device) for (_, lo, _), b in zip(plan.recv, bufs) if lo > plan.own[1]]
        k_slab = torch.cat([b[..., :d] for b in left] + [key] + [b[..., :d] for b in right], dim=1 + axis)
        v_slab = torch.cat([b[..., d:] for b in left] + [value] + [b[..., d:] for b in right], dim=1 + axis)
        return k_slab, v_slab

    @staticmethod
    @once_differentiable  # the exchange is not differentiable twice: a clear error, never a wrong gradient
    def backward(ctx, gk_slab, gv_slab):
        plan, axis, d = ctx.plan, ctx.axis, ctx.d
        slab_len = plan.slab[1] - plan.slab[0] + 1
        if gk_slab is None:
            shape = list(ctx.shape_k)
            shape[1 + axis] = slab_len
            gk_slab = torch.zeros(shape, dtype=ctx.dtype, device=ctx.out_dev)
        if gv_slab is None:
            shape = list(ctx.shape_v)
            shape[1 + axis] = slab_len
            gv_slab = torch.zeros(shape, dtype=ctx.dtype, device=ctx.out_dev)
        base = plan.slab[0]
        sends = [
            (p, _pack(gk_slab, gv_slab, axis, lo - base, hi - lo + 1, ctx.dev)) for p, lo, hi in plan.recv
        ]
        recvs = []
        for p, lo, hi in plan.send:
            shape = list(ctx.shape_k)
            shape[1 + axis] = hi - lo + 1
            shape[-1] = ctx.shape_k[-1] + ctx.shape_v[-1]
            recvs.append((p, lo, hi, torch.empty(shape, dtype=gk_slab.dtype, device=ctx.dev)))
        pending = _exchange(sends, [(p, b) for p, _, _, b in recvs], ctx.group)
        own_n = plan.own[1] - plan.own[0] + 1
        gk = _narrow(gk_slab, axis, plan.own[0] - base, own_n).clone()
        gv = _narrow(gv_slab, axis, plan.own[0] - base, own_n).clone()
        pending.wait()
        for p, lo, hi, buf in recvs:
            buf = buf.to(ctx.out_dev)
            n = hi - lo + 1
            _narrow(gk, axis, lo - plan.own[0], n).add_(buf[..., :d])
            _narrow(gv, axis, lo - plan.own[0], n).add_(buf[..., d:])
        return gk, gv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# argument checking across ranks
# ----------------------------------------------------------------------------------------------


def _canon(x):
    if isinstance(x, (list, tuple)):
        return tuple(_canon(v) for v in x)
    return x


def _triple(x):
    return (x,) * 3 if not isinstance(x, (list, tuple)) else tuple(x)


def _digest(*args) -> int:
    return int.from_bytes(hashlib.sha1(repr(_canon(args)).encode()).digest()[:7], "little")


_FIELDS = (
    "ok",
    "shard length",
    "batch",
    "grid dim a",
    "grid dim b",
    "heads",
    "heads_kv",
    "head_dim",
    "value head_dim",
    "dtype",
    "additional keys",
    "window arguments",
    "requires_grad of key/value",
)


def _local_meta(
    query, key, value, axis, additional_keys, additional_values, arg_digest
) -> Tuple[List[int], str]:
    """This rank's metadata row, and a reason when its inputs are unusable (row[0] = 0 then)."""
    bad = ""
    if axis not in (0, 1):
        bad = f"axis must be 0 (t) or 1 (h); got {axis!r}"
    elif not all(isinstance(t, Tensor) for t in (query, key, value)):
        bad = "query, key and value must be tensors"
    elif not (query.dim() == key.dim() == value.dim() == 6):
        bad = (
            f"query, key and value must be 6-D grid tensors (B, t, H, W, heads, D); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    elif query.shape[1:4] != key.shape[1:4] or key.shape[:5] != value.shape[:5]:
        bad = (
            f"this rank's query, key and value shards must cover the same grid slice (self-attention); "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    elif query.shape[0] != key.shape[0]:
        bad = f"key batch ({key.shape[0]}) must equal query batch ({query.shape[0]})"
    elif query.shape[1 + axis] < 1:
        bad = (
            f"every rank's shard must hold at least one slice along axis {axis}; got {query.shape[1 + axis]}"
        )
    elif query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        bad = f"query, key and value must share one floating dtype; got {query.dtype}, {key.dtype}, {value.dtype}"
    elif (additional_keys is None) != (additional_values is None):
        bad = "additional_keys and additional_values must be given together"
    if bad:
        return [0] * len(_FIELDS), bad
    others = [query.shape[1 + a] for a in range(3) if a != axis]
    s = -1 if additional_keys is None else int(additional_keys.shape[1])
    row = [
        1,
        query.shape[1 + axis],
        query.shape[0],
        *others,
        query.shape[4],
        key.shape[4],
        query.shape[5],
        value.shape[5],
        _DTYPES[query.dtype],
        s,
        arg_digest,
        int(torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)),
    ]
    return row, ""


def _gather_meta(row: List[int], group, device) -> List[List[int]]:
    world = dist.get_world_size(group)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def _check_meta(rows: List[List[int]], rank: int, reason: str) -> None:
    bad = [r for r, row in enumerate(rows) if row[0] == 0]
    if bad:
        here = f" This rank ({rank}): {reason}" if reason else ""
        raise ValueError(f"nearby_attention_cp: rank(s) {bad} passed unusable inputs.{here}")
    for i, name in enumerate(_FIELDS[2:], start=2):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            what = {
                "window arguments": "window arguments (kernel_size, causal, border, scale, stride, dilation, axis)"
            }.get(name, name)
            raise ValueError(
                f"nearby_attention_cp: every rank must pass the same {what}; they differ ({detail}). "
                "Only the shard length along the sharded axis may differ between ranks."
            )


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------


def _interior(grid, axis, own, args) -> Optional[Tuple[int, int]]:
    """The largest global query interval inside ``own`` whose windows stay inside ``own``."""
    try:
        return _interior_cached(tuple(grid), axis, tuple(own), _canon(args))
    except TypeError:
        return _interior_uncached(grid, axis, own, args)


@functools.lru_cache(maxsize=256)
def _interior_cached(grid, axis, own, args):
    return _interior_uncached(grid, axis, own, args)


def _interior_uncached(grid, axis, own, args) -> Optional[Tuple[int, int]]:
    lo, hi = own
    inside = []
    for i in range(lo, hi + 1):
        k_lo, k_hi = _needed_key_range(grid, *args, axis, i, i)
        if lo <= k_lo and k_hi <= hi:
            inside.append(i)
    if not inside:
        return None
    k_lo, k_hi = _needed_key_range(grid, *args, axis, inside[0], inside[-1])
    if k_lo < lo or k_hi > hi:  # not one interval (never seen; then no overlap rather than a wrong result)
        return None
    return inside[0], inside[-1]


def nearby_attention_cp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size=3,
    causal=False,
    border: str = "truncate",
    scale: Optional[float] = None,
    backend: str = "auto",
    *,
    stride=1,
    dilation=1,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    group=None,
    axis: int = 0,
    return_lse: bool = False,
    overlap: bool = False,
    shard_lengths: Optional[Sequence[int]] = None,
):
    """Context-parallel :func:`nuwa_kernels.nearby_attention` (contract section 6a).

    Args:
        query, key, value: this rank's shards in grid layout ``(B, t, H, W, heads, D)`` (``axis=0``) or
            ``(B, T, h, W, heads, D)`` (``axis=1``): a contiguous slice of the global grid, the ranks of
            ``group`` holding consecutive slices in rank order (lengths may differ, each >= 1).
        kernel_size, causal, border, scale, backend, stride, dilation: as in ``nearby_attention``,
            applied to the *global* grid; every rank must pass the same values.
        additional_keys, additional_values: ``(B, S, heads_kv, D)``, identical on every rank; their
            gradients are this rank's contribution (sum them across ranks, as for any replicated input).
        group: a ``torch.distributed`` process group; default the world.
        axis: the sharded grid axis, ``0`` (frames) or ``1`` (rows).
        return_lse: also return this rank's shard of the log-sum-exp.
        overlap: compute the queries whose windows stay inside the own shard while the halo is in
            flight (two extra kernel launches; helps when the shard is much longer than the halo).
        shard_lengths: every rank's shard length along ``axis``, when the caller knows them (e.g. a
            model that sharded its input): skips the metadata all-gather, and with it the host-device
            synchronisation of reading its result on GPUs and the cross-rank argument check (ranks
            that then disagree hang or fail in the exchange instead of raising a clear error).

    Returns:
        this rank's shard of the output (and of the lse with ``return_lse``).

    Raises:
        ValueError on every rank when the ranks disagree about shapes or arguments, or a rank passes
        unusable inputs (checked with one small all-gather before any K/V moves).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("nearby_attention_cp needs an initialised torch.distributed process group")
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    digest = _digest(_triple(kernel_size), causal, border, scale, _triple(stride), _triple(dilation), axis)
    row, reason = _local_meta(query, key, value, axis, additional_keys, additional_values, digest)
    if shard_lengths is None:
        dev = _comm_device(group, query) if isinstance(query, Tensor) else torch.device("cpu")
        rows = _gather_meta(row, group, dev)
        _check_meta(rows, rank, reason)
        lengths = [r[1] for r in rows]
    else:
        lengths = [int(n) for n in shard_lengths]
        if reason:
            raise ValueError(f"nearby_attention_cp: {reason}")
        if len(lengths) != world or lengths[rank] != row[1] or min(lengths) < 1:
            raise ValueError(
                f"nearby_attention_cp: shard_lengths {list(shard_lengths)} must hold one length >= 1 per rank "
                f"({world}), this rank's ({rank}) equal to its shard's length along axis {axis} ({row[1]})"
            )
    grid = list(query.shape[1:4])
    grid[axis] = sum(lengths)
    grid = tuple(grid)
    bounds = shard_bounds(lengths)
    wargs = (kernel_size, causal, border, stride, dilation)
    needs = _needs(grid, *wargs, axis, bounds)
    plan = _plan_from(rank, bounds, needs)
    kw = dict(
        kernel_size=kernel_size,
        causal=causal,
        border=border,
        scale=scale,
        return_lse=True,
        backend=backend,
        stride=stride,
        dilation=dilation,
        additional_keys=additional_keys,
        additional_values=additional_values,
    )

    def origin(x):
        o = [0, 0, 0]
        o[axis] = x
        return tuple(o)

    if world == 1 or not (plan.recv or plan.send):
        out, lse = _slab_attention(query, key, value, origin(plan.own[0]), origin(plan.own[0]), grid, **kw)
        return (out, lse) if return_lse else out

    def attend_rows(lo, hi, k, v, k_lo):
        """``(lo, hi, out, lse)`` of the local query rows ``[lo, hi]`` (global coordinates) against keys
        ``k``/``v`` that start at global coordinate ``k_lo``."""
        q = _narrow(query, axis, lo - plan.own[0], hi - lo + 1)
        o, l = _slab_attention(q, k, v, origin(lo), origin(k_lo), grid, **kw)
        return lo, hi, o, l

    pending, bufs = _start_halo(key, value, plan, axis, group)
    parts_q = []  # (q_lo, q_hi, out, lse) in coordinate order
    inner = _interior(grid, axis, plan.own, wargs) if overlap and plan.recv else None
    if inner is not None:  # rows that need no halo: computed while the halo is in flight
        parts_q.append(attend_rows(inner[0], inner[1], key, value, plan.own[0]))
    k_slab, v_slab = _HaloSlab.apply(key, value, plan, axis, group, pending, bufs)
    if inner is None:
        todo = [plan.own]
    else:
        todo = [(lo, hi) for lo, hi in ((plan.own[0], inner[0] - 1), (inner[1] + 1, plan.own[1])) if lo <= hi]
    for lo, hi in todo:
        parts_q.append(attend_rows(lo, hi, k_slab, v_slab, plan.slab[0]))
    parts_q.sort(key=lambda p: p[0])
    if len(parts_q) == 1:
        out, lse = parts_q[0][2], parts_q[0][3]
    else:
        out = torch.cat([p[2] for p in parts_q], dim=1 + axis)
        lse = torch.cat([p[3] for p in parts_q], dim=1 + axis)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# sharding helpers (inputs in, outputs out)
# ----------------------------------------------------------------------------------------------


def even_shard_lengths(n: int, world: int) -> List[int]:
    """Shard lengths of ``n`` slices over ``world`` ranks, as even as possible (the first ranks longer)."""
    if n < world:
        raise ValueError(f"cannot shard {n} slices over {world} ranks: every rank needs at least one")
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def shard(x: Tensor, dim: int, group=None, lengths: Optional[Sequence[int]] = None) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (even shards unless ``lengths`` is given).

    ``x`` is the same on every rank (e.g. the input of a model run context-parallel); the result is a
    view. Gradients flow back into that slice only.
    """
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = list(lengths) if lengths is not None else even_shard_lengths(x.shape[dim], world)
    return x.narrow(dim, sum(lengths[:rank]), lengths[rank])


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, lengths: Tuple[int, ...], group):
        rank = dist.get_rank(group)
        ctx.dim, ctx.off, ctx.n = dim, sum(lengths[:rank]), lengths[rank]
        dev = _comm_device(group, x)
        longest = max(lengths)
        pad = list(x.shape)
        pad[dim] = longest
        buf = x.new_zeros(pad, device=dev)
        buf.narrow(dim, 0, x.shape[dim]).copy_(x)
        outs = [torch.empty_like(buf) for _ in lengths]
        dist.all_gather(outs, buf, group=group)
        return torch.cat([o.narrow(dim, 0, n) for o, n in zip(outs, lengths)], dim=dim).to(x.device)

    @staticmethod
    def backward(ctx, grad):
        # every rank computes the same function of the gathered tensor: its own slice's gradient is
        # the gradient of that slice (no sum over ranks, which would count the replicated loss `world` times)
        return grad.narrow(ctx.dim, ctx.off, ctx.n), None, None, None


def gather_lengths(n: int, group=None, device=None) -> Tuple[List[int], int]:
    """Every rank's ``n`` (e.g. its shard length; one small all-gather) and this rank's index."""
    group = group if group is not None else dist.group.WORLD
    ref = torch.empty(0, device=device) if device is not None else torch.empty(0)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device(group, ref))
    got = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, t, group=group)
    return [int(x.item()) for x in got], dist.get_rank(group)


def gather_shards(x: Tensor, dim: int, group=None, lengths: Optional[Sequence[int]] = None) -> Tensor:
    """Concatenate every rank's shard ``x`` along ``dim`` (uneven lengths allowed; all-gather).

    ``lengths``: every rank's shard length along ``dim``; gathered (one small all-gather) when not given.
    Differentiable: the backward hands each rank the gradient of its own slice, i.e. it treats what comes
    after the gather as replicated (every rank computes the same loss of the gathered tensor).
    """
    group = group if group is not None else dist.group.WORLD
    if lengths is None:
        lengths = gather_lengths(x.shape[dim], group, x.device)[0]
    return _GatherShards.apply(x, dim, tuple(int(n) for n in lengths), group)
