r"""The data of a comparison and how it is judged: :class:`Run` (one method on one seed),
:class:`Comparison` (everything, the content of results.json) and :func:`summarize` (the
answer).

Both the runner and the report import this module; it imports neither (no torch either).

How the answer is judged
------------------------
Every method (a *row*: a method name, or a variant such as ``ggn[solver=woodbury]``) runs on
``K`` seeds with the same budget. Per row and quantity the figure is the **median over the
seeds** with its **range** (min, max).

- With a target training loss, rows are ranked by the median time to reach it (a seed that
  never reaches it counts as infinitely slow, so a row whose median is "not reached" cannot
  win); ties in time are broken by the median final loss. Without a target, or when no row
  reaches it, rows are ranked by the median final training loss.
- Two rows are **tied** when the median of one lies within the other's range over the seeds:
  the seeds do not separate them, and the answer names both.
- Rows whose trajectories **coincide** (the training loss equal to a relative ``1e-6`` at every
  recorded iteration they share, on every seed; see :func:`coinciding`) are the same algorithm
  in two implementations: they are merged into one row, named ``A = B``, with the reason when
  the papers give one (GGN = Fisher for a loss in natural parameters, Martens 002 section 9.2),
  and its figures are those of the faster member.

Example
-------
>>> s = summarize(problem, runs)        # problem: the "problem" dict of results.json
>>> s["sentence"], s["winner"], s["tied"]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "steepest.compare/2"
COINCIDE_RTOL = 1e-6  # relative agreement of two loss curves that counts as the same iterates


@dataclass
class Run:
    """One method (row ``method``) on one ``seed``.

    ``curve`` holds parallel lists: ``iteration`` (0 = the start), ``time`` (seconds of step
    time before that point), ``loss`` (the full training loss there) and ``test`` (the test
    metric there, None where the problem has none). Every iteration up to 50 is kept, then
    log-spaced ones (ratio 1.05) and the last; the time to target is taken from every step.
    """

    method: str
    label: str
    settings: dict[str, Any]
    seed: int = 0
    iterations: int = 0
    wall_time: float = 0.0
    final_loss: float = math.nan
    best_loss: float = math.nan
    test_metric: float | None = None
    time_to_target: float | None = None
    iters_to_target: int | None = None
    diverged: bool = False
    error: str | None = None
    curve: dict[str, list] = field(
        default_factory=lambda: {"iteration": [], "time": [], "loss": [], "test": []}
    )


@dataclass
class Comparison:
    """What :func:`steepest.compare.run` returns; ``to_dict()`` is results.json (see
    :data:`SCHEMA_DOC`). ``runs`` holds every seed's run of every row, ``tuning`` the
    learning-rate search of the baselines."""

    problem: dict[str, Any]
    config: dict[str, Any]
    environment: dict[str, Any]
    runs: list[Run]
    summary: dict[str, Any]
    tuning: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "problem": self.problem,
            "config": self.config,
            "environment": self.environment,
            "tuning": self.tuning,
            "runs": [asdict(r) for r in self.runs],
            "summary": self.summary,
        }

    def rows(self) -> list[str]:
        """The row names, in the order they were run."""
        return list(dict.fromkeys(r.method for r in self.runs))


SCHEMA_DOC = """results.json (schema "steepest.compare/2"); floats are null where not finite.

