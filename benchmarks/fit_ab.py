r"""A change to the fitting code, timed against the code before it: the 10,000-curve fit of
``fit_speed.py`` (the compiled core, J given and by autograd) and its tail (the 13 fits that
run to max_nfev, alone) with this tree's ``steepest`` (B) and another checkout's package (A),
interleaved in one process, so that both see the same phase of a machine whose speed drifts.
The base package is copied under another name (``steepest_base``; the package imports itself
relatively). Reported per pair: B's time over A's, the median over the repeats; and whether
popt, pcov, nfev and the Jacobian are bitwise A's (where not, how far they are).

Usage (from the repository root; the base is any commit's ``src/steepest``)::

    git worktree add /tmp/base <commit>
    python benchmarks/fit_ab.py --base /tmp/base/src/steepest --threads 2 \
        --out benchmarks/results/fit_ab.json
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import steepest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fit_speed import batch_cli, decay, decay_jac, machine, write_result  # noqa: E402


def load_base(path: str):
    """The package at ``path`` (a ``src/steepest`` folder), imported as ``steepest_base``."""
    root = tempfile.mkdtemp(prefix="fit_ab_")
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(path, Path(root) / "steepest_base", ignore=skip)
    sys.path.insert(0, root)
    return importlib.import_module("steepest_base")


def fit(mod, t, y, p0, given: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch names its failed fits in a warning
        t0 = time.perf_counter()
        out = mod.curve_fit(
            decay, t, y, p0, jac=decay_jac if given else None, full_output=True,
            max_nfev=400, engine="numba",
        )  # fmt: skip
    return time.perf_counter() - t0, out


def same(a, b) -> bool:
    (pa, ca, ra), (pb, cb, rb) = a, b
    return (
        torch.equal(pa, pb)
        and torch.equal(ca, cb)
        and torch.equal(torch.as_tensor(ra.nfev), torch.as_tensor(rb.nfev))
        and torch.equal(ra.jac, rb.jac)
    )


def _commit(path: Path) -> str | None:
    """The commit checked out where ``path`` lies (None outside a git work tree); a work tree
    with changes gets "+changes"."""
    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def differences(a, b) -> dict:
    """Where two runs of the batch are not bitwise the same: the successes of each, and on the
    fits where both succeed the largest popt difference (relative, against max(|popt|, 1)) and
    pcov difference (relative), and the share of fits with the same nfev and status."""
    (pa, ca, ra), (pb, cb, rb) = a, b
    both = ra.success & rb.success
    scale = pa.abs().clamp_min(1.0)
    big = torch.maximum(ca.abs(), cb.abs())  # 0 only where both are 0 (equal there)
    rel = torch.where(big > 0, (ca - cb).abs() / big, 0.0).nan_to_num(nan=0.0, posinf=0.0)
    return {
        "success": [int(ra.success.sum()), int(rb.success.sum())],
        "max_rel_popt_diff_both_succeeded": float(((pa - pb).abs() / scale)[both].max()),
        "max_rel_pcov_diff_both_succeeded": float(rel[both].max()),
        "same_nfev_share": float((ra.nfev == rb.nfev).double().mean()),
        "same_status_share": float((ra.status == rb.status).double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the src/steepest folder of the code before")
    args, t, y, p0 = batch_cli(ap, argv)
    base = load_base(args.base)
    result = {
        "machine": machine(args.threads, args.note),
        "base": args.base,
        "base_commit": _commit(Path(args.base)),
        "this_commit": _commit(HERE),
        "B": args.batch,
        "repeats": args.repeats,
    }
    for given in (True, False):
        kind = "given J" if given else "autograd J"
        _, ref = fit(base, t, y, p0, given)  # also the warm-ups (numba loads each copy's kernels)
        _, out = fit(steepest, t, y, p0, given)
        tail = (ref[2].status == 0).nonzero().squeeze(-1)
        rows = {"bitwise_same": same(ref, out), "tail_fits": int(tail.numel())}
        if not rows["bitwise_same"]:
            rows["differences"] = differences(ref, out)
            print(f"{kind}: not bitwise the same: {rows['differences']}")
        for name, yy, pp in (("batch", y, p0), ("tail", y[tail], p0[tail])):
            ta, tb = [], []
            for _ in range(args.repeats):
                ta.append(fit(base, t, yy, pp, given)[0])
                tb.append(fit(steepest, t, yy, pp, given)[0])
            rows[name] = {
                "base_median_s": statistics.median(ta),
                "this_median_s": statistics.median(tb),
                "per_pair_ratio_median": statistics.median(b / a for a, b in zip(ta, tb)),
            }
            print(
                f"{kind}, {name}: base {rows[name]['base_median_s'] * 1e3:.1f} ms, this "
                f"{rows[name]['this_median_s'] * 1e3:.1f} ms, per pair "
                f"{rows[name]['per_pair_ratio_median']:.3f} (bitwise same: {rows['bitwise_same']})"
            )
        result[kind] = rows
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
