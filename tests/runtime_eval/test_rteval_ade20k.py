"""ADE20K: reader, metric self-checks through the predictor hook, the ONNX segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import rteval_helpers as H

from runtime_eval import EvalError, evaluate
from runtime_eval.ade20k import (
    ade20k_dataset,
    argmax_resized,
    evaluate_segmentation,
    resize_bilinear,
)
from runtime_eval.metrics import reduce_zero_label

# ------------------------------------------------------------------------ ADE20K


def test_ade20k_ground_truth_scores_100_and_permutation_drops(tmp_path):
    ds = ade20k_dataset(H.ade_fixture(tmp_path))
    assert len(ds) == 2 and ds.report()["num_classes"] == 150
    labels = [ds.label(i) for i in range(len(ds))]
    order = iter(range(len(ds)))  # evaluate_segmentation visits images in order

    def gt(img):
        lab = labels[next(order)]
        assert img.size == (lab.shape[1], lab.shape[0])
        return reduce_zero_label(lab).clip(0, 149)

    r = evaluate_segmentation(gt, ds, workers=2)
    assert r["mIoU"] == pytest.approx(100.0) and r["mAcc"] == pytest.approx(100.0)
    assert r["aAcc"] == pytest.approx(100.0) and r["images"] == 2
    present = [k for k, v in enumerate(r["per_class_IoU"]) if v is not None]
    assert present == [0, 1, 149]  # classes 1, 2, 150 after reduce_zero_label

    order = iter(range(len(ds)))
    perm = np.roll(np.arange(150), 1)

    def permuted(img):
        return perm[reduce_zero_label(labels[next(order)]).clip(0, 149)]

    assert evaluate_segmentation(permuted, ds, workers=1)["mIoU"] == pytest.approx(0.0)


def test_ade20k_wrong_prediction_size(tmp_path):
    ds = ade20k_dataset(H.ade_fixture(tmp_path))
    with pytest.raises(EvalError, match="must be at the image's own size"):
        evaluate_segmentation(lambda img: np.zeros((3, 3), np.int64), ds)


def test_ade20k_errors(tmp_path):
    with pytest.raises(EvalError, match="no ADE20K tree"):
        ade20k_dataset(tmp_path)
    base = H.ade_fixture(tmp_path)
    next((base / "annotations" / "validation").iterdir()).unlink()
    with pytest.raises(EvalError, match="has no annotation"):
        ade20k_dataset(tmp_path)  # the parent of ADEChallengeData2016 is accepted too


def test_bilinear_resize_matches_half_pixel_convention():
    x = np.array([[[0.0, 1.0], [2.0, 3.0]]], np.float32)
    y = resize_bilinear(x, (4, 4))
    # torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False) gives:
    row0 = [0.0, 0.25, 0.75, 1.0]
    np.testing.assert_allclose(y[0, 0], row0, atol=1e-6)
    np.testing.assert_allclose(y[0, :, 0], [0.0, 0.5, 1.5, 2.0], atol=1e-6)
    np.testing.assert_allclose(resize_bilinear(x, (2, 2)), x)  # identity at the same size
    logits = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(
        argmax_resized(logits, (13, 11), rows=4), resize_bilinear(logits, (13, 11)).argmax(0)
    )


def test_ade20k_onnx_segmenter_end_to_end(tmp_path):
    H.ade_fixture(tmp_path / "ade")
    model = H.segmenter(tmp_path / "seg.onnx")
    rep = evaluate(model, "ade20k", tmp_path / "ade", providers=["cpu"], fp32=model, workers=2)
    m = rep["metrics"]
    assert set(m) >= {"mIoU", "mAcc", "aAcc", "images"} and m["images"] == 2
    assert 0.0 <= m["aAcc"] <= 100.0
    assert rep["deltas"]["mIoU"] == 0.0  # same model as its own fp32 reference
    clf = H.grey_classifier(tmp_path / "clf.onnx")
    with pytest.raises(EvalError, match="RGB"):
        evaluate(clf, "ade20k", tmp_path / "ade", providers=["cpu"])


def test_ade20k_registered_predictor(tmp_path):
    from runtime_eval import ade20k

    ds = ade20k_dataset(H.ade_fixture(tmp_path / "ade"))
    labels = {ds.image(i).tobytes(): ds.label(i) for i in range(len(ds))}
    model = H.classifier(
        tmp_path / "m.onnx",
        3,
        16,
        16,
        H.nearest_centroid_weights(H.COLOURS[:2], 3, 2),
        meta={"maskaq.task": "test-segmentation"},
    )

    def factory(sess, info, pre):
        return lambda img: reduce_zero_label(labels[img.tobytes()]).clip(0, 149)

    ade20k.register_segmentation_predictor("test-segmentation", factory)
    try:
        rep = evaluate(model, "ade20k", tmp_path / "ade", providers=["cpu"])
    finally:
        ade20k.SEGMENTATION_PREDICTORS.pop("test-segmentation")
    assert rep["metrics"]["mIoU"] == pytest.approx(100.0)
