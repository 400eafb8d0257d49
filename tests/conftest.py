"""Shared fixtures of the core tests.

Nothing here changes global state (default dtype, seeds, hypothesis profiles): other test files
share this process. Helpers to import (``seeded``, ``DEVICES``) live in tests/reference.py.
"""

from __future__ import annotations

import pytest
from reference import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """'cpu', and 'cuda' when a CUDA device exists (skipped otherwise)."""
    return request.param
