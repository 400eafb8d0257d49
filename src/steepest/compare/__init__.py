"""``steepest compare``, the main job: which method for my problem?

- :mod:`~steepest.compare.methods`: the methods, their default settings, variants
  (``ggn[solver=woodbury]``) and the optimizer each row builds;
- :mod:`~steepest.compare.runner`: the runs on several seeds, the learning-rate search of the
  baselines (:func:`run`, :func:`plan`, :func:`execute`);
- :mod:`~steepest.compare.results`: the data (:class:`Run`, :class:`Comparison`) and the
  judgement (:func:`summarize`: medians over seeds, ties, coinciding methods merged);
- :mod:`~steepest.compare.report`: the terminal table, results.json and report.html;
- :mod:`~steepest.compare.plots`: the figures (median over seeds and its range).

The report and the plots read results only: they never import the runner.

Example
-------
>>> from steepest import compare
>>> result = compare.run("regression", methods="ggn,adam,ggn[solver=cg]", seeds=3)
>>> print(result.summary["sentence"])
>>> compare.save(result, "out")
"""

from .methods import (
    LABELS,
    METHOD_DEFAULTS,
    METHODS,
    ROW_METHODS,
    STEEPEST_METHODS,
    STRUCTURED_METHODS,
    TORCH_METHODS,
    base_method,
    label,
    method_key,
    parse_methods,
    parse_set,
    resolve_settings,
    split_method,
)
from .results import SCHEMA, SCHEMA_DOC, Comparison, Run, coinciding, spread, summarize, tied
from .runner import (
    DEFAULT_SEEDS,
    SEED_LIMIT,
    TUNE_FACTORS,
    TUNED,
    Interrupted,
    Plan,
    check_budget,
    check_device,
    check_dtype,
    execute,
    plan,
    run,
    save,
)

__all__ = [
    "DEFAULT_SEEDS",
    "LABELS",
    "METHODS",
    "METHOD_DEFAULTS",
    "ROW_METHODS",
    "SCHEMA",
    "SCHEMA_DOC",
    "SEED_LIMIT",
    "STEEPEST_METHODS",
    "STRUCTURED_METHODS",
    "TORCH_METHODS",
    "TUNED",
    "TUNE_FACTORS",
    "Comparison",
    "Interrupted",
    "Plan",
    "Run",
    "base_method",
    "check_budget",
    "check_device",
    "check_dtype",
    "coinciding",
    "execute",
    "label",
    "method_key",
    "parse_methods",
    "parse_set",
    "plan",
    "resolve_settings",
    "run",
    "save",
    "spread",
    "split_method",
    "summarize",
    "tied",
]
