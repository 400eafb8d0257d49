"""The outputs of ``steepest compare``: the terminal table, the loss plots and report.html.

:func:`write` puts, in one directory, ``results.json`` (schema in
:data:`steepest.compare.SCHEMA_DOC`), ``loss_vs_iterations.png``, ``loss_vs_time.png`` and a
self-contained ``report.html`` (plots embedded as base64) that opens with the one-sentence
answer. Files are written to a temporary directory next to the destination and moved into
place at the end, so a failure never leaves half-written files behind.

Example
-------
>>> result = steepest.compare.run("regression", methods="all", iters=30)
>>> print_table(result)
>>> write(result, "out")
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .compare import Comparison, Run
from .errors import ConfigurationError

FILES = ("results.json", "loss_vs_iterations.png", "loss_vs_time.png", "report.html")
COLUMNS = ("method", "final train loss", "test metric", "iterations", "wall time",
           "time to target", "diverged")


# ---------------------------------------------------------------------------- table
def _g(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def table_rows(result: Comparison) -> list[list[str]]:
    """One row of strings per run, in the order of :data:`COLUMNS`."""
    rows = []
    for r in result.runs:
        if r.time_to_target is not None:
            ttt = f"{r.time_to_target:.3g} s ({r.iters_to_target} it)"
        elif result.problem["target_loss"] is None:
            ttt = "-"
        else:
            ttt = "not reached"
        rows.append([r.label, _g(r.final_loss), _g(r.test_metric), str(r.iterations),
                     f"{r.wall_time:.3g} s", ttt, "yes" if r.diverged else "no"])
    return rows


def _columns(result: Comparison) -> list[str]:
    cols = list(COLUMNS)
    cols[2] = result.problem["test_metric"] or "test metric"
    return cols


def print_table(result: Comparison, console: Any = None) -> None:
    """The results table in the terminal (rich), then the one-sentence answer."""
    from rich.console import Console
    from rich.table import Table

    if console is None:  # a pipe or a file gets the whole table, not 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(title=f"steepest compare: {result.problem['name']}")
    for k, col in enumerate(_columns(result)):
        table.add_column(col, justify="left" if k == 0 else "right", no_wrap=k in (0, 5))
    for r, row in zip(result.runs, table_rows(result)):
        table.add_row(r.method, *row[1:])
    console.print(table)
    console.print(result.summary["sentence"])
    for r in result.runs:
        if r.error:
            console.print(f"[red]{r.label}[/red] diverged: {r.error}", markup=True,
                          highlight=False)


# ---------------------------------------------------------------------------- plots
def _curves(result: Comparison) -> tuple[list[tuple[Run, list, list, list]], float, str]:
    """Per run (run, iterations, times, losses) with the losses shifted when some are <= 0
    (a log axis needs positive values); returns the shift and the y-axis label."""
    values = [v for r in result.runs for v in r.curve["loss"] if v is not None]
    label = "training loss"
    shift = 0.0
    if values and min(values) <= 0:
        spread = max(values) - min(values)
        shift = min(values) - max(1e-3 * spread, 1e-8)
        label = f"training loss - ({shift:.4g})"
    out = []
    for r in result.runs:
        pts = [(i, t, v - shift) for i, t, v in
               zip(r.curve["iteration"], r.curve["time"], r.curve["loss"]) if v is not None]
        out.append((r, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]))
    return out, shift, label


def plot(result: Comparison, path: str | os.PathLike, x: str = "iteration") -> None:
    """Training loss (log scale) against ``x`` ("iteration" or "time"), one line per method,
    the target loss as a dashed line; written to ``path`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    curves, shift, label = _curves(result)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    starts = [ls[0] for _, _, _, ls in curves if ls]
    lows = [min(ls) for _, _, _, ls in curves if ls]
    cap = max(starts) * 1e2 if starts else math.inf  # a diverging run would reach 1e300
    for k, (r, its, ts, ls) in enumerate(curves):
        xs = its if x == "iteration" else ts
        style = "-" if k < 10 else "--"
        label_k = r.label + (" (diverged)" if r.diverged else "")
        ax.plot(xs, [min(v, cap) for v in ls], style, label=label_k, color=f"C{k % 10}", lw=1.6)
    target = result.problem["target_loss"]
    if target is not None and target - shift > 0:
        ax.axhline(target - shift, color="k", ls=":", lw=1, label="target loss")
    ax.set_yscale("log")
    if starts:
        ax.set_ylim(max(min(lows) * 0.5, 1e-300), cap)
    ax.set_xlabel("iteration" if x == "iteration" else "step time (s)")
    ax.set_ylabel(label)
    ax.set_title(f"{result.problem['name']}: loss against {x}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


# ---------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;
color:#222}p.answer{font-size:1.25em;border-left:4px solid #2a6;padding:.4em .8em;
background:#f3faf5}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%}code,pre{background:#f6f6f6}pre{padding:.5em;overflow-x:auto}"""


def html_report(result: Comparison, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the answer first, then the table, plots and settings."""
    e = html.escape
    p, c = result.problem, result.config
    budget = f"{c['iters']} iterations" if c["iters"] is not None else f"{c['time']} s"
    head = "".join(f"<th>{e(col)}</th>" for col in _columns(result))
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>"
                   for row in table_rows(result))
    imgs = "".join(
        f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}">' for title, data in images.items())
    errors = "".join(f"<li>{e(r.label)}: {e(r.error)}</li>" for r in result.runs if r.error)
    settings = "".join(
        f"<tr><td>{e(r.label)}</td><td style='text-align:left'><code>"
        f"{e(', '.join(f'{k}={v}' for k, v in r.settings.items()))}</code></td></tr>"
        for r in result.runs)
    env = result.environment
    env_s = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>steepest compare: {e(p['name'])}</title>
<style>{_CSS}</style></head><body>
<p class="answer">{e(result.summary['sentence'])}</p>
<h1>steepest compare: {e(p['name'])}</h1>
<p>{e(p['description'])}. {p['parameters']} parameters, {p['n_train']} training and
{p['n_test']} test samples; target training loss {e(_g(p['target_loss']))}. Budget {budget}
per method, seed {c['seed']}, {e(c['device'])}, {e(c['dtype'])}. Times are seconds spent in
the methods' steps.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{f"<h2>Diverged runs</h2><ul>{errors}</ul>" if errors else ""}
{imgs}
<h2>Settings</h2><table><tbody>{settings}</tbody></table>
<h2>Environment</h2><p>{e(env_s)}</p>
<p>Every run's loss curve is in <code>results.json</code>.</p>
</body></html>
"""


# ---------------------------------------------------------------------------- files
def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def check_out(out: str | os.PathLike, kind: str = "directory") -> Path:
    """Refuse an output path that cannot be written, before anything runs.

    ``kind="directory"``: ``out`` is the directory of the results (created if missing);
    ``kind="file"``: ``out`` is a file (its directory is created if missing). Every part of the
    path that exists must be a directory (the last one too for ``kind="directory"``), and the
    deepest existing directory must be writable; else :class:`ConfigurationError` names the
    part at fault.

    >>> check_out("out")
    """
    path = Path(out)
    what = "a directory path" if kind == "directory" else "a file path"
    if path.exists():
        if kind == "directory" and not path.is_dir():
            raise ConfigurationError(f"--out {os.fspath(out)!r} exists and is not a directory; "
                                     "pass a directory path.")
        if kind == "file" and path.is_dir():
            raise ConfigurationError(f"--out {os.fspath(out)!r} is a directory; pass {what}.")
    parent = path if kind == "directory" else path.parent
    probe = Path(os.path.abspath(parent))
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigurationError(
            f"--out {os.fspath(out)!r}: {os.fspath(probe)!r} is a file, so nothing can be "
            f"created under it; pass {what} whose parents are directories."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"--out {os.fspath(out)!r}: the directory {os.fspath(probe)!r} is not writable; "
            "pass a path where you may write."
        )
    return path


def write(result: Comparison, out: str | os.PathLike) -> list[str]:
    """Write :data:`FILES` into the directory ``out`` (created if needed), atomically per file:
    everything is produced in a temporary directory first. Returns the written paths."""
    dest = check_out(out).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        (tmp / "results.json").write_text(
            json.dumps(_clean(result.to_dict()), indent=1, allow_nan=False) + "\n")
        plot(result, tmp / "loss_vs_iterations.png", "iteration")
        plot(result, tmp / "loss_vs_time.png", "time")
        images = {"Training loss against iterations": (tmp / "loss_vs_iterations.png")
                  .read_bytes(),
                  "Training loss against step time": (tmp / "loss_vs_time.png").read_bytes()}
        (tmp / "report.html").write_text(html_report(result, images), encoding="utf-8")
        # a new directory gets the ordinary mode (umask), not mkdtemp's 0700
        dest.mkdir(exist_ok=True)
        for name in FILES:
            os.replace(tmp / name, dest / name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.fspath(dest / name) for name in FILES]


__all__ = ["COLUMNS", "FILES", "check_out", "html_report", "plot", "print_table", "table_rows",
           "write"]