{
  "schema": "steepest.compare/2",
  "problem": {"name", "description", "loss": class name, "hessian_is_fisher": bool,
              "target_loss": float|null, "test_metric": name|null, "higher_is_better": bool,
              "n_train", "n_test", "parameters": int, "batch_size": int|null},
  "config": {"methods": [row names, e.g. "ggn", "ggn[solver=woodbury]"],
             "iters": int|null, "time": seconds of step time|null (one of the two is set),
             "clock": "wall" (time.perf_counter) | "cpu" (time.process_time),
             "seeds": [int, ...], "tune": bool, "device": "cpu"|"cuda...",
             "dtype": "float32"|"float64", "overrides": {method: {key: value}},
             "settings": {row: {key: value}} (after tuning), "partial": bool (Ctrl-C)},
  "environment": {"steepest", "python", "torch", "numpy", "scipy", "matplotlib",
                  "scikit-learn", "platform", "machine", "processor", "cpu_count",
                  "torch_threads", "load_average": [1, 5, 15 min]|null,
                  "cuda_device": name|null, "started": ISO 8601 UTC},
  "tuning": {row: {"key": "lr", "grid": [values], "chosen": value, "seed": int,
                   "judged": "time_to_target"|"final_loss",
                   "trials": [{"lr", "time_to_target", "final_loss", "diverged"}]}},
  "runs": [{"method": row, "label", "seed", "settings": {key: value},
            "iterations": steps taken, "wall_time": seconds of step time,
            "final_loss", "best_loss": training loss (full training set),
            "test_metric": float|null, "time_to_target": seconds|null,
            "iters_to_target": int|null, "diverged": bool, "error": message|null,
            "curve": {"iteration": [0, 1, ...], "time": [0.0, ...], "loss": [...],
                      "test": [...]}}],          one entry per row and seed
  "summary": {"judged": "time_to_target"|"final_loss", "budget": text, "seeds": K,
              "winner": row|null, "tied": [rows tied with the winner],
              "best_test": row|null, "best_test_tied": [rows],
              "first_to_target": row|null, "best_loss": row|null,
              "merged": [{"rows": [rows], "label", "reason": text|null}],
              "rows": [{"row", "label", "members": [rows], "reason": text|null,
                        "reached": seeds that reached the target, "seeds": K,
                        "diverged": seeds that diverged,
                        "time_to_target": {"median", "min", "max"},
                        "final_loss": {...}, "test_metric": {...}, "iterations": {...},
                        "wall_time": {...}}],
              "sentence": the answer}
}
Figures are medians over the seeds with their range (min, max); a seed that never reached
the target has time_to_target null in its run and counts as infinitely slow in the median
(so a median or max of null means "not reached"). Time is the time spent inside the
method's steps (the evaluations that record the curve are not counted); "time_to_target" is
the step time after the first step whose full training loss is <= target_loss. Curves keep
every iteration up to 50, then log-spaced ones (ratio 1.05) and the last.
"""


# ---------------------------------------------------------------------------- statistics
def spread(values: Iterable[float | None], missing: float = math.nan) -> dict[str, Any]:
    """Median, min and max of ``values`` (None counts as ``missing``: ``inf`` for a target
    never reached, NaN to leave it out); non-finite results become None.

    >>> spread([1.0, 3.0, None], missing=math.inf)
    {'median': 3.0, 'min': 1.0, 'max': None}
    """
    xs = [missing if v is None else float(v) for v in values]
    xs = [v for v in xs if not math.isnan(v)]
    if not xs:
        return {"median": None, "min": None, "max": None}

    def fin(v: float) -> float | None:
        return v if math.isfinite(v) else None

    return {"median": fin(statistics.median(xs)), "min": fin(min(xs)), "max": fin(max(xs))}


def _interval(s: dict[str, Any]) -> tuple[float, float, float]:
    """(median, min, max) with None read as +inf (not reached / not available)."""
    inf = math.inf
    return tuple(inf if s[k] is None else s[k] for k in ("median", "min", "max"))  # type: ignore[return-value]


def tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows' figures (``spread`` dicts) cannot be told apart: the median of one
    lies within the other's range over the seeds."""
    ma, lo_a, hi_a = _interval(a)
    mb, lo_b, hi_b = _interval(b)
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return ma == mb
    return lo_b <= ma <= hi_b or lo_a <= mb <= hi_a


# ---------------------------------------------------------------------------- coincidence
_REASONS = {
    frozenset({"natural", "ggn"}): (
        "GGN = Fisher when the loss is in the natural parameters of its distribution "
        "(MSE, cross-entropy, logistic: H_L = F_R, Martens 002 section 9.2)"
    ),
    frozenset({"gauss-newton", "ggn"}): (
        "GGN = Gauss-Newton for MSE with sigma = 1: H_L = I (000 section 3.2, Martens 002 "
        "section 8)"
    ),
    frozenset({"gauss-newton", "natural"}): (
        "Fisher = Gauss-Newton / sigma^2 for MSE: F_R = I / sigma^2 (000 section 3.2)"
    ),
}
_NEWTON = (
    "Hessian = GGN where the model is linear in theta: the second-derivative term of the "
    "Hessian vanishes (Martens 002 section 8)"
)


def _base(row: str) -> str:
    return row.split("[", 1)[0]


