"""ADE20K (SceneParsing, ADEChallengeData2016) semantic segmentation.

``ADEChallengeData2016/images/validation/*.jpg`` + ``annotations/validation/*.png``; label 0 is
"other" and ignored (reduce_zero_label), 150 classes; mIoU/mAcc/aAcc from one confusion matrix
accumulated over the whole set (:mod:`runtime_eval.metrics`).

Dense models plug in through :func:`evaluate_segmentation`, which takes any
``predict_fn(image: PIL.Image) -> label map [H, W]`` (at the image's own size).
:class:`OnnxSegmenter` is the predictor for a plain ONNX model with ``[B, 150, h, w]`` logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datasets import decode_image
from .errors import EvalError
from .loader import prefetch_map
from .metrics import SegmentationMetric
from .preprocess import INTERPOLATIONS, Preprocessing
from .session import SessionInfo, run_session

log = logging.getLogger(__name__)

NUM_CLASSES = 150
PredictFn = Callable[[Image.Image], np.ndarray]


@dataclass
class ADE20KDataset:
    """Pairs of (image, annotation) files."""

    root: Path
    split: str
    images: list[Path]
    annotations: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB."""
        im = decode_image(self.images[i], str(self.images[i]))
        return im if im.mode == "RGB" else im.convert("RGB")

    def label(self, i: int) -> np.ndarray:
        """Raw annotation ``i`` (uint8, 0 = ignore, 1..150 = classes)."""
        im = decode_image(self.annotations[i], str(self.annotations[i]))
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise EvalError(f"annotation {self.annotations[i]} is not a single-channel label map")
        return arr

    def report(self) -> dict[str, Any]:
        return {
            "name": "ade20k",
            "layout": "ADEChallengeData2016",
            "root": str(self.root),
            "split": self.split,
            "total_images": len(self),
            "num_classes": NUM_CLASSES,
            "reduce_zero_label": True,
        }


def ade20k_dataset(root: str | Path | None, split: str = "validation") -> ADE20KDataset:
    """Find ``images/<split>`` and ``annotations/<split>`` under ``root`` (the
    ADEChallengeData2016 folder or its parent) and pair them by file stem.

    Raises:
        EvalError: missing folders, no images, an image without annotation.
    """
    if root is None:
        raise EvalError("--data is required for ade20k (the ADEChallengeData2016 folder)")
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise EvalError(f"ade20k data folder not found: {base}")
    if split == "val":
        split = "validation"
    if split not in ("validation", "training"):
        raise EvalError(f"unknown ADE20K split {split!r} (valid: validation, training)")
    for cand in (base, base / "ADEChallengeData2016"):
        img_dir, ann_dir = cand / "images" / split, cand / "annotations" / split
        if img_dir.is_dir() and ann_dir.is_dir():
            break
    else:
        raise EvalError(
            f"no ADE20K tree in {base}: expected ADEChallengeData2016/images/{split}/*.jpg and "
            f"annotations/{split}/*.png"
        )
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise EvalError(f"{img_dir} holds no images")
    anns = []
    for p in images:
        a = ann_dir / (p.stem + ".png")
        if not a.is_file():
            raise EvalError(f"image {p.name} has no annotation {a}")
        anns.append(a)
    return ADE20KDataset(cand, split, images, anns)


