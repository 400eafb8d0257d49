"""Issue 12, "Evaluations": the model path (``Optimizer`` with MSE, GaussNewton and
MoreTrustRegion, the ftol/xtol defaults) on classic least-squares problems (tests/mgh.py)
posed as models, against MINPACK's ``lm`` (``scipy.optimize.least_squares(method="lm")``, its
default tolerances): the same cost, and no more function evaluations in total.

Counted as MINPACK counts: ``StepInfo.nfev`` (the forward at theta, 0 when the previous
step's accepted trial is reused, plus the trials) against scipy's ``nfev`` (1 + the trials of
lmder). The goal holds in total, not on every problem: on four problems the trust region takes
one to three iterations more than lmder (lambda is solved to 1 % of the radius where MINPACK
stops at 10 %; MoreTrustRegion(sigma=0.1) closes most of that gap), each iteration still
costing what lmder's costs. Powell's singular function is apart: the model path reaches a cost
of 0 to 1e-28 within MINPACK's evaluations but no stopping rule fires there (MINPACK stops on
its gtol cosine; the normal equations square the conditioning of the singular Jacobian at
x* = 0, so progress stalls near |x| = 1e-8): measured, not hidden, in
test_powell_singular_reaches_zero_within_minpacks_evaluations.
"""

from __future__ import annotations

import pytest
from mgh import PROBLEMS, fit, scipy_lm

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVED = [name for name in PROBLEMS if name != "powell_singular"]


def test_same_cost_and_no_more_evaluations_than_minpack_in_total():
    ours = theirs = 0
    for name in SOLVED:
        infos, cost = fit(name)
        ref = scipy_lm(name)
        assert infos[-1].converged and ref.success, name
        assert cost == pytest.approx(ref.cost, rel=1e-6, abs=1e-20), name
        nfev = sum(i.nfev for i in infos)
        # MINPACK's accounting: the first forward, then one per trial
        assert nfev == 1 + sum(i.evaluations for i in infos), name
        assert sum(i.njev for i in infos) == len(infos)
        assert nfev <= ref.nfev + 3, (name, nfev, ref.nfev)  # iterations, see the docstring
        ours, theirs = ours + nfev, theirs + ref.nfev
    assert ours <= theirs, (ours, theirs)


def test_without_reuse_each_step_costs_one_forward_more():
    """The count before the reuse: a forward at theta on every step (about twice MINPACK's)."""
    for name in ("box3d", "beale"):
        infos, _ = fit(name, reuse=False)
        after, _ = fit(name)
        assert sum(i.nfev for i in infos) == len(infos) + sum(i.evaluations for i in infos)
        assert sum(i.nfev for i in infos) - sum(i.nfev for i in after) == len(infos) - 1


def test_powell_singular_reaches_zero_within_minpacks_evaluations():
    ref = scipy_lm("powell_singular")
    infos, cost = fit("powell_singular", max_nfev=ref.nfev)
    assert sum(i.nfev for i in infos) <= ref.nfev
    assert ref.cost < 1e-40 and cost < 1e-28  # from 107.5
