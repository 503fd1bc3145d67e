"""Data-free quantization of the dense models (Mask R-CNN, Cascade Mask R-CNN, UperNet with the
original Swin):
quantize -> synthesise on the backbone -> calibrate on the dense outputs -> save -> export.

The same quantizer (:func:`maskaq.qmodel.quantize_model`, :class:`maskaq.qmodel.QuantConfig`),
the same synthesis (:func:`maskaq.synthesis.synthesize`), calibration
(:func:`maskaq.calibration.calibrate` / :func:`~maskaq.calibration.minmax_calibrate`), presets
and method table (:func:`maskaq.pipeline.resolve_plan`) as classification; what differs
(docs/dense.md, "Data-free quantization of the dense backbone"):

* synthesis runs on P's backbone (and Q's, for L_MAA) at the dense input size, with the
  original Swin's pad-then-shift window layout; L_CE is off by default (no classifier);
* calibration distils the dense outputs instead of class logits: per-pixel KD on UperNet's
  decode-head logits, normalised feature distillation on the (Cascade) Mask R-CNN FPN maps
  (:func:`dense_distill`), plus the masked head-wise L_HD on the backbone's window attention;
* ``scope="backbone"`` (default) quantizes the Swin backbone; ``scope="all"`` also the neck and
  heads (every Conv2d and Linear: weight per channel + input per tensor; the mask head's
  transposed conv stays FP).

Files, in ``out_dir`` (all written atomically): ``calibrated.pt`` (Q rebuildable without
re-running anything, :func:`load_dense_calibrated`), ``params.json``, ``run.json``,
``samples.png``, ``losses.png``, and ``ckpt/`` (synthesis batches, calibration epochs) from
which an interrupted run resumes (``resume=True``) with the same result.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from maskaq.calibration import (CalibResult, TensorBatches, calibrate, derive_seed, feature_distill_loss,
                                kd_loss, minmax_calibrate, peek_state, pixel_kd_loss)
from maskaq.io import atomic_torch_save, atomic_write_json
from maskaq.models import DataConfig
from maskaq.params import read_params
from maskaq.qmodel import QuantConfig, QuantLinear
from maskaq.quant import ActQuantizer, WeightQuantizer
from maskaq.recipes import method_names
from maskaq.synthesis import SynthResult, synthesize

from .models import (CascadeDetConfig, CascadeMaskRCNN, DetConfig, MaskRCNN, SegConfig, UperNet, quantize_backbone,
                     tiny_swin_config)

log = logging.getLogger(__name__)

__all__ = [
    "DenseError", "DENSE_MODELS", "DENSE_METHODS", "SCOPES", "DenseRunConfig", "DenseRunResult",
    "build_dense_model", "dense_data_config", "quantize_dense", "QuantConvAct", "DistillTarget", "calibration_boxes",
    "dense_distill", "run_dense_pipeline", "load_dense_calibrated",
    "DENSE_CALIBRATED_FORMAT",
]

DENSE_CALIBRATED_FORMAT = "maskaq-dense-calibrated/1"
RUN_SCHEMA = "maskaq-dense-run/1"
#: methods of the classification pipeline that need no real images
DENSE_METHODS = method_names(dense=True)  # maskaq.recipes: every method with dense=True
SCOPES = ("backbone", "all")
#: the last (prediction) layers of the heads: 8 bit with ``keep_first_last_8bit``
_PREDICTORS = ("conv_seg", "fc_cls", "fc_reg", "conv_logits", "rpn_cls", "rpn_reg")


class DenseError(ValueError):
    """A bad dense run setting, an unknown model, an output directory in the way."""


def _tiny_det() -> DetConfig:
    return DetConfig(swin=tiny_swin_config(depths=(2, 1, 1, 1)), fpn_channels=32, fc_dim=64, mask_conv_dim=32)


def _tiny_cascade() -> CascadeDetConfig:
    return CascadeDetConfig(swin=tiny_swin_config(depths=(2, 1, 1, 1)), fpn_channels=32, bbox_conv_dim=32, fc_dim=64,
                            mask_conv_dim=32)


def _tiny_seg() -> SegConfig:
    return SegConfig(swin=tiny_swin_config(depths=(2, 1, 1, 1)), channels=32, aux_channels=16)


#: alias -> (task, model class, config factory, default input size (H, W)).
#: ``tiny_*``: 16-channel Swin with random weights, for tests and smoke runs.
DENSE_MODELS: dict[str, tuple[str, type, Callable[[], Any], tuple[int, int]]] = {
    "swin_t_mask_rcnn": ("coco", MaskRCNN, DetConfig, (800, 1344)),
    "swin_t_cascade_mask_rcnn": ("coco", CascadeMaskRCNN, CascadeDetConfig, (800, 1344)),
    "swin_t_upernet": ("ade20k", UperNet, SegConfig, (512, 512)),
    "tiny_mask_rcnn": ("coco", MaskRCNN, _tiny_det, (64, 96)),
    "tiny_cascade_mask_rcnn": ("coco", CascadeMaskRCNN, _tiny_cascade, (64, 96)),
    "tiny_upernet": ("ade20k", UperNet, _tiny_seg, (64, 96)),
}


def build_dense_model(name: str, checkpoint: str | os.PathLike | None = None, *,
                      random_weights: bool = False, seed: int = 0) -> tuple[nn.Module, str]:
    """``(P, task)`` for a dense alias: weights from ``checkpoint`` (mmdet/mmseg, strict,
    :func:`maskaq.dense.load_dense_checkpoint`) or, with ``random_weights``, seeded random ones.

    Raises:
        DenseError: unknown name, or neither weights nor ``random_weights``.
    """
    if name not in DENSE_MODELS:
        raise DenseError(f"unknown dense model {name!r}; valid: {', '.join(DENSE_MODELS)}")
    task, cls, make_cfg, _ = DENSE_MODELS[name]
    if checkpoint is None and not random_weights:
        raise DenseError(f"{name} needs weights: pass a checkpoint (the mmdet/mmseg .pth) or random_weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(make_cfg())
    if checkpoint is not None:
        from .checkpoint import load_dense_checkpoint

        load_dense_checkpoint(model, checkpoint)
    return model.eval(), task


def dense_data_config(input_hw: tuple[int, int]) -> DataConfig:
    """Preprocessing of the dense models in maskaq's 0-1 convention: RGB, mmdet/mmseg mean/std
    (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) on 0-255, at ``input_hw``."""
    from .settings import MEAN_255, STD_255

    H, W = (int(v) for v in input_hw)
    return DataConfig((3, H, W), tuple(m / 255 for m in MEAN_255), tuple(s / 255 for s in STD_255),
                      crop_pct=1.0, interpolation="bilinear", crop_mode="none")


# --- quantization -----------------------------------------------------------------------------

class QuantConvAct(nn.Conv2d):
    """``nn.Conv2d`` with ``input_quantizer`` (per tensor, LSQ+) and ``weight_quantizer`` (per
    output channel): a neck/head convolution quantized like the transformer's Linear layers."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, cfg: QuantConfig) -> "QuantConvAct":
        new = copy.copy(conv)
        new.__class__ = cls
        new._modules = dict(conv._modules)
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new.input_quantizer = ActQuantizer(a_bits, symmetric=cfg.symmetric_activations)
        new.weight_quantizer = WeightQuantizer(w_bits, narrow=cfg.narrow_weights, axis=0)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