def evaluate_segmentation(
    predict_fn: PredictFn,
    dataset: ADE20KDataset,
    *,
    indices: Sequence[int] | None = None,
    num_classes: int = NUM_CLASSES,
    reduce_zero_label: bool = True,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """mIoU/mAcc/aAcc (percent) of ``predict_fn`` over ``dataset``.

    Args:
        predict_fn: image (PIL RGB) -> ``[H, W]`` class indices 0..149 at the image's size.
        dataset: from :func:`ade20k_dataset`.
        indices: subset to evaluate (default: all).
        num_classes: 150 for ADE20K.
        reduce_zero_label: ADE20K's convention (0 ignored, k -> k-1).
        workers: threads decoding images/labels ahead of the predictor.
        progress: called with the number of images done after each image.

    Example:
        >>> ds = ade20k_dataset("~/data/ADEChallengeData2016")  # doctest: +SKIP
        >>> evaluate_segmentation(lambda im: np.zeros(im.size[::-1], int), ds)  # doctest: +SKIP
        {'mIoU': ..., 'mAcc': ..., 'aAcc': ..., 'images': 2000, ...}
    """
    metric = SegmentationMetric(num_classes, reduce_zero_label=reduce_zero_label)
    idx = list(range(len(dataset))) if indices is None else list(indices)
    for i, (img, lab) in prefetch_map(idx, lambda i: (dataset.image(i), dataset.label(i)), workers):
        pred = np.asarray(predict_fn(img))
        if pred.shape != lab.shape:
            raise EvalError(
                f"predictor returned shape {pred.shape} for {dataset.images[i].name}, the label "
                f"is {lab.shape} (predictions must be at the image's own size)"
            )
        metric.update(pred, lab)
        if progress is not None:
            progress(1)
    return metric.result()


def _bilinear_weights(n_out: int, n_in: int) -> np.ndarray:
    """Interpolation matrix [n_out, n_in], half-pixel centres (align_corners=False)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1.0 - l1)
    np.add.at(w, (rows, i1), l1)
    return w


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[C, h, w]`` to ``[C, H, W]`` (as torch ``interpolate``,
    ``align_corners=False``)."""
    wy = _bilinear_weights(size[0], x.shape[1])
    wx = _bilinear_weights(size[1], x.shape[2])
    return np.einsum("Hh,chw,Ww->cHW", wy, x.astype(np.float32), wx, optimize=True)


def argmax_resized(logits: np.ndarray, size: tuple[int, int], rows: int = 64) -> np.ndarray:
    """``argmax`` over classes of ``logits [C, h, w]`` resized bilinearly to ``size``,
    computed in row chunks to bound memory."""
    wy = _bilinear_weights(size[0], logits.shape[1])
    wx = _bilinear_weights(size[1], logits.shape[2])
    x = logits.astype(np.float32)
    out = np.empty(size, np.int64)
    for r0 in range(0, size[0], rows):
        part = np.einsum("Hh,chw->cHw", wy[r0 : r0 + rows], x)
        part = np.einsum("cHw,Ww->cHW", part, wx)
        out[r0 : r0 + rows] = part.argmax(axis=0)
    return out


class OnnxSegmenter:
    """Predictor for a plain ONNX segmenter with ``[B, num_classes, h, w]`` logits.

    The image is resized to the model's input size (the graph is exported at a fixed shape),
    normalised with the metadata mean/std, the logits are resized bilinearly to the image size,
    argmax. Sliding-window or multi-scale inference belongs in a dense model's own predictor.
    """

    def __init__(
        self, sess: SessionInfo, input_name: str, pre: Preprocessing, num_classes: int = NUM_CLASSES
    ) -> None:
        self.sess = sess
        self.input_name = input_name
        self.pre = pre
        self.num_classes = num_classes

    def __call__(self, img: Image.Image) -> np.ndarray:
        x = img.convert(self.pre.pil_mode).resize(
            (self.pre.width, self.pre.height), INTERPOLATIONS[self.pre.interpolation]
        )
        arr = self.pre.to_array(x)[None]
        out = run_session(self.sess, {self.input_name: arr})[0]
        if out.ndim != 4 or out.shape[0] != 1 or out.shape[1] != self.num_classes:
            raise EvalError(
                f"segmentation output has shape {list(out.shape)}; expected [B, "
                f"{self.num_classes}, h, w] logits"
            )
        return argmax_resized(out[0], (img.size[1], img.size[0]))


# Dense-model predictors register here, keyed by the model's ``maskaq.task`` metadata:
# factory(session_info, model_info, preprocessing) -> PredictFn. Models whose task is not
# registered get :class:`OnnxSegmenter` (a plain ``[B, 150, h, w]`` logits graph).
SEGMENTATION_PREDICTORS: dict[str, Callable[..., PredictFn]] = {}


def register_segmentation_predictor(task: str, factory: Callable[..., PredictFn]) -> None:
    """Make ``--task ade20k`` use ``factory`` for models whose ``maskaq.task`` is ``task``."""
    SEGMENTATION_PREDICTORS[task] = factory
