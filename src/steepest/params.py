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


def check_dtype_device(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse parameters the curvature cannot be computed in, by name: half precision
    (float16, bfloat16: the dense factorisations and CG lose the step, torch has no CPU
    Cholesky for them) and the meta device (no data)."""
    if dtype not in (torch.float32, torch.float64):
        raise ConfigurationError(
            f"the trainable parameters are {dtype}; steepest computes the curvature and solves "
            "in the parameters' dtype and needs float32 or float64 (half precision loses the "
            "solve). Convert the model with model.float() (or model.double())."
        )
    if device.type == "meta":
        raise ConfigurationError(
            "the parameters are on the meta device (shapes without data); materialize the "
            "model first: model.to_empty(device='cpu') then initialize or load the weights "
            "(load_state_dict(..., assign=True))."
        )


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
        named = self._trainable()
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
        check_dtype_device(self.dtype, self.device)

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def stale(self) -> bool:
        """Whether the module's trainable parameters are no longer the ones of this view: a
        parameter frozen or unfrozen, a layer replaced, new tensors loaded
        (``load_state_dict(assign=True)``), or a dtype or device changed."""
        now = self._trainable()
        return [n for n, _ in now] != self.names or any(
            p is not q or p.shape != s or p.dtype != self.dtype or p.device != self.device
            for (_, p), q, s in zip(now, self.params, self.shapes))

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
