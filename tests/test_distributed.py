"""nuwa_kernels.distributed: context-parallel nearby attention on gloo (CPU), one process per rank.

Every check compares a rank's shard of the output, the lse and the gradients with the single-process
op on the whole grid (``backend="reference"``, float64). Several checks share one spawn (process
start-up dominates); each spawn has a deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nuwa_kernels as nk
import nuwa_kernels.distributed as nkd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SPAWN_TIMEOUT_S = 90

# A fork server that has imported torch (and torch._dynamo, which the ops' first call imports) and
# nuwa_kernels starts the ranks in a fraction of a second instead of seconds each; it never runs an
# OpenMP region itself, so forking from it is safe. Plain spawn where there is no fork server.
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "nuwa_kernels", "nuwa"]
if "forkserver" in __import__("multiprocessing").get_all_start_methods():
    _START_METHOD = "forkserver"
    __import__("multiprocessing").get_context("forkserver").set_forkserver_preload(_PRELOAD)
else:
    _START_METHOD = "spawn"


# ----------------------------------------------------------------------------------------------
# spawning
# ----------------------------------------------------------------------------------------------


def _poison_empty():
    """As conftest.py does in the test process: ``torch.empty``/``empty_like`` return NaN-filled float
    tensors in the ranks too, so a receive buffer or output left unwritten fails the checks."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if type(t) is torch.Tensor and t.is_floating_point() and t.numel():
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poisoned(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poisoned(real_empty_like(*a, **k))


def _entry(rank, world, init_file, fn, args):
    torch.set_num_threads(1)
    _poison_empty()
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=45)
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world, fn, *args, timeout=SPAWN_TIMEOUT_S):
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined by gloo (loopback file init)."""
    fd, init_file = tempfile.mkstemp(prefix="nuwa_cp_")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    ctx = mp.start_processes(
        _entry, args=(world, init_file, fn, args), nprocs=world, join=False, start_method=_START_METHOD
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"ranks did not finish within {timeout} s (a hang)")
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


# ----------------------------------------------------------------------------------------------
# the checks (run inside the ranks)
# ----------------------------------------------------------------------------------------------


def _supports(name):
    return name in inspect.signature(nk.nearby_attention).parameters


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _shard(t, axis, lengths, rank):
    off = sum(lengths[:rank])
    return t.narrow(1 + axis, off, lengths[rank])


def _check_case(rank, world, case, group=None, group_ranks=None):
    """One case: out, lse, dq, dk, dv (and d additional k/v) against the whole-grid op."""
    grid, axis, lengths = case["grid"], case["axis"], case["lengths"]
    me = rank if group_ranks is None else group_ranks.index(rank)
    dtype = case.get("dtype", torch.float64)
    B, heads, heads_kv, D = case.get("B", 1), case.get("heads", 2), case.get("heads_kv", 1), 4
    opts = {k: case[k] for k in ("kernel_size", "causal", "border", "stride", "dilation") if k in case}
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = mk(B, *grid, heads, D), mk(B, *grid, heads_kv, D), mk(B, *grid, heads_kv, D)
    g_out, g_lse = mk(B, *grid, heads, D), mk(B, *grid, heads)
    extra = {}
    S = case.get("extra", 0)
    if S:
        extra = dict(additional_keys=mk(B, S, heads_kv, D), additional_values=mk(B, S, heads_kv, D))

    # the single-process op on the whole grid
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *extra.values())]
    ref_extra = dict(zip(extra, leaves[3:]))
    out, lse = nk.nearby_attention(*leaves[:3], **opts, return_lse=True, backend="reference", **ref_extra)
    want = [out, lse, *torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), leaves)]

    # this rank's shard through the context-parallel op
    sh = lambda t: _shard(t, axis, lengths, me)  # noqa: E731
    mine = [sh(t).clone().requires_grad_() for t in (q, k, v)]
    mine_extra = {n: t.clone().requires_grad_() for n, t in extra.items()}
    out, lse = nkd.nearby_attention_cp(
        *mine,
        **opts,
        return_lse=True,
        backend=case.get("backend", "reference"),
        group=group,
        axis=axis,
        overlap=case.get("overlap", False),
        **mine_extra,
    )
    grads = torch.autograd.grad(
        (out * sh(g_out)).sum() + (lse * sh(g_lse)).sum(), mine + list(mine_extra.values())
    )
    extra_grads = [g.clone() for g in grads[3:]]
    for g in extra_grads:  # each rank holds its contribution: sum them
        dist.all_reduce(g, group=group)
    got = [out, lse, *grads[:3], *extra_grads]
    want = [sh(w) for w in want[:5]] + want[5:]
    tol = case.get("tol", 1e-10)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "d_add_k", "d_add_v"), got, want):
        assert a.shape == b.shape, (case, name, a.shape, b.shape)
        err = rel(a.double(), b.double())
        assert err < tol, f"rank {rank} {name}: rel err {err:.2e} in {case}"


def _check_mismatch(rank, world):
    grid = (4, 3, 3)
    q = torch.randn(1, 2, *grid[1:], 2, 4, dtype=torch.float64)
    # a rank with another frame size: a clear error on every rank
    bad = torch.randn(1, 2, 3, 4, 2, 4, dtype=torch.float64) if rank == 1 else q
    with _raises("every rank must pass the same grid dim"):
        nkd.nearby_attention_cp(bad, bad, bad, 3, backend="reference")
    # a rank with another window
    with _raises("window arguments"):
        nkd.nearby_attention_cp(q, q, q, 3 if rank else 5, backend="reference")
    # a rank with unusable inputs (5-D)
    with _raises("unusable inputs"):
        nkd.nearby_attention_cp(q[0] if rank == 0 else q, q, q, 3, backend="reference")
    # and the group still works afterwards
    out = nkd.nearby_attention_cp(q, q, q, 3, backend="reference")
    assert out.shape == q.shape
    # known shard lengths skip the metadata exchange; a wrong own length is caught locally
    again = nkd.nearby_attention_cp(q, q, q, 3, backend="reference", shard_lengths=[2, 2])
    assert torch.equal(again, out)
    with _raises("shard_lengths"):
        nkd.nearby_attention_cp(q, q, q, 3, backend="reference", shard_lengths=[3, 1])
    # second-order gradients through the exchange: a clear error, not a wrong gradient
    k = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(
        nkd.nearby_attention_cp(q, k, k, 3, backend="reference").sum(), k, create_graph=True
    )
    try:
        g.square().sum().backward()
    except RuntimeError as e:
        assert "once_differentiable" in str(e) or "differentiable" in str(e), str(e)
    else:
        raise AssertionError("a double backward through the halo exchange did not raise")


class _raises:
    def __init__(self, match):
        self.match = match

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        assert typ is ValueError, f"expected ValueError matching {self.match!r}, got {typ}: {exc}"
        assert self.match in str(exc), str(exc)
        return True


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------

FRAME_CAUSAL = (True, False, False)

CASES_2 = [
    # frames, uneven shards, every causal mode and both borders
    dict(grid=(5, 3, 4), axis=0, lengths=[2, 3], kernel_size=3),
    dict(grid=(5, 3, 4), axis=0, lengths=[3, 2], kernel_size=(3, 3, 3), causal=True, heads_kv=2, B=2),
    dict(grid=(6, 3, 3), axis=0, lengths=[1, 5], kernel_size=(4, 3, 3), causal=FRAME_CAUSAL, border="shift"),
    dict(grid=(6, 3, 3), axis=0, lengths=[4, 2], kernel_size=(5, 2, 3), border="shift", overlap=True),
    # rows
    dict(grid=(3, 5, 3), axis=1, lengths=[2, 3], kernel_size=(3, 3, 3), causal=True),
    dict(
        grid=(2, 6, 3),
        axis=1,
        lengths=[4, 2],
        kernel_size=(2, 4, 3),
        border="shift",
        causal=(False, True, False),
    ),
    dict(grid=(2, 7, 3), axis=1, lengths=[5, 2], kernel_size=3, overlap=True, causal=(True, True, True)),
    # a whole-axis window on the sharded axis: every rank needs every key
    dict(grid=(4, 2, 3), axis=0, lengths=[1, 3], kernel_size=(None, 1, 3)),
    # generalised windows (contract 3a / 5a)
    dict(grid=(6, 3, 4), axis=0, lengths=[3, 3], kernel_size=(4, 3, 3), stride=(2, 1, 3), border="shift"),
    dict(grid=(7, 3, 3), axis=0, lengths=[3, 4], kernel_size=3, dilation=(2, 1, 1), causal=FRAME_CAUSAL),
    dict(
        grid=(3, 6, 3),
        axis=1,
        lengths=[2, 4],
        kernel_size=3,
        stride=(1, 2, 1),
        dilation=(1, 2, 1),
        causal=True,
    ),
    dict(grid=(4, 3, 3), axis=0, lengths=[2, 2], kernel_size=3, extra=3, causal=True),
]

CASES_3 = [
    # a shard shorter than the halo: rank 2 gathers from ranks 0 and 1
    dict(grid=(7, 2, 3), axis=0, lengths=[2, 1, 4], kernel_size=(7, 3, 3)),
    dict(grid=(5, 2, 2), axis=0, lengths=[1, 1, 3], kernel_size=(5, 3, 3), causal=True, border="shift"),
    dict(grid=(2, 6, 3), axis=1, lengths=[1, 2, 3], kernel_size=(3, 5, 3), causal=(False, True, False)),
    dict(
        grid=(6, 2, 3), axis=0, lengths=[2, 2, 2], kernel_size=(3, 3, 3), dilation=(3, 1, 1), border="shift"
    ),
]

CASES_4 = [
    dict(grid=(2, 7, 3), axis=1, lengths=[1, 2, 1, 3], kernel_size=(3, 5, 3), causal=True),
    dict(grid=(8, 2, 2), axis=0, lengths=[3, 1, 2, 2], kernel_size=(5, 3, 3), border="shift", overlap=True),
    dict(grid=(6, 2, 2), axis=0, lengths=[1, 1, 1, 3], kernel_size=(3, 3, 3), causal=FRAME_CAUSAL, extra=2),
]


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


def _check_cases(rank, world, cases, members=None):
    """Run ``cases`` on the sub-group of ``members`` (all ranks must call; the others wait)."""
    group = None if members is None else dist.new_group(members)
    if members is None or rank in members:
        for case in cases:
            if any(k in case and not _supports(k) for k in ("stride", "dilation")) or (
                case.get("extra") and not _supports("additional_keys")
            ):
                continue  # the single-process op lacks the argument (yet)
            _check_case(rank, world, case, group=group, group_ranks=members)
    dist.barrier()


def _run_4(rank, world):
    _check_cases(rank, world, CASES_2, members=[1, 3])  # a 2-rank group whose ranks are not 0, 1
    _check_cases(rank, world, CASES_3, members=[0, 2, 3])
    _check_cases(rank, world, CASES_4)


def test_world_sizes_two_three_four():
    """2- and 3-rank groups inside a 4-rank world (one spawn), then the whole world."""
    run_ranks(4, _run_4)


def _run_2(rank, world):
    _check_cases(rank, world, CASES_2[:2])
    _check_mismatch(rank, world)
    # half precision over gloo, against the single-process op in the same dtype
    _check_case(rank, world, dict(grid=(4, 3, 4), axis=1, lengths=[1, 2], kernel_size=3, causal=True,
                                  dtype=torch.bfloat16, tol=1e-2))
    if nk.available_backends()["cpu"][0]:  # the fused C++ kernel on a slab
        _check_case(
            rank,
            world,
            dict(
                grid=(5, 4, 4),
                axis=0,
                lengths=[3, 2],
                kernel_size=3,
                causal=True,
                backend="cpu",
                dtype=torch.float32,
                tol=1e-5,
            ),
        )
    _model_checks(rank, world)
    _nuwa_checks(rank, world)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return
    _wan_checks(rank, world)


def _nuwa_checks(rank, world):
    """Nuwa.set_context_parallel: the decoder on shards (halo self-attention, slab cross-attention to a
    video condition of another grid size) equals the single-process model, logits and gradients."""
    from nuwa import Nuwa, NuwaConfig

    cfg = NuwaConfig.tiny(cross_kernel_size=(3, 3, 3), backend="reference")
    gen = torch.Generator().manual_seed(2)
    cond = torch.randint(0, 32, (2, 3, 2, 2), generator=gen)
    for axis, tgrid in ((0, (3, 4, 4)), (1, (2, 5, 4))):
        target = torch.randint(0, 16, (2, *tgrid), generator=gen)
        torch.manual_seed(0)
        single = Nuwa(cfg).double()
        torch.manual_seed(0)
        cp = Nuwa(cfg).double()
        cp.set_context_parallel(dist.group.WORLD, axis)
        want, got = single(cond, target), cp(cond, target)
        assert rel(got, want) < 1e-10
        single.loss(cond, target).backward()
        cp.loss(cond, target).backward()
        for (n, p), q in zip(cp.named_parameters(), single.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)
            assert rel(g, q.grad) < 1e-9, (n, rel(g, q.grad))


def _wan_checks(rank, world):
    """apply_nearby_attention(process_group=...) on a tiny Wan equals the single-process model."""
    from diffusers import WanTransformer3DModel

    from nuwa.integrations.diffusers import apply_nearby_attention

    def tiny_wan():
        torch.manual_seed(0)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )

    gen = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 8, 8, generator=gen),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
        return_dict=False,
    )
    per_token = torch.randint(0, 1000, (2, 48), generator=gen)  # Wan 2.2 TI2V: a timestep per token
    for axis, ks, timestep in ((0, (3, 3, 3), inputs["timestep"]), (1, (2, 3, 3), per_token)):
        inputs["timestep"] = timestep
        single, cp = tiny_wan(), tiny_wan()
        apply_nearby_attention(single, kernel_size=ks, backend="reference")
        handle = apply_nearby_attention(
            cp, kernel_size=ks, backend="reference", process_group=dist.group.WORLD, shard_axis=axis
        )
        want = single(**inputs)[0]
        got = cp(**inputs)[0]
        assert got.shape == want.shape and rel(got, want) < 1e-5, rel(got, want)
        want.square().mean().backward()
        got.square().mean().backward()
        for (n, p), q in zip(cp.named_parameters(), single.parameters()):
            if q.grad is None:
                continue
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank holds the gradient of its tokens
            assert rel(g, q.grad) < 1e-4, (n, rel(g, q.grad))
        handle.remove()
        with torch.no_grad():  # removed: the plain model again (no sharding hooks)
            assert torch.equal(cp(**inputs)[0], tiny_wan()(**inputs)[0])


def test_two_ranks_errors_models():
    """The default (world) group; inconsistent inputs raise on every rank; nuwa modules."""
    run_ranks(2, _run_2)


def _model_checks(rank, world):
    """nuwa.NearbyAttention with a process group equals the single-process module."""
    from nuwa import NearbyAttention

    for axis, causal in ((0, True), (1, (True, False, False))):
        grid, lengths = ((5, 3, 4), [2, 3]) if axis == 0 else ((3, 5, 4), [3, 2])
        torch.manual_seed(0)
        kw = dict(heads=2, num_kv_heads=1, kernel_size=3, causal=causal, backend="reference")
        attn = NearbyAttention(8, **kw).double()
        cp = NearbyAttention(8, **kw, process_group=dist.group.WORLD, shard_axis=axis).double()
        cp.load_state_dict(attn.state_dict())
        x = torch.randn(2, *grid, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        want = attn(x)
        (want * want).sum().backward()
        got = cp(_shard(x, axis, lengths, rank))
        (got * got).sum().backward()
        assert rel(got, _shard(want, axis, lengths, rank)) < 1e-10
        for (n, p), q in zip(cp.named_parameters(), attn.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)
            assert rel(g, q.grad) < 1e-10, n


# ----------------------------------------------------------------------------------------------
# planning (no processes)
# ----------------------------------------------------------------------------------------------


def test_halo_plan_is_the_halo():
    halo_plan = nkd.halo_plan

    p = halo_plan((8, 4, 4), [3, 2, 3], 1, axis=0, kernel_size=3)
    assert p.own == (3, 4) and p.slab == (2, 5)
    assert p.recv == ((0, 2, 2), (2, 5, 5)) and p.send == ((0, 3, 3), (2, 4, 4))
    # raster causal on frames: keys only from the left
    p = halo_plan((8, 4, 4), [3, 2, 3], 1, axis=0, kernel_size=3, causal=True)
    assert p.recv == ((0, 2, 2),) and p.send == ((2, 4, 4),)
    # a shard shorter than the halo: several owners
    p = halo_plan((7, 2, 2), [2, 1, 4], 2, axis=0, kernel_size=7)
    assert [r[0] for r in p.recv] == [0, 1] and p.slab == (0, 6)


def test_traffic_is_the_halo_not_the_grid():
    cp_traffic_bytes = nkd.cp_traffic_bytes

    grid = (32, 8, 8)
    per = cp_traffic_bytes(grid, 4, 0, (3, 3, 3), heads_kv=2, head_dim=8, itemsize=4)
    frame = 8 * 8 * 2 * 2 * 8 * 4  # one frame of K and V
    assert per == [frame, 2 * frame, 2 * frame, frame]


def test_traffic_benchmark_figures():
    """benchmarks/cp_traffic.py's computed HunyuanVideo figures (no processes)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from benchmarks import cp_traffic
    finally:
        sys.path.pop(0)
    rows = cp_traffic.computed_rows()
    assert all(r["halo_max"] < r["allgather"] for r in rows)
    small = [r for r in rows if tuple(r["window"]) == (3, 3, 3)]
    assert all(r["allgather"] > 10 * r["halo_max"] for r in small)
    assert "HunyuanVideo" in cp_traffic.markdown([], rows)
