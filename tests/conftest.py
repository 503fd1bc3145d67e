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
