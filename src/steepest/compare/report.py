"""The outputs of ``steepest compare``: the terminal table, results.json, the plots and
report.html.

:func:`write` puts, in one directory, ``results.json`` (schema in
:data:`steepest.compare.results.SCHEMA_DOC`), ``loss_vs_time.png`` (training loss and test
metric against step time), ``loss_vs_iterations.png`` and a self-contained ``report.html``
(plots embedded as base64) that opens with the answer and says how it was judged. Files are
written to a temporary directory next to the destination and moved into place at the end, so
a failure never leaves half-written files behind. This module reads results only; it never
imports the runner.

Example
-------
>>> result = steepest.compare.run("regression", methods="all", seeds=3)
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

from ..errors import ConfigurationError
from . import plots
from .results import Comparison

FILES = ("results.json", "loss_vs_iterations.png", "loss_vs_time.png", "report.html")
COLUMNS = ("method", "time to target", "reached", "final train loss", "test metric",
           "iterations", "step time", "diverged")


# ---------------------------------------------------------------------------- table
def _g(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _t(x: float | None) -> str:
    if x is None:
        return "not reached"
    return f"{x:.3g} s" if x >= 0.01 else f"{x * 1000:.2g} ms"


def _med(s: dict[str, Any], fmt=_g, seeds: int = 1) -> str:
    """``median [min, max]`` (the range only with more than one seed)."""
    if seeds <= 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}, {fmt(s['max'])}]"


def table_rows(result: Comparison) -> list[list[str]]:
    """One row of strings per row of the summary (merged rows once), in the order of
    :data:`COLUMNS`: medians over the seeds with their range in brackets."""
    out = []
    no_target = result.problem.get("target_loss") is None
    for t in result.summary["rows"]:
        k = t["seeds"]
        ttt = "-" if no_target else _med(t["time_to_target"], _t, k)
        out.append([
            t["label"], ttt, "-" if no_target else f"{t['reached']}/{k}",
            _med(t["final_loss"], _g, k), _med(t["test_metric"], _g, k),
            _g(t["iterations"]["median"], 6), _t(t["wall_time"]["median"]),
            f"{t['diverged']}/{k}",
        ])
    return out


def _columns(result: Comparison) -> list[str]:
    cols = list(COLUMNS)
    cols[4] = result.problem["test_metric"] or "test metric"
    return cols


def judged_text(result: Comparison) -> str:
    """How the answer was judged, in one paragraph of plain text."""
    s, c, p = result.summary, result.config, result.problem
    k = len(c.get("seeds") or [])
    budget = s.get("budget") or ""
    clock = "process CPU time" if c.get("clock") == "cpu" else "wall-clock time"
    if s["judged"] == "time_to_target":
        what = (f"the time to reach the target training loss {_g(p['target_loss'])} (median "
                "over the seeds; a seed that never reaches it counts as infinitely slow)")
    else:
        what = "the final training loss (median over the seeds)"
    text = (f"Judged on {what}, {k} seed{'s' if k != 1 else ''}, each method with the same "
            f"budget: {budget}. Figures are medians with their range [min, max] over the "
            "seeds. Methods are tied when the median of one lies within the other's range. "
            f"Times are seconds of {clock} spent in the methods' own steps (the evaluations "
            "that record the curves are not counted), on a machine that may be shared: "
            f"torch threads {result.environment.get('torch_threads')}, load average "
            f"{result.environment.get('load_average')}.")
    if result.tuning:
        text += (" The learning rates of " + ", ".join(sorted(result.tuning)) + " were "
                 "searched on the first seed (table below).")
    return text


def print_table(result: Comparison, console: Any = None) -> None:
    """The results table in the terminal (rich), then the answer."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:  # a pipe or a file gets the whole table, not 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=160)
    k = len(result.config.get("seeds") or [])
    table = Table(title=f"steepest compare: {result.problem['name']} (median [min, max] over "
                  f"{k} seeds, {result.summary.get('budget', '')})")
    for i, col in enumerate(_columns(result)):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i in (0, 1))
    for row in table_rows(result):
        table.add_row(*(escape(v) for v in row))
    console.print(table)
    for m in result.summary["merged"]:
        console.print(escape(f"{m['label']}: the same iterates on every seed"
                             + (f" ({m['reason']})" if m["reason"] else "")), highlight=False)
    for row, rec in result.tuning.items():
        grid = ", ".join(f"{v:g}" for v in rec["grid"])
        console.print(f"{escape(row)}: lr searched over {grid} on seed {rec['seed']}, chose "
                      f"{rec['chosen']:g}", highlight=False)
    console.print(escape(result.summary["sentence"]), highlight=False)
    seen = set()
    for r in result.runs:
        if r.error and r.method not in seen:
            seen.add(r.method)
            console.print(f"[red]{escape(r.label)}[/red] diverged (seed {r.seed}): "
                          f"{escape(r.error)}",
                          markup=True, highlight=False)