def quantize_dense(model: nn.Module, config: QuantConfig, scope: str = "backbone") -> nn.Module:
    """Q for a dense model (P is not modified; its backbone's attention is prepared in place).

    ``scope="backbone"``: :func:`maskaq.dense.models.quantize_backbone` (every Linear, the patch
    embedding's conv weight, q/k/softmax/v). ``scope="all"``: also every ``nn.Conv2d`` and
    ``nn.Linear`` of the neck and heads (weight + input; ``keep_first_last_8bit`` keeps the final
    predictors - ``conv_seg``, ``fc_cls``, ``fc_reg``, ``conv_logits``, ``rpn_cls``, ``rpn_reg`` -
    at 8 bit), Cascade Mask R-CNN's three box heads (shared convs, shared FC, predictors) and three
    mask heads included; transposed convs, BatchNorm, pooling and resizes stay FP.
    """
    if scope not in SCOPES:
        raise DenseError(f"quantization scope {scope!r} is not valid; valid: {', '.join(SCOPES)}")
    q = quantize_backbone(model, config)
    if scope == "all":
        from maskaq.qmodel import _set_child

        for name, m in list(q.named_modules()):
            if name == "backbone" or name.startswith("backbone."):
                continue
            last = name.rsplit(".", 1)[-1] in _PREDICTORS and config.keep_first_last_8bit
            wb, ab = (8, 8) if last else (config.w_bits, config.a_bits)
            if type(m) is nn.Linear:
                _set_child(q, name, QuantLinear.from_linear(m, wb, ab, config))
            elif type(m) is nn.Conv2d:
                _set_child(q, name, QuantConvAct.from_conv(m, wb, ab, config))
    q.maskaq_quant_scope = scope  # type: ignore[attr-defined]
    return q


