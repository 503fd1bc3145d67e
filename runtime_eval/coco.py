"""COCO detection / instance segmentation: val2017 + ``annotations/instances_val2017.json``,
box and mask AP through pycocotools' COCOeval.

Dense models plug in through :func:`evaluate_detection`, which takes any
``predict_fn(image: PIL.Image, info: dict) -> Detections`` (boxes xyxy in original-image pixels,
scores, contiguous labels 0..79, optional full-size binary masks). Results are written with
COCO's own category ids (contiguous index ``k`` -> ``sorted(category ids)[k]``).

pycocotools is imported lazily, only here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datasets import decode_image
from .errors import EvalError
from .loader import prefetch_map

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EvalError("the coco task needs pycocotools (pip install pycocotools)") from None
    return COCO, COCOeval, mask_utils


@dataclass
class Detections:
    """One image's predictions. ``boxes`` [N, 4] xyxy (original pixels), ``scores`` [N],
    ``labels`` [N] contiguous class indices, ``masks`` optional [N, H, W] binary."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None

    @classmethod
    def coerce(cls, d: Detections | Mapping[str, Any]) -> Detections:
        if isinstance(d, Detections):
            return d
        return cls(
            np.asarray(d["boxes"], np.float64).reshape(-1, 4),
            np.asarray(d["scores"], np.float64).reshape(-1),
            np.asarray(d["labels"], np.int64).reshape(-1),
            None if d.get("masks") is None else np.asarray(d["masks"]),
        )


PredictFn = Callable[[Image.Image, dict], "Detections | Mapping[str, Any]"]


@dataclass
class CocoDataset:
    """COCO images + annotations (a pycocotools ``COCO`` object)."""

    root: Path
    image_dir: Path
    ann_file: Path
    coco: Any
    img_ids: list[int]
    cat_ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.img_ids)

    def info(self, i: int) -> dict:
        return self.coco.imgs[self.img_ids[i]]

    def image(self, i: int) -> Image.Image:
        p = self.image_dir / self.info(i)["file_name"]
        im = decode_image(p, str(p))
        return im if im.mode == "RGB" else im.convert("RGB")

    def report(self) -> dict[str, Any]:
        return {
            "name": "coco",
            "layout": "coco",
            "root": str(self.root),
            "annotations": str(self.ann_file),
            "total_images": len(self),
            "num_classes": len(self.cat_ids),
        }


def coco_dataset(root: str | Path | None, split: str = "val2017") -> CocoDataset:
    """COCO at ``root`` (holding ``val2017/`` and ``annotations/instances_val2017.json``).

    Raises:
        EvalError: missing folder/json, unreadable json, no images.
    """
    if root is None:
        raise EvalError("--data is required for coco (the folder with val2017/ and annotations/)")
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise EvalError(f"coco data folder not found: {base}")
    if split in ("val", "validation"):
        split = "val2017"
    img_dir = base / split
    ann = base / "annotations" / f"instances_{split}.json"
    if not img_dir.is_dir() or not ann.is_file():
        raise EvalError(
            f"no COCO layout in {base}: expected {split}/*.jpg and {ann.relative_to(base)}"
        )
    COCO, _, _ = _pycocotools()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            coco = COCO(str(ann))
    except Exception as e:
        raise EvalError(f"cannot read COCO annotations {ann}: {type(e).__name__}: {e}") from None
    img_ids = sorted(coco.getImgIds())
    if not img_ids:
        raise EvalError(f"{ann} lists no images")
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise EvalError(f"{ann} lists no categories")
    return CocoDataset(base, img_dir, ann, coco, img_ids, cat_ids)


def encode_mask(mask: np.ndarray) -> dict:
    """Binary [H, W] mask -> COCO RLE with ``counts`` as str (JSON-serialisable)."""
    _, _, mask_utils = _pycocotools()
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def detections_to_results(
    img_id: int, det: Detections, cat_ids: Sequence[int], image_size: tuple[int, int] | None = None
) -> tuple[list[dict], list[dict]]:
    """COCO result dicts (``bbox`` xywh and, with masks, ``segmentation`` RLE) for one image.

    Args:
        img_id: COCO image id.
        det: predictions with contiguous labels.
        cat_ids: sorted COCO category ids (contiguous index -> id).
        image_size: (H, W), to check mask sizes.
    """
    n = det.boxes.shape[0]
    if det.scores.shape[0] != n or det.labels.shape[0] != n:
        raise EvalError(
            f"image {img_id}: {n} boxes but {det.scores.shape[0]} scores, {det.labels.shape[0]} labels"
        )
    if n and (det.labels.min() < 0 or det.labels.max() >= len(cat_ids)):
        raise EvalError(
            f"image {img_id}: label {int(det.labels.max())} outside the {len(cat_ids)} contiguous classes"
        )
    boxes, segms = [], []
    for k in range(n):
        x0, y0, x1, y1 = (float(v) for v in det.boxes[k])
        cat = int(cat_ids[int(det.labels[k])])
        score = float(det.scores[k])
        boxes.append(
            {
                "image_id": int(img_id),
                "category_id": cat,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": score,
            }
        )
        if det.masks is not None:
            m = det.masks[k]
            if image_size is not None and tuple(m.shape) != tuple(image_size):
                raise EvalError(f"image {img_id}: mask {m.shape} is not full-size {image_size}")
            segms.append(
                {
                    "image_id": int(img_id),
                    "category_id": cat,
                    "segmentation": encode_mask(m > 0.5 if m.dtype.kind == "f" else m),
                    "score": score,
                }
            )
    return boxes, segms


