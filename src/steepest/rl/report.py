"""The outputs of ``steepest rl``: the terminal table, return curves with bands, results.json
and a self-contained report.html.

:func:`write` puts ``results.json``, ``return_vs_steps.png``, ``return_vs_time.png`` and
``report.html`` (plots embedded) into a directory; each file is written to a temporary name and
moved into place, so an interrupted write never leaves a half file. The curves show, per
method, the median over seeds of the mean return of the last 10 training episodes, with a band
from the lowest to the highest seed.

Example
-------
>>> res = steepest.rl.runner.run("CartPole-v1", "trpo,vpg", seeds=[0, 1], steps=20_000)
>>> print_table(res); write(res, "out/rl")
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..compare.report import json_safe
from .runner import Results

FILES = ("results.json", "return_vs_steps.png", "return_vs_time.png", "report.html")
COLUMNS = (
    "method",
    "final mean return: median [min, max]",
    "seeds at target",
    "steps to target (median)",
    "wall time (median)",
    "s per 1000 steps",
)


def _g(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def table_rows(res: Results) -> list[list[str]]:
    """One row of strings per method, in the order of :data:`COLUMNS`."""
    rows = []
    for m in res.methods:
        s = res.summary[m]
        spread = (
            f"{_g(s['median_final_return'])} [{_g(s['min_final_return'])}, "
            f"{_g(s['max_final_return'])}]"
        )
        target = "-" if res.target is None else f"{s['reached_target']}/{s['seeds']}"
        rows.append(
            [
                m,
                spread,
                target,
                _g(s["median_steps_to_target"], ".0f"),
                f"{_g(s['median_wall_time'], '.3g')} s",
                _g(s["wall_time_per_1000_steps"], ".3g"),
            ]
        )
    return rows


def sentence(res: Results) -> str:
    """The one-sentence answer: who ended highest, who reached the target first."""
    finals = {m: res.summary[m]["median_final_return"] for m in res.methods}
    ok = {m: v for m, v in finals.items() if v is not None}
    if not ok:
        return f"On {res.env} no run finished an episode within {res.steps} steps."
    best = max(ok, key=ok.get)
    text = (
        f"On {res.env}, {best.upper()} ended with the highest median return "
        f"({ok[best]:.4g} over {len(res.seeds)} seed(s), {res.steps} steps each)"
    )
    hits = {
        m: res.summary[m]["median_steps_to_target"]
        for m in res.methods
        if res.summary[m]["reached_target"]
    }
    if res.target is not None:
        if hits:
            first = min(hits, key=hits.get)
            text += (
                f"; {first.upper()} reached the target {res.target:g} first (median "
                f"{hits[first]:.0f} steps, {res.summary[first]['reached_target']}/"
                f"{len(res.seeds)} seeds)"
            )
        else:
            text += f"; no method reached the target {res.target:g}"
    return text + "."


def print_table(res: Results, console: Any = None) -> None:
    """The table in the terminal (rich), then the sentence."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(title=f"steepest rl: {res.env}")
    for k, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if k == 0 else "right")
    for row in table_rows(res):
        table.add_row(*row)
    console.print(table)
    console.print(sentence(res), highlight=False)


def _running_mean(episodes: list, window: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([e[0] for e in episodes], dtype=float)
    rets = np.array([e[1] for e in episodes], dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(rets)])
    k = np.arange(1, len(rets) + 1)
    lo = np.maximum(0, k - window)
    return steps, (csum[k] - csum[lo]) / (k - lo)


