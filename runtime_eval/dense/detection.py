"""Mask R-CNN inference on the exported parts (``maskaq.dense.export.export_mask_rcnn``): the
mmdet 2.x COCO test pipeline and post-processing in numpy + onnxruntime.

``MaskRCNNPredictor(model_dir)`` is a ``predict_fn(image: PIL.Image, info) -> Detections`` for
``runtime_eval.coco.evaluate_detection``: boxes xyxy in original pixels, scores, contiguous labels
0..K-1, full-size binary masks.

Fixed shapes: the backbone graph has a fixed canvas ``[1, 3, Hc, Wc]``; each image is resized
keeping its ratio to (1333, 800), normalised, padded to a multiple of 32 (as mmdet) and then with
zeros to the canvas. mmdet's own batch-1 test pads only to 32; where the canvas is larger the
window attention sees extra zero tokens, so results can differ slightly from mmdet's unless the
canvas equals the image's pad-32 size. Pass several ``model_dir``s (one per canvas) and the
smallest canvas that fits is used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import EvalError
from . import ops

__all__ = ["MaskRCNNPredictor", "preprocess_detection", "load_dense_meta"]

PARTS = ("backbone_neck", "rpn_head", "bbox_head", "mask_head")


def load_dense_meta(path: str | Path) -> dict[str, Any]:
    """The ``maskaq.dense`` JSON of an exported dense graph (onnx metadata, no torch)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if "maskaq.dense" not in meta:
        raise EvalError(f"{path} has no maskaq.dense metadata (not a maskaq dense export)")
    return json.loads(meta["maskaq.dense"])


