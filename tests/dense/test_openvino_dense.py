"""A dense export (tiny Mask R-CNN, every part a separate graph) scores the same COCO AP through
maskaq-eval in OpenVINO as in ONNX Runtime: the sibling parts are compiled like the backbone."""
from __future__ import annotations

import pytest
import torch
from dense_helpers import CANVAS, IMG_SCALE, SWIN, K, coco_fixture

from export.dense_export import DET_TEST_CFG, export_mask_rcnn
from maskaq.dense.models import DetConfig, MaskRCNN

pytest.importorskip("openvino")
pytest.importorskip("pycocotools")


def test_mask_rcnn_coco_same_ap_in_openvino(tmp_path):
    from runtime_eval import evaluate

    torch.manual_seed(0)
    m = MaskRCNN(DetConfig(swin=SWIN, fpn_channels=32, fc_dim=64, mask_conv_dim=32, num_classes=K)).eval()
    out = tmp_path / "det"
    out.mkdir()
    export_mask_rcnn(m, out, CANVAS, extra={"test_cfg": dict(DET_TEST_CFG, img_scale=IMG_SCALE)}, optimize=False)
    coco_fixture(tmp_path / "coco")
    reps = {rt: evaluate(out, "coco", tmp_path / "coco", runtime=rt, workers=1,
                         **({"providers": ["cpu"]} if rt == "ort" else {})) for rt in ("ort", "openvino")}
    for key in ("bbox", "segm"):
        assert reps["openvino"]["metrics"][key]["AP"] == pytest.approx(reps["ort"]["metrics"][key]["AP"], abs=1e-6)
    assert reps["openvino"]["runtime"]["providers_used"] == ["OpenVINO:CPU"]
    assert reps["openvino"]["runtime"]["kernels"]["compute"]  # the backbone's layers, read after the run
