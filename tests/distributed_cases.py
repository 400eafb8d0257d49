"""The cases of tests/test_distributed.py, run inside 2 gloo processes on CPU.

:func:`worker` runs on each rank: for every case it trains the same small model for 3 steps
twice, once in this process alone on the whole batch (the reference) and once on this rank's
shard with ``distributed=DataParallel()``, and saves both parameter vectors and the steps'
decisions to ``outdir/rank{r}.pt``. The test process compares them; nothing is asserted here,
so a failing case is reported by name instead of hanging the other rank.

The shards are unequal (7 and 4 of N = 11 samples), so the weighted means are exercised.
"""

from __future__ import annotations

import datetime
import io
import os
import runpy
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import steepest as st
from steepest.distributed import DataParallel

N, SPLIT, D_IN, HIDDEN, C = 11, 7, 3, 4, 3
STEPS = 3


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, class labels, regression targets), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=g)
    targets = torch.randn(N, C, generator=g, dtype=torch.float64)
    return x, labels, targets


def model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[:SPLIT] if rank == 0 else t[SPLIT:]


def flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


# ------------------------------------------------------------------ the Optimizer cases
METRICS: dict[str, Callable[[], st.Metric]] = {
    "Identity": st.Identity,
    "GaussNewton": st.GaussNewton,
    "GGN": st.GGN,
    "Fisher": st.Fisher,
    "EmpiricalFisher": st.EmpiricalFisher,
    "GradientCovariance": lambda: st.GradientCovariance(centered=True),
    "Hessian": st.Hessian,
}
FACTORED = {"GaussNewton", "GGN", "Fisher", "EmpiricalFisher", "GradientCovariance"}


def optimizer_cases() -> dict[str, dict]:
    """name -> keyword arguments of steepest.Optimizer (and 'loss': 'ce' or 'mse')."""
    cases: dict[str, dict] = {}
    for name, metric in METRICS.items():
        for solver in ("cholesky", "cg", "woodbury"):
            if solver == "woodbury" and name not in FACTORED:
                continue  # no sample-space factor (Woodbury refuses these in one process too)
            # CG: a tight tolerance and lambda >= 0.1, so that the rounding of the sums
            # (another order on 2 ranks) moves the result below 1e-10 (at lambda ~ 1e-3 CG
            # stops at maxiter and one process on the batch reversed differs by ~1e-4 too)
            cases[f"{name}-{solver}"] = dict(
                metric=metric,
                solver=(lambda: st.CG(tol=1e-14)) if solver == "cg" else solver,
                damping=(lambda: st.LevenbergMarquardt(1.0, min=0.1))
                if solver == "cg"
                else (lambda: st.LevenbergMarquardt(1e-2)),
            )
    # Auto: the factor's rows over all ranks decide (GGN: 33 > P = 31, Cholesky, while rank
    # 0's own 21 rows would pick Woodbury; EmpiricalFisher: 11 rows, Woodbury)
    for name in ("GGN", "EmpiricalFisher"):
        cases[f"{name}-auto"] = dict(
            metric=METRICS[name], solver="auto", damping=lambda: st.LevenbergMarquardt(1e-2)
        )
    # structured metrics reduce their own statistics (factors, diagonal) over the ranks
    structured = {
        "KFAC-GGN": lambda: st.KFAC(st.GGN()),
        "KFAC-Fisher-spread_inverses": lambda: st.KFAC(st.Fisher(), spread_inverses=True),
        "EKFAC-GGN-spread_inverses": lambda: st.EKFAC(st.GGN(), spread_inverses=True),
        "KFAC-ema-T_inv": lambda: st.KFAC(st.GGN(), ema=0.9, T_inv=2, spread_inverses=True),
        "Diagonal-GGN-sqrt": lambda: st.Diagonal(st.GGN(), power=0.5),
        # the rescaling's exact products are the whole batch's, not this rank's shard's
        "KFAC-rescale-alpha": lambda: st.KFAC(st.GGN(), rescale="alpha"),
        "KFAC-rescale-momentum": lambda: st.KFAC(st.GGN(), rescale="momentum"),
    }
    for name, metric in structured.items():
        cases[name] = dict(
            metric=metric, solver="auto", damping=lambda: st.LevenbergMarquardt(1e-2)
        )
    cases["GaussNewton-mse-cholesky"] = dict(
        metric=st.GaussNewton,
        solver="cholesky",
        damping=lambda: st.LevenbergMarquardt(1e-2),
        loss="mse",
    )
    for solver in ("cholesky", "woodbury"):
        cases[f"GGN-MoreTrustRegion-{solver}"] = dict(
            metric=st.GGN, solver=solver, damping=lambda: st.MoreTrustRegion(sigma=1e-10)
        )
    cases["GGN-Armijo"] = dict(
        metric=st.GGN, solver="cholesky", damping=lambda: 1e-2, step=lambda: st.Armijo()
    )
    cases["Fisher-KLLineSearch"] = dict(
        metric=st.Fisher,
        solver="cholesky",
        damping=lambda: 1e-2,
        step=lambda: st.KLLineSearch(max_kl=1e-3),
    )
    cases["GGN-TrustRegion"] = dict(
        metric=st.GGN,
        solver=lambda: st.CG(tol=1e-14),
        damping=lambda: 0.1,
        step=lambda: st.TrustRegion(0.3, adaptive=True),
    )
    cases["GGN-hessian-free"] = dict(
        metric=st.GGN,
        solver=lambda: st.CG(maxiter=5),
        damping=lambda: st.LevenbergMarquardt(1.0),
        warm_start=0.95,
        cg_backtracking=True,
        preconditioner="empirical-fisher",
        momentum=0.5,
    )
    return cases


