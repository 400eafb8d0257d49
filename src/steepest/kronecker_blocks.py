r"""The pieces of K-FAC's per-layer blocks that do not depend on the metric (see
:mod:`steepest.kronecker`): a layer's block :math:`G \otimes A` (``_Block``) and the flat-vector
plumbing of all blocks (``_Structure``); the factors' eigendecompositions (float64 retry) and
damped inverses (Cholesky, with Martens & Grosse's :math:`\pi`); the product of a block written
into the flat vector; and the check that a block of ``.grad`` is the recorded
:math:`g^T \bar a` of the preconditioner's fast path.

Example
-------
>>> mu, q = _eigh(factor)                     # eigenvalues clamped at 0
>>> inv = _damped_inverse(factor, shift, signed=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigurationError, NonFiniteError, SingularMatrixError
from .linop import eigh


# ---------------------------------------------------------------------------------- blocks
@dataclass
class _Block:
    """G (x) A for one layer, per group: A (grp, d, d), G (grp, o, o)."""

    wi: int
    bi: int | None
    A: Tensor
    G: Tensor


def _sym_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part of a factor. LAPACK's eigensolver can fail to converge
    in float32 on ill-conditioned factors (seen on a float32 CNN), or return NaN without
    raising (seen on a rank-deficient float32 G of the digits autoencoder, finite entries of
    size 1e-2 to 1e-17): the factor is then decomposed in float64 and the result cast back; a
    failure there too is :func:`~steepest.linop.eigh`'s
    :class:`~steepest.errors.SingularMatrixError`."""
    sym = 0.5 * (m + m.transpose(-1, -2))
    try:
        mu, q = torch.linalg.eigh(sym)
        if bool(torch.isfinite(mu).all()) and bool(torch.isfinite(q).all()):
            return mu, q
    except torch.linalg.LinAlgError:
        pass
    if not bool(torch.isfinite(sym).all()):
        raise NonFiniteError(
            "a Kronecker factor holds NaN or infinite entries (the layer's inputs or output "
            "gradients overflowed); lower the learning rate or raise the damping."
        )
    mu, q = eigh(sym.double(), name="a Kronecker factor")
    if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(q).all())):
        raise SingularMatrixError(
            f"the eigendecomposition of a Kronecker factor ({sym.shape[-1]} x "
            f"{sym.shape[-1]}) is not finite even in float64; raise the damping or use float64."
        )
    return mu.to(sym.dtype), q.to(sym.dtype)


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues clamped at 0 (a PSD factor's rounding) and eigenvectors."""
    mu, q = _sym_eigh(m)
    return mu.clamp_min(0), q


def _eigh_signed(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues unclamped: a signed G (GGN of an indefinite H_L) keeps its negative part,
    so that the own inverse inverts the operator that ``@`` applies."""
    return _sym_eigh(m)


class _Structure:
    """Flat-vector plumbing shared by K-FAC and EKFAC: split a flat vector (or columns) into the
    blocks' [W b] matrices and the other parameters, and join back."""

    def __init__(self, sizes: list[int], shapes: list, blocks: list[_Block], others: list[int]):
        self.sizes, self.shapes, self.blocks, self.others = sizes, shapes, blocks, others
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)

    def piece(self, v: Tensor, i: int) -> Tensor:  # v: (k, P)
        return v[:, self.offsets[i] : self.offsets[i + 1]]

    def gather(self, v: Tensor, blk: _Block) -> Tensor:
        """(k, grp, o, d) from flat rows (k, P)."""
        grp, o = blk.G.shape[0], blk.G.shape[1]
        w = self.piece(v, blk.wi).reshape(v.shape[0], grp, o, -1)
        if blk.bi is None:
            return w
        b = self.piece(v, blk.bi).reshape(v.shape[0], grp, o, 1)
        return torch.cat([w, b], -1)

    def scatter(self, out: Tensor, x: Tensor, blk: _Block) -> None:
        """Write the blocks' [W b] matrices x (k, grp, o, d) into flat rows out (k, P), one
        strided copy each (no intermediate reshape copy)."""
        if blk.bi is None:
            self.piece(out, blk.wi).view(x.shape).copy_(x)
        else:
            self.piece(out, blk.wi).view(*x.shape[:-1], -1).copy_(x[..., :-1])
            self.piece(out, blk.bi).view(x.shape[:-1]).copy_(x[..., -1])


def _structure_copy(x):
    """New dicts, lists and tuples around the same tensors."""
    if isinstance(x, dict):
        return {k: _structure_copy(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_structure_copy(v) for v in x)
    return x


def _clone(x):
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_clone(v) for v in x)
    return x


def _product_into(st: _Structure, flat: Tensor, blk: _Block, left: Tensor, right: Tensor) -> None:
    """``left @ right`` (o, d) of an ungrouped block written straight into its weight (o, d - 1)
    and bias (o,) pieces of the flat vector ``flat`` (no intermediate block, no scatter)."""
    o = left.shape[0]
    if blk.bi is None:
        torch.mm(left, right, out=st.piece(flat[None], blk.wi).view(o, -1))
        return
    torch.mm(left, right[:, :-1], out=st.piece(flat[None], blk.wi).view(o, -1))
    torch.mv(left, right[:, -1], out=st.piece(flat[None], blk.bi).view(o))


def _probes(cache: dict, o: int, d: int, dtype: torch.dtype, device) -> tuple[Tensor, ...]:
    """Two Gaussian probe vectors u (2, o) and v (2, d), seeded 0 (the same values at every
    call), drawn once per layer shape and kept in ``cache``: u in ``dtype`` (for the pass over
    the gradient) and u, v in float64 (u the same values)."""
    key = (o, d, dtype, str(device))
    if key not in cache:
        gen = torch.Generator(device=device).manual_seed(0)
        u = torch.randn(2, o, generator=gen, dtype=torch.float64, device=device).to(dtype)
        v = torch.randn(2, d, generator=gen, dtype=torch.float64, device=device)
        cache[key] = (u, u.double(), v)
    return cache[key]


def _times_rows(a: Tensor, m: Tensor, bias: bool) -> Tensor:
    r""":math:`\bar a M` for input rows a (R, d - 1) and M (d, k), :math:`\bar a = [a\ 1]`
    when ``bias`` (one ``addmm``: the column of ones is never formed), else :math:`a M`."""
    return torch.addmm(m[-1], a, m[:-1]) if bias else a @ m


def _recorded_gradient(
    w: Tensor, b: Tensor | None, rec: tuple[Tensor, Tensor], factored: bool, cache: dict
) -> bool:
    r"""Whether the block :math:`X = [W\ b]` (o, d) of the right-hand side (``w`` (o, d - 1)
    and ``b`` (o,), or ``w`` (o, d) without bias) is the recorded :math:`g^T \bar a` (input
    rows a (R, d - 1) with :math:`\bar a = [a\ 1]`, or :math:`\bar a` = a (R, d) without
    bias), and the factorised product is the cheaper one (:math:`2R(o^2 + d^2 + od)` against
    :math:`2(o^2 d + o d^2)` flops; the exact damping adds the dense back-projection either
    way).

    The check is a sketch with two Gaussian probes, :math:`u^T X v = (g u)^T(\bar a v)`, at
    :math:`O(od + R(o + d))` instead of the :math:`2Rod` of forming :math:`g^T\bar a`, and it
    reads X once: :math:`z = u^T X` in X's dtype (one matrix product of two rows), the rest
    (:math:`z v`, the rows' side) in float64. Two roundings separate the sides when ``.grad``
    is the recorded gradient: autograd formed each entry of X off the exact sum by about
    :math:`\epsilon\sqrt R` times :math:`|x_{ij}|` (rows of one sign) or
    :math:`(\sum_r g_{ri}^2 \bar a_{rj}^2)^{1/2}` (cancelling rows), and z sums o products
    in X's dtype (about :math:`\epsilon\sqrt o\,|z_j|`). With
    :math:`s_z^2 = \sum_j v_j^2 z_j^2` (the size of :math:`\sum_{ij} u_i^2 x_{ij}^2 v_j^2`)
    and :math:`s_r^2 = \sum_r (g_r^2 \cdot u^2)(\bar a_r^2 \cdot v^2)` the block passes when
    both differences are within :math:`4\epsilon\,(R\,(s_z^2 + s_r^2) + o\, s_z^2)^{1/2}`
    (on the MLP 784-512-512-10 in float32 the two roundings measured at most 0.16 and 0.37 of
    their terms). A gradient that is not the recorded one (weight decay added to ``.grad``,
    accumulated micro-batches, another loss, a weight also used outside the layer) fails it
    and gets the dense product; a false alarm only costs the dense product."""
    a, g = rec
    bias = b is not None
    r, o, dw = a.shape[0], g.shape[-1], a.shape[-1]
    d = dw + bias
    dt = w.dtype
    if w.shape != (o, dw) or a.dtype != dt or g.dtype != dt or g.shape[0] != r:
        return False
    fast = r * (o * o + d * d + o * d)
    dense = o * o * d + o * d * d
    if (fast if factored else fast + dense) >= (dense if factored else 2 * dense):
        return False
    u, ud, v = _probes(cache, o, d, dt, w.device)
    z = (u @ w).double()  # (2, dw): the one pass over the weight's gradient
    zv = z * v[:, :dw]
    lhs, sz2 = zv.sum(1), zv.square().sum(1)
    if bias:
        zb = (ud @ b.double()) * v[:, dw]
        lhs, sz2 = lhs + zb, sz2 + zb.square()
    ad, gd = a.double(), g.double()
    rhs = ((gd @ ud.T) * _times_rows(ad, v.T, bias)).sum(0)
    sr2 = ((gd.square() @ ud.square().T) * _times_rows(ad.square(), v.square().T, bias)).sum(0)
    eps = torch.finfo(dt).eps
    tol = 4 * eps * (r * (sz2 + sr2) + o * sz2).sqrt()
    return bool(((lhs - rhs).abs() <= tol).all())


def _damped_inverse(m: Tensor, shift: Tensor, signed: bool) -> Tensor:
    """:math:`(M + c I)^{-1}` of a factor M (grp, n, n) with per-group shifts c (grp, 1, 1), by
    Cholesky (``cholesky_inverse``). Where a group is not positive definite in floating point
    (a shift at the rounding of M, or a signed G of an indefinite GGN) the group's
    eigendecomposition is used instead, eigenvalues clamped at 0 as the eigendecomposition path
    does (unclamped for a signed G)."""
    n = m.shape[-1]
    sym = 0.5 * (m + m.transpose(-1, -2))
    damped = sym + shift * torch.eye(n, dtype=m.dtype, device=m.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    bad = torch.nonzero(info).flatten().tolist()
    if bad:  # a failed group's partial factor can hold a zero pivot: cholesky_inverse raises
        chol = chol.clone()
        chol[bad] = torch.eye(n, dtype=m.dtype, device=m.device)
    out = torch.cholesky_inverse(chol)
    for k in bad:
        mu, q = _eigh_signed(m[k]) if signed else _eigh(m[k])
        out[k] = (q / (mu + shift[k, 0])) @ q.T
    return out


def _pi(A: Tensor, G: Tensor) -> Tensor:
    """Martens & Grosse's pi = sqrt((tr A / dim A) / (tr G / dim G)), per group (grp, 1, 1)."""
    ta = A.diagonal(dim1=-2, dim2=-1).mean(-1)
    tg = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    tiny = torch.finfo(A.dtype).tiny
    return (ta.clamp_min(tiny) / tg.clamp_min(tiny)).sqrt()[:, None, None]


def check_saved_state(name: str, state: dict, space) -> None:
    """:meth:`KFAC.check_state` for the metric named ``name``: raise a
    :class:`~steepest.errors.ConfigurationError` unless the saved K-FAC / EKFAC ``state``
    fits the parameters of ``space`` (blocks, diagonals, eigendecompositions, scalings).
    Changes nothing."""

    def fail(what: str) -> None:
        raise ConfigurationError(
            f"cannot load this {name} state: {what}. Load a state saved by the same metric "
            "on the same model."
        )

    if not isinstance(state, dict) or "calls" not in state:
        fail("it is no dict saved by state_dict()")
    sizes = [p.numel() for p in space.params]
    shapes = [tuple(p.shape) for p in space.params]
    fac = state.get("factors")
    blocks = {} if fac is None else fac.get("blocks", {})
    dims = {}
    for key, (A, G) in blocks.items():
        wi, bi = key
        if not (0 <= wi < len(sizes)) or (bi is not None and not 0 <= bi < len(sizes)):
            fail(f"block {key} names parameters the model (with {len(sizes)}) lacks")
        grp, o, d = G.shape[0], G.shape[-1], A.shape[-1]
        dw = d - (bi is not None)
        ok = (
            G.shape == (grp, o, o)
            and A.shape == (grp, d, d)
            and shapes[wi][0] == grp * o
            and sizes[wi] == grp * o * dw
            and (bi is None or sizes[bi] == grp * o)
        )
        if not ok:
            fail(
                f"block {key} has G {tuple(G.shape)} and A {tuple(A.shape)}, which do not fit "
                f"a weight of shape {shapes[wi]}"
            )
        dims[key] = (grp, o, d)
    for i, diag in ({} if fac is None else fac.get("others", {})).items():
        if not (0 <= i < len(sizes)) or diag.numel() != sizes[i]:
            fail(f"the diagonal of parameter {i} does not fit the model's parameters")
    eig = state.get("eig")
    for key, (_ea, qa, _eg, qg) in ({} if eig is None else eig).items():
        if key not in dims:
            fail(f"eigendecomposition {key} has no block")
        grp, o, d = dims[key]
        if qa.shape != (grp, d, d) or qg.shape != (grp, o, o):
            fail(f"eigendecomposition {key} does not fit its block")
    for key, (A, G) in (state.get("eig_factors") or {}).items():
        if key not in dims or (G.shape, A.shape) != (
            (dims[key][0], dims[key][1], dims[key][1]),
            (dims[key][0], dims[key][2], dims[key][2]),
        ):
            fail(f"the decomposed factors {key} do not fit their block")
    for key, sc in state.get("scalings", {}).items():
        if key not in dims or tuple(sc.shape) != dims[key][:1] + (dims[key][1], dims[key][2]):
            fail(f"scalings {key} do not fit their block")
    prev = state.get("previous")
    if prev is not None and prev.numel() != sum(sizes):
        fail(f"the previous answer holds {prev.numel()} values, the model {sum(sizes)}")
