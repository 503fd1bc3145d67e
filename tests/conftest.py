"""Fixtures shared by the top-level tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import TINY  # noqa: E402


@pytest.fixture(params=sorted(TINY))
def any_tiny(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (use with ``pytestmark = pytest.mark.usefixtures
    ("one_thread")``): on 2 shared cores oversubscribed OpenMP threads make tiny models 10-50x
    slower, and one thread makes single-process and 2-rank runs use the same float reduction order."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
