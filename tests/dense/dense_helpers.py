"""Tiny dense models, their exports and 2-image COCO / ADE20K fixtures shared by tests/dense."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.dense_export import DET_TEST_CFG, SEG_TEST_CFG, cascade_test_cfg, export_cascade_mask_rcnn, \
    export_mask_rcnn, export_upernet
from maskaq.dense.models import CascadeDetConfig, CascadeMaskRCNN, DetConfig, MaskRCNN, SegConfig, UperNet, \
    tiny_swin_config

K = 5  # classes of the tiny detectors = categories of coco_fixture
CANVAS = (96, 96)  # fits the landscape and portrait fixture images resized to IMG_SCALE
IMG_SCALE = [96, 64]
SWIN = tiny_swin_config(depths=(2, 1, 1, 1))  # shifted windows in stage 0, padding everywhere
# ade_fixture's 20x16 images resize to 80x64 with SEG_IMG_SCALE.
SEG_CANVAS = (64, 96)
SEG_IMG_SCALE = [96, 64]


def randomise(model):
    """Non-trivial BN statistics and perturbed weights (a fresh init has identity BN)."""
    with torch.no_grad():
        for n, b in model.named_buffers():
            if "running_mean" in n:
                b.normal_(0, 0.1)
            elif "running_var" in n:
                b.uniform_(0.5, 2.0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def tiny_cascade(agnostic: bool = False, seed: int = 0) -> CascadeMaskRCNN:
    torch.manual_seed(seed)
    return CascadeMaskRCNN(CascadeDetConfig(swin=SWIN, fpn_channels=32, bbox_conv_dim=16, fc_dim=64,
                                            mask_conv_dim=16, num_classes=K, reg_class_agnostic=agnostic)).eval()


def tiny_mask_rcnn(seed: int = 0) -> MaskRCNN:
    torch.manual_seed(seed)
    return MaskRCNN(DetConfig(swin=SWIN, fpn_channels=32, fc_dim=64, mask_conv_dim=16, num_classes=K)).eval()


def tiny_upernet(seed: int = 0, num_classes: int = 150) -> UperNet:
    torch.manual_seed(seed)
    return UperNet(SegConfig(swin=SWIN, channels=16, aux_channels=8, num_classes=num_classes)).eval()


def export_cascade(model: CascadeMaskRCNN, out: Path):
    return export_cascade_mask_rcnn(model, out, CANVAS, extra={"test_cfg": dict(cascade_test_cfg(model.cfg),
                                                                                 img_scale=IMG_SCALE)},
                                    optimize=False)


def export_det(model: MaskRCNN, out: Path):
    return export_mask_rcnn(model, out, CANVAS, extra={"test_cfg": dict(DET_TEST_CFG, img_scale=IMG_SCALE)},
                            optimize=False)


def export_seg(model: UperNet, path: Path) -> Path:
    return export_upernet(model, path, SEG_CANVAS, extra={"test_cfg": dict(SEG_TEST_CFG, img_scale=SEG_IMG_SCALE,
                                                                           stride=[32, 32])}, optimize=False)


def coco_fixture(root: Path) -> Path:
    """2 images (one landscape, one portrait), 5 categories with non-contiguous ids."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (h, w) in enumerate([(40, 56), (50, 30)], start=1):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2017" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w})
        anns.append({"id": i, "image_id": i, "category_id": [1, 3][i - 1], "bbox": [2, 3, 20, 15], "area": 300,
                     "iscrowd": 0, "segmentation": [[2, 3, 22, 3, 22, 18, 2, 18]]})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 5, 7)]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root
