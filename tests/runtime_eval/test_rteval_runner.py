"""evaluate(): static batch sizes, subsets, latency, report writing and summary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rteval_helpers as H

from runtime_eval import EvalError, evaluate
from runtime_eval.latency import parse_batch_sizes
from runtime_eval.loader import iter_batches, select_subset
from runtime_eval.report import numeric_deltas, summary, write_report


def test_static_batch_model_pads_the_last_batch(tmp_path):
    root, _ = H.fashion_fixture(tmp_path / "fm", n=10)
    m = H.grey_classifier(tmp_path / "b4.onnx", batch=4)
    rep = evaluate(m, "fashion-mnist", root, providers=["cpu"], batch_size=32)
    assert rep["runtime"]["batch_size"] == 4
    assert rep["metrics"] == {"top1": 100.0, "top5": 100.0, "images": 10}
    with pytest.raises(EvalError, match="fixed batch size 4"):
        evaluate(m, "fashion-mnist", root, providers=["cpu"], latency=True, latency_batches="1")


def test_subset_is_evenly_spaced_and_batches_keep_order():
    assert select_subset(10, None).tolist() == list(range(10))
    assert select_subset(10, 3).tolist() == [0, 4, 9]  # round(4.5) -> 4 (half to even)
    assert select_subset(3, 10).tolist() == [0, 1, 2]
    got = list(iter_batches(list(range(11)), 4, lambda i: np.array([i]), workers=3, prefetch=1))
    assert [b.tolist() for b, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert np.concatenate([x[:, 0] for _, x in got]).tolist() == list(range(11))


def test_loader_error_surfaces_and_stops():
    def load(i):
        if i == 5:
            raise EvalError("corrupt or unreadable image five.jpg")
        return np.zeros(1)

    with pytest.raises(EvalError, match="five.jpg"):
        for _ in iter_batches(range(100), 4, load, workers=2):
            pass


def test_latency_batch_parsing():
    assert parse_batch_sizes("1, 32,1") == [1, 32]
    for bad in ("0", "", "a,1"):
        with pytest.raises(EvalError):
            parse_batch_sizes(bad)


def test_latency_in_reference_mode_is_flagged_simulated(tmp_path):
    root, _ = H.fashion_fixture(tmp_path / "fm", n=4)
    q = H.grey_classifier(tmp_path / "q.onnx", qdq=True)
    rep = evaluate(
        q,
        "fashion-mnist",
        root,
        providers=["cpu"],
        latency=True,
        latency_batches=[2],
        latency_iters=2,
        latency_warmup=1,
    )
    lat = rep["latency"]
    assert lat["simulated"] is True and lat["mode"] == "reference"
    assert any("reference mode" in r for r in lat["simulated_reasons"])
    rep = evaluate(
        q,
        "fashion-mnist",
        root,
        providers=["cpu"],
        mode="deploy",
        latency=True,
        latency_batches=[2],
        latency_iters=2,
    )
    assert rep["latency"]["simulated"] is False  # 8-bit, fused: what deployment runs
    f = H.grey_classifier(tmp_path / "f.onnx")
    rep = evaluate(
        f,
        "fashion-mnist",
        root,
        providers=["cpu"],
        latency=True,
        latency_batches=[2],
        latency_iters=2,
    )
    assert rep["latency"]["simulated"] is False and rep["model"]["qdq"]["total"] == 0


def test_fp32_with_other_preprocessing_is_refused(tmp_path):
    root, _ = H.fashion_fixture(tmp_path / "fm", n=4)
    q = H.grey_classifier(tmp_path / "q.onnx")
    f = H.grey_classifier(
        tmp_path / "f.onnx",
        meta={"maskaq.preprocessing": {**H.preprocessing(1, 28, 28), "mean": [0.2]}},
    )
    with pytest.raises(EvalError, match="preprocessing"):
        evaluate(q, "fashion-mnist", root, fp32=f, providers=["cpu"])


def test_report_write_is_atomic_and_strict_json(tmp_path):
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub" / "r.json"
    write_report({"a": float("nan"), "b": np.float32(1.5), "c": [np.int64(2)]}, out)
    assert json.loads(out.read_text()) == {"a": None, "b": 1.5, "c": [2]}
    out.write_text("old")
    with pytest.raises(TypeError):
        write_report({"x": object()}, out)
    assert out.read_text() == "old"  # a failed write leaves the old file and no temp file
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_deltas_and_summary(tmp_path):
    q = {"top1": 70.0, "top5": 90.0, "images": 10, "bbox": {"AP": 40.0, "detections": 3}}
    f = {"top1": 72.5, "top5": 90.5, "images": 10, "bbox": {"AP": 41.0, "detections": 4}}
    assert numeric_deltas(q, f) == {"top1": -2.5, "top5": -0.5, "bbox.AP": -1.0}
    root, _ = H.fashion_fixture(tmp_path / "fm", n=4)
    m = H.grey_classifier(tmp_path / "m.onnx")
    rep = evaluate(m, "fashion-mnist", root, providers=["cpu"], fp32=m, output=tmp_path / "r.json")
    text = summary(rep, tmp_path / "r.json")
    assert len(text.splitlines()) <= 24
    assert "top1 100.00" in text and "delta     top1 +0.00 pp" in text
    assert os.path.exists(tmp_path / "r.json")
