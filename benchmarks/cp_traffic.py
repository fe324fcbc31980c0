"""Context-parallel traffic: halo exchange (``nuwa_kernels.distributed``) against all-gather K/V.

``python -m benchmarks.cp_traffic`` does two things:

1. **Measured** (gloo on CPU, one process per rank, loopback only): for world sizes 2 and 4, the bytes
   each rank sends in one forward of :func:`nearby_attention_cp` (counted at the point-to-point calls)
   and the wall time of the forward and of forward + backward, against the all-gather baseline (every
   rank all-gathers K and V, then attends its queries to the whole grid: what context-parallel *full*
   attention sends, Ulysses and ring attention alike, to first order; the same attention kernel runs
   in both, so the difference is the communication).
2. **Computed** (no processes): the same per-rank figures for HunyuanVideo's latent grid
   ``(30, 48, 80)``, 24 heads, D = 128, bfloat16, for 8 and 64 GPUs, with the halo plan of the real
   code (``nuwa_kernels.distributed.cp_traffic_bytes``) and the textbook volumes of all-gather,
   ring attention and Ulysses.

Writes ``benchmarks/results/<slug>/cp_traffic.md`` and ``.json`` (``--out``), prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURED = dict(grid=(16, 24, 24), heads=4, head_dim=32, kernel_size=(3, 7, 7), causal=False, axis=0, batch=1)
HUNYUAN = dict(grid=(30, 48, 80), heads=24, head_dim=128, itemsize=2)
_LOAD = ["?", "?"]
WINDOWS = {"(18, 24, 24)": (18, 24, 24), "(6, 8, 8)": (6, 8, 8), "(3, 3, 3)": (3, 3, 3)}


# ----------------------------------------------------------------------------------------------
# measured
# ----------------------------------------------------------------------------------------------


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


class _AllGatherKV(torch.autograd.Function):
    """The baseline: all-gather K and V (padded to the longest shard); backward sends every remote
    slice's gradient to its owner (point-to-point, the volume of a reduce-scatter) and sums there."""

    @staticmethod
    def forward(ctx, k, v, axis, lengths):
        rank, world = dist.get_rank(), dist.get_world_size()
        ctx.axis, ctx.lengths, ctx.rank = axis, lengths, rank
        n = max(lengths)
        pad = lambda t: torch.nn.functional.pad(
            t, (0, 0, 0, 0) + (0, 0) * (2 - axis) + (0, n - t.shape[1 + axis])
        )  # noqa: E731
        kv = torch.cat([pad(k), pad(v)], -1).contiguous()
        got = [torch.empty_like(kv) for _ in range(world)]
        dist.all_gather(got, kv)
        full = torch.cat([t.narrow(1 + axis, 0, lengths[r]) for r, t in enumerate(got)], 1 + axis)
        d = k.shape[-1]
        return full[..., :d], full[..., d:]

    @staticmethod
    def backward(ctx, gk, gv):
        axis, lengths, rank = ctx.axis, ctx.lengths, ctx.rank
        g = torch.cat([gk, gv], -1)
        offs = [sum(lengths[:r]) for r in range(len(lengths))]
        ops, bufs = [], []
        for r in range(len(lengths)):
            if r == rank:
                continue
            ops.append(dist.P2POp(dist.isend, g.narrow(1 + axis, offs[r], lengths[r]).contiguous(), r))
            buf = torch.empty_like(g.narrow(1 + axis, offs[rank], lengths[rank]))
            bufs.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, r))
        for w in dist.batch_isend_irecv(ops) if ops else []:
            w.wait()
        mine = g.narrow(1 + axis, offs[rank], lengths[rank]).clone()
        for b in bufs:
            mine += b
        d = gk.shape[-1]
        return mine[..., :d], mine[..., d:], None, None


