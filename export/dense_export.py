"""ONNX export of the dense models' parts, with weights, at fixed input shapes (dynamo exporter).

Mask R-CNN -> a directory holding four graphs (file names fixed, see :data:`DET_PARTS`):

* ``backbone_neck.onnx``: ``input`` [1, 3, H, W] -> ``p2..p6`` (FPN maps, strides 4..64);
* ``rpn_head.onnx``: ``p2..p6`` -> ``cls_0..cls_4`` [1, A, h, w], ``reg_0..reg_4`` [1, 4A, h, w];
* ``bbox_head.onnx``: ``rois`` [N, C, 7, 7] (N dynamic) -> ``cls_score`` [N, K+1], ``bbox_pred`` [N, 4K];
* ``mask_head.onnx``: ``rois`` [N, C, 14, 14] (N dynamic) -> ``mask_pred`` [N, K, 28, 28].

UperNet -> one graph ``input`` [1, 3, H, W] -> ``logits`` [1, K, H, W].

Every file carries ``maskaq.schema``, ``maskaq.task`` and ``maskaq.dense`` (JSON: part, model
config, preprocessing on the 0-255 scale, test-time settings) in ``metadata_props`` so the numpy
harness (``runtime_eval.dense``) needs neither torch nor maskaq.

A quantized part (backbone from :func:`maskaq.dense.models.quantize_backbone` or
:func:`maskaq.dense.quantize.quantize_dense`, neck/heads optionally) is frozen with
``export.freeze.freeze_model``, exported through ``maskaq.quant.export_mode()`` and
``export.onnx_export.translation_table``, and then rewritten into the classifier path's exact
encoding (``export.onnx_export.fold_constants`` + ``rewrite_quantizers``: CQDQ activations, int8 weight
initializers -> DequantizeLinear, every tensor named after its quantizer); the AIMET-layout
sidecar ``<part>.encodings.json`` is written beside it.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from maskaq.dense.models import BackboneNeck, MaskRCNN, RPNHeadPart, UperNet, UperNetFull
from maskaq.dense.settings import (CASCADE_PARTS, DET_PARTS, DET_TEST_CFG, MEAN_255, SEG_TEST_CFG, STD_255,
                                   cascade_test_cfg)

from .encodings import build_encodings
from .freeze import freeze_model, uninitialized_quantizers
from .onnx_export import ExportError, fold_constants, rewrite_quantizers, translation_table

__all__ = ["DET_PARTS", "DenseExportError", "export_part", "export_mask_rcnn", "export_upernet",
           "DET_TEST_CFG", "SEG_TEST_CFG", "MEAN_255", "STD_255", "is_quantized"]

class DenseExportError(RuntimeError):
    pass


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds any (enabled or not) maskaq quantizer."""
    from maskaq.quant import ActQuantizer, WeightQuantizer

    return any(isinstance(m, (ActQuantizer, WeightQuantizer)) for m in model.modules())