def reason(rows: Sequence[str], problem: dict[str, Any]) -> str | None:
    """Why rows can share their iterates, when the papers say (None when they do not)."""
    bases = {_base(r) for r in rows}
    if len(bases) == 1:
        return "the same metric with settings that give the same steps"
    texts = []
    for pair, text in _REASONS.items():
        if pair <= bases:
            if pair == frozenset({"natural", "ggn"}) and not problem.get("hessian_is_fisher"):
                continue
            if "gauss-newton" in pair and problem.get("loss") != "MSE":
                continue
            texts.append(text)
    if "newton" in bases and bases & {"ggn", "gauss-newton", "natural"}:
        texts.append(_NEWTON)
    return "; ".join(texts) or None


def _curve_map(run: Run) -> dict[int, float]:
    return {k: v for k, v in zip(run.curve["iteration"], run.curve["loss"]) if v is not None}


def coinciding(a: Sequence[Run], b: Sequence[Run], rtol: float = COINCIDE_RTOL) -> bool:
    """Whether two rows took the same iterates: on every seed both have runs, the training
    losses at every recorded iteration they share (at least three, and at least one step
    that changed the loss) agree to ``rtol``, and both diverged or neither did."""
    by_seed = {r.seed: r for r in b}
    if not a or {r.seed for r in a} != set(by_seed):
        return False
    for ra in a:
        rb = by_seed[ra.seed]
        if ra.diverged != rb.diverged:
            return False
        ca, cb = _curve_map(ra), _curve_map(rb)
        common = sorted(set(ca) & set(cb))
        if len(common) < 3:
            return False
        if all(ca[k] == ca[common[0]] for k in common):
            return False  # nothing moved: no evidence either way
        for k in common:
            x, y = ca[k], cb[k]
            if abs(x - y) > rtol * max(abs(x), abs(y)) + 1e-300:
                return False
    return True


# ---------------------------------------------------------------------------- summary
def _fmt_time(t: float | None) -> str:
    if t is None:
        return "not reached"
    return f"{t:.3g} s" if t >= 0.01 else f"{t * 1000:.2g} ms"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _range_text(s: dict[str, Any], fmt=_fmt) -> str:
    return f"{fmt(s['min'])} to {fmt(s['max'])}"


def _value(s: dict[str, Any], seeds: int) -> str:
    if seeds > 1:
        return f"median {_fmt(s['median'])} (range {_range_text(s)})"
    return _fmt(s["median"])


def _names(labels: Sequence[str]) -> str:
    if len(labels) <= 1:
        return "".join(labels)
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def _row_stats(runs: Sequence[Run]) -> dict[str, Any]:
    return {
        "reached": sum(r.time_to_target is not None for r in runs),
        "seeds": len(runs),
        "diverged": sum(r.diverged for r in runs),
        "time_to_target": spread((r.time_to_target for r in runs), missing=math.inf),
        "final_loss": spread(
            (None if r.diverged else r.final_loss for r in runs), missing=math.inf
        ),
        "test_metric": spread(r.test_metric for r in runs),
        "iterations": spread(r.iterations for r in runs),
        "wall_time": spread(r.wall_time for r in runs),
    }


def _groups(rows: list[str], by_row: dict[str, list[Run]]) -> list[list[str]]:
    """Rows grouped by coinciding trajectories (transitively), in run order."""
    parent = {r: r for r in rows}

    def find(r: str) -> str:
        while parent[r] != r:
            r = parent[r]
        return r

    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if find(a) != find(b) and coinciding(by_row[a], by_row[b]):
                parent[find(b)] = find(a)
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(find(r), []).append(r)
    return list(groups.values())


