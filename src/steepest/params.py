"""The flat parameter view: the only place that knows parameter order.

The flat vector theta holds the *trainable* parameters of a module (``requires_grad=True``), in
the order of ``model.parameters()`` (tied parameters appear once), each flattened row-major.
Frozen parameters and buffers stay in the module and are never part of theta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigurationError


class ParamSpace:
    """Names, shapes and (un)flattening of a module's trainable parameters.

    Parameters
    ----------
    model:
        Any ``nn.Module``. Parameters with ``requires_grad=False`` are left out.

    Examples
    --------
    >>> space = ParamSpace(torch.nn.Linear(3, 2))
    >>> space.size
    8
    >>> theta = space.get()          # a flat copy of the weights then the bias
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigurationError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "unfreeze at least one parameter to optimize it."
            )
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ConfigurationError(
                f"trainable parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                f"{sorted(map(str, devices))}; call model.to(dtype, device) first."
            )
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def get(self) -> Tensor:
        """A flat detached copy of the current trainable parameters."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def set(self, theta: Tensor) -> None:
        """Write a flat vector into the module's trainable parameters, in place."""
        with torch.no_grad():
            for p, chunk in zip(self.params, self.unflatten(theta)):
                p.copy_(chunk)

    def unflatten(self, theta: Tensor) -> list[Tensor]:
        """Split a flat vector into views shaped like the parameters (differentiable)."""
        return [c.view(s) for c, s in zip(torch.split(theta, self.numels), self.shapes)]

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (e.g. gradients) into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def function(self) -> Callable[[Tensor, Tensor], Tensor]:
        """``f(theta, x)``: the model evaluated with flat parameters theta (torch.func)."""
        names, model = self.names, self.model

        def f(theta: Tensor, x: Tensor | tuple[Tensor, ...]) -> Tensor:
            args = x if isinstance(x, tuple) else (x,)
            return functional_call(model, dict(zip(names, self.unflatten(theta))), args)

        return f