def export_part(module: nn.Module, example: Sequence[torch.Tensor], path: str | Path, *,
                input_names: Sequence[str], output_names: Sequence[str], dynamic_batch: bool = False,
                metadata: dict[str, str] | None = None, opset: int = 20, optimize: bool = True) -> Path:
    """Export one part (eval mode, no grad) at the example's fixed shapes; ``dynamic_batch``
    makes dim 0 of the (single) input dynamic (RoI heads); ``optimize`` runs the exporter's
    onnxscript optimizer (slow on big graphs; ORT optimises at session creation anyway).
    Writes ``path`` and returns it."""
    from maskaq.quant import export_mode

    path = Path(path)
    module = module.eval()
    quant = is_quantized(module)
    kw: dict[str, Any] = {}
    if quant:
        import copy

        bad = uninitialized_quantizers(module)
        if bad:
            raise DenseExportError(f"{len(bad)} activation quantizer(s) never saw data (run a forward first): {bad[:5]}")
        module = copy.deepcopy(module).eval()
        records = freeze_model(module, "ort")  # constant scales/zero-points: no data-dependent control flow
        kw["custom_translation_table"] = translation_table(opset)
    if dynamic_batch:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("num_rois", min=1, max=100000)},)
    ctx = export_mode() if quant else contextlib.nullcontext()
    with ctx, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(module, tuple(example), dynamo=True, opset_version=opset, verbose=False,
                                     optimize=optimize and not quant, input_names=list(input_names),
                                     output_names=list(output_names), **kw)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DenseExportError(f"torch.onnx.export failed for {type(module).__name__}: {msg}") from e
    encodings = None
    if quant:
        # the classifier path's exact encoding (export.onnx_export): constant folding without
        # merging the quantizers' scales, then every quantizer rebuilt under its own name -
        # activations Clip -> Q -> DQ only where the grid is narrower than 8 bit (CQDQ),
        # weights as int8 initializers holding the b-bit integers -> DQ (Linear weights [in, out])
        try:
            fold_constants(prog.model, keep_relu=True)
            model = prog.model_proto
            rewrite_quantizers(model, records, int4_block=None, shared_modules=True)
        except ExportError as e:
            raise DenseExportError(f"{type(module).__name__}: {e}") from None
        encodings = build_encodings(records, "ort", opset)
    else:
        model = prog.model_proto
    for k, v in (metadata or {}).items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name = "maskaq"
    path.parent.mkdir(parents=True, exist_ok=True)
    from maskaq.io import atomic_write_bytes

    if encodings is not None:
        atomic_write_bytes(encodings_path(path), (json.dumps(encodings, indent=1) + "\n").encode())
    atomic_write_bytes(path, model.SerializeToString())
    return path


def encodings_path(path: str | Path) -> Path:
    """``part.onnx`` -> ``part.encodings.json`` (the AIMET-layout sidecar of a quantized part)."""
    p = Path(path)
    return p.with_suffix(".encodings.json") if p.suffix.lower() == ".onnx" else Path(f"{p}.encodings.json")


def _meta(task: str, dense: dict[str, Any], quant: dict[str, Any] | None) -> dict[str, str]:
    return {"maskaq.schema": "1", "maskaq.task": task, "maskaq.dense": json.dumps(dense),
            "maskaq.quant": json.dumps(quant or {"profile": "fp32"})}


def _quant_json(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "maskaq_quant_config", None)
    if cfg is None:
        return None
    return {"w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "profile": "ort",
            "scope": str(getattr(model, "maskaq_quant_scope", "backbone")),
            **({"method": str(model.maskaq_method)} if getattr(model, "maskaq_method", None) else {})}


def export_mask_rcnn(model: MaskRCNN, out_dir: str | Path, input_hw: tuple[int, int] = (800, 1344), *,
                     opset: int = 20, extra: dict[str, Any] | None = None, optimize: bool = True) -> dict[str, Path]:
    """Export the four Mask R-CNN graphs into ``out_dir`` for a fixed ``input_hw`` canvas
    (multiples of 32; the harness pads each resized image to it). Returns part -> path."""
    H, W = input_hw
    if H % 32 or W % 32:
        raise DenseExportError(f"input_hw {input_hw} must be multiples of 32")
    model = model.eval()
    cfg = model.cfg
    dense = {"model": "mask_rcnn_swin", "config": cfg.to_json(), "input_size": [3, H, W],
             "mean": MEAN_255, "std": STD_255, "to_rgb": True, "test_cfg": DET_TEST_CFG,
             "num_classes": cfg.num_classes, **(extra or {})}
    quant = _quant_json(model)
    out_dir = Path(out_dir)
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = BackboneNeck(model)(x)
    lv = [f"p{i + 2}" for i in range(len(feats))]
    paths = {}
    meta = lambda part: _meta("coco_instance", dict(dense, part=part), quant)  # noqa: E731
    paths["backbone_neck"] = export_part(BackboneNeck(model), (x,), out_dir / "backbone_neck.onnx",
                                         input_names=["input"], output_names=lv, metadata=meta("backbone_neck"),
                                         opset=opset, optimize=optimize)
    n = len(feats)
    paths["rpn_head"] = export_part(RPNHeadPart(model), feats, out_dir / "rpn_head.onnx", input_names=lv,
                                    output_names=[f"cls_{i}" for i in range(n)] + [f"reg_{i}" for i in range(n)],
                                    metadata=meta("rpn_head"), opset=opset, optimize=optimize)
    C = cfg.fpn_channels
    paths["bbox_head"] = export_part(model.roi_head.bbox_head, (torch.randn(4, C, 7, 7),), out_dir / "bbox_head.onnx",
                                     input_names=["rois"], output_names=["cls_score", "bbox_pred"],
                                     dynamic_batch=True, metadata=meta("bbox_head"), opset=opset, optimize=optimize)
    paths["mask_head"] = export_part(model.roi_head.mask_head, (torch.randn(4, C, 14, 14),),
                                     out_dir / "mask_head.onnx", input_names=["rois"], output_names=["mask_pred"],
                                     dynamic_batch=True, metadata=meta("mask_head"), opset=opset, optimize=optimize)
    return paths