def calibration_boxes(input_hw: tuple[int, int], fractions: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8),
                      ratios: tuple[float, ...] = (0.5, 1.0, 2.0), grid: int = 3) -> torch.Tensor:
    """Fixed RoIs ``[K, 4]`` (x1, y1, x2, y2, input pixels) on which the RoI heads are
    calibrated when they are quantized [ours]: there are no proposals without running the RPN's
    NMS, so every image gets the same boxes - sides ``f * min(H, W)`` for each fraction, aspect
    ratios h/w 0.5/1/2, centres on a ``grid x grid`` lattice, clipped to the image. With the
    default fractions at 800x1344 the boxes fall on all four RoI levels (mmdet's
    ``map_roi_levels``, finest scale 56)."""
    H, W = (float(v) for v in input_hw)
    out = []
    for f in fractions:
        side = f * min(H, W)
        for r in ratios:
            h, w = side * math.sqrt(r), side / math.sqrt(r)
            for i in range(grid):
                for j in range(grid):
                    cy, cx = H * (i + 0.5) / grid, W * (j + 0.5) / grid
                    out.append([max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(W, cx + w / 2), min(H, cy + h / 2)])
    return torch.tensor(out, dtype=torch.float32)


def _roi_features(feats: list[torch.Tensor], boxes: torch.Tensor, size: int, strides=(4, 8, 16, 32),
                  finest_scale: float = 56.0) -> torch.Tensor:
    """mmdet ``SingleRoIExtractor`` (RoIAlign aligned=True, sampling_ratio 0) of the same
    ``boxes`` on every image of the batch: ``[B * K, C, size, size]``, image-major."""
    from torchvision.ops import roi_align

    B, K = feats[0].shape[0], boxes.shape[0]
    boxes = boxes.to(feats[0].device, feats[0].dtype)
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, len(strides) - 1).long()
    rois = torch.cat([torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(K)[:, None],
                      boxes.repeat(B, 1)], dim=1)
    lv = lvl.repeat(B)
    out = feats[0].new_zeros(B * K, feats[0].shape[1], size, size)
    for i, st in enumerate(strides):
        idx = (lv == i).nonzero().flatten()
        if idx.numel():
            out[idx] = roi_align(feats[i], rois[idx], (size, size), spatial_scale=1.0 / st, sampling_ratio=0,
                                 aligned=True)
    return out


def _stages(x: Any) -> list:
    """The per-stage entries of a (Cascade) RoI head: a ModuleList / tuple as a list, one head as [it]."""
    return list(x) if isinstance(x, (nn.ModuleList, tuple, list)) else [x]


