"""Mask R-CNN inference on the exported parts (``export.dense_export.export_mask_rcnn``): the
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

``CascadeMaskRCNNPredictor`` does the same for ``export_cascade_mask_rcnn`` directories (mmdet 2.x
``CascadeRoIHead.simple_test``: per-stage refinement, stage-averaged class logits, stage-averaged
sigmoid masks).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import EvalError
from . import ops

__all__ = ["MaskRCNNPredictor", "CascadeMaskRCNNPredictor", "preprocess_detection", "load_dense_meta",
           "cascade_parts", "run_graph"]

PARTS = ("backbone_neck", "rpn_head", "bbox_head", "mask_head")


def cascade_parts(num_stages: int) -> tuple[str, ...]:
    """Graph names of an ``export_cascade_mask_rcnn`` directory."""
    return (("backbone_neck", "rpn_head") + tuple(f"bbox_head_{i}" for i in range(num_stages))
            + tuple(f"mask_head_{i}" for i in range(num_stages)))


def run_graph(sess: Any, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """``sess.run(None, feeds)`` with ONNX Runtime failures as one-line :class:`EvalError`."""
    try:
        return sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        msg = " ".join(str(e).split())
        raise EvalError(f"ONNX Runtime failed running {what}: {msg[:400]}") from None


def load_dense_meta(path: str | Path) -> dict[str, Any]:
    """The ``maskaq.dense`` JSON of an exported dense graph (onnx metadata, no torch)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, OSError, ...
        raise EvalError(f"cannot read ONNX model {path} ({type(e).__name__}); expected a maskaq dense export") from None
    meta = {p.key: p.value for p in m.metadata_props}
    return _parse_dense(meta, path)


def _parse_dense(meta: dict[str, str], path: Any) -> dict[str, Any]:
    if "maskaq.dense" not in meta:
        raise EvalError(f"{path} has no maskaq.dense metadata (not a maskaq dense export)")
    try:
        dense = json.loads(meta["maskaq.dense"])
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: metadata 'maskaq.dense' is not valid JSON ({e})") from None
    if not isinstance(dense, dict) or "test_cfg" not in dense or "input_size" not in dense:
        raise EvalError(f"{path}: metadata 'maskaq.dense' lacks test_cfg/input_size (not a maskaq dense export)")
    dense.setdefault("task", meta.get("maskaq.task"))
    return dense


def _default_session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"ONNX Runtime cannot load {path}: {' '.join(str(e).split())[:400]}") from None


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


def _session_meta(sess: Any) -> dict[str, str] | None:
    """A session's custom metadata (ORT sessions have it; other test doubles may not)."""
    get = getattr(sess, "get_modelmeta", None)
    if get is None:
        return None
    try:
        return dict(get().custom_metadata_map)
    except Exception:  # noqa: BLE001
        return None


def _check_head(cls_score: np.ndarray, bbox_pred: np.ndarray, n: int, K: int, part: str = "bbox head") -> None:
    if cls_score.shape != (n, K + 1):
        raise EvalError(f"{part} gave class scores {list(cls_score.shape)}; expected [{n}, {K + 1}] "
                        "(K classes + background last)")
    if bbox_pred.ndim != 2 or bbox_pred.shape[0] != n or bbox_pred.shape[1] not in (4, 4 * K):
        raise EvalError(f"{part} gave box deltas {list(bbox_pred.shape)}; expected [{n}, 4] or [{n}, {4 * K}]")


