"""LinearOperator (steepest.linop) against explicit matrices, sizes drawn by hypothesis:
products, dense, diagonal (also the chunked fallbacks), factor, damping, size limit, scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import rel_err, seeded

from steepest.errors import DenseTooLargeError, ShapeError
from steepest.linop import Factor, LinearOperator

F64 = torch.float64
SETTINGS = settings(max_examples=10, deadline=None)


def spd(p: int, seed: int, rank: int | None = None):
    """(A = U^T U / n, U) with U of shape (rank, p)."""
    r = rank or p + 2
    u = torch.randn(r, p, generator=seeded(seed), dtype=F64)
    return u.T @ u / 3, u


def op_from(a: torch.Tensor, u=None, **kw) -> LinearOperator:
    return LinearOperator(
        lambda v: a @ v,
        a.shape[0],
        a.dtype,
        factor=(lambda: Factor(u, 3)) if u is not None else None,
        **kw,
    )


sizes = st.tuples(st.integers(1, 12), st.integers(0, 10_000))


@SETTINGS
@given(sizes)
def test_products_dense_diagonal(size_seed):
    p, seed = size_seed
    a, u = spd(p, seed)
    op = op_from(a)
    v = torch.randn(p, generator=seeded(seed + 1), dtype=F64)
    vs = torch.randn(p, 3, generator=seeded(seed + 2), dtype=F64)
    assert op.shape == (p, p) and op.dtype == F64 and op.device.type == "cpu"
    assert rel_err(op.matvec(v), a @ v) < 1e-14
    assert rel_err(op @ v, a @ v) < 1e-14
    assert rel_err(op.matmat(vs), a @ vs) < 1e-14
    assert rel_err(op @ vs, a @ vs) < 1e-14
    assert rel_err(op.to_dense(), a) < 1e-14
    assert rel_err(op.diagonal(), a.diagonal()) < 1e-14


@SETTINGS
@given(sizes, st.floats(0.0, 10.0))
def test_add_diagonal_keeps_factor_and_base(size_seed, lam):
    p, seed = size_seed
    a, u = spd(p, seed, rank=max(1, p // 2))
    op = op_from(a, u)
    damped = op + lam
    eye = torch.eye(p, dtype=F64)
    assert damped is not op and op.shift == 0 and damped.shift == lam
    assert (lam + op).shift == lam
    assert rel_err(damped.to_dense(), a + lam * eye) < 1e-14
    v = torch.randn(p, generator=seeded(seed), dtype=F64)
    assert rel_err(damped @ v, (a + lam * eye) @ v) < 1e-14
    assert rel_err(damped.matmat(eye), a + lam * eye) < 1e-14
    assert rel_err(damped.diagonal(), a.diagonal() + lam) < 1e-14
    f = damped.factor()  # the factor of M, not of M + lambda I
    assert rel_err(f.U.T @ f.U / f.n, a) < 1e-14
    # the diagonal from the factor alone
    only_factor = LinearOperator(lambda v: a @ v, p, F64, factor=lambda: Factor(u, 3))
    assert rel_err(only_factor.diagonal(), a.diagonal()) < 1e-14
    twice = damped.add_diagonal(1.0)
    assert twice.shift == lam + 1.0
    assert damped.psd and not op.add_diagonal(-1.0).psd


def test_chunked_fallbacks_above_256():
    """The column-by-column dense and diagonal paths work in chunks of 256 columns."""
    p = 300
    a, _ = spd(p, 0, rank=20)
    calls = []

    def mv(v):
        calls.append(1)
        return a @ v

    op = LinearOperator(mv, p, F64)
    assert rel_err(op.diagonal(), a.diagonal()) < 1e-14
    assert rel_err(op.to_dense(), a) < 1e-14
    assert len(calls) == 2 * p  # one product per column for each
    # once the dense matrix is formed, the diagonal is read from it: no product more
    assert torch.equal(op.diagonal(), op.to_dense().diagonal())
    assert torch.equal(op.add_diagonal(2.0).diagonal(), op.to_dense().diagonal() + 2.0)
    assert len(calls) == 2 * p
    assert not op.has_factor()
    with pytest.raises(NotImplementedError, match="no sample-space factor"):
        op.factor()


def test_provided_builders_are_used():
    a, _ = spd(5, 1)

    def fail(v):
        raise AssertionError("matvec called")

    op = LinearOperator(
        fail, 5, F64, dense=lambda: a, diagonal=lambda: a.diagonal(), matmat=lambda v: a @ v
    )
    assert rel_err(op.to_dense(), a) < 1e-15
    assert rel_err(op.diagonal(), a.diagonal()) < 1e-15
    assert rel_err(op.matmat(torch.eye(5, dtype=F64)), a) < 1e-15
    # a dense builder that returns a slightly non-symmetric matrix is symmetrised
    skew = a + 1e-3 * torch.triu(torch.ones(5, 5, dtype=F64), 1)
    op2 = LinearOperator(fail, 5, F64, dense=lambda: skew)
    assert torch.equal(op2.to_dense(), op2.to_dense().T)


def test_shape_checks_and_limit():
    op = op_from(torch.eye(4, dtype=F64))
    with pytest.raises(ShapeError, match=r"shape \(4,\)"):
        op.matvec(torch.ones(3, dtype=F64))
    with pytest.raises(ShapeError, match=r"\(4, k\)"):
        op.matmat(torch.ones(3, 2, dtype=F64))
    with pytest.raises(DenseTooLargeError, match="limit of 3"):
        op.to_dense(limit=3)
    assert "LinearOperator(M, shape=(4, 4)" in repr(op)


@SETTINGS
@given(st.integers(6, 20), st.integers(0, 10_000))
def test_to_scipy_eigsh_and_cg(p, seed):
    a, _ = spd(p, seed)
    op = op_from(a) + 0.5
    dense = (a + 0.5 * torch.eye(p, dtype=F64)).numpy()
    sop = op.to_scipy()
    assert sop.shape == (p, p) and sop.dtype == np.float64
    vals = sla.eigsh(sop, k=2, which="LA", return_eigenvectors=False)
    ref_vals = np.linalg.eigvalsh(dense)[-2:]
    np.testing.assert_allclose(np.sort(vals), ref_vals, rtol=1e-8)
    b = np.random.default_rng(seed).standard_normal(p)
    x, info = sla.cg(sop, b, rtol=1e-12, maxiter=10 * p)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(dense, b), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sop @ np.eye(p), dense, rtol=1e-13, atol=1e-14)


def test_to_scipy_from_float32():
    a, _ = spd(5, 3)
    op = op_from(a.float())
    out = op.to_scipy() @ np.ones(5)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, a.numpy() @ np.ones(5), rtol=1e-5)


@SETTINGS
@given(sizes)
def test_diagonal_damping_against_dense(size_seed):
    """M + diag(s) (a scaled damping): products, dense, diagonal equal the explicit matrix;
    the factor and the cached dense M are shared with the undamped operator."""
    p, seed = size_seed
    a, u = spd(p, seed, rank=max(1, p - 1))
    s = torch.rand(p, generator=seeded(seed + 1), dtype=F64) + 0.1
    op = op_from(a, u, factor_rows=u.shape[0])
    damped = op.add_diagonal(s)
    ref = a + torch.diag(s)
    v = torch.randn(p, generator=seeded(seed + 2), dtype=F64)
    m = torch.randn(p, 3, generator=seeded(seed + 3), dtype=F64)
    assert damped.diagonal_shift() and damped.is_damped() and not op.is_damped()
    assert rel_err(damped @ v, ref @ v) < 1e-12
    assert rel_err(damped @ m, ref @ m) < 1e-12
    assert rel_err(damped.to_dense(), ref) < 1e-12
    assert rel_err(damped.diagonal(), ref.diagonal()) < 1e-12
    assert damped.psd and not op.add_diagonal(-s).psd
    assert damped.damping_positive() and not op.add_diagonal(-s).damping_positive()
    assert damped.damping_quad(v) == pytest.approx(float(v @ torch.diag(s) @ v), rel=1e-12)
    assert (op + 0.5).damping_quad(v) == pytest.approx(0.5 * float(v @ v), rel=1e-12)
    assert not op.damping_positive() and op.damping_quad(v) == 0.0
    assert damped.factor() is op.factor() and damped.factor_rows == u.shape[0]
    both = damped.add_diagonal(0.5)  # diag(s) + 0.5 I
    assert rel_err(both.to_dense(), ref + 0.5 * torch.eye(p, dtype=F64)) < 1e-12
    with pytest.raises(ShapeError, match="diagonal damping needs shape"):
        op.add_diagonal(torch.ones(p + 1, dtype=F64))
