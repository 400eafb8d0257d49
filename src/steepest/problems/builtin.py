"""The built-in problems. Data come from scikit-learn's bundled datasets (no download) or are
generated from a fixed data seed; the model weights come from the run's seed.

Each ``make_*`` function returns a fresh :class:`~steepest.problems.Problem`; the registry
in :mod:`steepest.problems` calls them lazily.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigurationError
from ..losses import MSE, BCEWithLogits, CrossEntropy, GaussianNLL
from . import Problem, register

DATA_SEED = 0  # data (splits, generated inputs, noise) never depend on the run's seed
F64 = torch.float64


# ---------------------------------------------------------------------------- helpers
def init_linear_(layer: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn from ``gen`` instead of the global random state."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=F64) * 2 * bound - bound)


def mlp(sizes: list[int], seed: int, dtype: torch.dtype, device: torch.device | str,
        activation: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between
    layers, weights drawn from ``torch.Generator().manual_seed(seed)`` (global RNG untouched).

    >>> mlp([1, 20, 1], seed=0, dtype=torch.float64, device="cpu")
    """
    gen = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, bias=bias, device="meta").to_empty(device="cpu").to(F64)
        init_linear_(lin, gen)
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def _split(n: int, n_train: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    return perm[:n_train], perm[n_train:]


def _sklearn(loader: str):
    try:
        import sklearn.datasets as ds
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "this problem uses data bundled with scikit-learn; install it with "
            "`pip install scikit-learn`."
        ) from err
    return getattr(ds, loader)()


def accuracy(z: Tensor, y: Tensor) -> float:
    """Fraction of correct predictions: argmax of logits (N, C) against class indices, or the
    sign of one logit per sample (N, 1) against 0/1 targets."""
    if z.shape[1] == 1:
        return float(((z > 0).to(y.dtype) == y).to(F64).mean())
    return float((z.argmax(1) == y).to(F64).mean())


def rmse(z: Tensor, y: Tensor) -> float:
    """Root mean squared error of the prediction z (of y's shape)."""
    return float((z - y).pow(2).mean().sqrt())


