"""Dense-task inference (COCO Mask R-CNN / Cascade Mask R-CNN, ADE20K UperNet) on maskaq's exported
ONNX parts: numpy + onnxruntime only. See docs/dense.md.

:func:`register` (run at import) plugs the predictors into the generic evaluators, keyed by the
graph's ``maskaq.task``:

* ``coco_instance`` -> :class:`MaskRCNNPredictor`, ``coco_instance_cascade`` ->
  :class:`CascadeMaskRCNNPredictor` in ``runtime_eval.coco`` (the file given is
  ``backbone_neck.onnx``; its sibling parts are opened from the same directory with the same
  providers and session settings);
* ``ade20k_segmentation`` -> :class:`UperNetPredictor` in ``runtime_eval.ade20k``.
"""
from __future__ import annotations

from typing import Any

from . import ops
from .detection import CascadeMaskRCNNPredictor, MaskRCNNPredictor, load_dense_meta, preprocess_detection
from .segmentation import UperNetPredictor, preprocess_segmentation

__all__ = ["ops", "MaskRCNNPredictor", "CascadeMaskRCNNPredictor", "UperNetPredictor", "load_dense_meta",
           "preprocess_detection", "preprocess_segmentation", "register", "DETECTION_TASKS",
           "SEGMENTATION_TASKS", "DENSE_TASKS"]

# maskaq.task -> (predictor class, the --task that evaluates it)
DETECTION_TASKS = {"coco_instance": MaskRCNNPredictor, "coco_instance_cascade": CascadeMaskRCNNPredictor}
SEGMENTATION_TASKS = {"ade20k_segmentation": UperNetPredictor}
DENSE_TASKS = {**{k: "coco" for k in DETECTION_TASKS}, **{k: "ade20k" for k in SEGMENTATION_TASKS}}


def sibling_session_factory(sess_info: Any, model_path):
    """``path -> session``: the given session for ``model_path``; any other part opened like it
    (same providers, session config entries, graph optimisation level, thread counts)."""
    from pathlib import Path

    import onnxruntime as ort

    from ..errors import EvalError
    from ..session import GRAPH_OPT_LEVELS

    path = Path(model_path).resolve()
    if hasattr(sess_info, "open_sibling"):  # OpenVINO: same precision and threads for every part
        return sess_info.open_sibling
    s = sess_info.session
    opts = ort.SessionOptions()
    opts.graph_optimization_level = GRAPH_OPT_LEVELS.get(
        getattr(sess_info, "graph_optimization_level", "all"), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    opts.intra_op_num_threads = int(getattr(sess_info, "intra_op_threads", 0) or 0)
    opts.inter_op_num_threads = int(getattr(sess_info, "inter_op_threads", 0) or 0)
    opts.log_severity_level = 3
    for k, v in (getattr(sess_info, "config_entries", None) or {}).items():
        opts.add_session_config_entry(k, v)
    providers = s.get_providers()

    def factory(p):
        p = Path(p)
        if p.resolve() == path:
            return s
        try:
            sess = ort.InferenceSession(str(p), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT's own exception types
            raise EvalError(f"ONNX Runtime cannot load {p}: {' '.join(str(e).split())[:400]}") from None
        used = sess.get_providers()
        if used != providers:
            raise EvalError(f"{p.name} runs on {', '.join(used)}, not {', '.join(providers)} like {path.name}")
        return sess

    return factory


def _detection_factory(cls):
    def make(sess_info, model_info, preprocessing=None):
        from pathlib import Path

        path = Path(model_info.path)
        return cls(path.parent, session_factory=sibling_session_factory(sess_info, path))

    return make


def _segmentation_factory(sess_info, model_info, preprocessing=None, mode=None):
    return UperNetPredictor(model_info.path, mode=mode, session_factory=lambda p: sess_info.session)


def register() -> None:
    """Register the dense predictors in ``runtime_eval.coco`` / ``runtime_eval.ade20k``."""
    from ..ade20k import register_segmentation_predictor
    from ..coco import register_detection_predictor

    for task, cls in DETECTION_TASKS.items():
        register_detection_predictor(task, _detection_factory(cls))
    for task in SEGMENTATION_TASKS:
        register_segmentation_predictor(task, _segmentation_factory)


register()
