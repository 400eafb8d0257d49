"""Shared fixtures of the core tests.

Nothing here changes global state (default dtype, seeds, hypothesis profiles): other test files
share this process. Helpers to import (``seeded``, ``DEVICES``) live in tests/reference.py.
"""

from __future__ import annotations

import pytest
import torch
from reference import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """'cpu', and 'cuda' when a CUDA device exists (skipped otherwise)."""
    return request.param


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (the CLI and problem tests: many tiny ops, where 2 threads
    only add synchronisation), restoring the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report kept on its test (``item.rep_setup``, ``rep_call``), so that a
    fixture's teardown can tell whether the test ran to its end (test_fit.py's engine check).
    A new-style hook wrapper (``wrapper=True``): pytest 8 or later."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
