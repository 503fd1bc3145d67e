"""Progress of the long phases (synthesis rounds, calibration epochs) on stderr.

On a terminal: a tqdm bar. Off a terminal (stderr redirected to a file or a pipe, a batch job):
one plain line per phase at most every :data:`EVERY_S` seconds (environment variable
``MASKAQ_PROGRESS_EVERY``), and one when the phase finishes::

    maskaq-export: synthesis round 0: 120/400 steps (30%), 0:36 elapsed, ETA 1:24
    maskaq-export: synthesis round 0: 400/400 steps, done in 2:01

:func:`progress_bar` returns either; both have tqdm's ``update``, ``set_postfix``, ``total``,
``refresh`` and ``close``. A command line sets the line prefix with :func:`set_prefix`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["progress_bar", "LineProgress", "set_prefix", "EVERY_S"]

#: seconds between two lines of one phase off a terminal
EVERY_S = 10.0
_PREFIX = ""


def set_prefix(prefix: str) -> None:
    """Start every progress line with ``prefix`` (e.g. ``"maskaq-export: "``)."""
    global _PREFIX
    _PREFIX = prefix


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("MASKAQ_PROGRESS_EVERY", EVERY_S)))
    except ValueError:
        return EVERY_S


def _clock(s: float) -> str:
    s = int(round(max(s, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class LineProgress:
    """A tqdm look-alike that prints a line (phase, done/total, elapsed, ETA) at most every
    ``every`` seconds, and one when the phase is complete. An unfinished phase (interrupted or
    failed) prints no closing line."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", file: TextIO | None = None,
                 every: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.file = file
        self.every = _every() if every is None else every
        self.t0 = time.monotonic()
        self._last = self.t0
        self._postfix: dict[str, Any] = {}
        self._closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _emit(self, text: str) -> None:
        f = self.file if self.file is not None else sys.stderr
        print(f"{_PREFIX}{text}", file=f, flush=True)

    def _line(self, final: bool) -> str:
        el = time.monotonic() - self.t0
        tot = self.total
        units = self.unit + ("" if self.unit.endswith("s") else "s")
        post = "".join(f", {k} {v}" for k, v in self._postfix.items())
        if final:
            return f"{self.desc}: {self.n}/{tot} {units}, done in {_clock(el)}{post}"
        if tot:
            pct = f" ({100 * self.n / tot:.0f}%)"
            eta = _clock(el / self.n * (tot - self.n)) if self.n else "?"
            return f"{self.desc}: {self.n}/{tot} {units}{pct}, {_clock(el)} elapsed, ETA {eta}{post}"
        return f"{self.desc}: {self.n} {units}, {_clock(el)} elapsed{post}"

    def _maybe(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(self._line(False))

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self._postfix = {**dict(ordered_dict or {}), **kwargs}
        self._maybe()

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.total is not None and self.total > 0 and self.n >= self.total:
            self._emit(self._line(True))


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` off one, a silent tqdm when not
    ``enabled``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    return LineProgress(total, desc, unit)
