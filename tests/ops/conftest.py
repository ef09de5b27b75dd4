"""Fixtures for op tests. The helpers themselves live in tests/ops/helpers.py (import them from there)."""

import sys
from pathlib import Path

import pytest

# importlib import mode puts nothing on sys.path: make `nlc` and `tests.ops.helpers` importable from anywhere
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.ops.helpers import poisoned_empty  # noqa: E402


@pytest.fixture
def poison_empty():
    """Within the test, fresh torch.empty buffers are NaN-filled (see helpers.poisoned_empty)."""
    with poisoned_empty():
        yield


@pytest.fixture
def float64():
    """Oracle comparisons run in float64: make it the default dtype for the test."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)
