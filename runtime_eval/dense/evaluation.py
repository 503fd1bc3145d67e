"""What ``runtime_eval.runner.evaluate`` needs to run a maskaq dense export through ``--task coco``
/ ``--task ade20k``: task and part checks, the preprocessing description of the report (the
mmdet/mmseg test pipeline, not the classification transform), the per-part model section, and
class-count checks against the dataset. numpy/onnx only."""
from __future__ import annotations

import json
import logging
from typing import Any

from ..errors import EvalError
from ..model import ModelInfo, file_sha256, qdq_census
from ..preprocess import Preprocessing

log = logging.getLogger("runtime_eval")

__all__ = ["is_dense", "dense_meta", "check_task", "dense_preprocessing", "check_fp32", "parts_report",
           "check_dataset", "SEG_MODES"]

SEG_MODES = ("whole", "slide")


def is_dense(info: ModelInfo | None) -> bool:
    return info is not None and "maskaq.dense" in info.metadata


def dense_meta(info: ModelInfo) -> dict[str, Any]:
    try:
        d = json.loads(info.metadata["maskaq.dense"])
    except (KeyError, json.JSONDecodeError) as e:
        raise EvalError(f"{info.path.name}: metadata 'maskaq.dense' is missing or not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("test_cfg"), dict) or "input_size" not in d:
        raise EvalError(f"{info.path.name}: metadata 'maskaq.dense' lacks test_cfg/input_size")
    return d


def check_task(info: ModelInfo, task: str) -> dict[str, Any]:
    """The graph's dense metadata, after checking that ``task`` evaluates this kind of graph and
    that the file is the part the harness starts from."""
    from . import DENSE_TASKS, DETECTION_TASKS

    d = dense_meta(info)
    mt = info.task or ""
    want = DENSE_TASKS.get(mt)
    if want is None:
        raise EvalError(f"{info.path.name} is a dense export with maskaq.task={mt!r}, which no harness "
                        f"predictor knows (known: {', '.join(sorted(DENSE_TASKS))})")
    if want != task:
        raise EvalError(f"{info.path.name} is a {d.get('model', mt)} graph (maskaq.task={mt!r}), evaluated with "
                        f"--task {want}, not --task {task}")
    part = d.get("part")
    if mt in DETECTION_TASKS and part != "backbone_neck":
        raise EvalError(f"{info.path.name} is the {part!r} part of a {d.get('model')} export; give the "
                        "directory or its backbone_neck.onnx (the other parts are found beside it)")
    if mt not in DETECTION_TASKS and part not in (None, "full"):
        raise EvalError(f"{info.path.name} is the {part!r} part of a {d.get('model')} export, not the full graph")
    return d


def dense_preprocessing(info: ModelInfo, d: dict[str, Any], seg_mode: str | None = None
                        ) -> tuple[Preprocessing, dict[str, Any]]:
    """A :class:`Preprocessing` for the canvas (channels, latency input) and the report's
    ``preprocessing`` section describing the dense test pipeline."""
    try:
        size = tuple(int(v) for v in d["input_size"])
        mean = [float(v) for v in d["mean"]]
        std = [float(v) for v in d["std"]]
        tc = d["test_cfg"]
        img_scale = [int(v) for v in tc["img_scale"]]
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{info.path.name}: bad maskaq.dense metadata ({type(e).__name__}: {e})") from None
    if len(size) != 3 or len(mean) != size[0] or len(std) != size[0] or any(s == 0 for s in std):
        raise EvalError(f"{info.path.name}: maskaq.dense input_size {list(size)}, mean {mean}, std {std} are inconsistent")
    graph = info.input_shape[1:] if len(info.input_shape) == 4 else None
    if graph is None or any(isinstance(g, int) and g != s for g, s in zip(graph, size)):
        raise EvalError(f"{info.path.name}: graph input {info.input_shape} does not match maskaq.dense input_size "
                        f"{list(size)}")
    pre = Preprocessing(size, tuple(m / 255.0 for m in mean), tuple(s / 255.0 for s in std), 1.0, "squash",
                        "bilinear", source="maskaq.dense")  # type: ignore[arg-type]
    rep: dict[str, Any] = {
        "source": "maskaq.dense",
        "pipeline": "mmdet 2.x COCO test" if info.task != "ade20k_segmentation" else "mmseg ADE20K test",
        "model": d.get("model"),
        "input_size": list(size),
        "channels": size[0],
        "canvas": list(size[1:]),
        "mean": mean,
        "std": std,
        "scale": "0-255",
        "to_rgb": bool(d.get("to_rgb", True)),
        "resize": {"keep_ratio": True, "img_scale": img_scale, "interpolation": "bilinear",
                   "rounded_to_uint8": True},
        "pad": "zeros to the fixed canvas",
    }
    if "size_divisor" in tc:
        rep["size_divisor"] = tc["size_divisor"]
    if info.task == "ade20k_segmentation":
        mode = seg_mode or tc.get("mode", "whole")
        if mode not in SEG_MODES:
            raise EvalError(f"unknown segmentation mode {mode!r} (valid: {', '.join(SEG_MODES)})")
        rep["mode"] = mode
        if mode == "slide":
            rep["crop_size"] = list(size[1:])
            rep["stride"] = tc.get("stride")
    elif seg_mode is not None:
        raise EvalError("--seg-mode applies to ade20k segmentation graphs only")
    return pre, rep


def check_fp32(rep: dict[str, Any], d: dict[str, Any], info: ModelInfo, info32: ModelInfo, task: str,
               seg_mode: str | None) -> None:
    """The --fp32 graph must be the same kind of export with the same test pipeline."""
    if not is_dense(info32):
        raise EvalError(f"--fp32 model {info32.path.name} is not a maskaq dense export but {info.path.name} is")
    d32 = check_task(info32, task)
    if info32.task != info.task or d32.get("model") != d.get("model"):
        raise EvalError(f"--fp32 model is a {d32.get('model')} ({info32.task}) graph, the model a "
                        f"{d.get('model')} ({info.task}) one")
    _, rep32 = dense_preprocessing(info32, d32, seg_mode)
    if rep32 != rep or d32.get("test_cfg") != d.get("test_cfg"):
        raise EvalError(f"the --fp32 export's preprocessing/test settings {rep32} differ from the model's {rep}; "
                        "they must be evaluated on the same inputs")
    if d32.get("config") != d.get("config"):
        raise EvalError("the --fp32 export has a different model config (layer sizes) than the model")


def parts_report(info: ModelInfo) -> dict[str, Any] | None:
    """Per-part file, sha256, size and QDQ census of a detection export (the report's
    ``model.parts``; the model section itself describes ``backbone_neck.onnx``)."""
    from . import DETECTION_TASKS

    cls = DETECTION_TASKS.get(info.task or "")
    if cls is None:
        return None
    import onnx

    d = dense_meta(info)
    out: dict[str, Any] = {}
    total = 0
    for part in cls._parts(d):
        p = info.path.parent / f"{part}.onnx"
        if part == "backbone_neck":
            census, sha, size = info.census, info.sha256, info.size_bytes
        else:
            census = qdq_census(onnx.load(str(p), load_external_data=False))[0]
            sha, size = file_sha256(p), p.stat().st_size
        total += census["total"]
        out[part] = {"file": str(p), "sha256": sha, "size_bytes": size, "qdq": census}
    return {"model": d.get("model"), "num_parts": len(out), "qdq_total": total, "parts": out}


def check_dataset(info: ModelInfo, d: dict[str, Any], num_classes: int, what: str) -> None:
    k = d.get("num_classes")
    if k != num_classes:
        raise EvalError(f"{info.path.name} predicts {k} classes but {what} has {num_classes}; "
                        "evaluate it on a dataset with the classes it was trained for")