# ---------------------------------------------------------------------------- quadratic
class _Linear(nn.Module):
    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.theta = nn.Parameter(torch.randn(dim, generator=gen, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.theta).unsqueeze(1)


def make_quadratic(dim: int = 20, condition: float = 1e3, n: int = 100, noise: float = 0.0,
                   batch_size: int | None = None, name: str = "quadratic") -> Problem:
    r"""Convex quadratic :math:`L(\theta) = \frac1{2N}\|X\theta - y\|^2` whose Hessian
    :math:`X^TX/N` has eigenvalues log-spaced from 1 down to ``1/condition`` (Martens section
    14). ``noise`` adds Gaussian label noise (so per-sample gradients disagree at the optimum)
    and ``batch_size`` makes each step use a random mini-batch: stochastic gradients.
    Here every curvature metric except the empirical Fisher equals the Hessian.
    """
    if not (condition >= 1 and dim >= 1 and n >= dim):
        raise ConfigurationError("quadratic: need condition >= 1 and n >= dim >= 1.")
    gen = torch.Generator().manual_seed(DATA_SEED)
    u, _ = torch.linalg.qr(torch.randn(n, dim, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    eig = torch.logspace(0, -math.log10(condition), dim, dtype=F64)
    x = math.sqrt(n) * u @ torch.diag(eig.sqrt()) @ v.T
    theta_star = torch.randn(dim, generator=gen, dtype=F64) * 2
    y = (x @ theta_star).unsqueeze(1) + noise * torch.randn(n, 1, generator=gen, dtype=F64)
    best = torch.linalg.lstsq(x, y).solution
    l_star = float(0.5 * (x @ best - y).pow(2).mean())
    desc = (f"convex quadratic, {dim} parameters, condition number {condition:g}"
            + (f", label noise {noise:g}, mini-batches of {batch_size}" if batch_size else ""))
    return Problem(
        name=name, description=desc,
        make_model=lambda seed, dtype, device: _Linear(dim, seed).to(device=device, dtype=dtype),
        loss=MSE(), train=(x, y), target_loss=l_star + (2e-2 if batch_size else 1e-4),
        iters=60 if batch_size is None else 200, batch_size=batch_size,
        time=0.3 if batch_size is None else 1.0,
        defaults={
            "vanilla": {"lr": 1.0},
            "sgd": {"lr": 0.5, "momentum": 0.9},
            "adam": {"lr": 0.1},
            "empirical-fisher": {"damping": 1e-2},
            "gradient-covariance": {"damping": 1e-2},
            # mini-batches: curvature from 20 samples in 20 dimensions and LM judging steps on
            # the mini-batch diverge; a constant damping and a half step are stable (Martens 14)
            **({m: {"damping": 1.0, "adaptive_damping": False, "lr": 0.5}
                for m in ("gauss-newton", "natural", "ggn", "newton", "empirical-fisher",
                          "gradient-covariance", "kfac", "ekfac", "diagonal")}
               if batch_size else {}),
        },
    )


# ---------------------------------------------------------------------------- toy2d
class GaussianModel(nn.Module):
    r"""Two parameters: a mean m and a log-scale s; the output for every input is
    ``(m, 2 s)`` = (mean, log-variance), the input only sets the batch size."""

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.tensor(float(m), dtype=F64))
        self.s = nn.Parameter(torch.tensor(float(s), dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        ones = torch.ones(x.shape[0], 1, dtype=self.m.dtype, device=self.m.device)
        return torch.cat([ones * self.m, ones * (2 * self.s)], 1)


def make_toy2d(mean: float = 2.0, std: float = 0.3, n: int = 200) -> Problem:
    r"""Fit :math:`\mathcal N(m, e^{2s})` to samples of :math:`\mathcal N(2, 0.3^2)` by maximum
    likelihood: two parameters (m, s). The Fisher is :math:`\mathrm{diag}(e^{-2s}, 2)`: as the
    fitted variance shrinks the same shift of the mean costs more KL (000 Figure 2), so
    natural-gradient steps in m shrink while vanilla steps do not.
    """
    gen = torch.Generator().manual_seed(DATA_SEED)
    y = mean + std * torch.randn(n, 1, generator=gen, dtype=F64)
    x = torch.zeros(n, 1, dtype=F64)
    l_star = float(0.5 * math.log(2 * math.pi) + 0.5 + math.log(float(y.std(correction=0))))

    def make_model(seed: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        g = torch.Generator().manual_seed(int(seed))
        m0, s0 = (0.25 * torch.randn(2, generator=g, dtype=F64)).tolist()
        return GaussianModel(m0, s0).to(device=device, dtype=dtype)

    return Problem(
        name="toy2d", description="Gaussian N(m, exp(2s)) fitted by likelihood: two parameters "
        "(000 Figure 2)",
        make_model=make_model, loss=GaussianNLL(), train=(x, y), target_loss=l_star + 1e-3,
        iters=40, time=0.3, two_params=True,
        defaults={"vanilla": {"lr": 0.05}, "sgd": {"lr": 0.02, "momentum": 0.9},
                  "adam": {"lr": 0.1}},
    )


# ---------------------------------------------------------------------------- logistic
def _standardize(x: Tensor, train: Tensor) -> Tensor:
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    return (x - mu) / sd


def make_logistic() -> Problem:
    """Logistic regression (maximum likelihood, 003) on scikit-learn's breast-cancer data,
    standardized with the training statistics; 70/30 split; test accuracy."""
    data = _sklearn("load_breast_cancer")
    x = torch.as_tensor(data.data, dtype=F64)
    y = torch.as_tensor(data.target, dtype=F64).unsqueeze(1)
    tr, te = _split(x.shape[0], int(0.7 * x.shape[0]))
    x = _standardize(x, tr)
    return Problem(
        name="logistic", description="logistic regression on breast-cancer (30 features), test "
        "accuracy",
        make_model=lambda seed, dtype, device: mlp([30, 1], seed, dtype, device),
        loss=BCEWithLogits(), train=(x[tr], y[tr]), test=(x[te], y[te]), target_loss=0.06,
        test_metric=accuracy, test_metric_name="test accuracy", higher_is_better=True, iters=50,
        time=0.5,
        defaults={"vanilla": {"lr": 1.0}, "sgd": {"lr": 0.5, "momentum": 0.9},
                  "adam": {"lr": 0.05}},
    )


# ---------------------------------------------------------------------------- digits
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = _sklearn("load_digits")
    x = torch.as_tensor(data.data, dtype=F64) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    tr, te = _split(x.shape[0], 1000)
    return x, y, tr, te


def make_digits(hidden: int = 16) -> Problem:
    """A 64-16-10 tanh MLP classifier (CrossEntropy) on scikit-learn's 8x8 digits: 1000
    training images, 797 held out; test accuracy."""
    x, y, tr, te = _digits()
    x = x - x[tr].mean(0)
    cg = {"solver": "cg", "cg_maxiter": 50}
    return Problem(
        name="digits", description=f"64-{hidden}-10 tanh MLP classifier on sklearn digits, "
        "test accuracy",
        make_model=lambda seed, dtype, device: mlp([64, hidden, 10], seed, dtype, device),
        loss=CrossEntropy(), train=(x[tr], y[tr]), test=(x[te], y[te]), target_loss=0.05,
        test_metric=accuracy, test_metric_name="test accuracy", higher_is_better=True, iters=30,
        time=3.0,
        defaults={"vanilla": {"lr": 0.5}, "sgd": {"lr": 0.2, "momentum": 0.9},
                  "adam": {"lr": 0.02},
                  # R = N C = 10000 factor rows > P = 1210: no Woodbury, and Auto's dense
                  # Cholesky (J^T A J from per-sample Jacobians) is 20-27x slower a step than
                  # CG with 50 iterations, which takes the same iterates to the target
                  # (benchmarks/results/compare_defaults.json)
                  **{m: dict(cg) for m in ("gauss-newton", "natural", "ggn",
                                           "gradient-covariance")},
                  # the exact diagonal of the GGN needs per-sample Jacobians (N C rows): 1.7-2.3
                  # s a step against 0.05-0.14 s for the empirical Fisher's (per-sample
                  # gradients), measured on a loaded 2-core machine
                  "diagonal": {"base": "empirical-fisher"}},
    )


# ---------------------------------------------------------------------------- regression
def _curve(x: Tensor) -> Tensor:
    return torch.sin(2 * x) + 0.5 * x * torch.cos(x)


def make_regression(n: int = 200, noise: float = 0.1) -> Problem:
    """Nonlinear least squares: a 1-20-20-1 tanh MLP fitted to y = sin(2x) + x cos(x)/2 + noise
    (sigma 0.1) on x in [-3, 3]; MSE loss 0.5 (y - z)^2, the home ground of Gauss-Newton and
    Levenberg-Marquardt; held-out RMSE."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = 6 * torch.rand(2 * n, 1, generator=gen, dtype=F64) - 3
    y = _curve(x) + noise * torch.randn(2 * n, 1, generator=gen, dtype=F64)
    return Problem(
        name="regression", description="1-20-20-1 tanh MLP, nonlinear least squares, held-out "
        "RMSE",
        make_model=lambda seed, dtype, device: mlp([1, 20, 20, 1], seed, dtype, device),
        loss=MSE(), train=(x[:n], y[:n]), test=(x[n:], y[n:]), target_loss=0.01,
        test_metric=rmse, test_metric_name="test RMSE", iters=60, time=0.8,
        defaults={"vanilla": {"lr": 0.2}, "sgd": {"lr": 0.1, "momentum": 0.9},
                  "adam": {"lr": 0.05}},
    )


# ---------------------------------------------------------------------------- heteroscedastic
def make_heteroscedastic(n: int = 200) -> Problem:
    """A 1-20-20-2 tanh MLP predicting mean and log-variance (GaussianNLL) of y = sin(2x) +
    noise whose scale grows with |x|; held-out negative log-likelihood. Here the GGN is
    indefinite while the Fisher is PSD (Martens 9.2)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = 6 * torch.rand(2 * n, 1, generator=gen, dtype=F64) - 3
    scale = 0.05 + 0.25 * x.abs()
    y = torch.sin(2 * x) + scale * torch.randn(2 * n, 1, generator=gen, dtype=F64)
    return Problem(
        name="heteroscedastic", description="1-20-20-2 tanh MLP predicting mean and "
        "log-variance (GaussianNLL), held-out NLL",
        make_model=lambda seed, dtype, device: mlp([1, 20, 20, 2], seed, dtype, device),
        loss=GaussianNLL(), train=(x[:n], y[:n]), test=(x[n:], y[n:]), target_loss=0.4,
        test_metric=None, test_metric_name="test NLL", iters=60, time=1.5,
        defaults={"vanilla": {"lr": 0.05}, "sgd": {"lr": 0.02, "momentum": 0.9},
                  "adam": {"lr": 0.02}, "newton": {"damping": 1e-1},
                  # indefinite GGN: Auto takes CG; 50 iterations cut its step time by 1/4
                  # with the same iterations to the target (compare_defaults.json)
                  "ggn": {"damping": 1e-1, "cg_maxiter": 50}},
    )


# ---------------------------------------------------------------------------- autoencoder
def pixel_mse(z: Tensor, y: Tensor) -> float:
    """Mean squared error per pixel of the reconstruction sigmoid(z)."""
    return float((torch.sigmoid(z) - y).pow(2).mean())


def make_autoencoder(sizes: tuple[int, ...] = (64, 32, 16, 4, 16, 32, 64)) -> Problem:
    """A deep tanh autoencoder 64-32-16-4-16-32-64 on the digits images (pixels in [0, 1],
    Bernoulli outputs: BCEWithLogits), the classic Hessian-free benchmark (Hinton &
    Salakhutdinov 2006, Martens 2010) scaled to 8x8 images; held-out pixel MSE."""
    x, _, tr, te = _digits()
    cg = {"cg_maxiter": 20}
    return Problem(
        name="autoencoder", description="deep tanh autoencoder 64-32-16-4-16-32-64 on digits "
        "images, held-out pixel MSE",
        make_model=lambda seed, dtype, device: mlp(list(sizes), seed, dtype, device),
        loss=BCEWithLogits(), train=(x[tr], x[tr]), test=(x[te], x[te]), target_loss=24.0,
        test_metric=pixel_mse, test_metric_name="test pixel MSE", iters=30,
        time=3.0,
        defaults={"vanilla": {"lr": 0.05}, "sgd": {"lr": 0.02, "momentum": 0.9},
                  "adam": {"lr": 0.01}, "gauss-newton": dict(cg), "natural": dict(cg),
                  "ggn": dict(cg), "newton": dict(cg), "empirical-fisher": dict(cg),
                  "gradient-covariance": dict(cg),
                  # 64 outputs: the GGN's exact diagonal (per-sample Jacobians, 64 000 rows)
                  # takes minutes a step; the empirical Fisher's takes per-sample gradients
                  "diagonal": {"base": "empirical-fisher"}},
    )


register("quadratic", "ill-conditioned convex quadratic (20 parameters, condition 1e3)",
         make_quadratic)
register("quadratic-noisy", "the quadratic with label noise and mini-batches of 20: gradient "
         "noise (Martens 14)",
         lambda: make_quadratic(n=1000, noise=0.5, batch_size=20, name="quadratic-noisy"))
register("toy2d", "Gaussian with learned mean and log-scale: two parameters (000 Figure 2)",
         make_toy2d)
register("logistic", "logistic regression on breast-cancer, test accuracy", make_logistic)
register("digits", "64-16-10 tanh MLP classifier on sklearn digits, test accuracy", make_digits)
register("regression", "1-20-20-1 tanh MLP nonlinear least squares, held-out RMSE",
         make_regression)
register("heteroscedastic", "MLP predicting mean and log-variance (GaussianNLL), held-out NLL",
         make_heteroscedastic)
register("autoencoder", "deep tanh autoencoder on digits images, held-out pixel MSE",
         make_autoencoder)
