"""The flat parameter view (steepest.params.ParamSpace): order, frozen and tied parameters,
round trips, the functional form of the model, and its errors."""

from __future__ import annotations

import pytest
import torch
from reference import DEVICES, seeded
from torch import nn

from steepest.errors import ConfigurationError
from steepest.params import ParamSpace

F64 = torch.float64


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def test_order_sizes_and_round_trip():
    model = net()
    space = ParamSpace(model)
    params = list(model.parameters())
    assert space.names == [n for n, _ in model.named_parameters()]
    assert space.size == sum(p.numel() for p in params) == 12 + 4 + 4 + 4 + 8 + 2
    assert space.dtype == F64 and space.device.type == "cpu"
    theta = space.get()
    expected = torch.cat([p.detach().reshape(-1) for p in params])  # row-major, in order
    assert torch.equal(theta, expected)
    assert not theta.requires_grad
    theta += 1.0  # a copy: the module is not changed through it
    assert torch.equal(space.get(), expected)
    new = torch.randn(space.size, generator=seeded(0), dtype=F64)
    space.set(new)
    assert torch.equal(space.get(), new)
    assert torch.equal(model[0].weight.reshape(-1), new[:12])
    parts = space.unflatten(new)
    assert [p.shape for p in parts] == [p.shape for p in params]
    assert torch.equal(space.flatten(parts), new)


def test_function_matches_module_and_is_differentiable():
    model = net()
    space = ParamSpace(model)
    x = torch.randn(5, 3, generator=seeded(1), dtype=F64)
    f = space.function()
    theta = space.get().requires_grad_(True)
    z = f(theta, x)
    assert torch.equal(z, model(x))
    (g,) = torch.autograd.grad(z.sum(), theta)
    model.zero_grad()
    model(x).sum().backward()
    assert torch.allclose(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    # another theta changes the output, not the module
    before = space.get()
    z2 = f(theta.detach() + 0.1, x)
    assert not torch.allclose(z2, z) and torch.equal(space.get(), before)
    # tuple inputs are unpacked into forward's arguments

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2).to(F64)

        def forward(self, u, v):
            return self.a(u) * v

    two = Two()
    s2 = ParamSpace(two)
    v = torch.randn(5, 2, generator=seeded(2), dtype=F64)
    assert torch.equal(s2.function()(s2.get(), (x, v)), two(x, v))


def test_frozen_parameters_are_left_out():
    model = net()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    space = ParamSpace(model)
    assert "1.weight" not in space.names and "1.bias" not in space.names
    assert space.size == 12 + 4 + 8 + 2
    frozen = model[1].weight.detach().clone()
    space.set(torch.zeros(space.size, dtype=F64))
    assert torch.equal(model[1].weight, frozen)
    assert torch.equal(model[0].weight, torch.zeros(4, 3, dtype=F64))
    # frozen parameters may even have another dtype
    model[1].weight.data = model[1].weight.data.float()
    assert ParamSpace(model).dtype == F64


def test_tied_parameters_appear_once():
    emb = nn.Embedding(5, 3)
    dec = nn.Linear(3, 5)
    dec.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "dec": dec}).to(F64)
    space = ParamSpace(model)
    assert space.names == ["emb.weight", "dec.bias"] and space.size == 15 + 5
    new = torch.arange(space.size, dtype=F64)
    space.set(new)
    assert torch.equal(model["dec"].weight.reshape(-1), new[:15])


def test_errors():
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigurationError, match="no trainable parameters.*unfreeze"):
        ParamSpace(model)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(F64))
    with pytest.raises(ConfigurationError, match=r"mix dtypes.*model.to"):
        ParamSpace(mixed)


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_follow_the_model(device):
    model = nn.Linear(3, 2).to(device=device, dtype=torch.float32)
    space = ParamSpace(model)
    theta = space.get()
    assert theta.dtype == torch.float32 and theta.device.type == device
    assert space.device.type == device
