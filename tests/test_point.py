"""Point: per-sample Jacobians and gradients by vmap agree with the batched-backward path."""

import pytest
import torch
from torch import nn

from steepest.losses import MSE, CrossEntropy, GaussianNLL
from steepest.point import Point

F64 = torch.float64


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 4))
    return {
        "mlp": (mlp, torch.randn(5, 3, dtype=F64)),
        "conv": (conv.double(), torch.randn(5, 1, 6, 6, dtype=F64)),
    }


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.parametrize("loss", [CrossEntropy(), MSE(0.7), GaussianNLL()])
def test_vmap_and_batched_backward_agree(name, loss):
    model, x = _models()[name]
    gen = torch.Generator().manual_seed(1)
    if isinstance(loss, CrossEntropy):
        y = torch.randint(0, 4, (5,), generator=gen)
    elif isinstance(loss, GaussianNLL):
        y = torch.randn(5, 2, generator=gen, dtype=F64)
    else:
        y = torch.randn(5, 4, generator=gen, dtype=F64)
    fast = Point(model, loss, x, y)
    jac, grads = fast.jacobian(), fast.per_sample_grads()
    assert not fast._vmap_failed  # the vmap path was taken
    slow = Point(model, loss, x, y)
    slow._vmap_failed = True  # force the batched-backward path
    torch.testing.assert_close(jac, slow.jacobian(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, slow.per_sample_grads(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.jacobian(slice(1, 3)), jac[1:3])
    torch.testing.assert_close(grads.mean(0), fast.grad, rtol=1e-12, atol=1e-12)


def test_batchnorm_in_training_mode_uses_the_coupled_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    point = Point(model, CrossEntropy(), x, y)
    assert point._vmap_failed
    grads = point.per_sample_grads()
    # rows are the gradients of each l_i through the batch statistics: they sum to N g
    torch.testing.assert_close(grads.mean(0), point.grad, rtol=1e-10, atol=1e-12)


def test_hmm_equals_hvp_columns_and_shapes_are_checked():
    """H V column by column equals H v; a vector of the wrong shape is refused."""
    from reference import rel_err

    from steepest.errors import ShapeError

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    point = Point(model, CrossEntropy(), x, y)
    v = torch.randn(point.size, 3, dtype=torch.float64)
    hv = torch.stack([point.hvp(v[:, j]) for j in range(3)], 1)
    assert rel_err(point.hmm(v), hv) < 1e-12
    for bad in (torch.randn(1, point.size, dtype=torch.float64),
                torch.randn(point.size + 1, dtype=torch.float64)):
        with pytest.raises(ShapeError, match="flat parameters"):
            point.jvp(bad)


def test_forward_records_layer_calls_without_changing_the_graph():
    """``forward(..., record=types)`` keeps each recorded module call's input and output (a
    tensor of the graph, untouched by a later in-place ReLU) and the per-parameter views of
    theta, while the outputs, loss and gradient stay bit for bit those of a plain forward;
    the gradient with respect to a recorded output is dL/ds (here the last layer: (z - y)/N)."""
    from steepest.params import ParamSpace
    from steepest.point import forward

    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(F64)
    g = torch.Generator().manual_seed(32)
    x, y = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(7, 2, generator=g, dtype=F64)
    space = ParamSpace(model)
    plain = forward(space, MSE(), x, y, space.get())
    rec = forward(space, MSE(), x, y, space.get(), record=(nn.Linear,))
    assert plain.calls is None and plain.pieces is None
    assert torch.equal(rec.z, plain.z) and torch.equal(rec.value_t, plain.value_t)
    (g0,) = torch.autograd.grad(plain.value_t, plain.theta)
    (g1,) = torch.autograd.grad(rec.value_t, rec.theta, retain_graph=True)
    assert torch.equal(g0, g1)
    assert list(rec.calls) == [model[0], model[2]]
    assert all(len(c) == 1 for c in rec.calls.values())
    (a0, s0), (a2, s2) = rec.calls[model[0]][0], rec.calls[model[2]][0]
    assert torch.equal(a0, x)
    pre = x @ model[0].weight.T + model[0].bias
    assert torch.allclose(s0, pre, rtol=1e-14, atol=1e-14) and (s0 < 0).any()
    assert torch.equal(a2, torch.relu(pre.detach()))
    (ds,) = torch.autograd.grad(rec.value_t, s2)
    assert torch.allclose(ds, (rec.z.detach() - y) / 7, rtol=1e-14, atol=1e-14)
    assert [tuple(p.shape) for p in rec.pieces] == [tuple(p.shape) for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(rec.pieces, model.parameters()))
    point = Point(model, MSE(), x, y, record=(nn.Linear,))
    assert list(point.calls) == [model[0], model[2]] and torch.equal(point.grad, g0)
