r"""The rows of Table 1 (Pierrot et al. 2019): each metric maps a :class:`Point` to the
symmetric operator M of problem (1), :math:`\min_\delta g^T\delta` s.t.
:math:`\delta^T M \delta \le \epsilon^2`.

===========================  ===============================================================
metric                       M (means over the N samples s of the batch)
===========================  ===============================================================
``Identity()``               :math:`I` (vanilla gradient descent)
``GaussNewton()``            :math:`E_s[J^T J]` (classical Gauss-Newton, J = d z / d theta)
``Fisher()``                 :math:`E_s[J^T F_R J]` (natural gradient, exact Fisher)
``Fisher(mc_samples=k)``     :math:`E_s[\frac1k\sum_j \nabla l(\tilde y_j)\nabla l(\tilde y_j)^T]`,
                             :math:`\tilde y_j \sim R_z` (Monte-Carlo Fisher)
``EmpiricalFisher()``        :math:`E_s[\nabla\log p(y|x)\nabla\log p(y|x)^T]` (data labels)
``GradientCovariance()``     :math:`E_s[\nabla l\,\nabla l^T]` (``centered=True``: minus
                             :math:`\bar g\bar g^T`)
``Hessian()``                :math:`H = \nabla^2 L` (Newton)
``GGN()``                    :math:`E_s[J^T H_L J]` (generalized Gauss-Newton)
===========================  ===============================================================

Every operator is matrix-free (products through the Point's cached jvp/vjp), and also gives
``to_dense()`` and ``diagonal()`` built from per-sample Jacobians rather than from products,
and, where :math:`M = U^T U / N`, the sample-space factor U for the Woodbury solver.

Example
-------
>>> M = GGN().operator(Point(model, CrossEntropy(), x, y))
>>> M @ torch.randn(M.size)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import ConfigurationError
from .linop import Factor, LinearOperator
from .point import Point

_JAC_CHUNK_ELEMS = 2**26  # entries of a per-sample Jacobian block built at once (~512 MB f64)


class Metric:
    """Base class: ``operator(point)`` returns M as a :class:`LinearOperator`."""

    name = "M"
    psd = True
    needs_distribution = False

    def operator(self, point: Point) -> LinearOperator:
        raise NotImplementedError

    def check(self, point: Point) -> None:
        if self.needs_distribution and not point.loss.probabilistic:
            raise point.loss._not_probabilistic(f"the metric {self.name}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _sample_chunks(point: Point) -> list[slice]:
    per_sample = point.z[0].numel() * point.size
    step = max(1, _JAC_CHUNK_ELEMS // max(per_sample, 1))
    return [slice(i, min(i + step, point.n)) for i in range(0, point.n, step)]


def _jtaj(
    point: Point,
    apply_a: Callable[[Tensor], Tensor],
    matrix_a: Callable[[slice], Tensor],
    sqrt_a: Callable[[slice], Tensor] | None,
    psd: bool,
    name: str,
) -> LinearOperator:
    r"""The operator :math:`\frac1N\sum_i J_i^T A_i J_i` from an output-space product
    ``apply_a(u)`` (u shaped like z), per-sample dense ``A_i`` (n, C, C) for a slice of samples,
    and optionally per-sample square roots ``S_i`` (n, C, K), ``A_i = S_i S_i^T``."""
    n = point.n

    def matvec(v: Tensor) -> Tensor:
        return point.vjp(apply_a(point.jvp(v)) / n)

    def dense() -> Tensor:
        out = torch.zeros(
            point.size, point.size, dtype=point.theta.dtype, device=point.theta.device
        )
        for sl in _sample_chunks(point):
            jac = point.jacobian(sl)
            out += torch.einsum("ncp,ncd,ndq->pq", jac, matrix_a(sl), jac)
        return out / n

    def diagonal() -> Tensor:
        out = torch.zeros(point.size, dtype=point.theta.dtype, device=point.theta.device)
        for sl in _sample_chunks(point):
            jac = point.jacobian(sl)
            out += torch.einsum("ncp,ncd,ndp->p", jac, matrix_a(sl), jac)
        return out / n

    factor = rows = None
    if sqrt_a is not None:
        rows = n * sqrt_a(slice(0, 1)).shape[-1]  # R = N K, K the columns of S_i

        def factor() -> Factor:
            rows = []
            for sl in _sample_chunks(point):
                rows.append(torch.einsum("nck,ncp->nkp", sqrt_a(sl), point.jacobian(sl)))
            u = torch.cat(rows)
            return Factor(u.reshape(-1, point.size), n)

    return LinearOperator(
        matvec,
        point.size,
        point.theta.dtype,
        point.theta.device,
        dense=dense,
        diagonal=diagonal,
        factor=factor,
        factor_rows=rows,
        psd=psd,
        name=name,
    )


def _flat_out(point: Point, sl: slice) -> tuple[Tensor, int]:
    zf = point.z.detach()[sl]
    return zf, zf.reshape(zf.shape[0], -1).shape[1]


class Identity(Metric):
    """M = I: vanilla gradient descent (000 section 3.1). ``delta = -alpha g``.

    >>> M = Identity().operator(point)      # M @ v == v
    """

    name = "Identity"

    def operator(self, point: Point) -> LinearOperator:
        p, dt, dev = point.size, point.theta.dtype, point.theta.device
        return LinearOperator(
            lambda v: v.clone(),
            p,
            dt,
            dev,
            matmat=lambda V: V.clone(),
            dense=lambda: torch.eye(p, dtype=dt, device=dev),
            diagonal=lambda: torch.ones(p, dtype=dt, device=dev),
            name=self.name,
        )


class GaussNewton(Metric):
    r"""Classical Gauss-Newton, :math:`M = E_s[J^T J]` with J the Jacobian of the model output
    (000 section 3.2). For ``MSE(sigma)`` it equals :math:`\sigma^2` times the Fisher.

    >>> M = GaussNewton().operator(point)
    """

    name = "GaussNewton"

    def operator(self, point: Point) -> LinearOperator:
        def eye(sl: slice) -> Tensor:
            zf, c = _flat_out(point, sl)
            return torch.eye(c, dtype=zf.dtype, device=zf.device).expand(zf.shape[0], c, c)

        return _jtaj(point, lambda u: u, eye, eye, True, self.name)


class GGN(Metric):
    r"""Generalized Gauss-Newton, :math:`M = E_s[J^T H_L J]`, :math:`H_L` the Hessian of the
    loss in output space (000 section 4.3, Martens section 8). PSD when the loss is convex in
    z; equal to the Fisher for MSE, CrossEntropy and BCEWithLogits (Martens 9.2).

    >>> M = GGN().operator(point)
    """

    name = "GGN"

    def operator(self, point: Point) -> LinearOperator:
        loss, y = point.loss, point.y
        z = point.z.detach()
        exp_family = getattr(loss, "hessian_is_fisher", False)
        sqrt = (lambda sl: loss.fisher_sqrt(z[sl])) if exp_family else None
        return _jtaj(
            point,
            lambda u: loss.hessian_vp(z, y, u),
            lambda sl: loss.output_matrix(z[sl], y[sl], "hessian"),
            sqrt,
            exp_family,
            self.name,
        )


class Fisher(Metric):
    r"""Fisher information of the model's predictive distribution (natural gradient, 000
    section 3.3, Martens section 5): :math:`M = E_s[J^T F_R J]`, exact. With
    ``mc_samples=k``, the Monte-Carlo estimate from targets :math:`\tilde y \sim R_z` drawn with
    the optimizer's ``torch.Generator``:
    :math:`M = E_s[\frac1k\sum_j J^T \nabla_z l(\tilde y_j) \nabla_z l(\tilde y_j)^T J]`.

    >>> M = Fisher().operator(point)            # exact
    >>> M = Fisher(mc_samples=8).operator(point)
    """

    name = "Fisher"
    needs_distribution = True

    def __init__(self, mc_samples: int | None = None) -> None:
        if mc_samples is not None and (not isinstance(mc_samples, int) or mc_samples < 1):
            raise ConfigurationError(
                f"Fisher: mc_samples must be None (exact) or a positive integer, got "
                f"{mc_samples!r}."
            )
        self.mc_samples = mc_samples

    def __repr__(self) -> str:
        return f"Fisher(mc_samples={self.mc_samples})"

    def operator(self, point: Point) -> LinearOperator:
        self.check(point)
        loss, z = point.loss, point.z.detach()
        if self.mc_samples is None:
            return _jtaj(
                point,
                lambda u: loss.fisher_vp(z, u),
                lambda sl: loss.output_matrix(z[sl], None, "fisher"),
                lambda sl: loss.fisher_sqrt(z[sl]),
                True,
                self.name,
            )
        k = self.mc_samples
        # output-space gradients of the loss at sampled targets -> S (N, C, k). The k draws are
        # made in one call of loss.sample on z repeated k times (draw-major: rows j*N..j*N+N-1
        # hold draw j), and differentiated in one backward pass.
        n = point.n
        zk = z.unsqueeze(0).expand(k, *z.shape).reshape(k * n, *z.shape[1:])
        y_s = loss.sample(zk, point.generator)
        zz = zk.clone().requires_grad_(True)
        with torch.enable_grad():
            (gz,) = torch.autograd.grad(loss.value(zz, y_s).sum(), zz)
        s = gz.reshape(k, n, -1).permute(1, 2, 0) / k**0.5

        def apply_a(u: Tensor) -> Tensor:
            uf = u.reshape(point.n, -1)
            return torch.einsum("nck,nk->nc", s, torch.einsum("nck,nc->nk", s, uf)).view_as(u)

        return _jtaj(
            point,
            apply_a,
            lambda sl: s[sl] @ s[sl].transpose(1, 2),
            lambda sl: s[sl],
            True,
            f"Fisher(mc_samples={k})",
        )


class GradientCovariance(Metric):
    r"""Gradient covariance (outer-product metric), :math:`M = E_s[\nabla l\,\nabla l^T]`
    (000 section 4.1); ``centered=True`` gives :math:`E_s[(\nabla l - \bar g)(\nabla l -
    \bar g)^T]`. Products need no per-sample gradients: :math:`M v = \frac1N J_l^T (J_l v)`.

    >>> M = GradientCovariance().operator(point)
    """

    name = "GradientCovariance"

    def __init__(self, centered: bool = False) -> None:
        self.centered = bool(centered)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(centered={self.centered})"

    def operator(self, point: Point) -> LinearOperator:
        self.check(point)
        n, gbar, centered = point.n, point.grad, self.centered

        def matvec(v: Tensor) -> Tensor:
            out = point.loss_vjp(point.loss_jvp(v) / n)
            return out - gbar * (gbar @ v) if centered else out

        def factor() -> Factor:  # rows: per-sample gradients (centered: minus their mean)
            g = point.per_sample_grads()
            return Factor(g - gbar if centered else g, n)

        return LinearOperator(
            matvec,
            point.size,
            point.theta.dtype,
            point.theta.device,
            factor=factor,
            factor_rows=n,
            name=self.name,
        )


class EmpiricalFisher(GradientCovariance):
    r"""Empirical Fisher, :math:`M = E_s[\nabla\log p(y|x)\nabla\log p(y|x)^T]` over the data
    labels (000 section 3.3, Martens section 11). Since :math:`l = -\log p`, it equals the
    (uncentered) gradient covariance; it is *not* the Fisher (Martens 11.1).

    >>> M = EmpiricalFisher().operator(point)
    """

    name = "EmpiricalFisher"
    needs_distribution = True

    def __init__(self) -> None:
        super().__init__(centered=False)

    def __repr__(self) -> str:
        return "EmpiricalFisher()"


class Hessian(Metric):
    r"""Newton's method, :math:`M = H = \nabla^2_\theta L` (000 section 4.2). Indefinite in
    general: use damping, CG (which stops at negative curvature) or a trust region.

    >>> M = Hessian().operator(point)
    """

    name = "Hessian"
    psd = False

    def operator(self, point: Point) -> LinearOperator:
        return LinearOperator(
            point.hvp,
            point.size,
            point.theta.dtype,
            point.theta.device,
            matmat=point.hmm,
            psd=False,
            name=self.name,
        )


METRICS = {
    "identity": Identity,
    "gauss-newton": GaussNewton,
    "ggn": GGN,
    "fisher": Fisher,
    "empirical-fisher": EmpiricalFisher,
    "gradient-covariance": GradientCovariance,
    "hessian": Hessian,
}


def _exact_gram(metric: Metric, point, vs: list[Tensor], memo: dict | None = None) -> Tensor:
    r"""The Gram matrix :math:`V^T M V` (float64, k x k) of the exact metric M on the columns
    :math:`v_i` of V, for the rescaling of section 7. For :math:`M = \frac1N J^T A J`
    (``Fisher()``, ``GGN()``, ``GaussNewton()``) it is :math:`\frac1N (Jv_i)^T A (Jv_j)`: one
    Jacobian-vector product per column and products in output space, no :math:`J^T u`
    (Martens & Grosse 2015 section 7 compute the quadratic model so); for
    ``EmpiricalFisher()`` :math:`\frac1N (J_l v_i)^T (J_l v_j)`. Under torch.distributed, or for
    another metric, from the whole batch's operator products. ``memo`` keeps each column's
    products (keyed by the tensor itself) for later calls on the same point."""
    memo = {} if memo is None else memo
    loss, n = point.loss, point.n
    local = getattr(point, "distributed", None) is None

    def columns(v: Tensor) -> tuple[Tensor, Tensor]:  # (u, w) with v_i^T M v_j = u_i . w_j
        if local and isinstance(metric, Fisher | GGN | GaussNewton):
            u = point.jvp(v)
            z = point.z.detach()
            if isinstance(metric, GaussNewton):
                return u, u / n
            if isinstance(metric, Fisher):
                return u, loss.fisher_vp(z, u) / n
            return u, loss.hessian_vp(z, point.y, u) / n
        if local and isinstance(metric, GradientCovariance) and not metric.centered:
            u = point.loss_jvp(v)
            return u, u / n
        if "op" not in memo:
            op = metric.operator(point)
            if not local:  # the whole batch's
                op = point.distributed.operator(op, point.n, point.n_total)
            memo["op"] = op
        return v, memo["op"].matvec(v)

    cols = []
    for v in vs:
        hit = memo.get(id(v))
        if hit is None or hit[0] is not v:
            hit = (v, *columns(v))  # v kept with its products: its id stays its own
            memo[id(v)] = hit
        cols.append(hit[1:])
    k = len(vs)
    return torch.tensor(
        [[float((cols[i][0] * cols[j][1]).sum()) for j in range(k)] for i in range(k)],
        dtype=torch.float64,
    )
