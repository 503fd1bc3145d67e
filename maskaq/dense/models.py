"""Whole dense models: Mask R-CNN (Swin + FPN) and UperNet (Swin), as containers whose
``state_dict`` keys follow mmdet / mmseg (``backbone.*``, ``neck.*``, ``rpn_head.*``,
``roi_head.bbox_head.*``, ``roi_head.mask_head.*``; ``decode_head.*``, ``auxiliary_head.*``),
plus the exportable parts (:class:`BackboneNeck`, :class:`RPNHeadPart`, :class:`UperNetFull`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .heads import ConvFCBBoxHead, FCNHead, FCNMaskHead, FPN, RPNHead, Shared2FCBBoxHead, UPerHead
from .swin import SwinBackbone, SwinConfig

__all__ = [
    "DetConfig", "SegConfig", "MaskRCNN", "UperNet", "BackboneNeck", "RPNHeadPart", "UperNetFull",
    "tiny_swin_config", "quantize_backbone", "CascadeDetConfig", "CascadeMaskRCNN",
]


def tiny_swin_config(**kw: Any) -> SwinConfig:
    """A small Swin for tests: 16 channels, depths (2, 2, 2, 2), window 7."""
    base = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
    base.update(kw)
    return SwinConfig(**base)


@dataclass(frozen=True)
class DetConfig:
    """Mask R-CNN Swin-T (mmdet ``mask_rcnn_swin_fpn``) by default."""

    swin: SwinConfig = SwinConfig()
    fpn_channels: int = 256
    num_outs: int = 5
    num_anchors: int = 3
    fc_dim: int = 1024
    mask_conv_dim: int = 256
    num_classes: int = 80

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SegConfig:
    """UperNet Swin-T (mmseg ``upernet_swin``) by default."""

    swin: SwinConfig = SwinConfig()
    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    num_classes: int = 150
    aux: bool = True
    aux_channels: int = 256
    aux_in_index: int = 2

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _RoIHead(nn.Module):
    def __init__(self, cfg: DetConfig) -> None:
        super().__init__()
        c = cfg.fpn_channels
        self.bbox_head = Shared2FCBBoxHead(c, 7, cfg.fc_dim, cfg.num_classes)
        self.mask_head = FCNMaskHead(c, cfg.mask_conv_dim, 4, cfg.num_classes)


class MaskRCNN(nn.Module):
    """Container with mmdet key layout. Inference glue (anchors, NMS, RoIAlign, paste) lives in
    ``runtime_eval.dense.detection``; this class only holds the layers with weights."""

    def __init__(self, cfg: DetConfig = DetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SwinBackbone(cfg.swin)
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels, cfg.num_outs)
        self.rpn_head = RPNHead(cfg.fpn_channels, cfg.num_anchors)
        self.roi_head = _RoIHead(cfg)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.backbone(x))


class UperNet(nn.Module):
    """Container with mmseg key layout. ``forward(x)`` = mmseg ``encode_decode``: decode-head
    logits bilinearly resized (align_corners=False) to the input size."""

    def __init__(self, cfg: SegConfig = SegConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SwinBackbone(cfg.swin)
        ch = self.backbone.out_channels
        self.decode_head = UPerHead(ch, cfg.channels, cfg.pool_scales, cfg.num_classes)
        self.auxiliary_head = (FCNHead(ch[cfg.aux_in_index], cfg.aux_channels, 1, cfg.num_classes, cfg.aux_in_index)
                               if cfg.aux else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decode_head(self.backbone(x))
        return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)


# --- exportable parts ------------------------------------------------------------------------

class BackboneNeck(nn.Module):
    """image [B,3,H,W] -> FPN maps p2..p6 (strides 4..64)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.backbone, self.neck = model.backbone, model.neck

    def forward(self, x: torch.Tensor):
        return tuple(self.neck(self.backbone(x)))