def export_upernet(model: UperNet, path: str | Path, input_hw: tuple[int, int] = (512, 512), *,
                   opset: int = 20, extra: dict[str, Any] | None = None, optimize: bool = True) -> Path:
    """Export UperNet (backbone + decode head + resize to the input) at a fixed ``input_hw``."""
    H, W = input_hw
    model = model.eval()
    dense = {"model": "upernet_swin", "config": model.cfg.to_json(), "input_size": [3, H, W],
             "mean": MEAN_255, "std": STD_255, "to_rgb": True, "test_cfg": SEG_TEST_CFG,
             "num_classes": model.cfg.num_classes, "part": "full", **(extra or {})}
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    return export_part(UperNetFull(model), (x,), path, input_names=["input"], output_names=["logits"],
                       metadata=_meta("ade20k_segmentation", dense, _quant_json(model)), opset=opset, optimize=optimize)


# --- Cascade Mask R-CNN ----------------------------------------------------------------------

def export_cascade_mask_rcnn(model, out_dir: str | Path, input_hw: tuple[int, int] = (800, 1344), *,
                             opset: int = 20, extra: dict[str, Any] | None = None,
                             optimize: bool = True) -> dict[str, Path]:
    """Export a :class:`maskaq.dense.models.CascadeMaskRCNN` into ``out_dir`` for a fixed
    ``input_hw`` canvas (multiples of 32): ``backbone_neck.onnx`` and ``rpn_head.onnx`` as for
    Mask R-CNN, then per stage i ``bbox_head_{i}.onnx`` (``rois`` [N, C, 7, 7] -> ``cls_score``
    [N, K+1], ``bbox_pred`` [N, 4K] (or [N, 4] class-agnostic)) and ``mask_head_{i}.onnx``
    (``rois`` [N, C, 14, 14] -> ``mask_pred`` [N, K, 28, 28]), N dynamic. ``maskaq.task`` is
    ``coco_instance_cascade``. Returns part -> path."""
    from maskaq.dense.models import CascadeMaskRCNN

    if not isinstance(model, CascadeMaskRCNN):
        raise DenseExportError(f"export_cascade_mask_rcnn needs a CascadeMaskRCNN, got {type(model).__name__}")
    H, W = input_hw
    if H % 32 or W % 32:
        raise DenseExportError(f"input_hw {input_hw} must be multiples of 32")
    model = model.eval()
    cfg = model.cfg
    dense = {"model": "cascade_mask_rcnn_swin", "config": cfg.to_json(), "input_size": [3, H, W],
             "mean": MEAN_255, "std": STD_255, "to_rgb": True, "test_cfg": cascade_test_cfg(cfg),
             "num_classes": cfg.num_classes, "num_stages": cfg.num_stages, **(extra or {})}
    quant = _quant_json(model)
    out_dir = Path(out_dir)
    meta = lambda part: _meta("coco_instance_cascade", dict(dense, part=part), quant)  # noqa: E731
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = BackboneNeck(model)(x)
    n = len(feats)
    lv = [f"p{i + 2}" for i in range(n)]
    paths = {"backbone_neck": export_part(BackboneNeck(model), (x,), out_dir / "backbone_neck.onnx",
                                          input_names=["input"], output_names=lv, metadata=meta("backbone_neck"),
                                          opset=opset, optimize=optimize)}
    paths["rpn_head"] = export_part(RPNHeadPart(model), feats, out_dir / "rpn_head.onnx", input_names=lv,
                                    output_names=[f"cls_{i}" for i in range(n)] + [f"reg_{i}" for i in range(n)],
                                    metadata=meta("rpn_head"), opset=opset, optimize=optimize)
    C = cfg.fpn_channels
    g = torch.Generator().manual_seed(1)
    for i in range(cfg.num_stages):
        name = f"bbox_head_{i}"
        paths[name] = export_part(model.roi_head.bbox_head[i], (torch.randn(4, C, 7, 7, generator=g),),
                                  out_dir / f"{name}.onnx", input_names=["rois"],
                                  output_names=["cls_score", "bbox_pred"], dynamic_batch=True,
                                  metadata=meta(name), opset=opset, optimize=optimize)
        name = f"mask_head_{i}"
        paths[name] = export_part(model.roi_head.mask_head[i], (torch.randn(4, C, 14, 14, generator=g),),
                                  out_dir / f"{name}.onnx", input_names=["rois"], output_names=["mask_pred"],
                                  dynamic_batch=True, metadata=meta(name), opset=opset, optimize=optimize)
    return paths