class DistillTarget(nn.Module):
    """What calibration distils. (Cascade) Mask R-CNN: the FPN maps ``(p2..p6)``; with ``heads=True``
    (the heads are quantized) also the RPN outputs and the box and mask heads' outputs on the
    :func:`calibration_boxes` RoIs pooled from the model's own FPN maps - Mask R-CNN: ``cls``,
    ``reg``, ``mask`` tensors; Cascade: tuples with one entry per stage, every stage on the same
    fixed RoIs (the test-time refinement between stages needs detections, which the fixed-RoI
    calibration does not have). UperNet: the decode-head
    logits ``[B, K, H/4, W/4]`` (before the resize to the input, which is linear and adds
    nothing). Holds the model's own submodules (shared, not copied), only those on the path, so
    every parameter it trains receives a gradient."""

    def __init__(self, model: nn.Module, heads: bool = False) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.heads = bool(heads)
        if isinstance(model, (MaskRCNN, CascadeMaskRCNN)):
            self.kind, self.neck = "fpn", model.neck
            self.cascade = isinstance(model, CascadeMaskRCNN)
            if self.heads:
                self.rpn_head, self.roi_head = model.rpn_head, model.roi_head
        elif isinstance(model, UperNet):
            self.kind, self.decode_head = "seg", model.decode_head
        else:
            raise DenseError(f"no dense distillation target for {type(model).__name__}")

    def forward(self, x: torch.Tensor) -> Any:
        feats = self.backbone(x)
        if self.kind == "seg":
            return self.decode_head(feats)
        fpn = tuple(self.neck(feats))
        if not self.heads:
            return fpn
        boxes = calibration_boxes(tuple(x.shape[-2:]))
        r7, r14 = _roi_features(list(fpn), boxes, 7), _roi_features(list(fpn), boxes, 14)
        box = [h(r7) for h in _stages(self.roi_head.bbox_head)]
        mask = tuple(h(r14) for h in _stages(self.roi_head.mask_head))
        cls, reg = tuple(c for c, _ in box), tuple(r for _, r in box)
        if not self.cascade:
            (cls,), (reg,), (mask,) = cls, reg, mask
        return {"fpn": fpn, "rpn": tuple(self.rpn_head(list(fpn))), "cls": cls, "reg": reg, "mask": mask}


def _det_heads_distill(out_q: dict, out_p: dict, temperature: float) -> torch.Tensor:
    maps = lambda o: list(o["rpn"]) + _stages(o["reg"]) + _stages(o["mask"])  # noqa: E731
    cls = list(zip(_stages(out_q["cls"]), _stages(out_p["cls"])))
    return (feature_distill_loss(out_q["fpn"], out_p["fpn"]) + feature_distill_loss(maps(out_q), maps(out_p))
            + sum(kd_loss(q, p, temperature) for q, p in cls) / len(cls))


def dense_distill(target: DistillTarget, temperature: float) -> Callable[[Any, Any], torch.Tensor]:
    """The output term that replaces L_KD [ours]: UperNet -> per-pixel KD (``T^2 KL``,
    temperature T) on the decode-head logits; (Cascade) Mask R-CNN -> normalised feature
    distillation on the FPN maps, plus (heads quantized) normalised distillation of the RPN maps,
    box deltas and mask logits (every cascade stage's, one mean over all maps) and KD on the box
    classifier's logits (Cascade: mean over the stages) over the calibration RoIs."""
    if target.kind == "seg":
        return functools.partial(pixel_kd_loss, temperature=temperature)
    if target.heads:
        return functools.partial(_det_heads_distill, temperature=temperature)
    return feature_distill_loss


