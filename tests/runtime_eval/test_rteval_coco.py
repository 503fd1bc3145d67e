"""COCO: reader, box/mask AP self-checks through the predictor hook, category ids, RLE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rteval_helpers as H

from runtime_eval import EvalError, evaluate

pytest.importorskip("pycocotools")


def test_coco_ground_truth_scores_100_with_coco_category_ids(tmp_path):
    from runtime_eval.coco import (
        coco_dataset,
        evaluate_detection,
        ground_truth_predictor,
    )

    ds = coco_dataset(H.coco_fixture(tmp_path))
    assert ds.cat_ids == [1, 3, 7] and len(ds) == 2
    out = tmp_path / "results.json"
    r = evaluate_detection(ground_truth_predictor(ds), ds, workers=2, results_path=out)
    assert r["bbox"]["AP"] == pytest.approx(100.0) and r["segm"]["AP"] == pytest.approx(100.0)
    assert r["bbox"]["AP50"] == pytest.approx(100.0) and r["images"] == 2
    res = json.loads(out.read_text())
    assert sorted({d["category_id"] for d in res["bbox"]}) == [1, 3, 7]  # COCO ids, not 0..2
    assert all(isinstance(d["segmentation"]["counts"], str) for d in res["segm"])  # RLE, JSON-safe


def test_coco_permuted_labels_are_caught(tmp_path):
    from runtime_eval.coco import (
        Detections,
        coco_dataset,
        evaluate_detection,
        ground_truth_predictor,
    )

    ds = coco_dataset(H.coco_fixture(tmp_path))
    gt = ground_truth_predictor(ds)

    def permuted(img, info):
        d = gt(img, info)
        return Detections(d.boxes, d.scores, (d.labels + 1) % 3, d.masks)

    r = evaluate_detection(permuted, ds)
    assert r["bbox"]["AP"] == pytest.approx(0.0) and r["segm"]["AP"] == pytest.approx(0.0)

    def shifted(img, info):  # boxes only, moved by half their size: IoU < 0.5
        d = gt(img, info)
        b = d.boxes.copy()
        wh = b[:, 2:] - b[:, :2]
        b[:, :2] += wh * 0.6
        b[:, 2:] += wh * 0.6
        return {"boxes": b, "scores": d.scores, "labels": d.labels}

    r2 = evaluate_detection(shifted, ds)
    assert "segm" not in r2 and r2["bbox"]["AP50"] == pytest.approx(0.0)


def test_coco_limit_and_errors(tmp_path):
    from runtime_eval.coco import (
        coco_dataset,
        encode_mask,
        evaluate_detection,
        ground_truth_predictor,
    )

    ds = coco_dataset(H.coco_fixture(tmp_path))
    r = evaluate_detection(ground_truth_predictor(ds), ds, indices=[1])
    assert r["images"] == 1 and r["segm"]["AP"] == pytest.approx(100.0)

    def bad_label(img, info):
        return {"boxes": [[0, 0, 5, 5]], "scores": [1.0], "labels": [3]}

    with pytest.raises(EvalError, match="outside the 3 contiguous classes"):
        evaluate_detection(bad_label, ds)
    with pytest.raises(EvalError, match="no COCO layout"):
        coco_dataset(tmp_path / "val2017")
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(EvalError, match="cannot read COCO annotations"):
        coco_dataset(tmp_path)
    m = np.zeros((4, 5), bool)
    m[1:3, 2:4] = True
    from pycocotools import mask as mask_utils

    rle = encode_mask(m)
    assert mask_utils.area(dict(rle, counts=rle["counts"].encode())) == 4


def test_coco_cli_task_needs_a_detection_predictor(tmp_path):
    H.coco_fixture(tmp_path / "coco")
    model = H.classifier(
        tmp_path / "m.onnx", 3, 16, 16, H.nearest_centroid_weights(H.COLOURS[:2], 3, 2)
    )
    with pytest.raises(EvalError, match="no detection predictor"):
        evaluate(model, "coco", tmp_path / "coco", providers=["cpu"])


def test_coco_registered_predictor(tmp_path):
    from runtime_eval import coco

    H.coco_fixture(tmp_path / "coco")
    model = H.classifier(
        tmp_path / "m.onnx",
        3,
        16,
        16,
        H.nearest_centroid_weights(H.COLOURS[:2], 3, 2),
        meta={"maskaq.task": "test-detection"},
    )
    ds = coco.coco_dataset(tmp_path / "coco")
    coco.register_detection_predictor(
        "test-detection", lambda sess, info, pre: coco.ground_truth_predictor(ds)
    )
    try:
        rep = evaluate(model, "coco", tmp_path / "coco", providers=["cpu"], fp32=model)
    finally:
        coco.DETECTION_PREDICTORS.pop("test-detection")
    assert rep["metrics"]["bbox"]["AP"] == pytest.approx(100.0)
    assert rep["deltas"]["bbox.AP"] == pytest.approx(0.0)