def _coco_eval(
    dataset: CocoDataset, results: list[dict], iou_type: str, img_ids: list[int]
) -> dict[str, Any]:
    _, COCOeval, _ = _pycocotools()
    if not results:
        log.warning("no %s detections at all: AP 0", iou_type)
        return {k: 0.0 for k in STAT_NAMES} | {"detections": 0}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = dataset.coco.loadRes(copy.deepcopy(results))  # loadRes edits the dicts in place
        ev = COCOeval(dataset.coco, dt, iou_type)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("COCOeval %s:\n%s", iou_type, buf.getvalue())
    out: dict[str, Any] = {
        k: (None if v < 0 else 100.0 * float(v)) for k, v in zip(STAT_NAMES, ev.stats[:6])
    }
    out["detections"] = len(results)
    return out


def evaluate_detection(
    predict_fn: PredictFn,
    dataset: CocoDataset,
    *,
    indices: Sequence[int] | None = None,
    iou_types: Sequence[str] | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    results_path: str | Path | None = None,
) -> dict[str, Any]:
    """Box (and mask) AP of ``predict_fn`` over ``dataset`` with pycocotools' COCOeval.

    Args:
        predict_fn: ``(image, image_info) -> Detections`` (or a dict with boxes, scores,
            labels, masks), boxes xyxy in original pixels, labels contiguous 0..K-1.
        dataset: from :func:`coco_dataset`.
        indices: subset of images (COCOeval is restricted to them).
        iou_types: ``("bbox", "segm")``; default bbox, plus segm when masks are returned.
        workers: threads decoding images ahead of the predictor.
        progress: called with 1 after each image.
        results_path: optionally dump the result json (bbox + segm lists) there.

    Returns:
        ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}, "images": n}``
        in percent (None where COCOeval has no ground truth, e.g. an empty area range).
    """
    idx = list(range(len(dataset))) if indices is None else list(indices)
    bbox_res: list[dict] = []
    segm_res: list[dict] = []
    saw_masks = False
    for i, img in prefetch_map(idx, dataset.image, workers):
        info = dataset.info(i)
        det = Detections.coerce(predict_fn(img, info))
        saw_masks |= det.masks is not None
        b, s = detections_to_results(info["id"], det, dataset.cat_ids, (img.size[1], img.size[0]))
        bbox_res += b
        segm_res += s
        if progress is not None:
            progress(1)
    types = list(iou_types) if iou_types else (["bbox", "segm"] if saw_masks else ["bbox"])
    img_ids = [dataset.img_ids[i] for i in idx]
    out: dict[str, Any] = {"images": len(idx)}
    for t in types:
        if t not in ("bbox", "segm"):
            raise EvalError(f"unknown COCO iou type {t!r} (valid: bbox, segm)")
        out[t] = _coco_eval(dataset, bbox_res if t == "bbox" else segm_res, t, img_ids)
    if results_path is not None:
        import json

        Path(results_path).write_text(json.dumps({"bbox": bbox_res, "segm": segm_res}))
    return out


def ground_truth_predictor(dataset: CocoDataset, with_masks: bool = True) -> PredictFn:
    """A predictor returning the (non-crowd) ground truth: the metric self-check (AP = 100)."""
    index = {c: k for k, c in enumerate(dataset.cat_ids)}

    def predict(img: Image.Image, info: dict) -> Detections:
        anns = [a for a in dataset.coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd", 0)]
        boxes = np.array(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ],
            np.float64,
        ).reshape(-1, 4)
        labels = np.array([index[a["category_id"]] for a in anns], np.int64)
        masks = None
        if with_masks:
            with warnings.catch_warnings():  # pycocotools' decode vs numpy 2 copy semantics
                warnings.simplefilter("ignore", DeprecationWarning)
                ms = [dataset.coco.annToMask(a) for a in anns]
            masks = np.stack(ms) if ms else np.zeros((0, img.size[1], img.size[0]), np.uint8)
        return Detections(boxes, np.ones(len(anns)), labels, masks)

    return predict


# Dense-model predictors register here, keyed by the model's ``maskaq.task`` metadata:
# factory(session_info, model_info, preprocessing) -> PredictFn.
DETECTION_PREDICTORS: dict[str, Callable[..., PredictFn]] = {}


def register_detection_predictor(task: str, factory: Callable[..., PredictFn]) -> None:
    """Make ``--task coco`` usable for models whose ``maskaq.task`` is ``task``."""
    DETECTION_PREDICTORS[task] = factory