# --- the run ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DenseRunConfig:
    """One dense run, fully described (run.json, the calibrated state, the ONNX metadata).

    Args:
        model: a :data:`DENSE_MODELS` alias. checkpoint: the mmdet/mmseg weights.
        method: one of :data:`DENSE_METHODS` (the recipes of :mod:`maskaq.recipes` offered for dense models).
        w_bits, a_bits, keep_first_last_8bit: :class:`maskaq.qmodel.QuantConfig`.
        scope: ``backbone`` | ``all`` (neck and heads too).
        input_size: ``(H, W)`` of the synthetic / noise calibration images (None: the model's
            default, 800x1344 (Cascade) Mask R-CNN, 512x512 UperNet).
        preset, overrides: as classification (``maskaq.presets``); dense defaults
            (``synth.use_ce=False``) are applied before the overrides.
        seed; random_weights: seeded random weights instead of a checkpoint.
    """

    model: str
    checkpoint: str | None = None
    method: str = "maskaq"
    w_bits: int = 4
    a_bits: int = 4
    keep_first_last_8bit: bool = False
    scope: str = "backbone"
    input_size: tuple[int, int] | None = None
    preset: str = "cpu"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    random_weights: bool = False

    def __post_init__(self) -> None:
        if self.model not in DENSE_MODELS:
            raise DenseError(f"unknown dense model {self.model!r}; valid: {', '.join(DENSE_MODELS)}")
        if self.method not in DENSE_METHODS:
            raise DenseError(f"method {self.method!r} is not available for dense models; valid: "
                             f"{', '.join(DENSE_METHODS)}")
        if self.scope not in SCOPES:
            raise DenseError(f"quantization scope {self.scope!r} is not valid; valid: {', '.join(SCOPES)}")
        if self.input_size is None:
            object.__setattr__(self, "input_size", DENSE_MODELS[self.model][3])
        hw = tuple(int(v) for v in self.input_size)  # type: ignore[union-attr]
        if len(hw) != 2 or min(hw) < 1:
            raise DenseError(f"input_size {self.input_size!r} is not (H, W) with H, W >= 1")
        object.__setattr__(self, "input_size", hw)
        object.__setattr__(self, "overrides", dict(self.overrides))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise DenseError(f"seed {self.seed!r} is not an integer")
        self.quant_config()
        self.plan()  # validates preset and overrides now

    @property
    def task(self) -> str:
        return DENSE_MODELS[self.model][0]

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.w_bits, self.a_bits, keep_first_last_8bit=self.keep_first_last_8bit)

    def plan(self):
        """The classification pipeline's plan (preset -> method -> dense defaults -> overrides)."""
        from maskaq.pipeline import PipelineError, RunConfig, resolve_plan

        try:
            rc = RunConfig(model=self.model, method=self.method, w_bits=self.w_bits, a_bits=self.a_bits,
                           preset=self.preset, overrides={"synth.use_ce": False, **self.overrides}, seed=self.seed)
            return resolve_plan(rc)
        except PipelineError as e:
            raise DenseError(str(e)) from None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)  # type: ignore[arg-type]
        d["overrides"] = dict(self.overrides)
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DenseRunConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DenseError(f"unknown dense run settings {unknown}; valid: {', '.join(sorted(names))}")
        d = dict(d)
        if d.get("input_size") is not None:
            d["input_size"] = tuple(d["input_size"])
        return cls(**d)


@dataclass
class DenseRunResult:
    Q: nn.Module
    P: nn.Module
    config: DenseRunConfig
    data_config: DataConfig
    report: dict[str, Any]
    state_path: Path
    out_dir: Path
    calib: CalibResult | None = None


def _check_out_dir(out: Path, ck: Path, resume: bool, cfg: DenseRunConfig) -> None:
    from maskaq.pipeline import _has_checkpoints

    if _has_checkpoints(ck) and not resume:
        raise DenseError(f"{str(out)!r} already holds checkpoints of a run ({str(ck)!r}); pass --resume "
                         "(resume=True) to continue it, or choose another run directory")
    stored = ck / "run_config.json"
    if resume and stored.is_file() and _has_checkpoints(ck):
        with open(stored) as f:
            old = json.load(f)
        new = cfg.to_json()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise DenseError(f"cannot resume in {str(out)!r}: its checkpoints were made with a different "
                             f"run config (differs in: {', '.join(diff)}); use the same settings or another directory")