class _Graphs:
    """The parts of one exported directory (one canvas), checked to come from one export."""

    def __init__(self, model_dir: Path, session_factory: Callable[[Path], Any], *, model: str,
                 exporter: str, parts: Callable[[dict[str, Any]], Sequence[str]]) -> None:
        if not model_dir.is_dir():
            raise EvalError(f"dense model directory not found: {model_dir}")
        if not (model_dir / "backbone_neck.onnx").is_file():
            raise EvalError(f"{model_dir} lacks backbone_neck.onnx ({exporter} writes it)")
        self.meta = load_dense_meta(model_dir / "backbone_neck.onnx")
        kind = self.meta.get("model")
        if kind != model:
            raise EvalError(f"{model_dir / 'backbone_neck.onnx'} is a {kind!r} export (maskaq.task "
                            f"{self.meta.get('task')!r}); this predictor needs {model!r} ({exporter})")
        self.parts = tuple(parts(self.meta))
        missing = [p for p in self.parts if not (model_dir / f"{p}.onnx").is_file()]
        if missing:
            raise EvalError(f"{model_dir} lacks {', '.join(m + '.onnx' for m in missing)} ({exporter} writes "
                            f"{', '.join(p + '.onnx' for p in self.parts)})")
        self.sess = {p: session_factory(model_dir / f"{p}.onnx") for p in self.parts}
        base = _session_meta(self.sess["backbone_neck"]) or {}
        for p, sess in self.sess.items():
            md = _session_meta(sess)
            if md is None or p == "backbone_neck":
                continue
            other = _parse_dense(md, model_dir / f"{p}.onnx")
            same_quant = "maskaq.quant" not in base or md.get("maskaq.quant") == base["maskaq.quant"]
            if other.get("part") != p or other.get("config") != self.meta.get("config") \
                    or other.get("task") != self.meta.get("task") or not same_quant:
                raise EvalError(f"{model_dir / (p + '.onnx')} does not belong with its backbone_neck.onnx "
                                f"(part {other.get('part')!r}, task {other.get('task')!r}, or a different model "
                                "config or quantization): re-export the directory in one go")
        try:
            self.canvas = tuple(int(v) for v in self.meta["input_size"][1:])
        except (TypeError, ValueError) as e:
            raise EvalError(f"{model_dir}: bad input_size in maskaq.dense ({e})") from None