class RPNHeadPart(nn.Module):
    """(p2..p6) -> (cls_0..cls_4, reg_0..reg_4)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.rpn_head = model.rpn_head

    def forward(self, *feats: torch.Tensor):
        return tuple(self.rpn_head(list(feats)))


class UperNetFull(nn.Module):
    """image -> logits at the input size (the auxiliary head is training-only and left out)."""

    def __init__(self, model: UperNet) -> None:
        super().__init__()
        self.backbone, self.decode_head = model.backbone, model.decode_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decode_head(self.backbone(x))
        return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)


def quantize_backbone(model: nn.Module, config) -> nn.Module:
    """Q for a dense model: a deep copy whose ``backbone`` is ``maskaq.qmodel.quantize_model``'s
    fake-quantized Swin (every Linear, the patch-embedding conv weight, both attention matmuls);
    neck and heads stay FP. ``model`` (P) is not modified; P's backbone is prepared in place
    (its WindowAttention replaced by MaskAQAttention, same maths) so P and Q expose attention
    records to the synthesis losses."""
    from maskaq.qmodel import prepare_model, quantize_model

    prepare_model(model.backbone)
    q = copy.deepcopy(model)
    q.backbone = quantize_model(model.backbone, config)
    q.maskaq_quant_config = config  # type: ignore[attr-defined]
    return q


# --- Cascade Mask R-CNN ----------------------------------------------------------------------

@dataclass(frozen=True)
class CascadeDetConfig:
    """Cascade Mask R-CNN Swin-T as in Swin-Transformer-Object-Detection's
    ``cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco``:
    3 stages, each a ``ConvFCBBoxHead`` (4 shared conv3x3 256 + SyncBN + ReLU, 1 shared FC 1024)
    with ``reg_class_agnostic=False`` (that config overrides the base's ``True``: ``fc_reg`` has
    4K outputs) and an ``FCNMaskHead`` per stage. ``stage_target_stds`` are the stages'
    ``DeltaXYWHBBoxCoder`` stds (test-time decoding)."""

    swin: SwinConfig = SwinConfig()
    fpn_channels: int = 256
    num_outs: int = 5
    num_anchors: int = 3
    num_stages: int = 3
    bbox_conv_dim: int = 256
    num_shared_convs: int = 4
    num_shared_fcs: int = 1
    fc_dim: int = 1024
    reg_class_agnostic: bool = False
    mask_conv_dim: int = 256
    num_classes: int = 80
    stage_target_stds: tuple[tuple[float, float, float, float], ...] = (
        (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))

    def __post_init__(self) -> None:
        if len(self.stage_target_stds) != self.num_stages:
            raise ValueError(f"{self.num_stages} stages but {len(self.stage_target_stds)} stage_target_stds")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _CascadeRoIHead(nn.Module):
    """``roi_head.bbox_head.{i}`` and ``roi_head.mask_head.{i}`` (mmdet ``CascadeRoIHead``; the RoI
    extractors have no weights)."""

    def __init__(self, cfg: CascadeDetConfig) -> None:
        super().__init__()
        c = cfg.fpn_channels
        self.bbox_head = nn.ModuleList(
            ConvFCBBoxHead(c, 7, cfg.bbox_conv_dim, cfg.num_shared_convs, cfg.num_shared_fcs, cfg.fc_dim,
                           cfg.num_classes, cfg.reg_class_agnostic, norm=True)
            for _ in range(cfg.num_stages))
        self.mask_head = nn.ModuleList(FCNMaskHead(c, cfg.mask_conv_dim, 4, cfg.num_classes)
                                       for _ in range(cfg.num_stages))


class CascadeMaskRCNN(nn.Module):
    """Container with the mmdet 2.x Cascade Mask R-CNN key layout (``backbone.*``, ``neck.*``,
    ``rpn_head.*``, ``roi_head.bbox_head.{0,1,2}.*``, ``roi_head.mask_head.{0,1,2}.*``). The
    test-time cascade (refinement, score averaging, mask merging) is harness code
    (``runtime_eval.dense.detection.CascadeMaskRCNNPredictor``); :class:`BackboneNeck` and
    :class:`RPNHeadPart` accept this model as they accept :class:`MaskRCNN`."""

    def __init__(self, cfg: CascadeDetConfig = CascadeDetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SwinBackbone(cfg.swin)
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels, cfg.num_outs)
        self.rpn_head = RPNHead(cfg.fpn_channels, cfg.num_anchors)
        self.roi_head = _CascadeRoIHead(cfg)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.backbone(x))
