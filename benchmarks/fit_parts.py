r"""The size of the parts in which the compiled core evaluates a large batch
(``steepest.fit.compiled.PART_ELEMENTS``): the 10,000-curve fit of ``fit_speed.py`` timed
with parts of several sizes, interleaved in one process (every size sees the same load),
with J given (``curve_fit(jac=)``) and by autograd. Each size's popt and pcov are checked to
be bitwise those of one whole-batch part (the parts change where the work is done, not the
arithmetic).

Usage (from the repository root)::

    python benchmarks/fit_parts.py --out benchmarks/results/fit_parts.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import steepest
from steepest.fit import compiled

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fit_speed import P0, batch_cli, decay, decay_jac, machine, write_result  # noqa: E402

WHOLE = 2**62  # one part: the whole running set


def fit(t, y, p0, given: bool, elements: int):
    compiled.PART_ELEMENTS = elements
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch names its failed fits in a warning
        t0 = time.perf_counter()
        popt, pcov = steepest.curve_fit(
            decay, t, y, p0, jac=decay_jac if given else None, max_nfev=400, engine="numba"
        )
    return time.perf_counter() - t0, popt, pcov


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, t, y, p0 = batch_cli(ap, argv)
    default = compiled.PART_ELEMENTS
    sizes = [WHOLE, 2**16, 2**17, 2**18, 2**19]
    result = {"machine": machine(args.threads, args.note), "B": args.batch, "N": y.shape[1]}
    result["default_part_elements"] = default
    for given in (True, False):
        kind = "given J" if given else "autograd J"
        _, ref_p, ref_c = fit(t, y, p0, given, WHOLE)  # also the warm-up
        times = {s: [] for s in sizes}
        same = dict.fromkeys(sizes, True)  # over every repeat
        for _ in range(args.repeats):
            for s in sizes:
                dt, popt, pcov = fit(t, y, p0, given, s)
                times[s].append(dt)
                same[s] &= torch.equal(popt, ref_p) and torch.equal(pcov, ref_c)
        rows = {}
        for s in sizes:
            ratios = [a / b for a, b in zip(times[s], times[WHOLE], strict=True)]
            name = "whole" if s == WHOLE else str(s)
            compiled.PART_ELEMENTS = s
            rows[name] = {
                "part_rows": min(args.batch, compiled.part_rows(y.shape[1], len(P0))),
                "median_s": statistics.median(times[s]),
                "min_s": min(times[s]),
                "max_s": max(times[s]),
                "per_pair_ratio_to_whole_median": statistics.median(ratios),
                "bitwise_same_popt_pcov": same[s],
            }
            print(
                f"{kind}: parts of {name} entries ({rows[name]['part_rows']} curves): "
                f"{rows[name]['median_s']:.3f} s, per-pair ratio to one part "
                f"{rows[name]['per_pair_ratio_to_whole_median']:.3f}, same: {same[s]}"
            )
        result[kind] = rows
    compiled.PART_ELEMENTS = default
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
