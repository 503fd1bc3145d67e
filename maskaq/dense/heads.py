"""Dense heads in plain PyTorch with the mmdet 2.x / mmseg parameter layout.

* Mask R-CNN (mmdet ``mask_rcnn_r50_fpn`` heads as used with Swin): :class:`FPN`,
  :class:`RPNHead`, :class:`Shared2FCBBoxHead`, :class:`FCNMaskHead`.
* Cascade Mask R-CNN (Swin-Transformer-Object-Detection ``..._giou_4conv1f_...``): the stage box
  head :class:`ConvFCBBoxHead` (4 shared conv3x3 + BN + ReLU, 1 shared FC) and, per stage, the
  same :class:`FCNMaskHead`.
* UperNet (mmseg): :class:`UPerHead` (PPM with the adaptive-average-pooling bins written out, FPN
  fusion) and the auxiliary :class:`FCNHead`.

Only layers with weights live here; anchors, box decoding, NMS, RoIAlign and mask pasting are
FP32 harness code (``runtime_eval/dense``), so each head is one exportable function of tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvModule", "FPN", "RPNHead", "Shared2FCBBoxHead", "ConvFCBBoxHead", "FCNMaskHead",
    "adaptive_bins", "ExplicitAdaptiveAvgPool2d", "UPerHead", "FCNHead",
]


class ConvModule(nn.Module):
    """mmcv ``ConvModule``: ``conv`` (+ ``bn``) (+ ReLU); conv has a bias only without norm."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0, norm: bool = False, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.act else x


# --- Mask R-CNN ------------------------------------------------------------------------------

class FPN(nn.Module):
    """mmdet FPN: 1x1 laterals, nearest top-down, 3x3 outputs, extra levels by max-pool(1, 2)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, 1, act=False) for _ in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        outs = [conv(l) for conv, l in zip(self.fpn_convs, lat)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then ``rpn_cls`` (A sigmoid logits) and ``rpn_reg`` (4A deltas),
    applied to every level. Returns ``[cls_0..cls_L-1, reg_0..reg_L-1]``."""

    def __init__(self, channels: int = 256, num_anchors: int = 3) -> None:
        super().__init__()
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        cls, reg = [], []
        for f in feats:
            h = F.relu(self.rpn_conv(f))
            cls.append(self.rpn_cls(h))
            reg.append(self.rpn_reg(h))
        return cls + reg


class Shared2FCBBoxHead(nn.Module):
    """RoI features [N, C, 7, 7] -> (class logits [N, K+1] (background last), deltas [N, 4K])."""

    def __init__(self, in_channels: int = 256, roi_size: int = 7, fc_dim: int = 1024, num_classes: int = 80) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_size * roi_size, fc_dim), nn.Linear(fc_dim, fc_dim)])
        self.fc_cls = nn.Linear(fc_dim, num_classes + 1)
        self.fc_reg = nn.Linear(fc_dim, 4 * num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class ConvFCBBoxHead(nn.Module):
    """mmdet 2.x ``ConvFCBBoxHead`` with shared branches only (``num_cls_*``/``num_reg_*`` = 0,
    no average pooling), as the Cascade Mask R-CNN Swin ``4conv1f`` config builds it:
    ``shared_convs.{i}`` = ConvModule(3x3, padding 1, ``norm_cfg`` BN -> conv without bias,
    keys ``.conv`` / ``.bn``) + ReLU, flatten, ``shared_fcs.{j}`` Linear + ReLU, then ``fc_cls``
    (K+1, background last) and ``fc_reg`` (4 if ``reg_class_agnostic`` else 4K).

    RoI features [N, C, 7, 7] -> (class logits [N, K+1], deltas [N, 4] or [N, 4K])."""

    def __init__(self, in_channels: int = 256, roi_size: int = 7, conv_dim: int = 256, num_shared_convs: int = 4,
                 num_shared_fcs: int = 1, fc_dim: int = 1024, num_classes: int = 80,
                 reg_class_agnostic: bool = False, norm: bool = True) -> None:
        super().__init__()
        if num_shared_fcs < 1:
            raise ValueError("ConvFCBBoxHead here needs at least one shared FC")
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        self.shared_convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_dim, conv_dim, 3, 1, norm=norm) for i in range(num_shared_convs))
        flat = (conv_dim if num_shared_convs else in_channels) * roi_size * roi_size
        self.shared_fcs = nn.ModuleList(nn.Linear(flat if j == 0 else fc_dim, fc_dim) for j in range(num_shared_fcs))
        self.fc_cls = nn.Linear(fc_dim, num_classes + 1)
        self.fc_reg = nn.Linear(fc_dim, 4 if reg_class_agnostic else 4 * num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """RoI features [N, C, 14, 14] -> mask logits [N, K, 28, 28] (4 conv3x3, deconv x2, 1x1)."""

    def __init__(self, in_channels: int = 256, conv_dim: int = 256, num_convs: int = 4, num_classes: int = 80) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_dim, conv_dim, 3, 1) for i in range(num_convs))
        self.upsample = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = c(x)
        return self.conv_logits(F.relu(self.upsample(x)))


# --- UperNet ---------------------------------------------------------------------------------

def adaptive_bins(n: int, out: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges AdaptiveAvgPool uses: floor(i*n/out), ceil((i+1)*n/out)."""
    return [((i * n) // out, -(-((i + 1) * n) // out)) for i in range(out)]


class ExplicitAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(out)`` written as explicit slice means, so it exports at any size
    (the input spatial size is fixed at export)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = int(x.shape[-2]), int(x.shape[-1])
        rows = []
        for h0, h1 in adaptive_bins(H, self.out):
            cols = [x[:, :, h0:h1, w0:w1].mean(dim=(2, 3), keepdim=True) for w0, w1 in adaptive_bins(W, self.out)]
            rows.append(torch.cat(cols, dim=3))
        return torch.cat(rows, dim=2)


class _PPMBranch(nn.Sequential):
    """``Sequential(pool, ConvModule)``: keys ``psp_modules.{i}.1.conv/bn`` as in mmseg."""

    def __init__(self, scale: int, cin: int, ch: int) -> None:
        super().__init__(ExplicitAdaptiveAvgPool2d(scale), ConvModule(cin, ch, 1, norm=True))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """mmseg ``UPerHead`` (align_corners=False): PPM on the last level, FPN fusion, 3x3
    bottleneck, ``conv_seg``. Returns logits at stride 4."""

    def __init__(self, in_channels: Sequence[int] = (96, 192, 384, 768), channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), num_classes: int = 150) -> None:
        super().__init__()
        self.psp_modules = nn.ModuleList(_PPMBranch(s, in_channels[-1], channels) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, 1, norm=True)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm=True) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, 1, norm=True) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, 1, norm=True)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [_up(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        lat.append(self.psp_forward(feats[-1]))
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[2:])
        outs = [self.fpn_convs[i](lat[i]) for i in range(len(lat) - 1)] + [lat[-1]]
        for i in range(len(outs) - 1, 0, -1):
            outs[i] = _up(outs[i], outs[0].shape[2:])
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """mmseg auxiliary ``FCNHead`` (num_convs=1, concat_input=False) on ``feats[in_index]``."""

    def __init__(self, in_channels: int = 384, channels: int = 256, num_convs: int = 1, num_classes: int = 150,
                 in_index: int = 2) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, 1, norm=True)
                                     for i in range(num_convs)])
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.convs(feats[self.in_index]))
