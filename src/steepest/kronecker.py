r"""Kronecker-factored approximations of the rows of Table 1: K-FAC and EKFAC.

For a layer :math:`s = W \bar a` (``Linear``, and ``Conv1d``/``Conv2d`` on unfolded patches) with
input :math:`\bar a = (a, 1)` (a bias column when the layer has a trainable bias) and output
gradients :math:`g_k = J_{s}^T S_{\cdot k}` back-propagated from the columns of a square root
:math:`S S^T` of the base's output-space matrix, the block of :math:`M = E_n[J^T S S^T J]` for
:math:`[W\ b]` (row-major) is approximated by (Martens & Grosse 2015, section 3)

.. math:: M_{[W b]} \approx G \otimes A, \qquad A = E[\bar a \bar a^T], \quad
          G = E_n\big[\textstyle\sum_k g_k g_k^T\big].

The base decides S (001 "Practical computation"; Martens 2020 section 11):

=============================  ===========================================================
base                           S (per sample, output space)
=============================  ===========================================================
``Fisher(mc_samples=k)``       :math:`\nabla_z l(\tilde y_j, z)/\sqrt k`,
                               :math:`\tilde y_j\sim R_z` (default k = 1: one extra backward)
``Fisher()``                   :math:`F_R^{1/2}` (exact)
``GGN()``                      :math:`H_L^{1/2}` (:math:`= F_R^{1/2}` for exponential families;
                               otherwise the signed square root of an indefinite :math:`H_L`)
``EmpiricalFisher()``          :math:`\nabla_z l(y, z)` at the data labels
``GaussNewton()``              :math:`I`
=============================  ===========================================================

``Linear`` layers on inputs with shared dimensions (sequences: ``(N, T, d)``, or sequence-first
``(T, N, d)`` as torch's ``TransformerEncoderLayer(batch_first=False)`` feeds them; a
transformer's feed-forward layers, and attention whose query/key/value/output projections are
``nn.Linear`` modules) use K-FAC-expand
(``sequence="expand"``: :math:`A = \frac{1}{NT}\sum_{n,t}\bar a_{nt}\bar a_{nt}^T`,
:math:`G = \frac1N\sum_{n,t,k} g_{ntk}g_{ntk}^T`) or K-FAC-reduce (``"reduce"``: a averaged and g
summed over t first) (Eschenhagen et al. 2023). Convolutions are KFC (Grosse & Martens 2016):
expand over the spatial positions of the unfolded patches, one block per group. Every other
trainable parameter (LayerNorm, BatchNorm affine, embeddings, custom modules, a weight shared
by several layers, and ``nn.MultiheadAttention``'s packed ``in_proj_weight``/``in_proj_bias``
and its ``out_proj``, which it applies functionally, never calling them as modules) gets the
exact diagonal of the same base, so no model is refused.

The factors come from module hooks: the layers' inputs and the gradients of their outputs
(one backward of the columns of S), never hand-written per-layer derivatives
(:mod:`steepest.kronecker_capture`: the capture and the factor statistics; this module builds
the operators and their inverses from them). Under ``Optimizer`` and the Preconditioner the
point's own forward records the layers (``record_layers``), so a refresh adds only that
backward; elsewhere (``steepest.curvature``, ``TorchOptimizer``, ``stats_batch``, an
``Optimizer`` with ``curvature_batch_size`` or ``curvature=``) the capture runs one forward of
its own.

:class:`EKFAC` (George et al. 2018) keeps the eigenbasis :math:`Q_G \otimes Q_A` of the factors
and re-estimates the diagonal in it from per-sample gradients,
:math:`s = E_n[\sum_k (Q_G^T\,\nabla_{W} l_{nk}\,Q_A)^{\odot 2}]`.

Both operators carry their own inverse by per-block eigendecompositions,
:math:`(G\otimes A + \lambda I)^{-1} = (Q_G\otimes Q_A)\,(\Lambda_G\otimes\Lambda_A +
\lambda I)^{-1}(Q_G\otimes Q_A)^T`, which ``solver="auto"`` uses; with
``damping="factored"`` K-FAC inverts Martens & Grosse's factored Tikhonov damping
:math:`(A + \pi\sqrt\lambda I)\otimes(G + \sqrt\lambda/\pi\, I)` with
:math:`\pi = \sqrt{(\mathrm{tr}A/\dim A)/(\mathrm{tr}G/\dim G)}` instead (section 6.3),
the two damped factors inverted by Cholesky (no eigendecomposition needed).

Practice (Martens & Grosse 2015, sections 5 and 8): ``ema`` averages the factors across steps
(:math:`\epsilon = \min(1 - 1/k, \text{ema})`), ``T_cov`` and ``T_inv`` refresh factors and
eigendecompositions every so many calls (defaults ema = 0.95, T_cov = 10, T_inv = 100: the
work amortised; ``ema=None, T_cov=1, T_inv=1`` is each batch's metric). Such a metric keeps
state across steps; it saves it with ``state_dict()`` (part of the optimizer's) and resumes bit
for bit.

Example
-------
>>> opt = Optimizer(model, CrossEntropy(), metric=KFAC(), damping=LevenbergMarquardt(1e-2))
>>> M = steepest.curvature(model, MSE(), x, y, KFAC(base=GGN()))
>>> M @ v, M.to_dense(), M.diagonal(), (M + 1e-3).solve(g)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigurationError
from .kronecker_blocks import (
    _Block,
    _clone,
    _damped_inverse,
    _eigh,
    _eigh_signed,
    _pi,
    _product_into,
    _recorded_gradient,
    _Structure,
    _structure_copy,
    _times_rows,
    check_saved_state,
)
from .kronecker_capture import _KRON_TYPES, factor_statistics
from .linop import LinearOperator
from .metrics import (
    GGN,
    EmpiricalFisher,
    Fisher,
    GaussNewton,
    GradientCovariance,
    Metric,
    _exact_gram,
)


# ---------------------------------------------------------------------------------- metrics
class KFAC(Metric):
    r"""Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for convolutions,
    Grosse & Martens 2016; expand/reduce, Eschenhagen et al. 2023) of a Table 1 row: per layer
    :math:`G \otimes A`, the exact diagonal of the same base for every other parameter.

    Parameters
    ----------
    base: ``Fisher(mc_samples=1)`` (default), ``Fisher()``, ``GGN()``, ``EmpiricalFisher()`` or
        ``GaussNewton()``
    sequence: ``"expand"`` (default) or ``"reduce"`` for Linear layers on inputs with shared
        dimensions, ``(N, T, d)`` or sequence-first ``(T, N, d)``: the batch axis of each
        call's input is the one axis of size N (the loss's number of samples); where several
        have size N (T = N), or an axis of size m N merges the batch with another dimension
        (a flattened (N T, d), batch-major or time-major; a convolution on frames), the one
        along which the gradient of the second sample's outputs vanishes except at index 1
        (one extra backward, only where the per-sample rows matter), else axis 0 where it
        has size N. Where none is found and the per-sample rows matter
        (``"reduce"``, :class:`EKFAC`'s scalings, a signed GGN) the metric raises
        :class:`~steepest.errors.BatchAxisError` naming the layer (fix: make the batch an
        axis of the layer's input, e.g. ``batch_first=True``); expand with an unsigned base
        sums over the rows in any order and needs no batch axis.
        Attention: ``nn.Linear`` projections get these blocks; ``nn.MultiheadAttention``'s
        packed projections get the exact diagonal of the base (see the module docstring)
    damping: ``"exact"`` (default): the own inverse is exact for :math:`G\otimes A+\lambda I`;
        ``"factored"``: the inverse of Martens & Grosse's factored Tikhonov damping with the
        pi-correction (an approximation of the damped block, flagged inexact); its damped
        factors are inverted by Cholesky every ``T_inv`` calls (about a fifth of the work of
        the eigendecompositions), and ``state_dict()["eig"]`` is then None
    ema: the decay of the running averages of the factors, :math:`\epsilon = \min(1-1/k,`
        ema) at the k-th refresh (default 0.95, Martens & Grosse 2015 section 5, kfac-pytorch's
        ``factor_decay``, kfac-jax's ``curvature_ema``); None: the factors of the last refresh
    T_cov, T_inv: refresh the factors every ``T_cov`` calls of :meth:`operator` (default 10)
        and the eigendecompositions every ``T_inv`` calls (default 100). The defaults amortise:
        a refresh costs one forward and one backward of the sampled labels plus
        :math:`R(d^2 + o^2)` per layer, an eigendecomposition :math:`O(d^3 + o^3)`, which for
        a 784-512-512-10 MLP at batch 128 is about 15 Adam steps; every 100 steps it adds
        ~0.15 of one (kfac-pytorch's ImageNet settings are the same 10 and 100; Martens &
        Grosse recompute inverses every 20 steps of far larger batches; kfac-jax: factors every
        step, inverses every 5). ``T_cov=1, T_inv=1, ema=None`` is the metric of this batch
        at every call (what the exactness tests and ``steepest.curvature`` of one batch use)
    rescale: None (default), ``"alpha"`` or ``"momentum"``: the own solve rescales its answer
        :math:`\Delta = (K + \lambda I)^{-1} b` by the exact quadratic model of the base
        (Martens & Grosse 2015, section 7), :math:`C = M_{exact} + \lambda I`:
        ``"alpha"`` returns :math:`\alpha^*\Delta`, :math:`\alpha^* = b^T\Delta /
        \Delta^T C\Delta` (one exact product); ``"momentum"`` returns
        :math:`\alpha^*\Delta + \mu^*\delta_0` minimising
        :math:`\frac12 x^TCx - b^Tx` over the span of :math:`\Delta` and the previous
        answer :math:`\delta_0` (two exact products, a 2 x 2 solve). The exact metric is
        ``Fisher()`` for a Monte-Carlo Fisher base, the base itself otherwise; the solve is
        then flagged inexact (the optimizer measures it with K-FAC's own quadratic)
    stats_batch: None (default): the factors of every refresh come from the whole batch;
        an integer k: from a random sub-batch of k of the batch's samples, drawn at each
        refresh with the optimizer's generator: the extra forward and the backward of the
        sampled labels run on k samples instead of N, and :math:`A, G` (and the other
        parameters' diagonals) are means over them. The gradient, the exact products of
        ``rescale`` and the loss stay the whole batch's (unlike ``Optimizer``'s
        ``curvature_batch_size``, which moves every curvature product to the sub-batch). A
        batch of at most k samples is used whole (no draw). Per rank under
        torch.distributed; refused with ``TorchOptimizer`` (its closure evaluates the whole
        batch)
    spread_inverses: under torch.distributed (:mod:`steepest.distributed`), compute the
        eigendecompositions of block k on rank k mod R only and broadcast them (the inverse
        work spread over the ranks, as KAISA does with a gradient-worker fraction of 1/R);
        False (default): every rank decomposes every block, nothing is sent. Either way the
        factors are means over the samples of every rank (one all_reduce per refresh).

    Full-batch problems: the defaults (``ema=0.95, T_cov=10, T_inv=100``) amortise the
    factor work over noisy mini-batches; the operator between eigendecompositions is the one
    decomposed last, so for the first 100 steps it is the matrix of the initial weights. On a
    deterministic full-batch problem, where the curvature changes with the weights and not
    with the batch, use ``KFAC(rescale="momentum", damping="factored", ema=None, T_cov=1,
    T_inv=1)`` with ``LevenbergMarquardt(init=10)``, and ``stats_batch`` about half the
    batch where the batch is large: on the digits autoencoder race (``benchmarks/README.md``,
    "Races") the defaults never leave the first plateau in 15 CPU seconds, this schedule
    reaches tuned Adam's final loss in 0.42x Adam's CPU time (0.33x with ``stats_batch`` =
    N/2), on the regression MLP race in 0.53x (0.70x).

    The operator acts in the flat parameter order (``model.parameters()``); ``to_dense()`` is
    block diagonal up to that order, ``diagonal()`` is :math:`\mathrm{diag}(G)\otimes
    \mathrm{diag}(A)`, and ``solve``/``solver="auto"`` use the per-block eigendecompositions.

    Examples
    --------
    >>> opt = Optimizer(model, CrossEntropy(), metric=KFAC(), damping=LevenbergMarquardt(1e-1))
    >>> this_batch = KFAC(ema=None, T_cov=1, T_inv=1)  # the metric of each batch
    >>> full_batch = KFAC(
    ...     rescale="momentum", damping="factored", ema=None, T_cov=1, T_inv=1, stats_batch=512
    ... )
    """

    name = "KFAC"
    # whether the statistics need each sample's rows (EKFAC's scalings); K-FAC's sums over
    # rows do not (unless "reduce" or a signed GGN)
    per_sample_rows = False
    # whether damping="factored" is offered (EKFAC: no, its inverse damps the scalings)
    factored_damping = True
    # the factors are reduced over ranks (Point.mean_over_ranks), so the operator is already
    # the whole batch's: the optimizer does not reduce its products again
    reduces_over_ranks = True

    def __init__(
        self,
        base: Metric | None = None,
        *,
        sequence: str = "expand",
        damping: str = "exact",
        ema: float | None = 0.95,
        T_cov: int = 10,
        T_inv: int = 100,
        rescale: str | None = None,
        stats_batch: int | None = None,
        spread_inverses: bool = False,
    ) -> None:
        base = Fisher(mc_samples=1) if base is None else base
        ok = isinstance(base, Fisher | GGN | GaussNewton | EmpiricalFisher) or (
            isinstance(base, GradientCovariance) and not base.centered
        )
        if not ok:
            raise ConfigurationError(
                f"{type(self).__name__}: base must be Fisher(mc_samples=k), Fisher(), GGN(), "
                f"EmpiricalFisher() or GaussNewton(), got {base!r}; for another metric use "
                "steepest.Diagonal(base) or the exact metric."
            )
        if sequence not in ("expand", "reduce"):
            raise ConfigurationError(
                f"{type(self).__name__}: sequence must be 'expand' or 'reduce', got {sequence!r}."
            )
        if damping == "factored" and not self.factored_damping:
            raise ConfigurationError(
                f"{type(self).__name__}: damping='factored' (Martens & Grosse's factored "
                "Tikhonov damping of G and A) does not apply: its own inverse "
                "Q diag(1/(s + lambda)) Q^T damps the re-estimated scalings s exactly. Use "
                f"{type(self).__name__}() (damping='exact'), or KFAC(damping='factored')."
            )
        if damping not in ("exact", "factored"):
            raise ConfigurationError(
                f"{type(self).__name__}: damping must be 'exact' or 'factored', got {damping!r}."
            )
        if ema is not None and not (isinstance(ema, int | float) and 0 <= ema < 1):
            raise ConfigurationError(
                f"{type(self).__name__}: ema must be None or in [0, 1), "
                f"got {ema!r} (Martens & Grosse: 0.95)."
            )
        for nm, t in (("T_cov", T_cov), ("T_inv", T_inv)):
            if not (isinstance(t, int) and t >= 1):
                raise ConfigurationError(
                    f"{type(self).__name__}: {nm} must be a positive integer, got {t!r}."
                )
        if rescale not in (None, "alpha", "momentum"):
            raise ConfigurationError(
                f"{type(self).__name__}: rescale must be None, 'alpha' or 'momentum', got "
                f"{rescale!r}."
            )
        if stats_batch is not None and not (
            isinstance(stats_batch, int) and not isinstance(stats_batch, bool) and stats_batch >= 1
        ):
            raise ConfigurationError(
                f"{type(self).__name__}: stats_batch must be None (the whole batch) or a "
                f"positive integer number of samples, got {stats_batch!r}."
            )
        self.stats_batch = stats_batch
        self.base, self.sequence, self.damping = base, sequence, damping
        self.ema, self.T_cov, self.T_inv = ema, T_cov, T_inv
        self.rescale = rescale
        self.spread_inverses = bool(spread_inverses)
        self.needs_distribution = base.needs_distribution
        self.psd = base.psd
        self._state: dict = {"calls": 0, "refreshes": 0, "factors": None, "eig": None}
        self._inverse_cache: tuple | None = None  # derived from the state, never saved
        self._sketch_cache: tuple | None = None  # probes for the residual sketch, likewise
        self._recorded: dict | None = None  # rows of the gradient being solved (Preconditioner)
        self.fast_blocks = 0  # blocks the last solve preconditioned from recorded rows
        self._probe_cache: dict = {}  # the recorded-rows check's probe vectors, per shape

    @property
    def record_layers(self) -> tuple[type, ...]:
        """The layer types whose calls the optimizer's forwards record for the next
        :meth:`operator` call (:func:`steepest.point.forward`'s ``record``): the Kronecker
        layers when that call refreshes the factors from the whole batch, so that the refresh
        differentiates the point's own graph instead of running a second forward; none
        otherwise (``stats_batch`` forwards its sub-batch itself)."""
        due = self._refresh_due()
        return _KRON_TYPES if due and self.stats_batch is None else ()

    def _refresh_due(self) -> bool:
        """Whether the next :meth:`operator` call (number ``state["calls"]``) refreshes the
        factors (every ``T_cov`` calls, and the first)."""
        st = self._state
        return st["factors"] is None or st["calls"] % self.T_cov == 0

    def needs_point(self) -> bool:
        """Whether the next :meth:`operator` call evaluates the model (a factor refresh, or
        the exact products of ``rescale``, or eigendecompositions spread over ranks);
        otherwise it needs only the parameter layout."""
        st = self._state
        return (
            self._refresh_due()
            or self.rescale is not None
            or (self.spread_inverses and (st["eig"] is None or st["calls"] % self.T_inv == 0))
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={self.base!r}, sequence={self.sequence!r}, "
            f"damping={self.damping!r}, ema={self.ema}, T_cov={self.T_cov}, "
            f"T_inv={self.T_inv}, rescale={self.rescale!r}, stats_batch={self.stats_batch}, "
            f"spread_inverses={self.spread_inverses})"
        )

    # ------------------------------------------------------------------ state
    def parameters_changed(self) -> None:
        """Forget the running factors, eigendecompositions and counters: the optimizer calls
        this when the model's trainable parameters change layout (a layer frozen, unfrozen or
        replaced), since factors of the old layers do not fit the new ones. The next
        :meth:`operator` call starts afresh, as the first one did."""
        self._state = {"calls": 0, "refreshes": 0, "factors": None, "eig": None}
        self._inverse_cache = self._sketch_cache = None

    def state_dict(self) -> dict:
        """Running factors, eigendecompositions and counters (for bit-for-bit resume). The
        dicts are new, the tensors the metric's own, as in ``torch.optim``'s ``state_dict``:
        the metric never changes a tensor of its state in place (every refresh makes new
        ones), so what this returns keeps its values while training goes on; do not write into
        its tensors. (The optimizer's rollback snapshot copies them once per step; a clone
        here would copy them twice.)"""
        return _structure_copy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        if not isinstance(state, dict) or "calls" not in state:
            raise ConfigurationError(
                f"{type(self).__name__}.load_state_dict needs a dict saved by state_dict()."
            )
        self._state = _clone(state)
        self._inverse_cache = self._sketch_cache = None

    def _snapshot(self) -> dict:
        """The state as it is now, without copying tensors: every update replaces the state's
        entries (new dicts, new tensors), none changes a tensor in place, so a shallow copy
        restores it exactly (the Preconditioner's rollback, no copy of the factors per step)."""
        return dict(self._state)

    def _restore(self, snapshot: dict) -> None:
        self._state = dict(snapshot)
        self._inverse_cache = self._sketch_cache = None

    def check_state(self, state: dict, space) -> None:
        """Raise :class:`~steepest.errors.ConfigurationError` unless ``state`` (from
        :meth:`state_dict`) fits the parameters of ``space`` (a
        :class:`~steepest.params.ParamSpace`): every block's G (grp, o, o) and A (grp, d, d)
        match its weight and bias, every other diagonal its parameter, the eigendecompositions
        (and EKFAC's scalings) their blocks. Changes nothing.

        >>> KFAC().check_state(other_optimizer.state_dict()["metric"], opt.space)
        """
        check_saved_state(type(self).__name__, state, space)

    # ------------------------------------------------------------------ factors
    def _samples(self, point) -> Tensor | None:
        """The sorted indices of the refresh's sub-batch (``stats_batch``), None for the whole
        batch; drawn with the point's generator."""
        k = self.stats_batch
        if k is None or k >= point.n:
            return None
        if getattr(point.space, "model", None) is None:
            raise ConfigurationError(
                f"{type(self).__name__}(stats_batch={k}): a closure (TorchOptimizer) evaluates "
                "the whole batch, so the factors cannot be taken on a sub-batch; use "
                "stats_batch=None, or steepest.Optimizer / Preconditioner with the model."
            )
        gen = point.generator
        dev = gen.device if gen is not None else point.z.device
        idx = torch.randperm(point.n, generator=gen, device=dev)[:k]
        return idx.sort().values.to(point.z.device)

    def _new_factors(self, point) -> dict:
        new = factor_statistics(
            self.base, point, self.sequence, self._samples(point), self.per_sample_rows
        )
        self._state["signed"] = new["w"] is not None
        return new

    def _refresh(self, point) -> tuple[dict, bool]:
        """The factors to use at this call (refreshed, averaged); whether they are new."""
        st = self._state
        calls = st["calls"]
        fresh = self._refresh_due()
        new = None
        if fresh:
            new = self._new_factors(point)
            k = st["refreshes"] + 1
            if st["factors"] is not None and self.ema is not None:
                eps = min(1 - 1 / k, self.ema)
                old = st["factors"]
                # eps old + (1 - eps) new, one pass each (lerp: new tensors, none in place;
                # the new statistics' dtype, as a loaded state may hold another)
                blocks = {
                    key: (
                        torch.lerp(old["blocks"][key][0].to(a), a, 1 - eps),
                        torch.lerp(old["blocks"][key][1].to(g), g, 1 - eps),
                    )
                    if key in old["blocks"]
                    else (a, g)
                    for key, (a, g) in new["blocks"].items()
                }
                others = {
                    i: torch.lerp(old["others"][i].to(d), d, 1 - eps) if i in old["others"] else d
                    for i, d in new["others"].items()
                }
            else:
                blocks, others = new["blocks"], new["others"]
            st["factors"] = {"blocks": blocks, "others": others}
            st["refreshes"] = k
        st["calls"] = calls + 1
        return new, fresh

    def _decomposes(self) -> bool:
        """Whether the inverses come from eigendecompositions of the factors. K-FAC with the
        factored damping inverts :math:`A + \\pi\\sqrt\\lambda I` and
        :math:`G + \\sqrt\\lambda/\\pi\\, I` by Cholesky instead (about a fifth of the work of
        ``eigh`` at d = 785 in float32), unless the eigendecompositions are spread over ranks."""
        return self.damping != "factored" or self.spread_inverses

    def _eigen(self, calls: int, point) -> bool:
        """Recompute the eigendecompositions when due (every ``T_inv`` calls, and whenever the
        layers changed); returns whether they match the current factors. Without
        eigendecompositions (:meth:`_decomposes`) the factors to invert are fixed on the same
        schedule and ``eig`` stays None."""
        st = self._state
        blocks = st["factors"]["blocks"]
        done = st["eig"] if self._decomposes() else st.get("eig_factors")
        due = done is None or calls % self.T_inv == 0 or set(done) != set(blocks)
        if due:
            eig_g = _eigh_signed if st.get("signed", False) else _eigh
            if not self._decomposes():
                st["eig"] = None
            elif self.spread_inverses:
                mats = [m for A, G in blocks.values() for m in (A, G)]
                gs = {id(G) for _, G in blocks.values()}
                eig = point.spread_over_ranks(
                    lambda m: eig_g(m) if id(m) in gs else _eigh(m),
                    mats,
                    lambda m: [(m.shape[:-1], m.dtype), (m.shape, m.dtype)],
                )
                st["eig"] = {key: (*eig[2 * j], *eig[2 * j + 1]) for j, key in enumerate(blocks)}
            else:
                st["eig"] = {key: (*_eigh(A), *eig_g(G)) for key, (A, G) in blocks.items()}
            st["eig_refresh"] = st["refreshes"]
            st["eig_factors"] = blocks  # the factors decomposed (never changed in place)
        done = st["eig"] if self._decomposes() else st["eig_factors"]
        return st.get("eig_refresh") == st["refreshes"] and set(done) == set(blocks)

    def _probe(self, st: _Structure, flat: Tensor, blk: _Block, rec, factored: bool) -> bool:
        """:func:`_recorded_gradient` for the block ``blk`` of the flat vector ``flat`` (views
        of its weight and bias, no copy); only ungrouped blocks (Linear layers)."""
        if blk.G.shape[0] != 1:
            return False
        o = blk.G.shape[-1]
        w = st.piece(flat[None], blk.wi).reshape(o, -1)
        b = None if blk.bi is None else st.piece(flat[None], blk.bi).reshape(o)
        return _recorded_gradient(w, b, rec, factored, self._probe_cache)

    # ------------------------------------------------------------------ the operator
    def _structure(self, point, blocks: list[_Block]) -> _Structure:
        params = point.space.params
        in_blocks = {i for b in blocks for i in (b.wi, b.bi) if i is not None}
        others = [i for i in range(len(params)) if i not in in_blocks]
        return _Structure([p.numel() for p in params], [p.shape for p in params], blocks, others)

    def operator(self, point) -> LinearOperator:
        self.base.check(point)
        calls = self._state["calls"]
        self._refresh(point)
        current = self._eigen(calls, point)
        fac = self._state["factors"]
        # K-FAC's matrix between eigendecompositions is the one decomposed last (G_e (x) A_e):
        # its own inverse is then exact, and @, diagonal(), to_dense() and the quadratic model
        # of the step describe the matrix the step inverts; the running factors refreshed
        # every T_cov calls enter at the next eigendecomposition (as in kfac-pytorch). A state
        # saved before this (no "eig_factors") keeps the current factors, flagged inexact
        decomposed = self._state.get("eig_factors")
        if decomposed is not None:
            current = True
        blocks = [
            _Block(wi, bi, A, G)
            for (wi, bi), (A, G) in (fac["blocks"] if decomposed is None else decomposed).items()
        ]
        st = self._structure(point, blocks)
        eig = self._state["eig"]
        eigs = [None if eig is None else eig[(b.wi, b.bi)] for b in blocks]
        others = fac["others"]
        size, dt, dev = point.size, point.grad.dtype, point.grad.device

        def block_rows(rows: Tensor, out: Tensor) -> None:  # the blocks' part of M rows
            for blk in blocks:
                x = st.gather(rows, blk)
                st.scatter(out, blk.G @ x @ blk.A, blk)

        def mm(V: Tensor) -> Tensor:  # V (P, k)
            rows = V.T
            out = torch.empty_like(rows)
            block_rows(rows, out)
            for i in st.others:
                out[:, st.offsets[i] : st.offsets[i + 1]] = others[i] * st.piece(rows, i)
            return out.T

        source = fac["blocks"] if decomposed is None else decomposed

        def sketch() -> tuple[Tensor, Tensor]:
            # two Gaussian probes U and M U (float64) for the residual sketch of the exact own
            # inverse: the blocks' part is computed once per decomposed matrix (two products
            # every T_inv calls), the other parameters' diagonal part once per refresh
            cache = self._sketch_cache
            if cache is None or cache[0] is not source or cache[2].shape != (2, size):
                gen = torch.Generator(device=dev).manual_seed(0)
                u = torch.randn(2, size, generator=gen, dtype=torch.float64, device=dev).to(dt)
                mb = torch.zeros_like(u)
                block_rows(u, mb)
                cache = (source, None, u.double(), mb.double(), None)
            if cache[1] is not others:
                mu = cache[3].clone()
                for i in st.others:
                    sl = slice(st.offsets[i], st.offsets[i + 1])
                    mu[:, sl] = others[i].double() * cache[2][:, sl]
                cache = (cache[0], others, cache[2], cache[3], mu)
            self._sketch_cache = cache
            return cache[2], cache[4]

        def diag() -> Tensor:
            out = torch.empty(1, size, dtype=dt, device=dev)
            for blk in blocks:
                d = (
                    blk.G.diagonal(dim1=-2, dim2=-1)[:, :, None]
                    * blk.A.diagonal(dim1=-2, dim2=-1)[:, None, :]
                )
                st.scatter(out, d.unsqueeze(0), blk)
            for i in st.others:
                out[0, st.offsets[i] : st.offsets[i + 1]] = others[i]
            return out[0]

        factored = self.damping == "factored"

        def factored_inverses(lam: float) -> list[tuple[Tensor, Tensor]]:
            # (G + sqrt(lam)/pi I)^-1 and (A + pi sqrt(lam) I)^-1 as matrices, kept while the
            # decomposed factors and lambda stay: two products per block instead of four
            source = eig if eig is not None else decomposed
            cache = self._inverse_cache
            if cache is None or cache[0] is not source or cache[1] != lam:
                mats = []
                signed = self._state.get("signed", False)
                for blk, e in zip(blocks, eigs):
                    pi = _pi(blk.A, blk.G)
                    if e is None:  # by Cholesky of the damped factors
                        gi = _damped_inverse(blk.G, math.sqrt(lam) / pi, signed)
                        ai = _damped_inverse(blk.A, pi * math.sqrt(lam), False)
                    else:
                        ea, qa, eg, qg = e
                        gi = (qg / (eg[:, None, :] + math.sqrt(lam) / pi)) @ qg.transpose(-1, -2)
                        ai = (qa / (ea[:, None, :] + pi * math.sqrt(lam))) @ qa.transpose(-1, -2)
                    mats.append((gi, ai))
                self._inverse_cache = (source, lam, mats)
            return self._inverse_cache[2]

        def inverse(b: Tensor, lam: float) -> Tensor:
            lam = float(lam)
            rows = b.reshape(1, -1) if b.ndim == 1 else b.T
            out = torch.empty_like(rows)
            mats = factored_inverses(lam) if factored else [None] * len(blocks)
            # the rows of the gradient's own backward (Preconditioner): G^-1 X A^-1 of a
            # recorded X = g^T a as (G^-1 g^T)(a A^-1), O(R (o^2 + d^2 + o d)) flops
            recorded = self._recorded if b.ndim == 1 else None
            self.fast_blocks = 0
            for blk, e, m in zip(blocks, eigs, mats):
                ea, qa, eg, qg = (None,) * 4 if e is None else e
                rec = None if recorded is None else recorded.get((blk.wi, blk.bi))
                if rec is not None and self._probe(st, rows[0], blk, rec, factored):
                    a, g = rec  # a without the column of ones: _times_rows adds its row
                    bias = blk.bi is not None
                    if factored:  # (G^-1 g^T)(a A^-1)
                        left, right = (g @ m[0][0]).T, _times_rows(a, m[1][0], bias)
                    else:  # Q_G ((Q_G^T g^T)(a Q_A) / (e_G e_A^T + lam)) Q_A^T
                        y = (g @ qg[0]).T @ _times_rows(a, qa[0], bias)
                        left = qg[0] @ (y / (eg[0][:, None] * ea[0][None, :] + lam))
                        right = qa[0].T
                    _product_into(st, out[0], blk, left, right)
                    self.fast_blocks += 1
                    continue
                x = st.gather(rows, blk)
                if factored:
                    st.scatter(out, m[0] @ x @ m[1], blk)
                    continue
                y = qg.transpose(-1, -2) @ x @ qa
                den = eg[:, :, None] * ea[:, None, :] + lam
                st.scatter(out, qg @ (y / den) @ qa.transpose(-1, -2), blk)
            for i in st.others:
                out[:, st.offsets[i] : st.offsets[i + 1]] = st.piece(rows, i) / (others[i] + lam)
            return out[0] if b.ndim == 1 else out.T

        # the sketch's two probe products are paid once per decomposition: worth it against one
        # residual product per call when a decomposition serves three calls or more
        return self._linop(
            mm,
            diag,
            inverse,
            point,
            size,
            dt,
            dev,
            exact=current and not factored,
            sketch=sketch if self.T_inv > 2 else None,
        )

    def _linop(
        self, mm, diag, inverse, point, size, dt, dev, exact: bool, sketch=None
    ) -> LinearOperator:
        """The operator of products ``mm`` (columns), ``diag`` and the own ``inverse`` (rescaled
        when asked, then never exact), shared by KFAC and EKFAC; ``sketch`` gives the probes
        with which :class:`~steepest.solvers.OwnInverse` estimates the residual of an exact
        inverse instead of a product."""
        return LinearOperator(
            lambda v: mm(v.unsqueeze(1)).squeeze(1),
            size,
            dt,
            dev,
            matmat=mm,
            diagonal=diag,
            psd=self._psd(),
            name=self._name(),
            inverse=self._rescaled(inverse, point),
            inverse_exact=exact and self.rescale is None,
            sketch=sketch,
        )

    def _rescaled(self, inverse, point):
        """The own solve, followed by Martens & Grosse's rescaling (section 7) when asked."""
        if self.rescale is None:
            return inverse
        exact_metric = self.base
        if isinstance(exact_metric, Fisher) and exact_metric.mc_samples is not None:
            exact_metric = Fisher()
        # delta_0 is the answer of the previous step (the operator is built once a step): a
        # try that the optimizer rejects and solves again with another lambda combines with
        # the same delta_0, not with the rejected answer; its products are computed once
        prev = self._state.get("previous")
        memo: dict = {}

        def solve(b: Tensor, lam: float) -> Tensor:
            delta = inverse(b, lam)
            if b.ndim != 1:  # columns: the rescaling is for one right-hand side
                return delta
            lam = float(lam)
            use_prev = self.rescale == "momentum" and prev is not None and prev.shape == b.shape
            vs = [delta, prev] if use_prev else [delta]
            # V^T (M_exact + lambda I) V: the exact quadratic model on span(V)
            c = _exact_gram(exact_metric, point, vs, memo) + lam * torch.tensor(
                [[float(u @ v) for v in vs] for u in vs], dtype=torch.float64
            )
            dcd, bd = float(c[0, 0]), float(b @ delta)
            if use_prev:
                m = c
                r = torch.tensor([bd, float(b @ prev)], dtype=torch.float64)
                if torch.linalg.matrix_rank(m) == 2 and float(torch.linalg.det(m)) > 0:
                    a, mu = torch.linalg.solve(m, r).tolist()
                    x = a * delta + mu * prev
                    self._state["previous"] = x.detach().clone()
                    return x
            x = delta * (bd / dcd) if dcd > 0 else delta
            self._state["previous"] = x.detach().clone()
            return x

        return solve

    def _psd(self) -> bool:
        return bool(self.base.psd) and not (
            isinstance(self.base, GGN) and self._state.get("signed", False)
        )

    def _name(self) -> str:
        return f"{type(self).__name__}({self.base.name})"
