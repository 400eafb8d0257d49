"""Damping rules (steepest.damping): the Levenberg-Marquardt rule of Moré 1978 / Martens 2010."""

import math

import pytest

from steepest.damping import Constant, Damping, LevenbergMarquardt, as_damping
from steepest.errors import ConfigurationError


def test_constant_is_fixed_and_never_rejects():
    c = Constant(0.5)
    for rho in (-math.inf, -1.0, 0.0, 0.5, 1.0, 10.0):
        c.update(rho)
        assert c.value == 0.5
    assert not c.adaptive and not c.reject and c.max_tries == 1
    c.raise_for_retry()
    assert c.value == 0.5


@pytest.mark.parametrize(
    "rho, factor",
    [(1.0, 2 / 3), (0.76, 2 / 3), (0.75, 1.0), (0.5, 1.0), (0.25, 1.0), (0.24, 1.5),
     (-3.0, 1.5), (-math.inf, 1.5), (math.nan, 1.5), (math.inf, 2 / 3)],
)
def test_lm_rule_thresholds(rho, factor):
    """lambda * decrease when rho > 3/4, * increase when rho < 1/4 or rho is nan/-inf."""
    lm = LevenbergMarquardt(init=1.0, decrease=2 / 3, increase=1.5)
    lm.update(rho)
    assert lm.value == pytest.approx(factor, rel=1e-15)


def test_lm_bounds_and_retry():
    lm = LevenbergMarquardt(init=1.0, decrease=0.5, increase=4.0, min=0.2, max=10.0)
    for _ in range(5):
        lm.update(1.0)
    assert lm.value == 0.2  # clipped at min
    for _ in range(5):
        lm.raise_for_retry()
    assert lm.value == 10.0  # clipped at max
    assert lm.adaptive and lm.reject and lm.max_tries == 20


def test_lm_state_dict_round_trip():
    lm = LevenbergMarquardt(init=1e-2)
    lm.update(-1.0)
    other = LevenbergMarquardt(init=7.0)
    other.load_state_dict(lm.state_dict())
    assert other.value == lm.value == pytest.approx(1e-2 * lm.increase)
    c = Constant(3.0)
    c2 = Constant()
    c2.load_state_dict(c.state_dict())
    assert c2.value == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(init=0.0), dict(init=-1.0), dict(decrease=1.0), dict(increase=0.9),
     dict(decrease=0.0), dict(min=2.0, max=1.0), dict(max_tries=0)],
)
def test_lm_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigurationError):
        LevenbergMarquardt(**kwargs)


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "0.1"])
def test_constant_rejects_bad_lambda(bad):
    with pytest.raises(ConfigurationError):
        Constant(bad)


def test_as_damping():
    assert isinstance(as_damping(0.1), Constant) and as_damping(0.1).value == 0.1
    lm = LevenbergMarquardt()
    assert as_damping(lm) is lm
    for bad in (True, "lm", None):
        with pytest.raises(ConfigurationError):
            as_damping(bad)
    assert issubclass(LevenbergMarquardt, Damping)
