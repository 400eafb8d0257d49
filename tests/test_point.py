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
