"""Solvers (steepest.solvers) for (M + lambda I) x = b: exactness against torch.linalg.solve,
CG in float32, CG at negative curvature (Steihaug: a descent direction, flagged), warm start,
preconditioning, Martens' progress rule and kept iterates, Woodbury == Cholesky, Auto's choice."""

from __future__ import annotations

import pytest
import torch
from reference import rel_err, seeded
from torch import nn

import steepest.linop as linop
from steepest.errors import SingularMatrixError, SolverError
from steepest.linop import LinearOperator
from steepest.losses import CallableLoss, CrossEntropy
from steepest.metrics import GGN, GradientCovariance, Hessian, Identity
from steepest.point import Point
from steepest.solvers import CG, Auto, Cholesky, Woodbury, as_solver

F64 = torch.float64


def dense_op(a: torch.Tensor, **kw) -> LinearOperator:
    return LinearOperator(lambda v: a @ v, a.shape[0], a.dtype, **kw)


def spd(p: int, seed: int, cond: float = 100.0, dtype=F64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=seeded(seed), dtype=F64))
    mu = torch.logspace(0, torch.log10(torch.tensor(cond)), p, dtype=F64)
    return ((q * mu) @ q.T).to(dtype)


def classifier_point(dtype=F64, n=6, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    g = seeded(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=F64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return Point(model, CrossEntropy(), x, y)


# ------------------------------------------------------------------------------ Cholesky


def test_cholesky_exact():
    a = spd(12, 0)
    b = torch.randn(12, generator=seeded(1), dtype=F64)
    sol = Cholesky().solve(dense_op(a), b)
    assert sol.exact and sol.iterations == 1 and sol.residual < 1e-14
    assert rel_err(sol.x, torch.linalg.solve(a, b)) < 1e-12


def test_cholesky_indefinite_raise_or_clip():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=seeded(2), dtype=F64))
    mu = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.0, 4.0], dtype=F64)
    a = (q * mu) @ q.T
    b = torch.randn(6, generator=seeded(3), dtype=F64)
    with pytest.raises(SingularMatrixError, match=r"smallest eigenvalue -2.*indefinite='clip'"):
        Cholesky().solve(dense_op(a, name="A"), b)
    sol = Cholesky(indefinite="clip").solve(dense_op(a), b)
    assert sol.negative_curvature and not sol.exact and "2 eigenvalues" in sol.message
    assert rel_err(sol.x, q @ ((q.T @ b) / mu.abs())) < 1e-12
    assert float(b @ sol.x) > 0  # |A|^-1 is PD: a descent direction for b = -g


# ------------------------------------------------------------------------------ CG


def test_cg_exact_in_float64_and_warm_start():
    a = spd(30, 4, cond=1e3)
    b = torch.randn(30, generator=seeded(5), dtype=F64)
    x_ref = torch.linalg.solve(a, b)
    sol = CG(tol=1e-12, maxiter=100).solve(dense_op(a), b)
    assert sol.message == "converged" and sol.iterations <= 60 and not sol.negative_curvature
    assert rel_err(sol.x, x_ref) < 1e-9
    assert rel_err(a @ sol.x, b) <= 1e-12 * 1.01
    warm = CG(tol=1e-12, maxiter=100).solve(dense_op(a), b, x0=x_ref + 1e-6 * b)
    assert warm.iterations < sol.iterations and rel_err(warm.x, x_ref) < 1e-9
    zero = CG().solve(dense_op(a), torch.zeros(30, dtype=F64))
    assert zero.iterations == 0 and torch.equal(zero.x, torch.zeros(30, dtype=F64))


