"""The ``steepest`` command line (argparse with subcommands).

- ``steepest compare --problem NAME --methods LIST (--iters N | --time SECONDS) --seeds K --seed S
  --device cpu|cuda --dtype float32|float64 --out DIR [--set METHOD.KEY=VALUE ...] [--quiet]``
- ``steepest geometry --problem NAME [--at A,B] [--eps E] [--out FILE.png]``
- ``steepest problems [--defaults]``

Every option is checked before anything is computed or written; an error prints one line
``steepest: error: ...`` on stderr and exits with status 2.

Example
-------
$ steepest compare --problem regression --methods ggn,adam --iters 30 --out out
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import SteepestError

DEFAULT_PROBLEM = "regression"


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _budget(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .compare import METHODS

    parser = _Parser(prog="steepest", description="First- and second-order variants of "
                     "gradient descent in one framework: compare them on a problem.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    cmp = sub.add_parser(
        "compare", help="run the methods side by side on a problem and report",
        description="Run the six methods of Table 1, their K-FAC, EKFAC and diagonal "
        "approximations (and Adam, SGD, L-BFGS) from the same "
        "initial weights; print a table and write results.json, plots and report.html.")
    cmp.add_argument("--problem", default=DEFAULT_PROBLEM,
                     help=f"a built-in problem (see `steepest problems`) or "
                     f"path/to/file.py:function (default {DEFAULT_PROBLEM})")
    cmp.add_argument("--methods", default="all",
                     help=f"comma-separated, from {', '.join(METHODS)}; or 'all' (default); "
                     "a variant METHOD[KEY=VALUE,...] is a row of its own, e.g. "
                     "ggn,ggn[solver=woodbury],gauss-newton[damping=more]; the structured "
                     "approximations kfac, ekfac (base, T_cov, T_inv, ema, ...) and diagonal "
                     "(base, power), e.g. kfac[T_cov=10],diagonal[base=empirical-fisher,"
                     "power=0.5]")
    budget = cmp.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=_budget(int), metavar="N",
                        help="steps per method and seed")
    budget.add_argument("--time", type=_budget(float), metavar="SECONDS",
                        help="seconds of step time per method and seed; each run stops within "
                        "one step of it (default: the problem's time budget)")
    cmp.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                     help="the clock of --time and of the times reported: wall (default) or "
                     "cpu (process CPU time: a run waiting for a core of a shared machine is "
                     "not charged for the wait)")
    cmp.add_argument("--seed", type=int, default=0,
                     help="the first seed (0); the runs use SEED, SEED+1, ...")
    cmp.add_argument("--seeds", type=_budget(int), default=3, metavar="K",
                     help="seeds per method (3): every figure is a median over them")
    cmp.add_argument("--no-tune", action="store_true",
                     help="keep the baselines' learning rates (no search on the first seed)")
    cmp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    cmp.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    cmp.add_argument("--out", default="out", metavar="DIR",
                     help="directory for results.json, the plots and report.html (out)")
    cmp.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                     dest="assignments",
                     help="override a setting, e.g. natural.damping=1e-2 (repeatable); "
                     "keys: `steepest problems --defaults`")
    cmp.add_argument("--quiet", action="store_true", help="no progress display and no table")

    geo = sub.add_parser(
        "geometry", help="draw loss contours, trust regions and steps of a 2-parameter problem",
        description="Figure 1 of Pierrot et al. for a real model: at one point, the loss "
        "contours, each metric's trust region delta^T M delta <= eps^2 and its step.")
    geo.add_argument("--problem", default="toy2d", help="a two-parameter problem (toy2d)")
    geo.add_argument("--at", metavar="A,B", help="the point (default: the initial weights)")
    geo.add_argument("--seed", type=int, default=0, help="seed of the initial weights (0)")
    geo.add_argument("--eps", type=_budget(float),
                     help="one epsilon for every metric (default: scaled per metric)")
    geo.add_argument("--radius", type=_budget(float), default=1.0,
                     help="longest ellipse axis when eps is scaled per metric (1)")
    geo.add_argument("--out", default="geometry.png", metavar="FILE",
                     help="the PNG to write (geometry.png)")

    prob = sub.add_parser("problems", help="list the problems, one line each",
                          description="List the built-in problems.")
    prob.add_argument("--defaults", action="store_true",
                      help="also print each problem's per-method settings")
    from .rl.cli import add_parser as add_rl_parser

    add_rl_parser(sub)
    return parser


def _compare(args: argparse.Namespace) -> int:
    from . import compare
    from .compare import report

    overrides = compare.parse_set(args.assignments)
    if not 0 <= args.seed < compare.SEED_LIMIT:
        raise SteepestError(f"--seed must be >= 0 and < 2^64, got {args.seed}.")
    report.check_out(args.out)
    plan = compare.plan(args.problem, args.methods, iters=args.iters, time=args.time,
                        seed=args.seed, device=args.device, dtype=args.dtype,
                        settings=overrides, seeds=args.seeds, tune=not args.no_tune,
                        clock=args.clock)
    try:
        result = compare.execute(plan) if args.quiet else _with_progress(plan)
    except compare.Interrupted as stop:
        if not stop.partial.runs:
            raise
        report.write(stop.partial, args.out)
        print(f"steepest: interrupted; the {len(stop.partial.runs)} finished runs are in "
              f"{args.out} (marked partial)", file=sys.stderr)
        return 130
    report.write(result, args.out)
    if not args.quiet:
        from rich.console import Console

        console = Console() if sys.stdout.isatty() else Console(width=160)
        report.print_table(result, console)
        console.print(f"wrote {args.out}/report.html, results.json and plots", highlight=False)
    return 0


def _with_progress(plan) -> object:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import compare

    total = plan.iters
    columns = [TextColumn("{task.description:<34}"), BarColumn(bar_width=20),
               TextColumn("it {task.completed:>6.0f}"), TextColumn("loss {task.fields[loss]}"),
               TextColumn("step time {task.fields[elapsed]}"), TimeElapsedColumn()]
    tasks: dict[tuple[str, int], int] = {}
    index = {s: i for i, s in enumerate(plan.seeds)}
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        def update(row: str, seed: int, k: int, loss: float, elapsed: float) -> None:
            key = (row, seed)
            if key not in tasks:
                name = f"{compare.label(row)} s{index.get(seed, 0) + 1}/{len(plan.seeds)}"
                tasks[key] = progress.add_task(name, total=total, loss="-", elapsed="-")
            if k < 10 or k % 10 == 0 or (total is not None and k == total):
                progress.update(tasks[key], completed=k, loss=f"{loss:.4g}",
                                elapsed=f"{elapsed:.2f}s")

        return compare.execute(plan, update)


def _geometry(args: argparse.Namespace) -> int:
    import torch

    from . import geometry

    theta = None
    if args.at:
        try:
            theta = torch.tensor([float(v) for v in args.at.split(",")], dtype=torch.float64)
        except ValueError:
            raise SteepestError(f"--at must be two numbers A,B, got {args.at!r}.") from None
        if theta.numel() != 2:
            raise SteepestError(f"--at must be two numbers A,B, got {args.at!r}.")
    from .compare.report import check_out

    check_out(args.out, kind="file")
    geom = geometry.compute(args.problem, theta=theta, seed=args.seed, eps=args.eps,
                            radius=args.radius)
    path = geometry.draw(geom, args.out)
    print(f"wrote {path}")
    return 0


def _problems(args: argparse.Namespace) -> int:
    from . import problems

    rows = problems.describe()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
        if args.defaults:
            prob = problems.get(name)
            for method, kv in prob.defaults.items():
                sets = ", ".join(f"{k}={v}" for k, v in kv.items())
                print(f"{'':<{width}}    {method}: {sets}")
    if args.defaults:
        from .compare import METHOD_DEFAULTS

        print("\nglobal defaults (METHOD.KEY=VALUE; a problem's settings above override them):")
        for method, kv in METHOD_DEFAULTS.items():
            print(f"  {method}: " + ", ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``steepest`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .rl.cli import command as _rl

    handler = {"compare": _compare, "geometry": _geometry, "problems": _problems,
               "rl": _rl}[args.command]
    try:
        return handler(args)
    except SteepestError as err:
        print(f"steepest: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steepest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
