"""Batched, multi-threaded preprocessing: a thread pool decodes and resizes the next batches
while ONNX Runtime runs the current one (PIL releases the GIL while decoding and resizing)."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Preprocessing threads: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def select_subset(n: int, limit: int | None) -> np.ndarray:
    """Indices of the evaluated subset: all, or ``limit`` evenly spaced ones (deterministic,
    so a limited ImageFolder run still sees every class rather than the first few)."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError("limit must be positive")
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def iter_batches(
    indices: Sequence[int],
    batch_size: int,
    load: Callable[[int], np.ndarray],
    workers: int | None = None,
    prefetch: int = 2,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(batch_indices, stacked_arrays)`` in order, preparing ``prefetch`` batches ahead.

    ``load(i)`` runs in the pool; an exception it raises (e.g. a corrupt image) surfaces here,
    when its batch is reached, and the remaining work is cancelled.
    """
    idx = np.asarray(indices, dtype=np.int64)
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    workers = workers or default_workers()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maskaq-eval-pre")

    def load_chunk(chunk: np.ndarray) -> list[np.ndarray]:
        return [load(int(i)) for i in chunk]

    pending: deque[tuple[np.ndarray, list[Future]]] = deque()
    try:
        nxt = 0
        while nxt < len(batches) or pending:
            while nxt < len(batches) and len(pending) < prefetch + 1:
                b = batches[nxt]
                # one task per worker and batch: less scheduling overhead than one per image
                chunks = np.array_split(b, min(workers, len(b)))
                pending.append((b, [pool.submit(load_chunk, c) for c in chunks]))
                nxt += 1
            b, futs = pending.popleft()
            arrays = [a for f in futs for a in f.result()]
            yield b, np.stack(arrays)
    finally:
        for _, futs in pending:
            for f in futs:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def prefetch_map(
    indices: Sequence[int],
    fn: Callable[[int], object],
    workers: int | None = None,
    ahead: int | None = None,
) -> Iterator[tuple[int, object]]:
    """Yield ``(i, fn(i))`` in order while a thread pool computes the next ``ahead`` items."""
    workers = workers or default_workers()
    ahead = ahead or 2 * workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maskaq-eval-pre")
    pending: deque[tuple[int, Future]] = deque()
    it = iter(int(i) for i in indices)
    try:
        for i in it:
            pending.append((i, pool.submit(fn, i)))
            if len(pending) > ahead:
                j, f = pending.popleft()
                yield j, f.result()
        while pending:
            j, f = pending.popleft()
            yield j, f.result()
    finally:
        for _, f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
