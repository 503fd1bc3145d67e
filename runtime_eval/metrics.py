"""Metrics: top-k accuracy, and mIoU/mAcc/aAcc from a confusion matrix accumulated over a set.

Segmentation follows mmseg's ``eval_metrics`` (``intersect_and_union``): labels equal to the
ignore index are dropped; with ``reduce_zero_label`` label 0 becomes ignore and the others
shift down by one; predictions outside ``0..num_classes-1`` count for no class; IoU and Acc per
class, then ``nanmean`` over classes (a class absent from labels and predictions is NaN).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TopKAccuracy:
    """Accumulates top-k hits over batches of logits."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.hits = {k: 0 for k in ks}
        self.count = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Add a batch; returns the top-1 predictions."""
        logits = np.asarray(logits)
        labels = np.asarray(labels).reshape(-1)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"logits {logits.shape} do not match labels {labels.shape}")
        kmax = min(max(self.ks), logits.shape[1])
        # stable ordering: larger logit first, ties by lower index (as torch.topk in practice)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :kmax]
        match = top == labels[:, None]
        for k in self.ks:
            self.hits[k] += int(match[:, : min(k, kmax)].any(axis=1).sum())
        self.count += labels.shape[0]
        return top[:, 0]

    def result(self) -> dict[str, float]:
        """``{"top1": %, "top5": %}`` (percent)."""
        n = max(self.count, 1)
        return {f"top{k}": 100.0 * self.hits[k] / n for k in self.ks}


def topk_accuracy(
    logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent for one array of logits.

    Example:
        >>> topk_accuracy(np.eye(3), np.array([0, 1, 2]), ks=(1,))
        {'top1': 100.0}
    """
    acc = TopKAccuracy(ks)
    acc.update(logits, labels)
    return acc.result()


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K convention: 0 -> ignore, k -> k - 1 (mmseg ``reduce_zero_label``)."""
    lab = np.asarray(label).astype(np.int64, copy=True)
    ignored = (lab == 0) | (lab == ignore_index)
    lab -= 1
    lab[ignored] = ignore_index
    return lab


def confusion_matrix(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Confusion counts ``C[label, pred]`` of shape ``[n, n + 1]``; column ``n`` collects
    predictions outside ``0..n-1``. Pixels whose label is ``ignore_index`` (or outside the
    class range) are dropped.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction size {pred.size} != label size {label.size}")
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    pred, label = pred[keep], label[keep]
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    cm = np.bincount(label * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return cm.reshape(num_classes, num_classes + 1)


def segmentation_metrics(cm: np.ndarray) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU/Acc from an ``[n, n(+1)]`` confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    intersect = np.diag(cm[:, :n])
    area_label = cm.sum(axis=1)
    area_pred = cm[:, :n].sum(axis=0)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
    total = area_label.sum()
    return {
        "mIoU": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mAcc": 100.0 * float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "aAcc": 100.0 * float(intersect.sum() / total) if total else float("nan"),
        "per_class_IoU": [None if np.isnan(v) else 100.0 * float(v) for v in iou],
        "per_class_Acc": [None if np.isnan(v) else 100.0 * float(v) for v in acc],
    }


class SegmentationMetric:
    """Accumulates one confusion matrix over a whole set (mIoU over the set, not per image)."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero = reduce_zero_label
        self.cm = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.images = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Add one image: ``pred`` class indices, ``label`` raw annotation (same H x W)."""
        if np.shape(pred) != np.shape(label):
            raise ValueError(f"prediction shape {np.shape(pred)} != label shape {np.shape(label)}")
        lab = reduce_zero_label(label, self.ignore_index) if self.reduce_zero else label
        self.cm += confusion_matrix(pred, lab, self.num_classes, self.ignore_index)
        self.images += 1

    def result(self) -> dict[str, Any]:
        out = segmentation_metrics(self.cm)
        out["images"] = self.images
        return out