def _cascade_cls():
    from maskaq.dense.models import CascadeMaskRCNN

    return CascadeMaskRCNN


def export_dense(Q: nn.Module, task: str, out_dir: str | str | Path, canvas: tuple[int, int], *,
                 opset: int = 20, extra: dict[str, Any] | None = None, optimize: bool = True,
                 test_scale: tuple[int, int] | None = None) -> dict[str, Path]:
    """Export a (quantized) dense model into ``out_dir`` for the numpy/ORT harness: COCO ->
    the four Mask R-CNN graphs, or Cascade Mask R-CNN's eight (``backbone_neck.onnx``,
    ``rpn_head.onnx``, ``bbox_head_{0,1,2}.onnx``, ``mask_head_{0,1,2}.onnx``);
    ``backbone_neck.onnx`` (or the directory) is what ``maskaq-eval --task coco`` takes; ADE20K ->
    ``upernet.onnx``. ``test_scale`` ``(long, short)`` replaces the harness's resize scale in the
    model's own test settings. Quantized parts get the classifier path's QDQ encoding and an
    ``.encodings.json`` sidecar (:func:`export_part`)."""
    if task == "coco":
        cascade = isinstance(Q, _cascade_cls())
        fn, test_cfg = ((export_cascade_mask_rcnn, cascade_test_cfg(Q.cfg)) if cascade
                        else (export_mask_rcnn, DET_TEST_CFG))
    elif task == "ade20k":
        fn, test_cfg = None, SEG_TEST_CFG
    else:
        raise DenseExportError(f"unknown dense task {task!r}; valid: coco, ade20k")
    extra = dict(extra or {})
    if test_scale is not None:
        extra["test_cfg"] = dict(test_cfg, img_scale=[int(test_scale[0]), int(test_scale[1])])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fn is not None:
        return fn(Q, out, tuple(canvas), opset=opset, extra=extra, optimize=optimize)
    return {"upernet": export_upernet(Q, out / "upernet.onnx", tuple(canvas), opset=opset, extra=extra,
                                      optimize=optimize)}


__all__ += ["CASCADE_PARTS", "cascade_test_cfg", "export_cascade_mask_rcnn", "export_dense", "encodings_path"]
