r"""Data parallelism on ``torch.distributed``: the one place that knows about ranks.

Each of the R ranks of a process group holds a shard :math:`B_r` of the batch, of
:math:`N_r` samples, :math:`N = \sum_r N_r`. Every quantity of a step is a mean over samples
(DESIGN.md: the mean is taken in :class:`~steepest.point.Point`), so the step on R ranks equals
the step on the concatenated batch when each rank's mean is weighted by
:math:`w_r = N_r / N` and summed over the ranks (one ``all_reduce``):

.. math::

    L = \sum_r w_r L_r,\qquad g = \sum_r w_r g_r,\qquad
    M v = \sum_r w_r M_r v,\qquad M = \frac1N \sum_r U_r^T U_r,

with :math:`L_r, g_r, M_r` the loss, gradient and metric of rank r's shard (means over
:math:`N_r` samples) and :math:`U_r` its sample-space factor (:math:`M_r = U_r^T U_r / N_r`),
whose rows are gathered for the Woodbury solver. Unequal shards are therefore exact, not an
approximation. The losses at trial points (reduction ratio rho, line searches, CG
backtracking) and the KL of a KL line search are reduced the same way, so every rank computes
the same direction, takes the same decision and ends with the same parameters; a rank that
fails to evaluate its shard makes every rank raise (:class:`~steepest.errors.RankError`).

Monte-Carlo quantities (the sampled Fisher, curvature sub-batches) draw from a per-rank
generator seeded, at each step, from one draw of the optimizer's shared generator and the rank:
the ranks' samples are independent, and the optimizer's state (the shared generator) is the
same on every rank, so a ``state_dict`` saved on rank 0 resumes on every rank.

Metrics, solvers and step rules never call ``torch.distributed``; the optimizer hands a
:class:`DataParallel` to the Point (the means) and wraps the metric's operator with
:meth:`DataParallel.operator` (the curvature). A structured metric whose operator is not linear
in the per-sample terms reduces its own statistics through the Point instead
(``reduces_over_ranks = True``): K-FAC its Kronecker factors,
:math:`A = \sum_r (N_r/N) A_r`, :math:`G = \sum_r (N_r/N) G_r`
(:meth:`~steepest.point.GraphProducts.mean_over_ranks`), and with
``KFAC(spread_inverses=True)`` the eigendecomposition of block k is computed on rank k mod R and
broadcast (:meth:`~steepest.point.GraphProducts.spread_over_ranks`, KAISA's distribution of
the inverse work); ``Diagonal`` reduces the diagonal before taking its power.

Example
-------
>>> torch.distributed.init_process_group("gloo")          # e.g. under torchrun
>>> opt = Optimizer(model, CrossEntropy(), metric=GGN(), distributed=DataParallel())
>>> info = opt.step(x_shard, y_shard)      # same step and parameters on every rank
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigurationError, RankError
from .linop import Factor, LinearOperator

# odd 64-bit constant (the golden ratio's): rank r's seed is the shared seed XOR r * this, so
# the low 32 bits that seed the CPU's Mersenne twister differ for every rank
_RANK_MIX = 0x9E3779B97F4A7C15


class DataParallel:
    r"""The ranks of a ``torch.distributed`` process group sharing one step of
    :math:`\delta = -\alpha (M + \lambda I)^{-1} g` on the concatenation of their shards.

    Parameters
    ----------
    group: the process group (default: the default group, ``torch.distributed.group.WORLD``);
        ``torch.distributed.init_process_group`` must have been called on every rank.

    Attributes
    ----------
    rank, world_size: this process's rank in ``group`` and the number of ranks R.
    bytes_sent: the payload of every collective this object ran, in bytes per rank (the
        input tensor of each all_reduce, broadcast or all_gather), for measuring the
        communication volume of a step.

    Every rank must run the same sequence of steps with the same optimizer configuration;
    the shards may have different sizes (the means are weighted by :math:`N_r / N`).

    Example
    -------
    >>> dp = DataParallel()                     # after init_process_group
    >>> opt = Optimizer(model, MSE(), metric=GaussNewton(), damping=LevenbergMarquardt(1e-3),
    ...                 distributed=dp)
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available():
            raise ConfigurationError(
                "torch.distributed is not available in this build of PyTorch; run without "
                "distributed= or install a PyTorch build with distributed support."
            )
        if not dist.is_initialized():
            raise ConfigurationError(
                "torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(backend) on every rank first (torchrun "
                "sets the environment: init_process_group('gloo') on CPU, 'nccl' on GPUs)."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        # where the scalars of a collective live: NCCL reduces CUDA tensors only
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ collectives
    def sum(self, t: Tensor) -> Tensor:
        """:math:`\\sum_r t_r` over the ranks (a new tensor; identical on every rank)."""
        out = t.detach().clone().contiguous()
        self.bytes_sent += out.numel() * out.element_size()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s tensor on every rank (a new tensor)."""
        out = t.detach().clone().contiguous()
        self.bytes_sent += out.numel() * out.element_size()
        if self.group is not None:
            src = dist.get_global_rank(self.group, src)
        dist.broadcast(out, src=src, group=self.group)
        return out

    def gather_rows(self, u: Tensor) -> Tensor:
        """The rows of every rank's ``u`` (shape (R_r, ...)) stacked in rank order; the row
        counts may differ (each rank's block is padded to the largest for the all_gather)."""
        counts = self.sum(
            torch.nn.functional.one_hot(torch.tensor(self.rank), self.world_size).to(
                device=u.device, dtype=torch.int64
            )
            * u.shape[0]
        )
        counts = [int(c) for c in counts]
        width = max(counts)
        padded = u.new_zeros((width, *u.shape[1:]))
        padded[: u.shape[0]] = u
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.bytes_sent += padded.numel() * padded.element_size()
        dist.all_gather(blocks, padded.contiguous(), group=self.group)
        return torch.cat([b[:c] for b, c in zip(blocks, counts)])

    # ------------------------------------------------------------------ the hooks
    def mean(
        self,
        value: Tensor | None,
        grad: Tensor | None,
        n: int,
        like: Tensor,
        error: BaseException | None = None,
    ) -> tuple[Tensor, Tensor, int]:
        r"""The weighted means :math:`L = \sum_r (N_r/N) L_r`, :math:`g = \sum_r (N_r/N) g_r`
        and N, from this rank's mean loss (0-dim), mean gradient (P,) and sample count, in one
        all_reduce; ``like`` is a (P,) tensor of the parameters' dtype and device.

        ``error``: the exception this rank met evaluating its shard (None if none); if any rank
        met one, every rank raises (this rank its own, the others a
        :class:`~steepest.errors.RankError` that names the rank and its message), so no rank
        waits for a collective the others never reach.
        """
        zero = like.new_zeros(())
        if error is None:
            parts = [grad * n, (value.detach() * n).reshape(1), zero + n, zero]
        else:
            parts = [torch.zeros_like(like), zero.reshape(1), zero, zero + 1]
        payload = self.sum(torch.cat([p.reshape(-1) for p in parts]))
        if float(payload[-1]) > 0:
            self.raise_together(error)
        total = int(round(float(payload[-2])))
        return payload[-3] / total, payload[:-3] / total, total

    def raise_together(self, error: BaseException | None) -> None:
        """Called by every rank once some rank failed: each rank learns which ranks failed and
        why (one all_gather of the messages) and raises."""
        msgs: list[Any] = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(msgs, mine, group=self.group)
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        raise RankError(
            "rank(s) " + ", ".join(f"{r} ({m})" for r, m in bad) + f" of {self.world_size} "
            "failed to evaluate their shard, so every rank stops this step (parameters and "
            "optimizer state unchanged); fix the data or model on that rank."
        )

    def weighted_sum(self, tensors: list[Tensor], weight: float) -> list[Tensor]:
        r""":math:`\sum_r w_r t_r` for each tensor of the list, in one all_reduce (this rank's
        weight :math:`w_r = N_r / N`): means over a shard made means over all shards."""
        if not tensors:
            return []
        flat = self.sum(torch.cat([weight * t.reshape(-1) for t in tensors]))
        parts = torch.split(flat, [t.numel() for t in tensors])
        return [p.view_as(t) for p, t in zip(parts, tensors)]

    def spread(self, fn: Any, items: list[Tensor], shapes: Any) -> list[tuple[Tensor, ...]]:
        """``[fn(x) for x in items]`` with item i computed on rank i mod R only and its result
        (a tuple of tensors, shaped as ``shapes(x)`` says: a list of (shape, dtype)) broadcast
        from there: the inverse work of K-FAC's blocks spread over the ranks (KAISA), the same
        result on every rank."""
        out: list[tuple[Tensor, ...]] = []
        for i, x in enumerate(items):
            owner = i % self.world_size
            if owner == self.rank:
                res = fn(x)
            else:
                res = tuple(torch.empty(sh, dtype=dt, device=x.device) for sh, dt in shapes(x))
            out.append(tuple(self.broadcast(t, owner) for t in res))
        return out

    def scalar(self, value: float, weight: float) -> float:
        r""":math:`\sum_r w_r v_r` for this rank's weight :math:`w_r = N_r / N` and value
        :math:`v_r` (a trial loss or KL); infinite if any rank's value is."""
        if not math.isfinite(value):
            value, weight = math.inf, 1.0
        out = float(
            self.sum(torch.tensor([weight * value], dtype=torch.float64, device=self.device))
        )
        return out if math.isfinite(out) else math.inf

    def operator(self, op: LinearOperator, n_local: int, n_total: int) -> LinearOperator:
        r"""The metric of the whole batch from this rank's metric ``op`` (a mean over its
        ``n_local`` samples): :math:`M = \sum_r (N_r/N) M_r`. Products, the dense matrix and
        the diagonal are all-reduced; the sample-space factor is gathered,
        :math:`U = [U_1; \dots; U_R]` with :math:`M = U^T U / N`."""
        w = n_local / n_total

        def matvec(v: Tensor) -> Tensor:
            return self.sum(w * op.matvec(v))

        def matmat(V: Tensor) -> Tensor:
            return self.sum(w * op.matmat(V))

        def diagonal() -> Tensor:
            return self.sum(w * op.diagonal())

        def dense() -> Tensor:
            return self.sum(w * op.to_dense(limit=op.size))

        factor = rows = None
        if op.has_factor():
            if op.factor_rows is not None:
                rows = int(self.sum(torch.tensor([op.factor_rows], device=op.device)))

            def factor() -> Factor:
                f = op.factor()
                # M_r = U_r^T U_r / n_r; rows scaled by sqrt(N_r / n_r) give M = U^T U / N
                u = f.U if f.n == n_local else f.U * math.sqrt(n_local / f.n)
                return Factor(self.gather_rows(u), n_total)

        # a metric whose dense matrix comes from its factor keeps doing so (R P, not P^2, sent)
        from_factor = op._dense is None and op.has_factor()
        return LinearOperator(
            matvec,
            op.size,
            op.dtype,
            op.device,
            matmat=matmat,
            dense=None if from_factor else dense,
            diagonal=diagonal,
            factor=factor,
            factor_rows=rows,
            psd=op.psd,
            name=op.name,
        )

    def generator(self, shared: torch.Generator) -> torch.Generator:
        """This rank's generator for one step: seeded from one draw of the ``shared`` generator
        (the same on every rank) mixed with the rank, so ranks draw independent samples."""
        seed = int(torch.randint(0, 2**62, (1,), generator=shared, device=shared.device))
        local = torch.Generator(device=shared.device)
        local.manual_seed((seed ^ (self.rank * _RANK_MIX)) & (2**63 - 1))
        return local

    def check_synchronized(self, module: nn.Module | Tensor) -> float:
        """The largest difference between rank 0's and any rank's parameters (0.0 when all are
        identical), the same number on every rank; for tests and assertions in scripts."""
        flat = (
            module
            if isinstance(module, Tensor)
            else torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        )
        ref = self.broadcast(flat, 0)
        diff = (flat - ref).abs().max().reshape(1).to(torch.float64)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=self.group)
        return float(diff)


def as_data_parallel(
    distributed: DataParallel | bool | None, model: Any = None
) -> tuple[DataParallel | None, Any]:
    """The :class:`DataParallel` of an optimizer from its ``distributed`` option, and the model
    to differentiate: a ``DistributedDataParallel`` wrapper is replaced by its ``.module`` (the
    reduction is steepest's, not DDP's) and, unless ``distributed`` says otherwise, its process
    group is used."""
    ddp = dist.is_available() and isinstance(model, nn.parallel.DistributedDataParallel)
    if ddp:
        if distributed is False:
            raise ConfigurationError(
                "the model is wrapped in DistributedDataParallel but distributed=False: pass the "
                "plain module (ddp.module) to optimize each rank alone, or distributed=True."
            )
        if distributed is None or distributed is True:
            distributed = DataParallel(model.process_group)
        model = model.module
    if distributed is None or distributed is False:
        return None, model
    if distributed is True:
        return DataParallel(), model
    if not isinstance(distributed, DataParallel):
        raise ConfigurationError(
            f"distributed must be None, True or a steepest.DataParallel, got {distributed!r}."
        )
    return distributed, model


__all__ = ["DataParallel", "as_data_parallel"]
