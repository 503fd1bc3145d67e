"""Test-time settings and preprocessing of the dense models (mmdet 2.x / mmseg), shared by the
library (:mod:`maskaq.dense.quantize`), the exporter (:mod:`export.dense_export`, which writes them
into each graph's ``maskaq.dense`` metadata) and nothing else."""
from __future__ import annotations

from typing import Any

__all__ = ["DET_PARTS", "CASCADE_PARTS", "MEAN_255", "STD_255", "DET_TEST_CFG", "SEG_TEST_CFG", "cascade_test_cfg"]

DET_PARTS = ("backbone_neck", "rpn_head", "bbox_head", "mask_head")
MEAN_255 = [123.675, 116.28, 103.53]
STD_255 = [58.395, 57.12, 57.375]
# mmdet 2.x Mask R-CNN test settings (mask_rcnn_r50_fpn.py) and the COCO test pipeline.
DET_TEST_CFG: dict[str, Any] = {
    "img_scale": [1333, 800], "size_divisor": 32,
    "anchor_scales": [8], "anchor_ratios": [0.5, 1.0, 2.0], "anchor_strides": [4, 8, 16, 32, 64],
    "rpn": {"nms_pre": 1000, "max_per_img": 1000, "iou_threshold": 0.7, "min_bbox_size": 0},
    "rpn_target_stds": [1.0, 1.0, 1.0, 1.0], "rcnn_target_stds": [0.1, 0.1, 0.2, 0.2],
    "roi_strides": [4, 8, 16, 32], "finest_scale": 56, "bbox_roi_size": 7, "mask_roi_size": 14,
    "rcnn": {"score_thr": 0.05, "iou_threshold": 0.5, "max_per_img": 100, "mask_thr_binary": 0.5},
}
# mmseg UperNet Swin ADE20K test settings.
SEG_TEST_CFG: dict[str, Any] = {"img_scale": [2048, 512], "mode": "whole", "crop_size": [512, 512],
                                "stride": [341, 341]}

CASCADE_PARTS = ("backbone_neck", "rpn_head", "bbox_head_{i}", "mask_head_{i}")


def cascade_test_cfg(cfg) -> dict[str, Any]:
    """mmdet 2.x ``CascadeRoIHead.simple_test`` settings: the Mask R-CNN RPN/RCNN test cfg plus the
    per-stage box-coder stds and whether regression is class-agnostic."""
    return dict(DET_TEST_CFG, num_stages=cfg.num_stages,
                stage_target_stds=[list(s) for s in cfg.stage_target_stds],
                reg_class_agnostic=bool(cfg.reg_class_agnostic))