def test_cg_float32_reaches_a_modest_tolerance():
    """In float32 CG on a well-conditioned damped GGN reaches a relative residual of 1e-5
    (checked in float64), agrees with the float64 solution, and its reported residual is
    honest; an unreachable tolerance ends at maxiter instead of looping or diverging."""
    p32, p64 = classifier_point(torch.float32), classifier_point(F64)
    lam = 1e-2
    a32, a64 = GGN().operator(p32) + lam, GGN().operator(p64) + lam
    b32, b64 = -p32.grad, -p64.grad
    sol = CG(tol=1e-5).solve(a32, b32)
    assert sol.x.dtype == torch.float32 and sol.message == "converged"
    dense64 = a64.to_dense()
    true_res = rel_err(dense64 @ sol.x.double(), b64)
    assert true_res < 1e-4
    assert rel_err(sol.x, torch.linalg.solve(dense64, b64)) < 1e-3
    assert abs(sol.residual - true_res) < 1e-5  # the reported residual is the true one
    tight = CG(tol=1e-14, maxiter=3 * a32.size).solve(a32, b32)
    assert torch.isfinite(tight.x).all()
    tight_res = rel_err(dense64 @ tight.x.double(), b64)
    assert tight_res < 1e-4 and abs(tight.residual - tight_res) < 1e-5
    assert tight.residual > 1e-14 and "float32 precision" in tight.message
    assert float(b32 @ tight.x) > 0


def test_cg_negative_curvature_explicit():
    a = torch.diag(torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=F64))
    b = torch.tensor([0.1, 0.1, 1.0, 0.1], dtype=F64)  # b^T A b < 0: stops at iteration 1
    sol = CG().solve(dense_op(a, psd=False), b)
    assert sol.negative_curvature and "negative curvature" in sol.message
    assert sol.iterations == 0 and torch.equal(sol.x, b)
    b = torch.tensor([1.0, 1.0, 0.3, 1.0], dtype=F64)  # meets it later
    sol = CG().solve(dense_op(a, psd=False), b)
    assert sol.negative_curvature and torch.isfinite(sol.x).all() and float(b @ sol.x) > 0


def test_cg_negative_curvature_with_a_warm_start_still_descends():
    a = torch.diag(torch.tensor([-1.0, 1.0], dtype=F64))
    b = torch.tensor([1.0, 1.0], dtype=F64)
    x0 = torch.tensor([-3.0, 0.0], dtype=F64)  # b^T x0 < 0 and b^T (b - A x0) < 0
    sol = CG().solve(dense_op(a, psd=False), b, x0=x0)
    assert sol.negative_curvature and float(b @ sol.x) > 0