def _worker(rank, world, init_file, cfg, reps, out_file):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    import nuwa_kernels as nk
    import nuwa_kernels.distributed as nkd

    sent = {"bytes": 0}
    real_exchange = nkd._exchange

    def counting_exchange(send, recv, group):
        sent["bytes"] += sum(b.numel() * b.element_size() for _, b in send)
        return real_exchange(send, recv, group)

    nkd._exchange = counting_exchange
    grid, axis = cfg["grid"], cfg["axis"]
    lengths = nkd.even_shard_lengths(grid[axis], world)
    local = list(grid)
    local[axis] = lengths[rank]
    B, h, D = cfg["batch"], cfg["heads"], cfg["head_dim"]
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(B, *local, h, D, generator=g) for _ in range(3))
    kw = dict(kernel_size=cfg["kernel_size"], causal=cfg["causal"], backend="cpu")
    off = sum(lengths[:rank])

    def halo():
        return nkd.nearby_attention_cp(q, k, v, **kw, axis=axis)

    def halo_overlap():
        return nkd.nearby_attention_cp(q, k, v, **kw, axis=axis, overlap=True)

    def allgather():
        K, V = _AllGatherKV.apply(k, v, axis, tuple(lengths))
        o = [0, 0, 0]
        o[axis] = off
        return nk.nearby_attention_slab(q, K, V, nk.Slab(tuple(o), (0, 0, 0), tuple(grid), tuple(grid)), **kw)

    with torch.no_grad():
        a, b, c = halo(), halo_overlap(), allgather()
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5) and torch.allclose(b, c, rtol=1e-4, atol=1e-5)
    needs = nkd._needs(tuple(grid), cfg["kernel_size"], cfg["causal"], "truncate", 1, 1, axis,
                       nkd.shard_bounds(lengths))
    plan = nkd._plan_from(rank, nkd.shard_bounds(lengths), needs)

    def halo_comm():  # the exchange alone
        pending, _ = nkd._start_halo(k, v, plan, axis, dist.group.WORLD)
        pending.wait()

    def allgather_comm():
        with torch.no_grad():
            _AllGatherKV.apply(k, v, axis, tuple(lengths))

    res = {}
    for name, fn, modes in (
        ("halo", halo, ("fwd", "fwd+bwd")),
        ("halo+overlap", halo_overlap, ("fwd", "fwd+bwd")),
        ("allgather", allgather, ("fwd", "fwd+bwd")),
        ("halo", halo_comm, ("comm",)),
        ("halo+overlap", halo_comm, ("comm",)),
        ("allgather", allgather_comm, ("comm",)),
    ):
        for mode in modes:
            times = []
            for i in range(reps + 1):
                for t in (q, k, v):
                    t.requires_grad_(mode == "fwd+bwd")
                    t.grad = None
                sent["bytes"] = 0
                dist.barrier()
                t0 = time.perf_counter()
                out = fn()
                if mode == "fwd+bwd":
                    out.sum().backward()
                dist.barrier()
                if i:
                    times.append(time.perf_counter() - t0)
            res[(name, mode)] = (_median(times), sent["bytes"])
    rows = [None] * world
    dist.all_gather_object(rows, {f"{a}|{b}": v for (a, b), v in res.items()})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def measure(world: int, reps: int, cfg=MEASURED):
    fd, init_file = tempfile.mkstemp(prefix="nuwa_cp_bench_")
    os.close(fd)
    os.unlink(init_file)
    out_file = init_file + ".json"
    mp.start_processes(
        _worker, args=(world, init_file, cfg, reps, out_file), nprocs=world, join=True, start_method="spawn"
    )
    with open(out_file) as f:
        rows = json.load(f)
    os.unlink(out_file)
    import nuwa_kernels.distributed as nkd

    grid, axis = cfg["grid"], cfg["axis"]
    lengths = nkd.even_shard_lengths(grid[axis], world)
    slice_bytes = cfg["batch"] * cfg["heads"] * cfg["head_dim"] * 2 * 4 * math.prod(grid) // grid[axis]
    out = []
    for mode in ("comm", "fwd", "fwd+bwd"):
        halo_t = max(r[f"halo|{mode}"][0] for r in rows)
        ov_t = max(r[f"halo+overlap|{mode}"][0] for r in rows)
        ag_t = max(r[f"allgather|{mode}"][0] for r in rows)
        halo_b = max(r["halo|fwd"][1] for r in rows)
        assert halo_b == max(r["halo|comm"][1] for r in rows)
        ag_b = max((world - 1) * lengths[r] * slice_bytes for r in range(world))
        out.append(
            dict(
                world=world,
                mode=mode,
                halo_ms=halo_t * 1e3,
                overlap_ms=ov_t * 1e3,
                allgather_ms=ag_t * 1e3,
                halo_bytes=halo_b,
                allgather_bytes=ag_b,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# computed
# ----------------------------------------------------------------------------------------------


def computed(gpus: int, cp: int, axis: int, window, cfg=HUNYUAN):
    """Per-rank bytes of one attention forward for a ``cp``-way context-parallel group."""
    import nuwa_kernels.distributed as nkd

    grid, heads, D, isz = cfg["grid"], cfg["heads"], cfg["head_dim"], cfg["itemsize"]
    sends = nkd.cp_traffic_bytes(grid, cp, axis, window, heads_kv=heads, head_dim=D, itemsize=isz)
    lengths = nkd.even_shard_lengths(grid[axis], cp)
    per_slice = heads * D * isz * math.prod(grid) // grid[axis]  # one of Q, K, V or O for one slice
    shard = max(lengths) * per_slice
    return dict(
        gpus=gpus,
        cp=cp,
        axis="t" if axis == 0 else "h",
        window=window,
        halo_max=max(sends),
        halo_mean=sum(sends) / cp,
        allgather=(cp - 1) * 2 * shard,  # K and V to every other rank
        ring=(cp - 1) * 2 * shard,  # K and V passed cp - 1 hops (forward)
        # all-to-all of Q, K, V and O; Ulysses splits the heads, so needs heads % cp == 0
        ulysses=4 * (cp - 1) * shard // cp if heads % cp == 0 else None,
    )


def computed_rows():
    rows = []
    for window in WINDOWS.values():
        rows.append(computed(8, 8, 0, window))
        rows.append(computed(8, 8, 1, window))
        # 64 GPUs: 30 frames and 48 rows cannot be split 64 ways along one axis; context parallelism
        # over 32 ranks (rows) times 2-way CFG/data parallelism uses all 64.
        rows.append(computed(64, 32, 1, window))
        rows.append(computed(64, 48, 1, window))
    return rows


def _mb(x):
    return f"{x / 2**20:,.1f}"


def markdown(measured, comp) -> str:
    m = MEASURED
    lines = [
        "# Context-parallel traffic: halo exchange vs all-gather",
        "",
        f"## Measured: gloo on CPU, loopback, grid {m['grid']}, window {m['kernel_size']}, {m['heads']} heads, "
        f"D={m['head_dim']}, float32, sharded on frames, `cpu` kernel, 1 thread per rank",
        "",
        f"Load average before / after the measurement: {_LOAD[0]} / {_LOAD[1]} (on {os.cpu_count()} cores); median "
        "of the reps, the slowest rank.",
        "",
        "Pass `comm`: the exchange alone (halo point-to-point vs all-gather of K and V); `fwd`, `fwd+bwd`: "
        "the whole op (the baseline then attends to the gathered grid and sends remote gradients back).",
        "",
        "| ranks | pass | halo: MiB sent / rank | all-gather: MiB sent / rank | halo ms | halo + overlap ms | all-gather ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in measured:
        overlap = "-" if r["mode"] == "comm" else f"{r['overlap_ms']:.1f}"
        lines.append(
            f"| {r['world']} | {r['mode']} | {_mb(r['halo_bytes'])} | {_mb(r['allgather_bytes'])} | "
            f"{r['halo_ms']:.1f} | {overlap} | {r['allgather_ms']:.1f} |"
        )
    h = HUNYUAN
    lines += [
        "",
        f"## Computed: HunyuanVideo grid {h['grid']}, {h['heads']} heads, D={h['head_dim']}, bf16, one attention "
        "forward, MiB sent per rank",
        "",
        "Halo: the plan of `nearby_attention_cp` (max and mean over ranks). All-gather and ring attention send "
        "K and V of the shard to every other rank; Ulysses all-to-alls Q, K, V and O. Backward sends as much "
        "again (gradients of the halo back to their owners; ring attention passes dK/dV around the ring).",
        "",
        "| GPUs | CP ranks | axis | window | halo max | halo mean | all-gather / ring | Ulysses | all-gather / halo max |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in comp:
        lines.append(
            f"| {r['gpus']} | {r['cp']} | {r['axis']} | {tuple(r['window'])} | {_mb(r['halo_max'])} | "
            f"{_mb(r['halo_mean'])} | {_mb(r['allgather'])} | "
            f"{_mb(r['ulysses']) if r['ulysses'] is not None else 'n/a (heads % CP != 0)'} | "
            f"{r['allgather'] / max(r['halo_max'], 1):.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4", help="world sizes to measure (comma separated; '' = none)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu-amd-epyc-2t"))
    args = ap.parse_args(argv)
    _LOAD[0] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    measured = []
    for w in [int(x) for x in args.worlds.split(",") if x]:
        measured += measure(w, args.reps)
    _LOAD[1] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    comp = computed_rows()
    md = markdown(measured, comp)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cp_traffic.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "cp_traffic.json"), "w") as f:
            json.dump(
                dict(measured=measured, computed=comp, measured_case=MEASURED, hunyuan=HUNYUAN),
                f,
                indent=1,
                default=list,
            )


if __name__ == "__main__":
    main()