def run_dense_pipeline(cfg: DenseRunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                       device: str | torch.device = "cpu", progress: bool = True) -> DenseRunResult:
    """Quantize a dense model data-free (docs/dense.md): build P, Q = :func:`quantize_dense`,
    calibration images (synthesis on the backbone at ``cfg.input_size``, or noise), calibration
    (:func:`maskaq.calibration.calibrate` with :func:`dense_distill` + L_HD, with refresh for
    MaskAQ; PSAQ: min/max PTQ), then the files listed in the module docstring.

    Raises:
        DenseError, CheckpointError, PipelineError-like errors: bad settings or directories.

    Example:
        >>> res = run_dense_pipeline(DenseRunConfig("tiny_upernet", random_weights=True, preset="tiny"), "run/")
    """
    t_all = time.perf_counter()
    device = torch.device(device)
    out = Path(out_dir)
    ck = out / "ckpt"
    _check_out_dir(out, ck, resume, cfg)
    from maskaq.pipeline import _has_checkpoints

    resumed = resume and _has_checkpoints(ck)
    plan = cfg.plan()
    out.mkdir(parents=True, exist_ok=True)
    ck.mkdir(exist_ok=True)
    if not resumed or not (ck / "run_config.json").is_file():
        atomic_write_json(ck / "run_config.json", cfg.to_json())
    seed = cfg.seed
    seeds = {k: derive_seed(seed, k) for k in ("model", "synth", "calib", "noise")}
    timings: dict[str, Any] = {}
    log.info("dense run: %s %s on %s (%s), scope %s, input %s, preset %s, seed %d -> %s", cfg.method,
             cfg.quant_config().tag, cfg.model, cfg.task, cfg.scope, cfg.input_size, cfg.preset, seed, out)

    t0 = time.perf_counter()
    P, _ = build_dense_model(cfg.model, cfg.checkpoint, random_weights=cfg.random_weights, seed=seeds["model"] & 0xFFFFFFFF)
    P = P.to(device).eval()
    from maskaq.models import check_finite_weights

    check_finite_weights(P, f"model {cfg.model!r}")  # once, before any work
    for p in P.parameters():
        p.requires_grad_(False)
    qcfg = cfg.quant_config()
    Q = quantize_dense(P, qcfg, cfg.scope).to(device).eval()
    Q.maskaq_method = cfg.method  # type: ignore[attr-defined]
    Pd, Qd = DistillTarget(P, heads=cfg.scope == "all"), DistillTarget(Q, heads=cfg.scope == "all")
    dcfg = dense_data_config(cfg.input_size)  # type: ignore[arg-type]
    timings["load_quantize_s"] = round(time.perf_counter() - t0, 3)

    calib_ckpt = ck / "calib.pt"
    state = peek_state(calib_ckpt) if plan.ptq == "kd" else None
    epochs_done = int(state["epoch"]) if state else 0
    if state is not None:
        Qd.load_state_dict(state["q_state"], strict=True)
        log.info("resuming: %d of %d calibration epochs done", epochs_done, plan.calib.epochs)
    R = plan.calib.refresh_every if plan.refresh else 0
    E = plan.calib.epochs
    cur_round = (min(epochs_done, max(E - 1, 0)) // R) if R else 0
    synth_log: dict[int, dict[str, Any]] = {}
    last: dict[str, Any] = {"images": None, "masks": None, "round": 0}

    def synth_round(r: int) -> torch.Tensor:
        path, meta_path = ck / f"synth_r{r:03d}.pt", ck / f"synth_r{r:03d}.json"
        t_r = time.perf_counter()
        if path.is_file():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            images, masks = obj["images"], obj["masks"]
        else:
            res: SynthResult = synthesize(
                P.backbone, Q.backbone if plan.synth_uses_q else None, plan.num_images, plan.synth, dcfg,
                seed=seeds["synth"], round=r, device=device, progress=progress,
                checkpoint_dir=ck / f"synth_r{r:03d}")
            images, masks = res.images, res.masks
            atomic_torch_save({"images": images, "masks": masks}, path)
            atomic_write_json(meta_path, {"round": r, "losses": res.losses,
                                          "timings": json.loads(json.dumps(res.timings, default=str))})
            shutil.rmtree(ck / f"synth_r{r:03d}", ignore_errors=True)
            for old in ck.glob("synth_r*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)
        if meta_path.is_file():
            with open(meta_path) as f:
                synth_log[r] = json.load(f)
        timings.setdefault("synthesis_s", {})[str(r)] = round(time.perf_counter() - t_r, 3)
        last.update(images=images, masks=masks, round=r)
        return images

    t0 = time.perf_counter()
    if plan.synth is not None:
        data = synth_round(cur_round)
    else:  # noise
        data = torch.randn((plan.num_images, *dcfg.input_size), generator=torch.Generator().manual_seed(seeds["noise"]))
        last.update(images=data)
    timings["data_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    calib_res = None
    if plan.ptq == "minmax":
        minmax_calibrate(Qd, TensorBatches(data, plan.calib.batch_size))
    else:
        calib_res = calibrate(Pd, Qd, data, plan.calib, seed=seeds["calib"], device=device, progress=progress,
                              checkpoint_path=calib_ckpt, refresh=synth_round if plan.refresh else None,
                              data_round=cur_round, data_config=dcfg,
                              distill=dense_distill(Qd, plan.calib.kd_temperature))
    timings["calibration_s"] = round(time.perf_counter() - t0, 3)
    Q.eval()

    t0 = time.perf_counter()
    state_path = out / "calibrated.pt"
    params = read_params(Q)
    params.meta.update({"model": cfg.model, "method": cfg.method, "quant": qcfg.to_json(), "seed": seed,
                        "preset": cfg.preset, "scope": cfg.scope})
    for meta in sorted(ck.glob("synth_r*.json")):
        with open(meta) as f:
            m = json.load(f)
        synth_log.setdefault(int(m["round"]), m)
    distilled = ("per-pixel KD on decode-head logits" if Qd.kind == "seg" else
                 "normalised FPN feature distillation" + (" + RPN/RoI-head outputs on fixed calibration RoIs"
                                                          if Qd.heads else ""))
    report = {
        "schema": RUN_SCHEMA, "config": cfg.to_json(), "plan": plan.to_json(), "task": cfg.task, "seed": seed,
        "seeds": seeds, "quant": qcfg.to_json(), "scope": cfg.scope, "distill": distilled,
        "data_config": dcfg.to_json(), "device": str(device), "resumed": bool(state is not None),
        "losses": {
            "synthesis": {str(r): m["losses"] for r, m in sorted(synth_log.items())},
            "calibration": None if calib_res is None else {"epochs": calib_res.epochs, "steps": calib_res.steps},
        },
        "timings": timings,
    }
    atomic_torch_save({
        "format": DENSE_CALIBRATED_FORMAT,
        "q_state": {k: v.detach().cpu() for k, v in Q.state_dict().items()},
        "p_state": {k: v.detach().cpu() for k, v in P.state_dict().items()},
        "run_config": cfg.to_json(),
        "data_config": dcfg.to_json(),
    }, state_path)
    params.save(out / "params.json")
    from maskaq.viz import save_loss_curves, save_sample_grid

    if last["images"] is not None:
        save_sample_grid(last["images"], out / "samples.png", mean=dcfg.mean, std=dcfg.std, masks=last["masks"],
                         title=f"{cfg.method} calibration samples ({cfg.model})")
    save_loss_curves(out / "losses.png", calib_steps=None if calib_res is None else calib_res.steps,
                     calib_epochs=None if calib_res is None else calib_res.epochs,
                     synth_rounds={r: m["losses"] for r, m in synth_log.items()},
                     title=f"{cfg.model} {qcfg.tag} {cfg.method}")
    timings["save_s"] = round(time.perf_counter() - t0, 3)
    timings["total_s"] = round(time.perf_counter() - t_all, 3)
    atomic_write_json(out / "run.json", report)
    log.info("dense run finished in %.1f s: %s", timings["total_s"], out)
    return DenseRunResult(Q, P, cfg, dcfg, report, state_path, out, calib_res)


def load_dense_calibrated(state_path: str | os.PathLike, device: str | torch.device = "cpu"
                          ) -> tuple[nn.Module, nn.Module, DenseRunConfig]:
    """``(Q, P, config)`` rebuilt from a dense ``calibrated.pt`` (no weights file needed)."""
    path = Path(state_path)
    if not path.is_file():
        raise DenseError(f"calibrated state {str(path)!r} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DenseError(f"cannot read calibrated state {str(path)!r} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != DENSE_CALIBRATED_FORMAT:
        raise DenseError(f"{str(path)!r} is not a maskaq dense calibrated state ({DENSE_CALIBRATED_FORMAT!r})")
    cfg = DenseRunConfig.from_json(obj["run_config"])
    P, _ = build_dense_model(cfg.model, random_weights=True)
    try:
        P.load_state_dict(obj["p_state"], strict=True)
        Q = quantize_dense(P, cfg.quant_config(), cfg.scope)
        Q.load_state_dict(obj["q_state"], strict=True)
    except RuntimeError as e:
        raise DenseError(f"calibrated state {str(path)!r} does not fit its model: {str(e).splitlines()[0]}") from None
    Q.maskaq_method = cfg.method  # type: ignore[attr-defined]
    return Q.to(device).eval(), P.to(device).eval(), cfg