def make_optimizer(m: nn.Module, spec: dict, dp: DataParallel | None) -> st.Optimizer:
    loss = st.MSE() if spec.get("loss") == "mse" else st.CrossEntropy()
    solver = spec["solver"]
    kwargs = {
        k: v
        for k, v in spec.items()
        if k in ("warm_start", "cg_backtracking", "preconditioner", "momentum")
    }
    return st.Optimizer(
        m,
        loss,
        metric=spec["metric"](),
        damping=spec["damping"](),
        solver=solver() if callable(solver) else solver,
        step=spec["step"]() if "step" in spec else None,
        distributed=dp,
        **kwargs,
    )


def run_case(spec: dict, rank: int, dp: DataParallel | None) -> dict:
    x, labels, targets = data()
    y = targets if spec.get("loss") == "mse" else labels
    if dp is not None:
        x, y = shard(x, rank), shard(y, rank)
    m = model()
    opt = make_optimizer(m, spec, dp)
    infos = [opt.step(x, y) for _ in range(STEPS)]
    return {
        "theta": flat(m),
        "accepted": [i.accepted for i in infos],
        "loss": [i.loss for i in infos],
        "damping": [i.damping for i in infos],
        "tries": [i.tries for i in infos],
        "solver": [i.solver for i in infos],
    }


# ------------------------------------------------------------------ special cases
def case_rejected(rank: int, dp: DataParallel) -> dict:
    """A step far too long, one try: rejected on every rank, parameters unchanged."""
    x, labels, _ = data()
    m = model()
    before = flat(m)
    opt = st.Optimizer(
        m,
        st.CrossEntropy(),
        metric=st.GGN(),
        solver="cholesky",
        damping=st.LevenbergMarquardt(1e-8, max_tries=1),
        step=st.LearningRate(1e3),
        distributed=dp,
    )
    info = opt.step(shard(x, rank), shard(labels, rank))
    return {
        "accepted": info.accepted,
        "unchanged": bool(torch.equal(before, flat(m))),
        "damping_after": opt.damping.value,
        "theta": flat(m),
    }