def _default_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def preprocess_detection(img: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """RGB HWC uint8 -> normalised CHW float32 (unpadded) and the image meta (ori_shape,
    img_shape, scale_factor [w, h, w, h])."""
    h, w = img.shape[:2]
    cfg = meta["test_cfg"]
    nw, nh = ops.rescale_size(w, h, cfg["img_scale"])
    x = ops.resize_image(img, nw, nh)
    x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    info = {"ori_shape": (h, w), "img_shape": (nh, nw),
            "scale_factor": np.array([nw / w, nh / h, nw / w, nh / h], np.float64)}
    return x.transpose(2, 0, 1).astype(np.float32), info


class _Graphs:
    def __init__(self, model_dir: Path, session_factory: Callable[[Path], Any]) -> None:
        missing = [p for p in PARTS if not (model_dir / f"{p}.onnx").is_file()]
        if missing:
            raise EvalError(f"{model_dir} lacks {', '.join(m + '.onnx' for m in missing)} (export_mask_rcnn writes all four)")
        self.meta = load_dense_meta(model_dir / "backbone_neck.onnx")
        self.sess = {p: session_factory(model_dir / f"{p}.onnx") for p in PARTS}
        self.canvas = tuple(self.meta["input_size"][1:])


class MaskRCNNPredictor:
    """See the module docstring. ``session_factory(path) -> object with .run(None, feeds)``
    (default: a CPU ``onnxruntime.InferenceSession``)."""

    def __init__(self, model_dirs: str | Path | Sequence[str | Path], *,
                 session_factory: Callable[[Path], Any] | None = None, with_masks: bool = True) -> None:
        dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
        fac = session_factory or _default_session
        self.graphs = sorted((_Graphs(Path(d), fac) for d in dirs), key=lambda g: g.canvas[0] * g.canvas[1])
        self.meta = self.graphs[0].meta
        self.cfg = self.meta["test_cfg"]
        self.num_classes = int(self.meta["num_classes"])
        self.with_masks = with_masks

    # -- stages ---------------------------------------------------------------------------------
    def _pick(self, h: int, w: int) -> _Graphs:
        for g in self.graphs:
            if h <= g.canvas[0] and w <= g.canvas[1]:
                return g
        raise EvalError(f"resized image {h}x{w} does not fit any exported canvas "
                        f"({[g.canvas for g in self.graphs]}); export one at least that large")

    def features(self, x: np.ndarray) -> tuple[_Graphs, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        c, h, w = x.shape
        g = self._pick(h, w)
        canvas = np.zeros((1, c) + g.canvas, np.float32)
        canvas[0, :, :h, :w] = x
        feats = g.sess["backbone_neck"].run(None, {"input": canvas})
        names = [f"p{i + 2}" for i in range(len(feats))]
        out = g.sess["rpn_head"].run(None, dict(zip(names, feats)))
        L = len(feats)
        return g, feats, out[:L], out[L:]

    def proposals(self, cls: list[np.ndarray], reg: list[np.ndarray], img_shape: tuple[int, int]) -> np.ndarray:
        """mmdet 2.x ``RPNHead`` test: per-level top ``nms_pre``, decode, NMS per level, top
        ``max_per_img``. Returns [N, 5] (x1, y1, x2, y2, score)."""
        cfg, rcfg = self.cfg, self.cfg["rpn"]
        boxes, scores, levels = [], [], []
        for lv, (c, r) in enumerate(zip(cls, reg)):
            stride = cfg["anchor_strides"][lv]
            base = ops.base_anchors(stride, cfg["anchor_scales"], cfg["anchor_ratios"])
            anchors = ops.grid_anchors(base, c.shape[2:], stride)
            s = 1.0 / (1.0 + np.exp(-c[0].transpose(1, 2, 0).reshape(-1).astype(np.float64)))
            d = r[0].transpose(1, 2, 0).reshape(-1, 4)
            if 0 < rcfg["nms_pre"] < s.shape[0]:
                top = np.argsort(-s, kind="stable")[: rcfg["nms_pre"]]
                s, d, anchors = s[top], d[top], anchors[top]
            boxes.append(ops.delta2bbox(anchors, d, cfg["rpn_target_stds"], max_shape=img_shape))
            scores.append(s)
            levels.append(np.full(s.shape[0], lv))
        b, s, lvl = np.concatenate(boxes), np.concatenate(scores), np.concatenate(levels)
        if rcfg["min_bbox_size"] >= 0:
            ok = ((b[:, 2] - b[:, 0]) > rcfg["min_bbox_size"]) & ((b[:, 3] - b[:, 1]) > rcfg["min_bbox_size"])
            b, s, lvl = b[ok], s[ok], lvl[ok]
        keep = ops.batched_nms(b, s, lvl, rcfg["iou_threshold"])[: rcfg["max_per_img"]]
        return np.concatenate([b[keep], s[keep, None]], axis=1)

    def roi_features(self, feats: list[np.ndarray], rois: np.ndarray, size: int) -> np.ndarray:
        strides = self.cfg["roi_strides"]
        lv = ops.map_roi_levels(rois, len(strides), self.cfg["finest_scale"])
        out = np.zeros((rois.shape[0], feats[0].shape[1], size, size), np.float32)
        for i, s in enumerate(strides):
            idx = np.nonzero(lv == i)[0]
            if idx.size:
                out[idx] = ops.roi_align(feats[i][0], rois[idx], size, 1.0 / s, 0, True)
        return out

    def detect(self, g: _Graphs, feats: list[np.ndarray], props: np.ndarray, info: dict[str, Any]):
        """Box head + per-class decode + rescale + multiclass NMS (mmdet 2.x)."""
        K, rc = self.num_classes, self.cfg["rcnn"]
        if props.shape[0] == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        rois = props[:, :4]
        x = self.roi_features(feats, rois, self.cfg["bbox_roi_size"])
        cls_score, bbox_pred = g.sess["bbox_head"].run(None, {"rois": x})
        z = cls_score.astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
        boxes = ops.delta2bbox(rois, bbox_pred, self.cfg["rcnn_target_stds"], max_shape=info["img_shape"])
        boxes = (boxes.reshape(-1, K, 4) / info["scale_factor"]).reshape(-1, 4)
        sc = scores[:, :K].reshape(-1)
        labels = np.tile(np.arange(K), rois.shape[0])
        ok = sc > rc["score_thr"]
        boxes, sc, labels = boxes[ok], sc[ok], labels[ok]
        keep = ops.batched_nms(boxes, sc, labels, rc["iou_threshold"])[: rc["max_per_img"]]
        return boxes[keep], sc[keep], labels[keep]

    def masks(self, g: _Graphs, feats: list[np.ndarray], boxes: np.ndarray, labels: np.ndarray,
              info: dict[str, Any]) -> np.ndarray:
        H, W = info["ori_shape"]
        if boxes.shape[0] == 0:
            return np.zeros((0, H, W), bool)
        x = self.roi_features(feats, boxes * info["scale_factor"], self.cfg["mask_roi_size"])
        logits = g.sess["mask_head"].run(None, {"rois": x})[0]
        m = logits[np.arange(boxes.shape[0]), labels].astype(np.float64)
        prob = 1.0 / (1.0 + np.exp(-m))
        return ops.paste_masks(prob, boxes, H, W, self.cfg["rcnn"]["mask_thr_binary"])

    # -- the predict_fn ---------------------------------------------------------------------------
    def predict_array(self, img: np.ndarray) -> dict[str, np.ndarray]:
        """RGB HWC uint8 -> {boxes, scores, labels, masks}."""
        x, info = preprocess_detection(img, self.meta)
        g, feats, cls, reg = self.features(x)
        props = self.proposals(cls, reg, info["img_shape"])
        boxes, scores, labels = self.detect(g, feats, props, info)
        out = {"boxes": boxes, "scores": scores, "labels": labels}
        if self.with_masks:
            out["masks"] = self.masks(g, feats, boxes, labels, info)
        return out

    def __call__(self, image, info: dict | None = None):
        from ..coco import Detections

        arr = np.asarray(image.convert("RGB"), np.uint8)
        d = self.predict_array(arr)
        return Detections(d["boxes"], d["scores"], d["labels"], d.get("masks"))
