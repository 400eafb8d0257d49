"""Data-parallel second-order training on torch.distributed (two rings, a small MLP).

Each rank holds a shard of the batch; ``Optimizer(..., distributed=True)`` reduces the loss,
the gradient, the curvature (GGN products, its Woodbury factor) and the step's decisions (rho,
the Levenberg-Marquardt damping) over the ranks, so every rank takes the step of the whole
batch and ends with the same parameters. At the end rank 0 repeats the training in one process
on the whole batch and prints the largest difference (rounding only).

Run on one machine with 2 processes (gloo on CPU, NCCL when GPUs are visible)::

    torchrun --nproc_per_node=2 examples/distributed.py

on 2 machines with 4 processes each (run on both, node_rank 0 and 1)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST_OF_NODE_0:29500 examples/distributed.py

or without torchrun, as one process: ``python examples/distributed.py``.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import nn

import steepest

N, STEPS = 501, 12  # 501 samples: the shards are unequal on 2 ranks (251 and 250)


def data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noisy concentric rings, generated (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 2, (N,), generator=g)
    angle = torch.rand(N, generator=g, dtype=torch.float64) * 2 * torch.pi
    radius = 0.5 + 0.5 * label + 0.15 * torch.randn(N, generator=g, dtype=torch.float64)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return x.to(device), label.to(device)


def model(device: torch.device) -> nn.Module:
    torch.manual_seed(1)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double().to(device)


def fit(x: torch.Tensor, y: torch.Tensor, device: torch.device, distributed: bool) -> nn.Module:
    net = model(device)
    opt = steepest.Optimizer(
        net,
        steepest.CrossEntropy(),
        metric=steepest.GGN(),  # M = E[J^T H_L J], reduced over the ranks
        damping=steepest.LevenbergMarquardt(1e-2),  # lambda from rho, the same on every rank
        distributed=distributed,
    )
    talk = distributed and dist.get_rank() == 0
    for k in range(STEPS):
        info = opt.step(x, y)
        if talk and k % 3 == 2:
            print(
                f"step {k + 1:2d}  loss {info.loss:.4f}  lambda {info.damping:.2e}  "
                f"rho {info.rho:.2f}  solver {info.solver}"
            )
    return net


def train() -> dict:
    """Train on this rank's shard (the process group is initialised); rank 0 compares with
    one process on the whole batch. Returns what a test checks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if (dist.get_backend() == "nccl")
        else torch.device("cpu")
    )
    x, y = data(device)
    xs, ys = x[rank::world], y[rank::world]  # this rank's shard
    net = fit(xs, ys, device, distributed=True)
    mismatch = steepest.DataParallel().check_synchronized(net)  # 0.0: identical on every rank
    result = {"mismatch": mismatch, "world": world}
    if rank == 0:
        with torch.no_grad():
            result["accuracy"] = float((net(x).argmax(1) == y).double().mean())
        one = fit(x, y, device, distributed=False)
        theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        ref = torch.cat([p.detach().reshape(-1) for p in one.parameters()])
        result["difference"] = float((theta - ref).abs().max())
        print(
            f"{world} ranks: accuracy {result['accuracy']:.3f}, parameters identical on "
            f"every rank (max difference {mismatch:g}); against one process on the whole "
            f"batch: max |difference| {result['difference']:.1e}"
        )
    return result


def main() -> dict:
    if "RANK" not in os.environ:  # plain `python examples/distributed.py`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        return train()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
