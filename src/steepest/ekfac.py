r"""EKFAC (George et al. 2018): K-FAC's eigenbasis :math:`Q_G \otimes Q_A` with the diagonal
re-estimated in it from per-sample gradients,
:math:`s = E_n[\sum_k (Q_G^T\,\nabla_{W} l_{nk}\,Q_A)^{\odot 2}]` (see :mod:`steepest.kronecker`).

Example
-------
>>> opt = Optimizer(model, CrossEntropy(), metric=EKFAC(), damping=LevenbergMarquardt(1e-2))
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kronecker import KFAC
from .kronecker_blocks import _Block
from .linop import LinearOperator


class EKFAC(KFAC):
    r"""Eigenvalue-corrected K-FAC (George et al. 2018): per layer
    :math:`(Q_G\otimes Q_A)\,\mathrm{diag}(s)\,(Q_G\otimes Q_A)^T` with :math:`Q_A, Q_G` the
    eigenvectors of the K-FAC factors and the scalings re-estimated from per-sample gradients,
    :math:`s = E_n[\sum_k (Q_G^T\, g_{nk}\bar a_n^T\, Q_A)^{\odot 2}]` (sums over positions for
    sequences and convolutions), the exact diagonal of the base in that basis. The other
    parameters get the exact diagonal of the base, as in :class:`KFAC`.

    Parameters are those of :class:`KFAC`, except ``damping``: always ``"exact"`` here (the
    inverse is :math:`Q\,\mathrm{diag}(1/(s + \lambda))\,Q^T`); ``damping="factored"`` is
    refused with a :class:`~steepest.errors.ConfigurationError`.

    >>> opt = Optimizer(model, CrossEntropy(), metric=EKFAC(), damping=LevenbergMarquardt(1e-2))
    """

    name = "EKFAC"
    per_sample_rows = True
    factored_damping = False

    def _decomposes(self) -> bool:
        return True  # the eigenbasis is the operator

    def operator(self, point) -> LinearOperator:
        self.base.check(point)
        calls = self._state["calls"]
        new, _ = self._refresh(point)
        self._eigen(calls, point)
        st_ = self._state
        # the scalings are re-estimated on every fresh capture, in the current eigenbasis
        if new is not None:
            scal = {}
            for key, (a, g) in new["raw"].items():
                ea, qa, eg, qg = st_["eig"][key]
                scal[key] = _scalings(a, g, qa, qg, new["n"], new["w"])
            scal = dict(zip(scal, point.mean_over_ranks(list(scal.values()))))
            old = st_.get("scalings")
            if old is not None and self.ema is not None and set(old) == set(scal):
                eps = min(1 - 1 / st_["refreshes"], self.ema)
                scal = {k: eps * old[k] + (1 - eps) * s for k, s in scal.items()}
            st_["scalings"] = scal
            st_["basis"] = {k: (st_["eig"][k][1], st_["eig"][k][3]) for k in scal}
        fac = st_["factors"]
        keys = list(fac["blocks"])
        blocks = [_Block(wi, bi, *fac["blocks"][(wi, bi)]) for wi, bi in keys]
        st = self._structure(point, blocks)
        qs = [st_["basis"][k] for k in keys]
        ss = [st_["scalings"][k] for k in keys]
        others = fac["others"]
        size, dt, dev = point.size, point.grad.dtype, point.grad.device

        def apply(rows: Tensor, f) -> Tensor:
            out = torch.empty_like(rows)
            for blk, (qa, qg), s in zip(blocks, qs, ss):
                x = st.gather(rows, blk)
                y = qg.transpose(-1, -2) @ x @ qa
                st.scatter(out, qg @ f(y, s) @ qa.transpose(-1, -2), blk)
            for i in st.others:
                out[:, st.offsets[i] : st.offsets[i + 1]] = f(st.piece(rows, i), others[i])
            return out

        def mm(V: Tensor) -> Tensor:
            return apply(V.T, lambda y, s: y * s).T

        def inverse(b: Tensor, lam: float) -> Tensor:
            lam = float(lam)
            rows = b.reshape(1, -1) if b.ndim == 1 else b.T
            out = apply(rows, lambda y, s: y / (s + lam))
            return out[0] if b.ndim == 1 else out.T

        def diag() -> Tensor:
            out = torch.empty(1, size, dtype=dt, device=dev)
            for blk, (qa, qg), s in zip(blocks, qs, ss):
                # diag(Q diag(s) Q^T) with Q = Q_G (x) Q_A: (Q_G^2) s (Q_A^2)^T per group
                st.scatter(out, (qg.pow(2) @ s @ qa.pow(2).transpose(-1, -2)).unsqueeze(0), blk)
            for i in st.others:
                out[0, st.offsets[i] : st.offsets[i + 1]] = others[i]
            return out[0]

        return self._linop(mm, diag, inverse, point, size, dt, dev, exact=True)

    def scalings(self) -> dict:
        """The current per-layer scalings s (grp, o, d), keyed by (weight index, bias index)."""
        return self._state.get("scalings", {})


def _scalings(a: Tensor, g: Tensor, qa: Tensor, qg: Tensor, n: int, w: Tensor | None) -> Tensor:
    """:math:`E_n[\\sum_k (Q_G^T G_{nk} Q_A)^2]` with :math:`G_{nk} = \\sum_t g_{ntk}\\bar
    a_{nt}^T`, the per-sample gradient of the layer (rows R = N * positions)."""
    k, grp, r, o = g.shape
    pa = (a @ qa).reshape(grp, n, r // n, -1)  # (grp, N, T, d)
    pg = (g @ qg).reshape(k, grp, n, r // n, o)  # (K, grp, N, T, o)
    per = torch.einsum("kgnto,gntd->kgnod", pg, pa)  # per-sample projected gradients
    sq = per.pow(2)
    if w is not None:
        sq = sq * w.T.reshape(k, 1, n, 1, 1)
    return sq.sum((0, 2)) / n
