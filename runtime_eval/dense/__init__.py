"""Dense-task inference (COCO Mask R-CNN, ADE20K UperNet) on maskaq's exported ONNX parts:
numpy + onnxruntime only. See docs/dense.md.

:func:`register` plugs the Mask R-CNN predictor into ``runtime_eval.coco`` for models whose
``maskaq.task`` is ``coco_instance`` (the file given is ``backbone_neck.onnx``; its siblings are
found in the same directory)."""
from __future__ import annotations

from . import ops
from .detection import MaskRCNNPredictor, load_dense_meta, preprocess_detection
from .segmentation import UperNetPredictor, preprocess_segmentation

__all__ = ["ops", "MaskRCNNPredictor", "UperNetPredictor", "load_dense_meta", "preprocess_detection",
           "preprocess_segmentation", "register"]


def _coco_factory(sess_info, model_info, preprocessing=None):
    """``runtime_eval.coco`` factory: reuse the given session for the backbone, open the other
    parts beside it with the same providers and session options."""
    from pathlib import Path

    import onnxruntime as ort

    path = Path(model_info.path)
    s = sess_info.session
    opts = ort.SessionOptions()
    for k, v in (getattr(sess_info, "config_entries", None) or {}).items():
        opts.add_session_config_entry(k, v)

    def factory(p: Path):
        if p.resolve() == path.resolve():
            return s
        return ort.InferenceSession(str(p), opts, providers=s.get_providers())

    return MaskRCNNPredictor(path.parent, session_factory=factory)


def register() -> None:
    """Register the Mask R-CNN predictor for ``maskaq.task == "coco_instance"``."""
    from ..coco import register_detection_predictor

    register_detection_predictor("coco_instance", _coco_factory)


register()
