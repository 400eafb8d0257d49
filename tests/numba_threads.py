"""Helpers of the compiled core's tests (test_fit_kernels.py, test_fit_compiled.py,
test_fit_compiled_parts.py): numba's thread count for a block, and a call counter."""

from __future__ import annotations

import contextlib

import numba
import pytest

from steepest.fit import compiled

kernels = compiled._kernels()
factor = compiled._factor()


@contextlib.contextmanager
def numba_threads(n: int):
    """numba's thread count n for the block (restored after). Where numba has fewer than n
    threads (NUMBA_NUM_THREADS), the compiled core is told n all the same: its parallel kernels
    then run their n chunks on the threads there are (the split is what is tested)."""
    old = numba.get_num_threads()
    have = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(have)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if have < n:
                mp.setattr(kernels.numba, "get_num_threads", lambda: n)
            yield
    finally:
        numba.set_num_threads(old)


def record(mp: pytest.MonkeyPatch, owner, name: str) -> list:
    """Replace owner.name by a wrapper that counts its calls (in the returned list)."""
    calls: list = []
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    mp.setattr(owner, name, wrapper)
    return calls
