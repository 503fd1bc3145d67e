"""Metric self-checks: ground truth scores 100, permutations are caught, hand-computed matrices."""

from __future__ import annotations

import numpy as np
import pytest

from runtime_eval.metrics import (
    SegmentationMetric,
    TopKAccuracy,
    confusion_matrix,
    reduce_zero_label,
    segmentation_metrics,
    topk_accuracy,
)


def test_topk_ground_truth_is_100_and_permutation_drops():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    onehot = np.eye(10)[labels]
    assert topk_accuracy(onehot, labels) == {"top1": 100.0, "top5": 100.0}
    perm = (labels + 1) % 10  # every label moved to another class
    assert topk_accuracy(np.eye(10)[perm], labels)["top1"] == 0.0


def test_topk_hand_computed():
    logits = np.array(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # top1 = 1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4 at rank 5 -> top5 hit only
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0 last -> miss
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # top1 = 0
        ]
    )
    labels = np.array([1, 4, 0, 0])
    acc = TopKAccuracy((1, 5))
    acc.update(logits[:2], labels[:2])
    acc.update(logits[2:], labels[2:])  # accumulates over batches
    assert acc.result() == {"top1": 50.0, "top5": 75.0}
    assert acc.count == 4


def test_topk_fewer_classes_than_k():
    assert topk_accuracy(np.array([[0.0, 1.0, 0.5]]), np.array([0]))["top5"] == 100.0


def test_confusion_hand_computed():
    label = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(pred, label, 3)
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    m = segmentation_metrics(cm)
    # IoU = [1/3, 2/3, 0]; Acc = [1/2, 1, 0]; aAcc = 3/5
    assert m["mIoU"] == pytest.approx(100.0 / 3)
    assert m["mAcc"] == pytest.approx(50.0)
    assert m["aAcc"] == pytest.approx(60.0)
    assert m["per_class_IoU"] == pytest.approx([100 / 3, 200 / 3, 0.0])


def test_absent_class_is_nan_and_skipped_by_nanmean():
    # class 2 appears neither in labels nor predictions -> IoU NaN, not 0
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
    m = segmentation_metrics(cm)
    assert m["per_class_IoU"][2] is None
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0.5) / 2)


def test_out_of_range_predictions_count_for_no_class():
    cm = confusion_matrix(np.array([7, 0]), np.array([0, 0]), 2)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [0, 0, 0]])
    m = segmentation_metrics(cm)
    assert m["aAcc"] == pytest.approx(50.0)
    assert m["per_class_IoU"][0] == pytest.approx(50.0)  # union = pred 1 + label 2 - 1


def test_reduce_zero_label():
    lab = np.array([0, 1, 2, 150, 255], np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(lab), [255, 0, 1, 149, 255])


def test_segmentation_accumulates_over_the_set_not_per_image():
    # image A: class 0 perfect on 1 pixel; image B: class 0 wrong on 3 pixels.
    m = SegmentationMetric(2)
    m.update(np.array([[0]]), np.array([[0]]))
    m.update(np.array([[1, 1, 1]]), np.array([[0, 0, 0]]))
    r = m.result()
    # set-level: class0 I=1, label area 4, pred area 1 -> IoU 1/4; class1 I=0, U=3 -> 0
    assert r["per_class_IoU"] == pytest.approx([25.0, 0.0])
    assert r["aAcc"] == pytest.approx(25.0)
    assert r["images"] == 2


def test_segmentation_ground_truth_is_100_and_permutation_drops():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 151, (12, 9)).astype(np.uint8) for _ in range(3)]
    m = SegmentationMetric(150, reduce_zero_label=True)
    for lab in labels:
        m.update(reduce_zero_label(lab).clip(0, 149), lab)  # prediction = reduced ground truth
    r = m.result()
    assert r["mIoU"] == pytest.approx(100.0) and r["aAcc"] == pytest.approx(100.0)
    perm = rng.permutation(150)
    m2 = SegmentationMetric(150, reduce_zero_label=True)
    for lab in labels:
        m2.update(perm[reduce_zero_label(lab).clip(0, 149)], lab)
    assert m2.result()["mIoU"] < 10.0
