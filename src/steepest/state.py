r"""The optimizer's state across steps, apart from the step itself: a saved state checked before
it is loaded, and a change of the model's trainable parameters followed.

:func:`check_state` validates what :meth:`~steepest.optimizer.Optimizer.state_dict` saved
against the optimizer it is loaded into (the damping rule and step rule it was saved with,
their keys, the length of every flat vector, the generator, a metric's own state) and raises a
:class:`~steepest.errors.ConfigurationError` that names the mismatch, before anything changes.

:func:`follow_parameters` compares the trainable set of a
:class:`~steepest.params.ParamSpace` with the model's now (a layer frozen, unfrozen or
replaced, ``load_state_dict(assign=True)``, ``model.to(dtype)``) and returns the new space, a
note for ``StepInfo.message``, and whether the flat layout changed (then the state that lives
on the old flat vector, :math:`x_{k-1}`, the momentum buffer, a damping rule's D, must be
reset; the optimizer does that and warns).

Example
-------
>>> check_state(saved, space=opt.space, damping=opt.damping, step_rule=opt.step_rule,
...             generator=opt.generator, metric=opt.metric)      # raises, or returns None
>>> change = follow_parameters(opt.space)
>>> change.space, change.note, change.layout_changed
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigurationError
from .params import ParamSpace


def check_state(
    state: Any,
    *,
    space: ParamSpace,
    damping: Any,
    step_rule: Any,
    generator: torch.Generator,
    metric: Any,
) -> None:
    """Raise a :class:`~steepest.errors.ConfigurationError` unless ``state`` is a state dict
    that an optimizer with these parts (damping rule, step rule, parameters, generator,
    metric) saved; nothing is changed."""

    def fail(what: str) -> None:
        raise ConfigurationError(
            f"cannot load this optimizer state: {what}. Load a state saved by "
            "state_dict() of an optimizer built the same way (same damping rule, step rule "
            "and model)."
        )

    if not isinstance(state, dict):
        fail(f"expected a dict, got {type(state).__name__}")
    missing = {"steps", "damping", "step_rule", "generator"} - set(state)
    if missing:
        fail(f"it lacks keys {sorted(missing)}")
    if not (isinstance(state["steps"], int) and state["steps"] >= 0):
        fail(f"steps must be an integer >= 0, got {state['steps']!r}")
    size = space.size
    for owner, key in ((damping, "damping"), (step_rule, "step_rule")):
        sub = state[key]
        if not isinstance(sub, dict):
            fail(f"state['{key}'] must be a dict, got {type(sub).__name__}")
        rule, own = sub.get("rule"), type(owner).__name__
        if rule is not None and rule != own:
            fail(f"it was saved with {key} {rule}, this optimizer uses {own}")
        keys, expected = set(sub) - {"rule"}, set(owner.state_dict())
        if keys != expected:
            fail(f"state['{key}'] has keys {sorted(keys)}, {own} expects {sorted(expected)}")
        for name, value in sub.items():
            if isinstance(value, Tensor) and value.numel() != size:
                fail(
                    f"state['{key}']['{name}'] holds {value.numel()} values, the model "
                    f"has {size} trainable parameters"
                )
    for key in ("prev_direction", "momentum_buffer"):
        v = state.get(key)
        if v is not None and not (isinstance(v, Tensor) and v.shape == (size,)):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            fail(f"state['{key}'] has shape {shape}, the model has {size} trainable parameters")
    gen = state["generator"]
    ref = generator.get_state()
    if not (isinstance(gen, Tensor) and gen.dtype == ref.dtype and gen.shape == ref.shape):
        fail(f"state['generator'] is not the state of a torch.Generator on {generator.device}")

    check = getattr(metric, "check_state", None)  # KFAC: factors fit the model
    if check is not None and state.get("metric") is not None:
        check(state["metric"], space)


@dataclass(frozen=True)
class ParameterChange:
    """What :func:`follow_parameters` found: the space to use from now on, a note for
    ``StepInfo.message`` ('' when nothing changed), and whether the flat layout changed."""

    space: ParamSpace
    note: str = ""
    layout_changed: bool = False


def follow_parameters(space: ParamSpace) -> ParameterChange:
    """The model's trainable parameters now, against ``space``: the same (nothing to do), new
    tensors of the same names, shapes, dtype and device (followed, state kept), or another
    layout (followed; the state on the old flat vector must be reset)."""
    if not space.stale():
        return ParameterChange(space)
    new = type(space)(space.model)
    same = (new.names, new.shapes, new.dtype, new.device) == (
        space.names,
        space.shapes,
        space.dtype,
        space.device,
    )
    if same:
        return ParameterChange(
            new,
            "the model's parameters are new tensors (same names and shapes): followed, state kept",
        )
    note = (
        f"the trainable parameters changed ({space.size} -> {new.size} values, "
        f"{len(space.names)} -> {len(new.names)} tensors): followed; the previous "
        "solution, momentum buffer and damping scaling were reset"
    )
    return ParameterChange(new, note, layout_changed=True)


def metric_state(metric):
    """A metric's state as it is now, to put back with :func:`set_metric_state`: K-FAC's
    cheap snapshot (its tensors are replaced, never changed in place), else a copy of its
    ``state_dict``; None for a metric without state."""
    snapshot = getattr(metric, "_snapshot", None)
    if snapshot is not None:
        return ("snapshot", snapshot())
    if hasattr(metric, "state_dict"):
        return ("state", copy.deepcopy(metric.state_dict()))
    return None


def set_metric_state(metric, state) -> None:
    """Put back what :func:`metric_state` returned."""
    if state is None:
        return
    kind, value = state
    if kind == "snapshot":
        metric._restore(value)
    else:
        metric.load_state_dict(value)


class OptimizerState:
    """The state half of :class:`steepest.Optimizer` (a mixin): ``state_dict`` /
    ``load_state_dict`` (validated by :func:`check_state`, atomic) and the snapshot a failed
    step rolls back to. Reads the optimizer's ``steps``, ``damping``, ``step_rule``,
    ``metric``, ``generator``, ``space``, ``_prev_solution`` and ``_momentum_buffer``."""

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (parameters excluded, as in torch.optim)."""
        def clone(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "steps": self.steps,
            "damping": {"rule": type(self.damping).__name__, **self.damping.state_dict()},
            "step_rule": {"rule": type(self.step_rule).__name__, **self.step_rule.state_dict()},
            "prev_direction": clone(self._prev_solution),
            "momentum_buffer": clone(self._momentum_buffer),
            "generator": self.generator.get_state(),
            # a metric that keeps state across steps (KFAC's running factors) saves it here
            **({"metric": self.metric.state_dict()} if hasattr(self.metric, "state_dict")
               else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved.

        Validated first and atomic: a state of another damping rule or step rule, of a model
        with another number of parameters, or with keys missing raises a
        :class:`~steepest.errors.ConfigurationError` before anything changes.
        """
        check_state(state, space=self.space, damping=self.damping, step_rule=self.step_rule,
                    generator=self.generator, metric=self.metric)
        self._next = None  # another run's state: the next step evaluates its point afresh
        before = copy.deepcopy(self.state_dict())
        try:
            self._load_state(state)
        except BaseException:
            self._load_state(before)
            raise

    def _rollback_state(self) -> dict:
        """What a failed step restores: :meth:`state_dict`, deep-copied, except what is only
        ever replaced, never changed in place, which is kept by reference: the previous
        solution and momentum buffer (P values each), and the state of a metric with a cheap
        snapshot (K-FAC's factors and eigendecompositions: copying them cost more than one
        K-FAC product per step on a 670k-parameter MLP)."""
        if getattr(self.metric, "_snapshot", None) is None:
            return copy.deepcopy(self.state_dict())
        return {
            "steps": self.steps,
            "damping": copy.deepcopy(self.damping.state_dict()),
            "step_rule": copy.deepcopy(self.step_rule.state_dict()),
            "prev_direction": self._prev_solution,
            "momentum_buffer": self._momentum_buffer,
            "generator": self.generator.get_state(),
            "metric_state": self._metric_state(),
        }

    def _metric_state(self):
        return metric_state(self.metric)

    def _set_metric_state(self, state) -> None:
        set_metric_state(self.metric, state)

    def _load_state(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.damping.load_state_dict({k: v for k, v in state["damping"].items() if k != "rule"})
        self.step_rule.load_state_dict(
            {k: v for k, v in state["step_rule"].items() if k != "rule"})
        pd, mb = state.get("prev_direction"), state.get("momentum_buffer")
        self._prev_solution = None if pd is None else pd.clone()
        self._momentum_buffer = None if mb is None else mb.clone()
        self.generator.set_state(state["generator"])
        if "metric_state" in state:  # a rollback (_rollback_state)
            self._set_metric_state(state["metric_state"])
        elif "metric" in state and hasattr(self.metric, "load_state_dict"):
            self.metric.load_state_dict(state["metric"])
