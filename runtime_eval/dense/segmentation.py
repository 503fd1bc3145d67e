"""UperNet inference on the exported graph (``export.dense_export.export_upernet``): the mmseg
ADE20K test pipeline in numpy + onnxruntime.

``UperNetPredictor(path)`` is a ``predict_fn(image: PIL.Image) -> [H, W] labels 0..K-1`` for
``runtime_eval.ade20k.evaluate_segmentation``. Resize keeping ratio to (2048, 512) (mmcv
``imrescale``, bilinear), normalise on 0-255, then

* ``mode="whole"`` (mmseg's setting for the Swin UperNet reference): the image is zero-padded to
  the graph's fixed canvas, the logits cropped back; exact when the canvas equals the resized
  size, otherwise the padded zeros take part in window attention (documented approximation);
* ``mode="slide"``: ``crop_size`` windows with ``stride`` (mmseg ``slide_inference``; crops
  smaller than the canvas are zero-padded), logits averaged where windows overlap.

Logits are resized bilinearly (align_corners=False) to the original size and argmaxed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import EvalError
from . import ops
from .detection import _default_session, load_dense_meta, run_graph

__all__ = ["UperNetPredictor", "preprocess_segmentation"]


def preprocess_segmentation(img: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    h, w = img.shape[:2]
    nw, nh = ops.rescale_size(w, h, meta["test_cfg"]["img_scale"])
    x = ops.resize_image(img, nw, nh)
    x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    return x.transpose(2, 0, 1).astype(np.float32)


class UperNetPredictor:
    def __init__(self, path: str | Path, *, mode: str | None = None,
                 session_factory: Callable[[Path], Any] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"segmentation model not found: {path}")
        self.meta = load_dense_meta(path)
        if self.meta.get("model") != "upernet_swin":
            raise EvalError(f"{path.name} is a {self.meta.get('model')!r} export (maskaq.task "
                            f"{self.meta.get('task')!r}); UperNetPredictor needs an export_upernet graph")
        self.sess = (session_factory or _default_session)(path)
        self.name = path.name
        self.canvas = tuple(int(v) for v in self.meta["input_size"][1:])
        self.mode = mode or self.meta["test_cfg"].get("mode", "whole")
        if self.mode not in ("whole", "slide"):
            raise EvalError(f"unknown segmentation mode {self.mode!r} (valid: whole, slide)")
        self.num_classes = int(self.meta["num_classes"])

    def _run(self, x: np.ndarray) -> np.ndarray:
        """x [C, h, w] with h, w <= canvas -> logits [K, h, w]."""
        c, h, w = x.shape
        if h > self.canvas[0] or w > self.canvas[1]:
            raise EvalError(f"input {h}x{w} exceeds the exported canvas {self.canvas}; export a larger one "
                            "or use mode='slide'")
        buf = np.zeros((1, c) + self.canvas, np.float32)
        buf[0, :, :h, :w] = x
        out = run_graph(self.sess, {"input": buf}, self.name)[0]
        if out.shape != (1, self.num_classes) + self.canvas:
            raise EvalError(f"{self.name} gave logits {list(out.shape)}; expected "
                            f"[1, {self.num_classes}, {self.canvas[0]}, {self.canvas[1]}]")
        return out[0, :, :h, :w]

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "whole":
            return self._run(x)
        _, H, W = x.shape
        ch, cw = self.canvas
        sh, sw = self.meta["test_cfg"]["stride"]
        gh = max(H - ch + sh - 1, 0) // sh + 1
        gw = max(W - cw + sw - 1, 0) // sw + 1
        acc = np.zeros((self.num_classes, H, W), np.float32)
        cnt = np.zeros((H, W), np.float32)
        for i in range(gh):
            for j in range(gw):
                y1, x1 = i * sh, j * sw
                y2, x2 = min(y1 + ch, H), min(x1 + cw, W)
                y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
                acc[:, y1:y2, x1:x2] += self._run(x[:, y1:y2, x1:x2])
                cnt[y1:y2, x1:x2] += 1
        return acc / cnt

    def predict_array(self, img: np.ndarray) -> np.ndarray:
        from ..ade20k import argmax_resized

        lg = self.logits(preprocess_segmentation(img, self.meta))
        return argmax_resized(lg, img.shape[:2])

    def __call__(self, image) -> np.ndarray:
        return self.predict_array(np.asarray(image.convert("RGB"), np.uint8))