class MaskRCNNPredictor:
    """See the module docstring. ``session_factory(path) -> object with .run(None, feeds)``
    (default: a CPU ``onnxruntime.InferenceSession``)."""

    MODEL = "mask_rcnn_swin"
    EXPORTER = "export_mask_rcnn"

    @staticmethod
    def _parts(meta: dict[str, Any]) -> Sequence[str]:
        return PARTS

    def __init__(self, model_dirs: str | Path | Sequence[str | Path], *,
                 session_factory: Callable[[Path], Any] | None = None, with_masks: bool = True) -> None:
        dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
        if not dirs:
            raise EvalError("no exported model directory given")
        fac = session_factory or _default_session
        self.graphs = sorted((_Graphs(Path(d), fac, model=self.MODEL, exporter=self.EXPORTER, parts=self._parts)
                              for d in dirs), key=lambda g: g.canvas[0] * g.canvas[1])
        self.meta = self.graphs[0].meta
        for g in self.graphs[1:]:
            if g.meta.get("config") != self.meta.get("config") or g.meta.get("test_cfg") != self.meta.get("test_cfg"):
                raise EvalError("the exported canvases come from different models or test settings")
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
        feats = run_graph(g.sess["backbone_neck"], {"input": canvas}, "backbone_neck.onnx")
        names = [f"p{i + 2}" for i in range(len(feats))]
        out = run_graph(g.sess["rpn_head"], dict(zip(names, feats)), "rpn_head.onnx")
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
        if props.shape[0] == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        rois = props[:, :4]
        x = self.roi_features(feats, rois, self.cfg["bbox_roi_size"])
        cls_score, bbox_pred = run_graph(g.sess["bbox_head"], {"rois": x}, "bbox_head.onnx")
        return self._final_boxes(rois, cls_score, bbox_pred, self.cfg["rcnn_target_stds"], info)

    def _final_boxes(self, rois: np.ndarray, cls_score: np.ndarray, bbox_pred: np.ndarray,
                     stds: Sequence[float], info: dict[str, Any]):
        """mmdet 2.x ``BBoxHead.get_bboxes`` (softmax, decode, clip, rescale) + ``multiclass_nms``;
        class-agnostic deltas ([N, 4]) are shared by every class, as mmdet expands them."""
        K, rc = self.num_classes, self.cfg["rcnn"]
        _check_head(cls_score, bbox_pred, rois.shape[0], K)
        z = cls_score.astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
        boxes = ops.delta2bbox(rois, bbox_pred, stds, max_shape=info["img_shape"])
        if boxes.shape[1] == 4:
            boxes = np.repeat(boxes[:, None, :], K, axis=1)
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
        prob = self.mask_probs(g, x, labels)
        return ops.paste_masks(prob, boxes, H, W, self.cfg["rcnn"]["mask_thr_binary"])

    def _mask_head(self, g: _Graphs, part: str, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """One mask graph on RoI features -> sigmoid of each detection's own class channel."""
        logits = run_graph(g.sess[part], {"rois": x}, f"{part}.onnx")[0]
        if logits.ndim != 4 or logits.shape[0] != x.shape[0] or logits.shape[1] != self.num_classes:
            raise EvalError(f"{part}.onnx gave mask logits {list(logits.shape)}; expected "
                            f"[{x.shape[0]}, {self.num_classes}, m, m]")
        m = logits[np.arange(x.shape[0]), labels].astype(np.float64)
        return 1.0 / (1.0 + np.exp(-m))

    def mask_probs(self, g: _Graphs, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Mask probabilities [N, m, m] of the detections' classes (before pasting)."""
        return self._mask_head(g, "mask_head", x, labels)

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


class CascadeMaskRCNNPredictor(MaskRCNNPredictor):
    """Cascade Mask R-CNN on ``export_cascade_mask_rcnn`` parts: mmdet 2.x
    ``CascadeRoIHead.simple_test`` in numpy.

    * RPN, pre-processing, RoIAlign, rescaling, NMS and pasting as :class:`MaskRCNNPredictor`;
    * stage i runs ``bbox_head_{i}`` on the current RoIs; for i < last, the RoIs are refined with
      stage i's deltas of the argmax class excluding background (``regress_by_class``; the
      deltas are used directly when the head is class-agnostic), decoded with stage i's stds and
      clipped to the resized image;
    * the class logits of all stages are averaged (mmdet averages the raw ``cls_score`` and
      applies the softmax once, in the last stage's ``get_bboxes``); boxes are the last stage's
      deltas decoded on the RoIs that stage saw; then score threshold, per-class NMS, top 100;
    * masks: every stage's mask head on the final detections, sigmoid of the detection's class,
      averaged over the stages (``merge_aug_masks``), pasted and thresholded at 0.5.
    """

    MODEL = "cascade_mask_rcnn_swin"
    EXPORTER = "export_cascade_mask_rcnn"

    @staticmethod
    def _parts(meta: dict[str, Any]) -> Sequence[str]:
        n = meta.get("num_stages", meta.get("test_cfg", {}).get("num_stages"))
        if not isinstance(n, int) or n < 1:
            raise EvalError(f"cascade export metadata has no valid num_stages ({n!r})")
        return cascade_parts(n)

    def __init__(self, model_dirs, **kw) -> None:
        super().__init__(model_dirs, **kw)
        self.num_stages = int(self.meta["num_stages"])
        stds = self.cfg.get("stage_target_stds")
        if not isinstance(stds, list) or len(stds) != self.num_stages:
            raise EvalError(f"cascade export metadata: stage_target_stds {stds!r} does not list "
                            f"{self.num_stages} stages")
        self.stage_stds = [[float(v) for v in s] for s in stds]

    def detect(self, g: _Graphs, feats: list[np.ndarray], props: np.ndarray, info: dict[str, Any]):
        if props.shape[0] == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        K = self.num_classes
        rois = props[:, :4].astype(np.float64)
        ms_scores = []
        for i in range(self.num_stages):
            x = self.roi_features(feats, rois, self.cfg["bbox_roi_size"])
            part = f"bbox_head_{i}"
            cls_score, bbox_pred = run_graph(g.sess[part], {"rois": x}, f"{part}.onnx")
            _check_head(cls_score, bbox_pred, rois.shape[0], K, f"{part}.onnx")
            ms_scores.append(cls_score.astype(np.float64))
            if i < self.num_stages - 1:
                label = cls_score[:, :-1].argmax(axis=1)
                d = bbox_pred
                if d.shape[1] != 4:
                    d = d.reshape(d.shape[0], K, 4)[np.arange(d.shape[0]), label]
                rois = ops.delta2bbox(rois, d, self.stage_stds[i], max_shape=info["img_shape"])
        cls_mean = sum(ms_scores) / float(len(ms_scores))
        return self._final_boxes(rois, cls_mean, bbox_pred, self.stage_stds[-1], info)

    def mask_probs(self, g: _Graphs, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        probs = [self._mask_head(g, f"mask_head_{i}", x, labels) for i in range(self.num_stages)]
        return np.mean(probs, axis=0)