def curves(
    res: Results, x: str = "steps", points: int = 200
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per method (grid, median, min, max) over seeds of the running mean return, against
    environment steps (``x="steps"``) or wall time (``x="time"``)."""
    window = int(res.settings.get("episodes_window", 10))
    out = {}
    for m in res.methods:
        rs = [r for r in res.runs if r.method == m and r.episodes]
        if not rs:
            continue
        if x == "steps":
            end = max(r.steps for r in rs)
        else:
            end = max(r.wall_time for r in rs)
        grid = np.linspace(0, end, points)
        ys = []
        for r in rs:
            st, mean = _running_mean(r.episodes, window)
            if x == "time":  # map steps to time through the iterations' (steps, wall time)
                hs = np.array([h["steps"] for h in r.history], dtype=float)
                ht = np.array([h["wall_time"] for h in r.history], dtype=float)
                st = np.interp(st, np.concatenate([[0.0], hs]), np.concatenate([[0.0], ht]))
            idx = np.searchsorted(st, grid, side="right") - 1
            y = np.where(idx >= 0, mean[np.clip(idx, 0, None)], np.nan)
            ys.append(y)
        arr = np.array(ys)
        with np.errstate(all="ignore"), _quiet():
            out[m] = (grid, np.nanmedian(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0))
    return out


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)


def plot(res: Results, path: str | os.PathLike, x: str = "steps") -> None:
    """Median return with a min-max band over seeds, one colour per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from .agent import LABELS

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for k, (m, (grid, med, lo, hi)) in enumerate(curves(res, x).items()):
        ax.plot(grid, med, color=f"C{k}", lw=1.8, label=LABELS.get(m, m))
        ax.fill_between(grid, lo, hi, color=f"C{k}", alpha=0.2, lw=0)
    if res.target is not None:
        ax.axhline(res.target, color="k", ls=":", lw=1, label=f"target {res.target:g}")
    ax.set_xlabel("environment steps" if x == "steps" else "wall time (s)")
    ax.set_ylabel("mean return of the last 10 episodes")
    n = len(res.seeds)
    ax.set_title(f"{res.env}: median over {n} seed(s), band min-max")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;
color:#222}p.answer{font-size:1.25em;border-left:4px solid #2a6;padding:.4em .8em;
background:#f3faf5}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%}code{background:#f6f6f6}"""


def html_report(res: Results, images: dict[str, bytes]) -> str:
    """A self-contained page: the answer, the table, the plots, the settings, the machine."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in table_rows(res)
    )
    imgs = "".join(
        f'<h2>{e(t)}</h2><img alt="{e(t)}" src="data:image/png;base64,'
        f'{base64.b64encode(d).decode()}">'
        for t, d in images.items()
    )
    sets = e(", ".join(f"{k}={v}" for k, v in res.settings.items()))
    mach = e(", ".join(f"{k} {v}" for k, v in res.machine.items() if v is not None))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>steepest rl: {e(res.env)}</title>
<style>{_CSS}</style></head><body>
<p class="answer">{e(sentence(res))}</p>
<h1>steepest rl: {e(res.env)}</h1>
<p>Methods {e(", ".join(res.methods))}; seeds {e(", ".join(map(str, res.seeds)))};
{res.steps} environment steps per run; target return {e(_g(res.target))}. Returns are the
mean of the last 10 training episodes; wall time is the time in the runs' iterations
(rollouts, advantages, policy step, value fit).</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{imgs}
<h2>Settings</h2><p><code>{sets}</code></p>
<h2>Machine</h2><p>{mach}</p>
<p>Every run's per-iteration history and episode returns are in <code>results.json</code>.</p>
</body></html>
"""


def write(res: Results, out: str | os.PathLike) -> list[str]:
    """Write :data:`FILES` into the directory ``out`` (created if needed)."""
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: bytes) -> None:
        tmp = dest / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest / name)

    doc = json_safe({**res.to_dict(), "sentence": sentence(res)})
    put("results.json", (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
    images = {}
    for name, x, title in (
        ("return_vs_steps.png", "steps", "Return against environment steps"),
        ("return_vs_time.png", "time", "Return against wall time"),
    ):
        plot(res, dest / f".{name}.tmp", x)
        os.replace(dest / f".{name}.tmp", dest / name)
        images[title] = (dest / name).read_bytes()
    put("report.html", html_report(res, images).encode("utf-8"))
    return [os.fspath(dest / n) for n in FILES]