def case_failed_shard(rank: int, dp: DataParallel) -> dict:
    """Rank 1's shard holds a NaN: every rank raises, rank 1 its own error, rank 0 RankError."""
    x, labels, _ = data()
    x = x.clone()
    x[SPLIT + 1, 0] = float("nan")
    m = model()
    before = flat(m)
    opt = st.Optimizer(m, st.CrossEntropy(), metric=st.GGN(), distributed=dp)
    state = opt.state_dict()
    try:
        opt.step(shard(x, rank), shard(labels, rank))
        raised = None
    except st.SteepestError as err:
        raised = type(err).__name__
    after = opt.state_dict()
    return {
        "raised": raised,
        "unchanged": bool(torch.equal(before, flat(m))),
        "state_unchanged": after["steps"] == state["steps"]
        and torch.equal(after["generator"], state["generator"]),
        "next_ok": opt.step(shard(data()[0], rank), shard(labels, rank)).accepted,
    }


class _Exp(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(z)


def case_failed_step(rank: int, dp: DataParallel) -> dict:
    """The loss after the step overflows on rank 1's shard only (larger inputs into exp), with
    no retry left: the reduced trial loss is infinite, NonFiniteError on every rank."""
    x, _, targets = data()
    x = torch.cat([x[:SPLIT], 10 * x[SPLIT:]])
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(D_IN, C), _Exp()).double()
    before = flat(m)
    opt = st.Optimizer(
        m,
        st.MSE(),
        metric=st.Identity(),
        solver="cholesky",
        damping=st.Constant(0.0),
        step=st.LearningRate(30.0),
        distributed=dp,
    )
    state = opt.state_dict()
    try:
        info = opt.step(shard(x, rank), shard(targets, rank))
        raised = f"accepted={info.accepted}"
    except st.SteepestError as err:
        raised = type(err).__name__
    return {
        "raised": raised,
        "unchanged": bool(torch.equal(before, flat(m))),
        "state_unchanged": opt.state_dict()["steps"] == state["steps"],
    }


def case_state_dict(rank: int, dp: DataParallel) -> dict:
    """MC Fisher + LM: 2 steps, rank 0's state_dict (and parameters) loaded into fresh
    optimizers on every rank, then 2 more steps; equals 4 steps without the reload."""
    x, labels, _ = data()
    xs, ys = shard(x, rank), shard(labels, rank)

    def fresh() -> tuple[nn.Module, st.Optimizer]:
        m = model()
        return m, st.Optimizer(
            m,
            st.CrossEntropy(),
            metric=st.Fisher(mc_samples=2),
            solver="cholesky",
            damping=st.LevenbergMarquardt(1e-2),
            distributed=dp,
        )

    m, opt = fresh()
    for _ in range(2):
        opt.step(xs, ys)
    buf = [None]
    if rank == 0:
        f = io.BytesIO()
        torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, f)
        buf = [f.getvalue()]
    dist.broadcast_object_list(buf, src=0)
    saved = torch.load(io.BytesIO(buf[0]), weights_only=False)
    m2, opt2 = fresh()
    m2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        opt.step(xs, ys)
        opt2.step(xs, ys)
    return {"theta": flat(m), "theta_resumed": flat(m2)}


def case_mc_independent(rank: int, dp: DataParallel) -> dict:
    """Per-rank samples differ, the shared generator's state stays the same on every rank."""
    shared = torch.Generator().manual_seed(0)
    draw = torch.rand(4, generator=dp.generator(shared), dtype=torch.float64)
    x, labels, _ = data()
    m = model()
    opt = st.Optimizer(
        m,
        st.CrossEntropy(),
        metric=st.Fisher(mc_samples=1),
        solver="cholesky",
        damping=st.LevenbergMarquardt(1e-2),
        distributed=dp,
    )
    # the same shard on both ranks: only the Monte-Carlo samples could tell them apart
    for _ in range(STEPS):
        opt.step(x, labels)
    out = {
        "draw": draw,
        "shared_state": shared.get_state(),
        "theta": flat(m),
        "mismatch": dp.check_synchronized(m),
    }
    if rank == 0:  # one process on the same shard draws one set of samples, not two
        m1 = model()
        opt = st.Optimizer(
            m1,
            st.CrossEntropy(),
            metric=st.Fisher(mc_samples=1),
            solver="cholesky",
            damping=st.LevenbergMarquardt(1e-2),
        )
        for _ in range(STEPS):
            opt.step(x, labels)
        out["theta_one_process"] = flat(m1)
    return out


