"""The result object of :mod:`steepest.fit` (scipy's ``OptimizeResult``) and the status
messages of :func:`~steepest.fit.least_squares`."""

from __future__ import annotations

from .bounds import _active, _optimality

MESSAGES = {
    -1: (
        "The Jacobian is not finite at x, or (levenberg-marquardt, gauss-newton: no column "
        "scaling) the square of its largest column norm over- or underflows: the fit stopped "
        "there (method='trust-region' scales J's columns)."
    ),
    0: "The maximum number of function evaluations is exceeded.",
    1: "`gtol` termination condition is satisfied.",
    2: "`ftol` termination condition is satisfied.",
    3: "`xtol` termination condition is satisfied.",
    4: "Both `ftol` and `xtol` termination conditions are satisfied.",
}


class OptimizeResult(dict):
    """The result of a fit, a dict whose keys read as attributes (as ``scipy.optimize``'s).

    For :func:`least_squares`: ``x``, ``cost`` (:math:`\\tfrac12\\|f\\|^2`), ``fun`` (f at x),
    ``jac`` (J at x), ``grad`` (:math:`J^T f`), ``optimality`` (:math:`\\|J^T f\\|_\\infty`),
    ``status``, ``message``, ``success``, ``nfev``, ``njev``, ``nit`` (accepted steps), and
    ``method``. For a batch of B problems every entry has a leading axis B (``status``, ``nfev``,
    ... tensors, ``message`` a list of B strings).

    >>> res = steepest.least_squares(fun, x0)
    >>> res.x, res["cost"], res.success
    """

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__

    def __repr__(self) -> str:
        if not self:
            return f"{type(self).__name__}()"
        width = max(map(len, self)) + 1
        return "\n".join(f"{k.rjust(width)}: {v!r}" for k, v in self.items())

    def __dir__(self):
        return list(self.keys())


def _result(out: dict, batched: bool, method: str, box=None) -> OptimizeResult:
    """The OptimizeResult of the core's output ``out``; ``box``: the bounds (lb, ub) or None."""
    f, jac, grad, cost = out["fun"], out["jac"], out["grad"], out["cost"]
    status = out["status"]
    res = OptimizeResult(
        x=out["x"],
        cost=cost,
        fun=f,
        jac=jac,
        grad=grad,
        optimality=grad.abs().amax(-1),
        status=status,
        nfev=out["nfev"],
        njev=out["njev"],
        nit=out["nit"],
    )
    res["success"] = status > 0
    res["message"] = [MESSAGES[s] for s in status.tolist()]
    if box is not None:  # bounds: the projected gradient's norm, and which bounds bind
        res["optimality"] = _optimality(out["x"], grad, *box)
        res["active_mask"] = _active(out["x"], *box)
    if not batched:
        for key in ("x", "fun", "jac", "grad") + (("active_mask",) if box is not None else ()):
            res[key] = res[key].squeeze(0)
        for key in ("cost", "optimality"):
            res[key] = float(res[key][0])
        for key in ("status", "nfev", "njev", "nit"):
            res[key] = int(res[key][0])
        res["success"] = bool(res["success"][0])
        res["message"] = res["message"][0]
    res["method"] = method
    return res
