"""End-to-end smoke test: an optimizer step lowers the loss of a small classifier."""

import torch

import steepest
from steepest.losses import CrossEntropy


def test_ggn_steps_lower_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = steepest.Optimizer(model, CrossEntropy(), metric=steepest.GGN(),
                             damping=steepest.LevenbergMarquardt(1e-2))
    first = opt.step(x, y).loss
    for _ in range(10):
        info = opt.step(x, y)
    assert info.loss < 0.5 * first
