"""``steepest rl``: train policy-gradient methods on a gymnasium environment and report.

``steepest rl --env CartPole-v1 --methods trpo,npg,vpg --steps 100000 --seeds 3 --out out/rl
[--seed FIRST] [--target R] [--set KEY=VALUE ...] [--resume] [--checkpoint-every N] [--quiet]``

Prints a progress bar per run and the table (final mean return with its spread over seeds,
environment steps to the target, wall time), and writes ``results.json``,
``return_vs_steps.png``, ``return_vs_time.png`` and ``report.html`` to ``--out``, with
checkpoints in ``--out/checkpoints`` (``--resume`` continues an interrupted run from them).

Example
-------
$ steepest rl --env CartPole-v1 --methods trpo,vpg --steps 20000 --seeds 2 --out out/rl
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .agent import METHODS, Settings


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``rl`` subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "rl",
        help="train NPG, TRPO and VPG on a gymnasium environment and report",
        description="Natural policy gradient, TRPO and the vanilla policy gradient as steepest "
        "Optimizer steps on a gymnasium (classic control) environment: several seeds, a table, "
        "return curves with bands, results.json and report.html.",
    )
    p.add_argument("--env", default="CartPole-v1", help="gymnasium id (CartPole-v1)")
    p.add_argument(
        "--methods",
        default="trpo,npg,vpg",
        help=f"comma-separated from {', '.join(METHODS)}, or all (trpo,npg,vpg)",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=100_000, help="environment steps per run (100000)"
    )
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (3)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (0)")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="target mean return (default: the environment's reward threshold)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="assignments",
        help="change a setting for every method, e.g. "
        "max_kl=0.02 (repeatable); keys: " + ", ".join(f.name for f in fields(Settings)),
    )
    p.add_argument("--out", default="out/rl", metavar="DIR", help="output directory (out/rl)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the checkpoints in DIR/checkpoints"
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=10,
        metavar="N",
        help="save each run's state every N iterations (10)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads (1: the networks are small, more threads only add synchronisation)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    return p


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """``["max_kl=0.02", "hidden=32,32"]`` -> typed Settings changes."""
    types = {f.name: type(f.default) for f in fields(Settings)}
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ConfigurationError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}."
            )
        kind = types[key]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value: Any = text.lower() in ("true", "1")
            elif kind is tuple:
                value = tuple(int(v) for v in text.split(",") if v.strip())
            else:
                value = kind(text)
        except ValueError:
            raise ConfigurationError(
                f"--set {item!r}: {text!r} is not a valid {kind.__name__} for {key}."
            ) from None
        out[key] = value
    return out


def command(args: argparse.Namespace) -> int:
    """Run ``steepest rl`` from parsed arguments; returns the exit status."""
    from . import runner
    from .agent import settings_for
    from .rollouts import check_env

    check_env(args.env)
    methods = runner.parse_methods(args.methods)
    changes = parse_set(args.assignments)
    settings_for(args.env, **changes)  # validate before anything runs
    if args.seed < 0:
        raise ConfigurationError(f"--seed must be >= 0, got {args.seed}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {args.out!r} exists and is not a directory.")
    seeds = list(range(args.seed, args.seed + args.seeds))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, methods, changes, seeds, out)
    finally:
        torch.set_num_threads(threads)


def _run(
    args: argparse.Namespace,
    methods: list[str],
    changes: dict[str, Any],
    seeds: list[int],
    out: Path,
) -> int:
    from . import report, runner

    kwargs = dict(
        seeds=seeds,
        steps=args.steps,
        target=args.target,
        settings=changes,
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    if args.quiet:
        res = runner.run(args.env, methods, **kwargs)
    else:
        res = _with_progress(args.env, methods, seeds, args.steps, kwargs)
    report.write(res, out)
    if not args.quiet:
        from rich.console import Console

        console = Console() if sys.stdout.isatty() else Console(width=140)
        report.print_table(res, console)
        console.print(f"wrote {out}/report.html, results.json and plots", highlight=False)
    return 0


def _with_progress(
    env: str, methods: list[str], seeds: list[int], steps: int, kwargs: dict[str, Any]
) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import runner

    columns = [
        TextColumn("{task.description:<14}"),
        BarColumn(bar_width=24),
        TextColumn("{task.completed:>7.0f} steps"),
        TextColumn("return {task.fields[ret]}"),
        TimeElapsedColumn(),
    ]
    tasks: dict[tuple[str, int], int] = {}
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:

        def update(method: str, seed: int, agent: Any) -> None:
            key = (method, seed)
            if key not in tasks:
                tasks[key] = progress.add_task(f"{method} seed {seed}", total=steps, ret="-")
            ret = agent.mean_return()
            progress.update(
                tasks[key],
                completed=min(agent.steps, steps),
                ret="-" if ret is None else f"{ret:.1f}",
            )

        return runner.run(env, methods, progress=update, **kwargs)
