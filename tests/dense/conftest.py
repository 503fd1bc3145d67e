"""Shared exports for tests/dense (each export of a tiny model costs seconds: done once)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

import dense_helpers as D  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _quiet_export_trace():
    """pytest's log capture formats every torch.export trace record (minutes); keep them local."""
    lg = logging.getLogger("torch.__trace")
    old = lg.propagate
    lg.propagate = False
    yield
    lg.propagate = old


@pytest.fixture(scope="session")
def cascade_export(tmp_path_factory):
    """(model, export directory, part -> path) of a tiny class-specific Cascade Mask R-CNN."""
    m = D.randomise(D.tiny_cascade())
    out = tmp_path_factory.mktemp("cascade")
    return m, out, D.export_cascade(m, out)
