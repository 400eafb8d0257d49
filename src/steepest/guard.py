r"""One step's forward passes: the model's buffers and the global random state.

A step evaluates the model several times on one batch (the point, trial points, K-FAC's
capture); :class:`ForwardGuard` makes every forward after the point's see the buffers
(BatchNorm's running statistics) and the random state (Dropout's masks) the point saw, and
puts them back when the step is rejected. Used by :mod:`steepest.optimizer`,
:mod:`steepest.trials` and :mod:`steepest.preconditioner`.

>>> with ForwardGuard(model) as guard:
...     point = Point(model, loss, x, y); guard.point_done()
...     with guard.trial(): evaluate(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The global random state: CPU, and every CUDA device's once CUDA is initialised."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class ForwardGuard:
    r"""Buffers and random state across the forward passes of one optimizer step.

    One ``torch.optim`` training step runs the model forward once on the batch: BatchNorm's
    running statistics move once and Dropout draws one set of masks. A step of
    :math:`\delta = -\alpha (M + \lambda I)^{-1} g` evaluates the model more often (rejected
    tries, line-search trials, the loss :math:`L(\theta + \delta)` of rho, a curvature
    sub-batch). The guard makes those extra evaluations invisible:

    - the forward at the step's point (inside ``with guard:`` before :meth:`point_done`) runs as
      usual: the buffers are updated once, from the forward at :math:`\theta`;
    - every later forward of the step runs on fresh copies of the buffers as the point's
      forward left them (each :meth:`trial` gets its own), so trial evaluations never write the
      module's buffers and all see the same values; inside :meth:`trial` the global random
      state is first set to what the point's forward started from, so Dropout draws the same
      masks on the same batch (rho then compares like with like), and afterwards put back
      where the point's forward left it;
    - :meth:`rollback` (a failed step) puts the buffers and the random state back to what they
      were before the point's forward; leaving the ``with`` block hands the module's own
      buffers back.

    Modules are found by a global forward pre-hook
    (``torch.nn.modules.module.register_module_forward_pre_hook``), so the model behind a
    closure is covered without being named; a module whose ``forward`` is called directly
    (not through ``module(x)``) is not seen.

    Example
    -------
    >>> with ForwardGuard(model) as guard:
    ...     point = Point(model, loss, x, y)      # running stats updated once
    ...     guard.point_done()
    ...     with guard.trial():
    ...         evaluate(point.space, loss, x, y, theta_new)   # running stats untouched
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._modules: dict[int, nn.Module] = {}
        self._before: dict[int, dict[str, Tensor]] = {}  # copies from before the step
        self._own: dict[int, dict[str, Tensor]] = {}  # the module's own buffer tensors
        self._swapped: set[int] = set()
        self._after_point = False
        self._handle = None
        self._rng0 = _rng_state()
        self._rng1: tuple[Tensor, list[Tensor] | None] | None = None
        if model is not None:
            for m in model.modules():
                self._see(m)

    def _see(self, module: nn.Module) -> None:
        key = id(module)
        if key in self._modules:
            return
        own = {n: b for n, b in module._buffers.items() if b is not None}
        self._modules[key] = module
        with torch.no_grad():
            self._before[key] = {n: b.clone() for n, b in own.items()}
        self._own[key] = own

    def _hook(self, module: nn.Module, args: Any) -> None:
        self._see(module)
        key = id(module)
        if self._after_point and key not in self._swapped and self._own[key]:
            self._swapped.add(key)
            with torch.no_grad():
                for n, b in self._own[key].items():
                    module._buffers[n] = b.clone()

    def _unswap(self) -> None:
        for key in self._swapped:
            self._modules[key]._buffers.update(self._own[key])
        self._swapped.clear()

    def __enter__(self) -> ForwardGuard:
        from torch.nn.modules.module import register_module_forward_pre_hook

        self._handle = register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._unswap()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._rng1 is not None and exc[0] is None:
            _set_rng_state(self._rng1)

    def point_done(self) -> None:
        """The point's forward is over: later forwards run on copies of these buffers."""
        for key, module in self._modules.items():
            self._own[key] = {n: b for n, b in module._buffers.items() if b is not None}
        self._rng1 = _rng_state()
        self._after_point = True

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """A forward at a trial point: fresh buffer copies, the point's random state."""
        self._unswap()
        now = _rng_state()
        _set_rng_state(self._rng0)
        try:
            yield
        finally:
            self._unswap()
            _set_rng_state(self._rng1 if self._rng1 is not None else now)

    def trial_was_pure(self) -> bool:
        """Inside :meth:`trial`, after its forwards: whether they drew no random numbers (the
        global random state is still the point's start state) and wrote no buffer (every
        swapped-in copy still equals the buffer it was copied from). Only then is a trial's
        forward the one a fresh forward at that point would make, whatever the random state
        and with the module's own buffers: what the optimizer needs to reuse it as the next
        step's point."""
        now, start = _rng_state(), self._rng0
        if not torch.equal(now[0], start[0]) or (now[1] is None) != (start[1] is None) or (
                now[1] is not None and not all(
                    torch.equal(a, b) for a, b in zip(now[1], start[1], strict=True))):
            return False
        for key in self._swapped:
            current = self._modules[key]._buffers
            for n, b in self._own[key].items():
                cur = current.get(n)
                if cur is None or cur.shape != b.shape or not torch.equal(cur, b):
                    return False
        return True

    def rollback(self) -> None:
        """Buffers and random state as before the step (a failed step)."""
        self._unswap()
        with torch.no_grad():
            for key, module in self._modules.items():
                for n, saved in self._before[key].items():
                    cur = module._buffers.get(n)
                    if cur is not None and cur.shape == saved.shape and cur.dtype == saved.dtype:
                        if not torch.equal(cur, saved):
                            cur.copy_(saved)
                    else:
                        module._buffers[n] = saved
        _set_rng_state(self._rng0)
        self._rng1 = None