# ---------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}p.answer{font-size:1.2em;border-left:4px solid #2a6;padding:.4em .8em;
background:#f3faf5}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%}code,pre{background:#f6f6f6}pre{padding:.5em;overflow-x:auto}"""


def html_report(result: Comparison, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the answer first, how it was judged, the table, merged
    rows and their reasons, the learning-rate search, plots, settings and environment."""
    e = html.escape
    p, c = result.problem, result.config
    head = "".join(f"<th>{e(col)}</th>" for col in _columns(result))
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>"
                   for row in table_rows(result))
    imgs = "".join(
        f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}">' for title, data in images.items())
    seen: set[str] = set()
    errors = ""
    for r in result.runs:
        if r.error and r.method not in seen:
            seen.add(r.method)
            errors += f"<li>{e(r.label)} (seed {r.seed}): {e(r.error)}</li>"
    merged = "".join(
        f"<li>{e(m['label'])}: the same iterates on every seed"
        + (f" ({e(m['reason'])})" if m["reason"] else " (no reason given by the papers)")
        + "</li>" for m in result.summary["merged"])
    tuning = "".join(
        f"<tr><td>{e(row)}</td><td>{e(', '.join(f'{v:g}' for v in rec['grid']))}</td>"
        f"<td>{rec['chosen']:g}</td><td>{rec['seed']}</td><td>{e(rec['judged'])}</td></tr>"
        for row, rec in result.tuning.items())
    settings = "".join(
        f"<tr><td>{e(row)}</td><td style='text-align:left'><code>"
        f"{e(', '.join(f'{k}={v}' for k, v in kv.items()))}</code></td></tr>"
        for row, kv in c["settings"].items())
    env = result.environment
    env_s = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)
    partial = ("<p><strong>Partial results: the comparison was interrupted.</strong></p>"
               if c.get("partial") else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>steepest compare: {e(p['name'])}</title>
<style>{_CSS}</style></head><body>
<p class="answer">{e(result.summary['sentence'])}</p>
{partial}<h1>steepest compare: {e(p['name'])}</h1>
<p>{e(p['description'])}. {p['parameters']} parameters, {p['n_train']} training and
{p['n_test']} test samples; target training loss {e(_g(p['target_loss']))}; {e(c['device'])},
{e(c['dtype'])}, seeds {e(', '.join(str(s) for s in c.get('seeds', [])))}.</p>
<p>{e(judged_text(result))}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{f"<h2>Merged methods</h2><ul>{merged}</ul>" if merged else ""}
{f"<h2>Diverged runs</h2><ul>{errors}</ul>" if errors else ""}
{imgs}
{"<h2>Learning-rate search</h2><table><thead><tr><th>method</th><th>grid</th><th>chosen</th>"
 f"<th>seed</th><th>judged on</th></tr></thead><tbody>{tuning}</tbody></table>"
 if tuning else ""}
<h2>Settings</h2><table><tbody>{settings}</tbody></table>
<h2>Environment</h2><p>{e(env_s)}</p>
<p>Every seed's curves are in <code>results.json</code>.</p>
</body></html>
"""


# ---------------------------------------------------------------------------- files
def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and keys as strings (strict JSON; the RL report
    uses it too)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
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
            json.dumps(json_safe(result.to_dict()), indent=1, allow_nan=False) + "\n")
        plots.plot_time(result, tmp / "loss_vs_time.png")
        plots.plot_iterations(result, tmp / "loss_vs_iterations.png")
        images = {"Training loss and test metric against step time":
                  (tmp / "loss_vs_time.png").read_bytes(),
                  "Training loss against iterations":
                  (tmp / "loss_vs_iterations.png").read_bytes()}
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


__all__ = ["COLUMNS", "FILES", "check_out", "html_report", "judged_text", "print_table",
           "table_rows", "write"]
