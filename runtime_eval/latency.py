"""Model-only latency: ``session.run`` on random input of the model's shape, after warm-up."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import EvalError
from .session import SessionInfo, run_session

log = logging.getLogger(__name__)


def parse_batch_sizes(text: str | Sequence[int]) -> list[int]:
    """``"1,32"`` -> ``[1, 32]``; raises EvalError on anything but positive integers."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int] = []
    for it in items:
        s = str(it).strip()
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            raise EvalError(
                f"latency batch size {s!r} is not an integer (e.g. --latency-batch 1,32)"
            ) from None
        if v <= 0:
            raise EvalError(f"latency batch size must be positive, got {v}")
        if v not in out:
            out.append(v)
    if not out:
        raise EvalError("no latency batch sizes given (e.g. --latency-batch 1,32)")
    return out


def measure_latency(
    sess: SessionInfo,
    input_name: str,
    chw: tuple[int, int, int],
    batch_sizes: Sequence[int],
    *,
    fixed_batch: int | None = None,
    warmup: int = 5,
    iters: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """p50/p90/p99 latency (ms) and throughput (images/s) per batch size.

    Args:
        sess: the session to time (its mode and providers are those of the evaluation).
        input_name: graph input name.
        chw: input (C, H, W).
        batch_sizes: e.g. ``[1, 32]``.
        fixed_batch: the graph's static batch size, if any (other sizes are an error).
        warmup: untimed runs first.
        iters: timed runs per batch size.
        seed: for the random input.

    Returns:
        ``{"batch_sizes": {"1": {"p50_ms", "p90_ms", "p99_ms", "mean_ms",
        "throughput_img_s", "iters"}, ...}, "warmup": w, "input": "random normal"}``.
    """
    if iters <= 0 or warmup < 0:
        raise EvalError("latency needs iters > 0 and warmup >= 0")
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    for bs in batch_sizes:
        if fixed_batch is not None and bs != fixed_batch:
            raise EvalError(
                f"the model has a fixed batch size {fixed_batch}; --latency-batch {bs} cannot run"
            )
        x = rng.standard_normal((bs, *chw)).astype(np.float32)
        feeds = {input_name: x}
        for _ in range(warmup):
            run_session(sess, feeds)
        times = np.empty(iters)
        for i in range(iters):
            t0 = time.perf_counter()
            run_session(sess, feeds)
            times[i] = time.perf_counter() - t0
        ms = times * 1e3
        results[str(bs)] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "throughput_img_s": float(bs / times.mean()),
            "iters": iters,
        }
        log.info("latency batch %d: p50 %.2f ms", bs, results[str(bs)]["p50_ms"])
    return {"batch_sizes": results, "warmup": warmup, "input": "random normal"}