def summarize(
    problem: dict[str, Any], runs: Sequence[Run], budget: str = "", merge: bool = True
) -> dict[str, Any]:
    """The answer: rows merged where their trajectories coincide, ranked by the median time
    to target (else the median final loss), ties named, the best test metric, one sentence.

    ``problem`` needs ``name``, ``target_loss``, ``test_metric``, ``higher_is_better`` (and
    ``loss``, ``hessian_is_fisher`` for the reasons of merged rows); ``budget`` is the text
    of the budget for the sentence. The keys are listed in :data:`SCHEMA_DOC`.
    """
    rows = list(dict.fromkeys(r.method for r in runs))
    by_row = {row: [r for r in runs if r.method == row] for row in rows}
    labels = {row: by_row[row][0].label for row in rows}
    groups = _groups(rows, by_row) if merge else [[r] for r in rows]
    seeds = max((len(v) for v in by_row.values()), default=0)
    target = problem.get("target_loss")

    table: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    for members in groups:
        stats = {m: _row_stats(by_row[m]) for m in members}
        # the merged row shows its fastest member (same iterates, so only time differs)
        rep = min(
            members,
            key=lambda m: (
                _interval(stats[m]["time_to_target"])[0],
                _interval(stats[m]["wall_time"])[0],
            ),
        )
        label = " = ".join(labels[m] for m in [rep] + [m for m in members if m != rep])
        why = reason(members, problem) if len(members) > 1 else None
        if len(members) > 1:
            merged.append({"rows": members, "label": label, "reason": why})
        table.append({"row": rep, "label": label, "members": members, "reason": why, **stats[rep]})

    def loss_key(t: dict[str, Any]) -> tuple[float, float]:
        return _interval(t["final_loss"])[0], _interval(t["time_to_target"])[0]

    reached = [t for t in table if t["time_to_target"]["median"] is not None]
    if target is not None and reached:
        judged, key = "time_to_target", "time_to_target"
        ranked = sorted(reached, key=lambda t: (_interval(t[key])[0], loss_key(t)[0]))
    else:
        judged, key = "final_loss", "final_loss"
        ranked = sorted((t for t in table if t["final_loss"]["median"] is not None), key=loss_key)
    winner = ranked[0] if ranked else None
    ties = [t for t in ranked[1:] if winner is not None and tied(winner[key], t[key])]

    tested = [
        t
        for t in table
        if t["test_metric"]["median"] is not None and t["final_loss"]["median"] is not None
    ]
    sign = -1.0 if problem.get("higher_is_better") else 1.0
    tested.sort(key=lambda t: sign * t["test_metric"]["median"])
    best_test = tested[0] if tested else None
    test_ties = [
        t
        for t in tested[1:]
        if best_test is not None and tied(best_test["test_metric"], t["test_metric"])
    ]

    name = problem["name"]
    how = f"{seeds} seed{'s' if seeds != 1 else ''}" + (f", {budget}" if budget else "")
    if winner is None:
        sentence = f"On {name} ({how}), every method diverged."
    else:
        wl = winner["label"]
        if judged == "time_to_target":
            s = winner[key]
            if winner["seeds"] > 1:
                detail = (
                    f": median {_fmt_time(s['median'])} over the seeds (range "
                    f"{_range_text(s, _fmt_time)}, {winner['reached']} of "
                    f"{winner['seeds']} seeds reached it)"
                )
            else:
                detail = f" ({_fmt_time(s['median'])})"
            sentence = (
                f"On {name} ({how}), {wl} reached the target training loss "
                f"{target:.4g} first{detail}"
            )
        else:
            s = winner[key]
            why_loss = (
                "no method reached the target training loss "
                f"{target:.4g} on most seeds; judged on the final training loss"
                if target is not None
                else "judged on the final training loss"
            )
            sentence = (
                f"On {name} ({how}; {why_loss}), {wl} ended lowest: {_value(s, winner['seeds'])}"
            )
        if ties:
            sentence += (
                f", tied with {_names([t['label'] for t in ties])} (their ranges "
                "over the seeds overlap)"
            )
        sentence += "."
        if best_test is not None:
            s = best_test["test_metric"]
            sentence += (
                f" Best {problem['test_metric']}: {best_test['label']}, "
                f"{_value(s, best_test['seeds'])}"
            )
            if test_ties:
                sentence += f", tied with {_names([t['label'] for t in test_ties])}"
            sentence += "."
    return {
        "judged": judged,
        "budget": budget,
        "seeds": seeds,
        "winner": winner["row"] if winner else None,
        "tied": [t["row"] for t in ties],
        "best_test": best_test["row"] if best_test else None,
        "best_test_tied": [t["row"] for t in test_ties],
        "first_to_target": winner["row"] if winner and judged == "time_to_target" else None,
        "best_loss": min(table, key=loss_key)["row"]
        if table and any(t["final_loss"]["median"] is not None for t in table)
        else None,
        "merged": merged,
        "rows": table,
        "sentence": sentence,
    }


__all__ = [
    "COINCIDE_RTOL",
    "SCHEMA",
    "SCHEMA_DOC",
    "Comparison",
    "Run",
    "coinciding",
    "reason",
    "spread",
    "summarize",
    "tied",
]
