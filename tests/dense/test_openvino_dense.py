"""A dense export (tiny Mask R-CNN, every part a separate graph) scores the same COCO AP through
maskaq-eval in OpenVINO as in ONNX Runtime: the sibling parts are compiled like the backbone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dense_helpers import CANVAS, IMG_SCALE, SWIN, K, coco_fixture

from export.dense_export import DET_TEST_CFG, export_mask_rcnn
from maskaq.dense.models import DetConfig, MaskRCNN

ROOT = Path(__file__).resolve().parents[2]

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
    reps = {"ort": evaluate(out, "coco", tmp_path / "coco", runtime="ort", workers=1, providers=["cpu"])}
    # OpenVINO in a child process, as a user runs maskaq-eval: with this many compiled parts in the
    # pytest process, a later in-process torch synthesis (tests/test_robustness.py) crashed with
    # SIGSEGV (OpenVINO's CPU-plugin threads beside torch's; reproduced with only these two files)
    rep = tmp_path / "ov.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "runtime_eval.cli", str(out), "--task", "coco", "--data",
                        str(tmp_path / "coco"), "--runtime", "openvino", "--workers", "1", "-q", "-o", str(rep)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    reps["openvino"] = json.loads(rep.read_text())
    for key in ("bbox", "segm"):
        assert reps["openvino"]["metrics"][key]["AP"] == pytest.approx(reps["ort"]["metrics"][key]["AP"], abs=1e-6)
    assert reps["openvino"]["runtime"]["providers_used"] == ["OpenVINO:CPU"]
    assert reps["openvino"]["runtime"]["kernels"]["compute"]  # the backbone's layers, read after the run