def case_torch_optimizer(rank: int, dp: DataParallel | None, ddp: bool = False) -> dict:
    """TorchOptimizer, GGN + LM, closure (outputs, targets); with ddp the model is wrapped in
    DistributedDataParallel, handed to the optimizer as params and called by the closure."""
    x, labels, _ = data()
    if dp is not None:
        x, labels = shard(x, rank), shard(labels, rank)
    m = model()
    params = nn.parallel.DistributedDataParallel(m) if ddp else m
    opt = st.TorchOptimizer(
        params,
        loss=st.CrossEntropy(),
        metric=st.GGN(),
        damping=st.LevenbergMarquardt(1e-2),
        solver="cholesky",
        distributed=None if ddp else dp,
    )
    for _ in range(STEPS):
        opt.step(lambda: (params(x), labels))  # DDP forward with ddp=True
    return {"theta": flat(m)}


class Gated(nn.Module):
    """The first k samples of the batch pass through an extra layer; with k = 0 the layer is
    not called (its gradient is None on that rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model()
        torch.manual_seed(2)
        self.extra = nn.Linear(C, C).double()

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        z = self.net(x)
        return torch.cat([z[:k] + self.extra(z[:k]), z[k:]]) if k else z


def case_unused_on_one_rank(rank: int, dp: DataParallel | None) -> dict:
    """TorchOptimizer with weight decay, a layer used by rank 0's samples only: unused on rank
    1 alone, it must still be a used parameter on every rank (the reduced gradient sees it);
    one process on the whole batch is the reference (review: the mask was per rank)."""
    x, labels, _ = data()
    k = SPLIT  # rank 0's shard, the first SPLIT samples of the whole batch
    if dp is not None:
        x, labels = shard(x, rank), shard(labels, rank)
        k = SPLIT if rank == 0 else 0
    m = Gated()
    opt = st.TorchOptimizer(
        m,
        loss=st.CrossEntropy(),
        metric=st.GGN(),
        damping=st.LevenbergMarquardt(1e-2),
        solver="cholesky",
        weight_decay=1e-2,
        distributed=dp,
    )
    for _ in range(STEPS):
        opt.step(lambda: (m(x, k), labels))
    return {"theta": flat(m)}


def case_optimizer_ddp(rank: int) -> dict:
    """steepest.Optimizer given a DistributedDataParallel model: unwrapped, its group used."""
    x, labels, _ = data()
    m = model()
    opt = st.Optimizer(
        nn.parallel.DistributedDataParallel(m),
        st.CrossEntropy(),
        metric=st.GGN(),
        solver="cholesky",
        damping=st.LevenbergMarquardt(1e-2),
    )
    for _ in range(STEPS):
        opt.step(shard(x, rank), shard(labels, rank))
    return {"theta": flat(m)}


def case_curvature_batch(rank: int, dp: DataParallel) -> dict:
    """curvature_batch_size=3 per rank (different random samples on each rank)."""
    x, labels, _ = data()
    m = model()
    opt = st.Optimizer(
        m,
        st.CrossEntropy(),
        metric=st.GGN(),
        solver="cholesky",
        damping=st.LevenbergMarquardt(1e-2),
        curvature_batch_size=3,
        distributed=dp,
    )
    infos = [opt.step(shard(x, rank), shard(labels, rank)) for _ in range(STEPS)]
    return {"theta": flat(m), "accepted": [i.accepted for i in infos]}


def case_preconditioner(rank: int, ddp: bool) -> dict:
    """KFAC Preconditioner + SGD, the kfac-pytorch pattern: with ddp the model is wrapped in
    DistributedDataParallel (its backward averages .grad over the 2 equal shards of the first
    10 samples) and handed to the Preconditioner; else one process on those 10 samples."""
    x, labels, _ = data()
    x, labels = x[:10], labels[:10]
    if ddp:
        x, labels = x[rank * 5 : rank * 5 + 5], labels[rank * 5 : rank * 5 + 5]
    m = model()
    net = nn.parallel.DistributedDataParallel(m) if ddp else m
    pre = st.Preconditioner(net, st.CrossEntropy(), metric=st.KFAC(st.GGN()), damping=1e-2)
    sgd = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(STEPS):
        sgd.zero_grad()
        nn.functional.cross_entropy(net(x), labels).backward()
        pre.step(x, labels)
        sgd.step()
    return {"theta": flat(m)}


def case_scalar_closure(rank: int, dp: DataParallel) -> dict:
    x, labels, _ = data()
    m = model()
    opt = st.TorchOptimizer(m, metric=st.Identity(), damping=0.0, distributed=dp)
    try:
        opt.step(lambda: nn.functional.cross_entropy(m(shard(x, rank)), shard(labels, rank)))
        return {"raised": None}
    except st.SteepestError as err:
        return {"raised": type(err).__name__, "message": str(err)}


# ------------------------------------------------------------------ the process
def _record(results: dict, name: str, fn: Callable[[], dict]) -> None:
    try:
        results[name] = fn()
    except Exception:  # noqa: BLE001 (reported by the test process, by case name)
        results[name] = {"error": traceback.format_exc()}


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        dp = DataParallel()
        results: dict[str, dict] = {}
        for k, (name, spec) in enumerate(optimizer_cases().items()):
            if k % world == rank:  # the references are split over the ranks
                _record(results, f"ref/{name}", lambda spec=spec: run_case(spec, rank, None))
            _record(results, f"dist/{name}", lambda spec=spec: run_case(spec, rank, dp))
        if rank == 0:
            _record(results, "ref/torch_optimizer", lambda: case_torch_optimizer(rank, None))
        _record(results, "dist/torch_optimizer", lambda: case_torch_optimizer(rank, dp))
        _record(
            results, "dist/torch_optimizer_ddp", lambda: case_torch_optimizer(rank, dp, ddp=True)
        )
        _record(results, "dist/optimizer_ddp", lambda: case_optimizer_ddp(rank))
        if rank == 1:
            _record(results, "ref/unused_on_one_rank", lambda: case_unused_on_one_rank(rank, None))
        _record(results, "dist/unused_on_one_rank", lambda: case_unused_on_one_rank(rank, dp))
        _record(results, "dist/curvature_batch", lambda: case_curvature_batch(rank, dp))
        if rank == 1:
            _record(results, "ref/preconditioner", lambda: case_preconditioner(rank, False))
        _record(results, "dist/preconditioner", lambda: case_preconditioner(rank, True))
        _record(results, "dist/scalar_closure", lambda: case_scalar_closure(rank, dp))
        _record(results, "dist/rejected", lambda: case_rejected(rank, dp))
        _record(results, "dist/failed_shard", lambda: case_failed_shard(rank, dp))
        _record(results, "dist/failed_step", lambda: case_failed_step(rank, dp))
        _record(results, "dist/state_dict", lambda: case_state_dict(rank, dp))
        _record(results, "dist/mc_independent", lambda: case_mc_independent(rank, dp))
        example = Path(__file__).resolve().parent.parent / "examples" / "distributed.py"
        _record(
            results,
            "dist/example",
            lambda: runpy.run_path(str(example), run_name="example")["train"](),
        )
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
