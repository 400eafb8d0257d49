"""Data parallelism on torch.distributed: time per step and communication volume per step.

For each metric of Table 1 and solver (Cholesky, CG, Woodbury where the metric has a factor),
an MLP is trained for a few steps with ``Optimizer(..., distributed=DataParallel())`` on R
processes (gloo on CPU; R = 1 and 2 by default), each holding N / R samples of the same batch,
and with R = 1 also without ``distributed`` (the single-process baseline). Measured per
configuration:

- the wall time of one step on rank 0 (median over the steps after a warm-up step, then the
  median and the spread over the repeats; the R values are launched in turn, repeat by repeat),
- the bytes each rank hands to collectives per step (``DataParallel.bytes_sent``: the payload
  of every all_reduce, broadcast and all_gather; an all_reduce of b bytes moves about 2 b (R-1)/R
  bytes per rank in a ring), which depends on the metric and solver, not on R (except the
  padding of a gathered factor).

Run::

    python benchmarks/distributed.py --out benchmarks/results/distributed.json
    python benchmarks/distributed.py --markdown benchmarks/results/distributed.json  # table

Options: ``--procs 1 2``, ``--repeats 3``, ``--steps 3``, ``--n 256``, ``--hidden 16``,
``--threads 1`` (torch threads per process). On a machine with 2 cores, 2 processes of 1 thread
each use both cores; the speed-up is bounded by the cores, and by the load of other users: the
load average is written into the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import steepest as st

D_IN, C = 16, 4
METRICS = {
    "Identity": st.Identity,
    "GaussNewton": st.GaussNewton,
    "GGN": st.GGN,
    "Fisher": st.Fisher,
    "EmpiricalFisher": st.EmpiricalFisher,
    "GradientCovariance": st.GradientCovariance,
    "Hessian": st.Hessian,
    "KFAC": lambda: st.KFAC(st.GGN()),
    "KFAC-spread": lambda: st.KFAC(st.GGN(), spread_inverses=True),
}
FACTORED = {"GaussNewton", "GGN", "Fisher", "EmpiricalFisher", "GradientCovariance"}


def configs() -> list[tuple[str, str]]:
    kfac = [("KFAC", "auto"), ("KFAC-spread", "auto")]  # its own inverse
    return kfac + [
        (m, s)
        for m in METRICS
        if not m.startswith("KFAC")
        for s in ("cholesky", "cg", "woodbury")
        if s != "woodbury" or m in FACTORED
    ]


def problem(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, C, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(n, C, generator=g, dtype=torch.float64)).argmax(1)
    return x.to(device), y.to(device)


def model(hidden: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, C))
    return net.double().to(device)


def solver(name: str) -> st.solvers.Solver | str:
    return st.CG(tol=1e-10, maxiter=50) if name == "cg" else name


def measure(metric: str, solv: str, x, y, hidden: int, steps: int, dp) -> dict:
    m = model(hidden, x.device)
    opt = st.Optimizer(
        m,
        st.CrossEntropy(),
        metric=METRICS[metric](),
        solver=solver(solv),
        damping=st.LevenbergMarquardt(1e-1),
        distributed=dp,
    )
    times, sent = [], []
    for k in range(steps + 1):  # step 0 warms up
        if dp is not None:
            dist.barrier()
        before = 0 if dp is None else dp.bytes_sent
        t0 = time.perf_counter()
        opt.step(x, y)
        if x.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if k:
            times.append(dt)
            sent.append((0 if dp is None else dp.bytes_sent) - before)
    return {"step_s": statistics.median(times), "bytes": statistics.median(sent)}


def worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(args["threads"])
    device = "cpu"
    if args["backend"] == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        args["backend"],
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        x, y = problem(args["n"], device)
        xs, ys = x[rank::world], y[rank::world]
        dp = st.DataParallel()
        res = {}
        for metric, solv in configs():
            res[f"{metric}/{solv}"] = measure(
                metric, solv, xs, ys, args["hidden"], args["steps"], dp
            )
            if world == 1:
                res[f"{metric}/{solv}"]["step_s_plain"] = measure(
                    metric, solv, x, y, args["hidden"], args["steps"], None
                )["step_s"]
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def launch(world: int, args: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def table(data: dict) -> str:
    procs = data["procs"]
    head = (
        "| metric | solver | bytes/step/rank | "
        + " | ".join(f"{r} proc s/step" for r in procs)
        + " | 1 proc, no DataParallel | "
        + " | ".join(f"speed-up {r}" for r in procs[1:])
        + " |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, row in data["results"].items():
        metric, solv = key.split("/")
        t = {r: row[str(r)]["step_s"] for r in procs}
        cells = [f"{t[r]['median'] * 1e3:.1f} ms (±{t[r]['spread'] * 1e3:.1f})" for r in procs]
        speed = [f"{t[procs[0]]['median'] / t[r]['median']:.2f}x" for r in procs[1:]]
        plain = f"{row['plain_s']['median'] * 1e3:.1f} ms" if "plain_s" in row else "-"
        lines.append(
            f"| {metric} | {solv} | {row[str(procs[-1])]['bytes']:,.0f} | "
            + " | ".join(cells)
            + f" | {plain} | "
            + " | ".join(speed)
            + " |"
        )
    m = data["machine"]
    lines.append("")
    lines.append(
        f"N = {data['n']}, MLP {D_IN}-{data['hidden']}-{C} (P = {data['P']}), float64, "
        f"{m.get('backend', 'gloo')} on {m.get('gpu') or 'CPU'}, "
        f"{data['threads']} torch thread(s) per process, {data['repeats']} repeats "
        f"(median, ± half the range), {m['cpu_count']} CPUs, load average "
        f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f} (shared machine)."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default="gloo",
        help="nccl: one GPU per process (processes beyond the GPUs are skipped)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="print the table of a JSON")
    a = p.parse_args()
    if a.markdown:
        print(table(json.loads(a.markdown.read_text())))
        return
    args = {
        "n": a.n,
        "hidden": a.hidden,
        "steps": a.steps,
        "threads": a.threads,
        "backend": a.backend,
    }
    if a.backend == "nccl":
        gpus = torch.cuda.device_count()
        skipped = [r for r in a.procs if r > gpus]
        a.procs = [r for r in a.procs if r <= gpus]
        if skipped:
            print(
                f"{gpus} GPU(s): skipping {skipped} processes (NCCL needs one GPU each)",
                file=sys.stderr,
            )
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": a.backend,
        "gpu": torch.cuda.get_device_name(0) if a.backend == "nccl" else None,
        "loadavg_start": list(os.getloadavg()),
        "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    runs: dict[int, list[dict]] = {r: [] for r in a.procs}
    for rep in range(a.repeats):
        for r in a.procs:  # interleaved, so that a change of load hits every R alike
            runs[r].append(launch(r, args))
            print(f"repeat {rep + 1}/{a.repeats}: {r} process(es) done", file=sys.stderr)
    machine["loadavg_end"] = list(os.getloadavg())
    machine["uptime_end"] = subprocess.run(
        ["uptime"], capture_output=True, text=True
    ).stdout.strip()

    def summary(values: list[float]) -> dict:
        return {
            "median": statistics.median(values),
            "spread": (max(values) - min(values)) / 2,
            "values": values,
        }

    results = {}
    for metric, solv in configs():
        key = f"{metric}/{solv}"
        row = {
            str(r): {
                "step_s": summary([run[key]["step_s"] for run in runs[r]]),
                "bytes": runs[r][0][key]["bytes"],
            }
            for r in a.procs
        }
        if 1 in runs:
            row["plain_s"] = summary([run[key]["step_s_plain"] for run in runs[1]])
        results[key] = row
    data = {
        "procs": a.procs,
        "repeats": a.repeats,
        "n": a.n,
        "hidden": a.hidden,
        "P": sum(p.numel() for p in model(a.hidden).parameters()),
        "threads": a.threads,
        "steps": a.steps,
        "machine": machine,
        "results": results,
    }
    if a.out:
        a.out.write_text(json.dumps(data, indent=1))
    print(table(data))


if __name__ == "__main__":
    main()
