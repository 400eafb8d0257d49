"""Data parallelism on torch.distributed (steepest.distributed): 2 gloo processes on CPU.

One launch of 2 processes (tests/distributed_cases.py) runs every case; each test here reads
its case's results. For every metric with Cholesky, CG and Woodbury, for LM and
MoreTrustRegion, line searches, the Hessian-free options and TorchOptimizer, the parameters
after 3 steps on 2 ranks (unequal shards, 7 and 4 samples) equal those of one process on the
whole batch to 1e-10 in float64 and are bit-identical on both ranks.
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import distributed_cases as cases
import pytest
import torch
import torch.distributed as dist

import steepest as st
from steepest.errors import ConfigurationError, RankError, SteepestError

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="this PyTorch build has no torch.distributed gloo backend",
)

TOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Both ranks' results (one spawn of 2 processes for the whole module)."""
    out = tmp_path_factory.mktemp("dist")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=cases.worker, args=(r, 2, port, str(out))) for r in range(2)]
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env
    for p in procs:
        p.join(300)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "a rank hung (a collective reached by one rank only)"
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _ref(results: list[dict], name: str) -> dict:
    """The one-process reference (computed on one of the ranks)."""
    (res,) = [r[name] for r in results if name in r]
    assert "error" not in res, f"reference {name}:\n{res['error']}"
    return res


def _get(results: list[dict], name: str) -> tuple[dict, dict]:
    a, b = results[0][name], results[1][name]
    for r, res in enumerate((a, b)):
        assert "error" not in res, f"rank {r}, case {name}:\n{res['error']}"
    return a, b


@pytest.mark.parametrize("name", list(cases.optimizer_cases()))
def test_two_ranks_equal_one_process(results, name):
    ref = _ref(results, f"ref/{name}")
    r0, r1 = _get(results, f"dist/{name}")
    assert torch.equal(r0["theta"], r1["theta"]), "ranks ended with different parameters"
    for key in ("accepted", "tries", "solver"):  # the same decisions as one process
        assert r0[key] == r1[key] == ref[key], key
    for key in ("loss", "damping"):
        assert r0[key] == r1[key]
        assert r0[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert torch.allclose(r0["theta"], ref["theta"], rtol=0, atol=TOL), float(
        (r0["theta"] - ref["theta"]).abs().max()
    )
    assert not torch.equal(ref["theta"], cases.flat(cases.model())), "the reference never moved"


@pytest.mark.parametrize(
    "name", ["dist/torch_optimizer", "dist/torch_optimizer_ddp", "dist/optimizer_ddp"]
)
def test_torch_optimizer_and_ddp(results, name):
    """TorchOptimizer (plain module or DDP as params) and Optimizer(DDP(model)) on 2 ranks
    equal one TorchOptimizer on the whole batch."""
    ref = _ref(results, "ref/torch_optimizer")
    r0, r1 = _get(results, name)
    assert torch.equal(r0["theta"], r1["theta"])
    assert torch.allclose(r0["theta"], ref["theta"], rtol=0, atol=TOL)


def test_a_parameter_unused_on_one_rank_only(results):
    """A layer only rank 0's samples use: both ranks step it, as one process on the whole
    batch does (before, rank 1 masked it: the ranks drifted apart)."""
    ref = _ref(results, "ref/unused_on_one_rank")
    r0, r1 = _get(results, "dist/unused_on_one_rank")
    assert torch.equal(r0["theta"], r1["theta"])
    assert torch.allclose(r0["theta"], ref["theta"], rtol=0, atol=TOL)


def test_curvature_sub_batch_per_rank(results):
    r0, r1 = _get(results, "dist/curvature_batch")
    assert torch.equal(r0["theta"], r1["theta"]) and any(r0["accepted"])
    assert not torch.equal(r0["theta"], cases.flat(cases.model()))


def test_kfac_preconditioner_with_ddp(results):
    """Preconditioner(DDP(model), KFAC) + SGD on 2 ranks equals one process on the batch."""
    ref = _ref(results, "ref/preconditioner")
    r0, r1 = _get(results, "dist/preconditioner")
    assert torch.equal(r0["theta"], r1["theta"])
    assert torch.allclose(r0["theta"], ref["theta"], rtol=0, atol=TOL)
    assert not torch.equal(ref["theta"], cases.flat(cases.model()))


def test_scalar_closure_refused_by_name(results):
    r0, r1 = _get(results, "dist/scalar_closure")
    assert r0["raised"] == r1["raised"] == "ConfigurationError"
    assert "per-sample losses" in r0["message"]


def test_rejected_on_every_rank(results):
    r0, r1 = _get(results, "dist/rejected")
    assert r0["accepted"] is False and r1["accepted"] is False
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["damping_after"] == r1["damping_after"] > 1e-8  # lambda raised on both


def test_failed_shard_raises_on_every_rank(results):
    """A NaN in rank 1's shard: rank 1 raises its NonFiniteError, rank 0 a RankError; both
    leave parameters and state unchanged, and the next step (clean data) works on both."""
    r0, r1 = _get(results, "dist/failed_shard")
    assert (r0["raised"], r1["raised"]) == ("RankError", "NonFiniteError")
    for r in (r0, r1):
        assert r["unchanged"] and r["state_unchanged"] and r["next_ok"]


def test_failed_step_on_every_rank(results):
    """The trial loss overflows on rank 1's shard only: NonFiniteError on both ranks."""
    r0, r1 = _get(results, "dist/failed_step")
    assert r0["raised"] == r1["raised"] == "NonFiniteError"
    assert r0["unchanged"] and r1["unchanged"] and r0["state_unchanged"]


def test_state_dict_from_rank0_resumes_everywhere(results):
    r0, r1 = _get(results, "dist/state_dict")
    for r in (r0, r1):
        assert torch.equal(r["theta"], r["theta_resumed"])
    assert torch.equal(r0["theta_resumed"], r1["theta_resumed"])


def test_monte_carlo_independent_per_rank(results):
    """Each rank's generator draws other samples; the shared state and the parameters after
    3 steps of the MC Fisher (same shard on both ranks) stay identical on both ranks."""
    r0, r1 = _get(results, "dist/mc_independent")
    assert not torch.equal(r0["draw"], r1["draw"])
    assert torch.equal(r0["shared_state"], r1["shared_state"])
    assert torch.equal(r0["theta"], r1["theta"])
    assert r0["mismatch"] == r1["mismatch"] == 0.0


def test_monte_carlo_ranks_average_their_samples(results):
    """With the same shard on both ranks, independent samples make the 2-rank MC Fisher step
    differ from the 1-process one (which draws one set): the samples are not shared."""
    r0, _ = _get(results, "dist/mc_independent")
    assert not torch.allclose(r0["theta_one_process"], r0["theta"], atol=1e-8)


def test_example_on_two_ranks(results):
    """examples/distributed.py (its train(), in the 2 processes): identical parameters on
    both ranks, equal to one process on the whole batch, and a classifier that works."""
    r0, r1 = _get(results, "dist/example")
    assert r0["world"] == 2 and r0["mismatch"] == r1["mismatch"] == 0.0
    assert r0["difference"] < TOL
    assert r0["accuracy"] > 0.9


def test_data_parallel_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ConfigurationError, match="init_process_group"):
        st.DataParallel()
    with pytest.raises(ConfigurationError, match="init_process_group"):
        st.Optimizer(torch.nn.Linear(2, 1), st.MSE(), distributed=True)


def test_rank_error_is_a_steepest_error():
    assert issubclass(RankError, SteepestError) and issubclass(RankError, RuntimeError)
