"""A complete PyTorch training loop with steepest's torch.optim adapter.

Generalized Gauss-Newton steps with Levenberg-Marquardt damping on mini-batches of a
DataLoader, a learning-rate scheduler, and a checkpoint through ``state_dict()``: the loop is the
one you would write for ``torch.optim.SGD``, with a closure that returns ``(outputs, targets)``
instead of calling ``backward()``.

Run: ``python examples/training_loop.py`` (about ten seconds of CPU time).
"""

import io

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import steepest
from steepest.torch_optim import TorchOptimizer

torch.manual_seed(0)
x = torch.linspace(-3, 3, 512, dtype=torch.float64).unsqueeze(1)
y = torch.sin(2 * x) + 0.05 * torch.randn_like(x)
loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).double()

opt = TorchOptimizer(
    model.parameters(),
    loss=steepest.MSE(),                          # l(y, z) = |y - z|^2 / 2
    metric=steepest.GGN(),                        # M = E[J^T H_L J]
    lr=1.0,                                       # alpha, driven by the scheduler
    damping=steepest.LevenbergMarquardt(1e-1),    # lambda adapted from rho
)
scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

for epoch in range(20):
    for xb, yb in loader:
        def closure(xb=xb, yb=yb):                # the batch's outputs (with graph), targets
            return model(xb), yb

        opt.zero_grad()                           # harmless: steepest differentiates itself
        loss = opt.step(closure)                  # one GGN step; loss before it
    scheduler.step()
    if epoch % 5 == 4:
        with torch.no_grad():
            full = 0.5 * (model(x) - y).pow(2).mean()
        info = opt.last_info
        print(f"epoch {epoch + 1:2d}  loss {float(full):.5f}  lr {scheduler.get_last_lr()[0]:.3f}"
              f"  lambda {info.damping:.2e}  rho {info.rho:.2f}")

# checkpoint and resume: the next step is bit-identical
buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
buffer.seek(0)
checkpoint = torch.load(buffer, weights_only=False)
model.load_state_dict(checkpoint["model"])
opt.load_state_dict(checkpoint["optimizer"])
print("resumed at lr", opt.param_groups[0]["lr"], "after", opt.steepest.steps, "steps")
