"""Run nearby attention context-parallel: one video grid sharded across processes (halo exchange).

    torchrun --nproc-per-node 2 examples/context_parallel.py                    # gloo, CPU
    torchrun --nproc-per-node 8 examples/context_parallel.py --device cuda      # NCCL, one GPU per rank
    torchrun --nproc-per-node 4 examples/context_parallel.py --axis 1 --grid 8 32 32

Every rank builds the same model (same seed) and the same input; each runs a stack of
``nuwa.NearbyAttention`` layers on its shard of the grid along ``--axis`` (frames or rows) with
``process_group=`` set, so the layers exchange only the window's halo with their neighbours. Rank 0
then checks the gathered output and the summed parameter gradients against one process on the
whole grid, and every rank prints what it sent.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import nuwa_kernels.distributed as nkd
from nuwa import NearbyAttention
from nuwa.modules import set_context_parallel


def build(dim, heads, kernel_size, causal, layers):
    torch.manual_seed(0)
    return nn.Sequential(
        *[NearbyAttention(dim, heads=heads, kernel_size=kernel_size, causal=causal) for _ in range(layers)]
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 16, 16))
    ap.add_argument("--axis", type=int, default=0, choices=(0, 1))
    ap.add_argument("--kernel-size", type=int, nargs=3, default=(3, 7, 7))
    ap.add_argument("--causal", action="store_true", help="raster-order causal")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32

    model = build(args.dim, args.heads, tuple(args.kernel_size), args.causal, args.layers).to(dev, dtype)
    set_context_parallel(
        model, dist.group.WORLD, shard_axis=args.axis
    )  # every self-attention NearbyAttention
    x = torch.randn(1, *args.grid, args.dim, generator=torch.Generator().manual_seed(1)).to(dev, dtype)

    sent = {"bytes": 0}
    exchange = nkd._exchange

    def counting(send, recv, group):  # count what this rank sends (forward halo and backward gradients)
        sent["bytes"] += sum(b.numel() * b.element_size() for _, b in send)
        return exchange(send, recv, group)

    nkd._exchange = counting
    local = nkd.shard(x, 1 + args.axis)  # this rank's frames (rows)
    out = model(local)
    fwd_bytes = sent["bytes"] / args.layers  # per layer, forward (the backward sends as much again)
    out.square().sum().backward()  # the global loss is the sum of the ranks' losses
    full = nkd.gather_shards(out.detach(), 1 + args.axis)
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)  # each rank holds the gradient of its own tokens
    kv_shard = 2 * args.dim * local[0, ..., 0].numel() * local.element_size()  # K and V of the shard
    print(
        f"rank {rank}/{world}: shard {tuple(local.shape[1:4])}, sends {fwd_bytes / 2**10:.1f} KiB of K/V per "
        f"layer forward; all-gather of K/V would send {(world - 1) * kv_shard / 2**10:.1f} KiB"
    )
    if rank == 0:  # one process on the whole grid
        ref = build(args.dim, args.heads, tuple(args.kernel_size), args.causal, args.layers).to(dev, dtype)
        want = ref(x)
        want.square().sum().backward()
        err = ((full - want).norm() / want.norm()).item()
        gerr = max(((g - p.grad).norm() / p.grad.norm()).item() for g, p in zip(grads, ref.parameters()))
        print(f"rank 0: output rel err {err:.2e}, parameter gradient rel err {gerr:.2e} against one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