def test_cg_negative_curvature_on_a_hessian():
    """The undamped Hessian of a non-convex model: CG flags negative curvature and returns a
    finite descent direction rather than the (meaningless) Newton step."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    x = torch.randn(10, 2, generator=seeded(4), dtype=F64)
    y = torch.randn(10, 2, generator=seeded(5), dtype=F64)
    point = Point(model, CallableLoss(lambda z, t: torch.log1p((z - t) ** 2).sum(1)), x, y)
    h = Hessian().operator(point)
    assert float(torch.linalg.eigvalsh(h.to_dense())[0]) < 0
    b = -point.grad
    sol = CG(tol=1e-12).solve(h, b)
    assert sol.negative_curvature and torch.isfinite(sol.x).all()
    assert float(b @ sol.x) > 0
    # Auto: the dense route with eigenvalue clipping for a small indefinite M (issue 12), CG
    # above dense_max; both give a descent direction
    auto = Auto()
    chosen = auto.choose(h + 1e-3)
    assert isinstance(chosen, Cholesky) and chosen.indefinite == "clip"
    assert float(b @ auto.solve(h + 1e-3, b).x) > 0
    assert isinstance(Auto(dense_max=10).choose(h + 1e-3), CG)
    assert float(b @ Auto(dense_max=10).solve(h + 1e-3, b).x) > 0


def test_cg_preconditioner():
    scale = torch.logspace(0, 4, 40, dtype=F64)
    a = spd(40, 6, cond=3.0) * torch.outer(scale.sqrt(), scale.sqrt())
    b = torch.randn(40, generator=seeded(7), dtype=F64)
    x_ref = torch.linalg.solve(a, b)
    plain = CG(tol=1e-10, maxiter=400).solve(dense_op(a), b)
    pre = CG(tol=1e-10, preconditioner=a.diagonal()).solve(dense_op(a), b)
    assert pre.message == "converged" and pre.iterations < plain.iterations
    assert rel_err(pre.x, x_ref) < 1e-8
    by_arg = CG(tol=1e-10).solve(dense_op(a), b, preconditioner=a.diagonal())
    assert torch.equal(by_arg.x, pre.x)


def test_cg_progress_rule_and_kept_iterates():
    a = spd(200, 8, cond=1e6)
    b = torch.randn(200, generator=seeded(9), dtype=F64)
    full = CG(tol=1e-12, maxiter=200).solve(dense_op(a), b)
    early = CG(tol=1e-12, maxiter=200, progress_tol=5e-3).solve(dense_op(a), b)
    assert "relative progress" in early.message and 10 < early.iterations < full.iterations
    assert float(b @ early.x) > 0

    def phi(x):
        return float(0.5 * x @ (a @ x) - b @ x)

    assert phi(early.x) < 0
    kept = CG(tol=1e-12, maxiter=30, keep_iterates=(3, 10, 30)).solve(dense_op(a), b)
    assert sorted(kept.iterates) == [3, 10, 30] and torch.equal(kept.iterates[30], kept.x)
    for k in (3, 10):
        alone = CG(tol=1e-12, maxiter=k).solve(dense_op(a), b)
        assert torch.allclose(kept.iterates[k], alone.x, rtol=0, atol=1e-12)
    # the quadratic model decreases along the CG iterates
    assert phi(kept.iterates[3]) > phi(kept.iterates[10]) > phi(kept.iterates[30])


def test_cg_non_finite_product():
    op = LinearOperator(lambda v: v * float("nan"), 3, F64)
    with pytest.raises(SolverError, match="non-finite.*iteration 1"):
        CG().solve(op, torch.ones(3, dtype=F64))


# ------------------------------------------------------------------------------ Woodbury, Auto


@pytest.mark.parametrize("metric", [GGN(), GradientCovariance()], ids=["ggn", "gradcov"])
def test_woodbury_equals_cholesky(metric):
    point = classifier_point()
    op = metric.operator(point)
    f = op.factor()
    assert f.U.shape[0] < op.size  # batch x outputs < parameters
    b = -point.grad
    for lam in (1e-3, 1.0):
        chol = Cholesky().solve(op + lam, b)
        wood = Woodbury().solve(op + lam, b)
        assert wood.exact and f"R={f.U.shape[0]}" in wood.message
        assert rel_err(wood.x, chol.x) < 1e-9
        assert wood.residual < 1e-10
    given = Woodbury().solve(op + 0.1, b, factor=f)
    assert rel_err(given.x, Cholesky().solve(op + 0.1, b).x) < 1e-10


def test_auto_choice():
    point = classifier_point()
    ggn = GGN().operator(point)
    assert ggn.factor_rows == 18 < ggn.size == 45  # known without building the factor
    auto = Auto()
    assert isinstance(auto.choose(ggn + 1e-3), Woodbury)  # R = 18 rows < P = 45
    assert "factor" not in ggn._cache  # choosing built nothing
    assert isinstance(auto.choose(ggn + 0.0), Cholesky)  # Woodbury needs lambda > 0
    # a small maybe-indefinite M: the dense route with clipping; a large one: CG
    hess = auto.choose(Hessian().operator(point) + 1.0)
    assert isinstance(hess, Cholesky) and hess.indefinite == "clip"
    assert isinstance(Auto(dense_max=10).choose(Hessian().operator(point) + 1.0), CG)
    assert isinstance(auto.choose(Identity().operator(point) + 1e-3), Cholesky)  # no factor
    small = Auto(dense_max=10)
    assert isinstance(small.choose(ggn + 1e-3), Woodbury)
    assert isinstance(small.choose(ggn + 0.0), CG)
    assert isinstance(small.choose(Identity().operator(point) + 1e-3), CG)
    b = -point.grad
    ref = Cholesky().solve(ggn + 1e-3, b).x
    assert rel_err(auto.solve(ggn + 1e-3, b).x, ref) < 1e-10
    # a factor with more rows than parameters: Cholesky, or CG above dense_max
    big = classifier_point(n=60)
    gc = GradientCovariance().operator(big) + 1e-2
    assert gc.factor_rows == 60 > gc.size
    assert isinstance(auto.choose(gc), Cholesky)
    gc_x = small.solve(gc, -big.grad)
    assert not gc_x.exact and rel_err(gc_x.x, Cholesky().solve(gc, -big.grad).x) < 1e-6
    # the configurable dense limit is honoured at call time
    old = linop.DENSE_LIMIT
    try:
        linop.set_dense_limit(10)
        assert isinstance(auto.choose(ggn + 0.0), CG)
    finally:
        linop.set_dense_limit(old)
    assert isinstance(auto.choose(ggn + 0.0), Cholesky)


def test_auto_keeps_cholesky_for_small_float32_problems():
    """Below float64, Woodbury's (b - U^T K^-1 U b) / lambda loses accuracy at small lambda
    while Cholesky refuses cleanly: Auto takes Woodbury there only above dense_max; a failed
    Woodbury factorisation is a SingularMatrixError (the optimizer raises lambda and retries)."""
    point = classifier_point(dtype=torch.float32)
    ggn = GGN().operator(point)
    assert ggn.factor_rows < ggn.size
    assert isinstance(Auto().choose(ggn + 1e-3), Cholesky)
    assert isinstance(Auto(dense_max=10).choose(ggn + 1e-3), Woodbury)
    with pytest.raises(SingularMatrixError, match="raise the damping"):
        Woodbury().solve(ggn + 1e-30, -point.grad)


def test_woodbury_with_a_diagonal_damping():
    """(M + diag(s))^-1 b by Woodbury equals the dense solve; a zero entry is refused."""
    point = classifier_point()
    op = GGN().operator(point)
    b = -point.grad
    s = torch.linspace(1e-3, 1.0, op.size, dtype=torch.float64)
    ref = torch.linalg.solve(op.to_dense() + torch.diag(s), b)
    sol = Woodbury().solve(op.add_diagonal(s), b)
    assert sol.exact and rel_err(sol.x, ref) < 1e-9 and sol.residual < 1e-10
    assert rel_err(Cholesky().solve(op.add_diagonal(s), b).x, ref) < 1e-10
    assert isinstance(Auto().choose(op.add_diagonal(s)), Woodbury)
    with pytest.raises(SingularMatrixError, match="lambda > 0"):
        Woodbury().solve(op.add_diagonal(s * (torch.arange(op.size) > 0)), b)


def test_woodbury_reuses_the_gram_matrix():
    """A retry with another lambda reuses U U^T (the damped copies share the factor)."""
    point = classifier_point()
    op = GGN().operator(point)
    b = -point.grad
    first = Woodbury().solve(op + 1e-3, b)
    assert hasattr(op.factor(), "_gram")  # computed by the solve, not by this test
    gram = op.factor()._gram
    second = Woodbury().solve(op + 1.0, b)
    assert op.factor()._gram is gram
    for lam, sol in ((1e-3, first), (1.0, second)):
        assert rel_err(sol.x, Cholesky().solve(op + lam, b).x) < 1e-9


def test_as_solver():
    assert isinstance(as_solver("auto"), Auto)
    assert isinstance(as_solver("CG"), CG)
    assert isinstance(as_solver("cholesky"), Cholesky)
    assert isinstance(as_solver("woodbury"), Woodbury)
    s = CG(tol=1e-3)
    assert as_solver(s) is s
