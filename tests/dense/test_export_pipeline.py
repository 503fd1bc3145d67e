"""Export every dense part (dynamo), torch-vs-ORT parity, and the numpy harness end to end on
2-image COCO and ADE20K fixtures with tiny random models."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export.dense_export import DET_TEST_CFG, SEG_TEST_CFG, export_mask_rcnn, export_part, export_upernet
from maskaq.dense.models import (BackboneNeck, DetConfig, MaskRCNN, SegConfig, UperNet, quantize_backbone,
                                 tiny_swin_config)

CANVAS = (128, 128)
SWIN = tiny_swin_config(depths=(2, 1, 1, 1))  # shifted windows in stage 0, padding everywhere
K = 5


def _sess(p):
    return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    torch.manual_seed(0)
    m = MaskRCNN(DetConfig(swin=SWIN, fpn_channels=32, fc_dim=64, mask_conv_dim=32, num_classes=K)).eval()
    out = tmp_path_factory.mktemp("det")
    paths = export_mask_rcnn(m, out, CANVAS, extra={"test_cfg": dict(DET_TEST_CFG, img_scale=[128, 64])},
                             optimize=False)
    return m, out, paths


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    torch.manual_seed(1)
    m = UperNet(SegConfig(swin=SWIN, channels=32, aux_channels=16, num_classes=7)).eval()
    p = tmp_path_factory.mktemp("seg") / "upernet.onnx"
    export_upernet(m, p, (64, 96), extra={"test_cfg": dict(SEG_TEST_CFG, img_scale=[96, 64], stride=[40, 40])}, optimize=False)
    return m, p


@torch.no_grad()
def test_detection_parts_parity(det):
    m, _, paths = det
    x = torch.randn(1, 3, *CANVAS)
    feats = m.features(x)
    ort_feats = _sess(paths["backbone_neck"]).run(None, {"input": x.numpy()})
    assert len(ort_feats) == 5
    for a, b in zip(ort_feats, feats):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    rpn = _sess(paths["rpn_head"]).run(None, {f"p{i + 2}": f.numpy() for i, f in enumerate(feats)})
    for a, b in zip(rpn, m.rpn_head(feats)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    for n in (1, 9):  # dynamic number of RoIs
        r = torch.randn(n, 32, 7, 7)
        for a, b in zip(_sess(paths["bbox_head"]).run(None, {"rois": r.numpy()}), m.roi_head.bbox_head(r)):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
        r = torch.randn(n, 32, 14, 14)
        np.testing.assert_allclose(_sess(paths["mask_head"]).run(None, {"rois": r.numpy()})[0],
                                   m.roi_head.mask_head(r).numpy(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_upernet_parity(seg):
    m, p = seg
    x = torch.randn(1, 3, 64, 96)
    out = _sess(p).run(None, {"input": x.numpy()})[0]
    assert out.shape == (1, 7, 64, 96)
    np.testing.assert_allclose(out, m(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # ~40 s on 2 busy cores: run with -m slow
@torch.no_grad()
def test_quantized_backbone_exports_qdq(det, tmp_path):
    from maskaq.qmodel import QuantConfig

    m, _, _ = det
    Q = quantize_backbone(m, QuantConfig.parse("8w8a"))
    x = torch.randn(1, 3, *CANVAS)
    Q.features(x)  # initialise the activation quantizers
    p = export_part(BackboneNeck(Q), (x,), tmp_path / "q.onnx", input_names=["input"],
                    output_names=[f"p{i}" for i in range(2, 7)], optimize=False)
    import onnx

    ops_ = {n.op_type for n in onnx.load(str(p)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops_
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    for a, b in zip(got, Q.features(x)):
        b = b.numpy()
        # fake-quant is chaotic at rounding ties: most values agree to float precision
        assert np.mean(np.abs(a - b) <= 1e-3 * (1 + np.abs(b))) > 0.95
        assert np.abs(a - b).mean() < 0.05 * np.abs(b).mean() + 1e-6


def _coco_fixture(root):
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


def test_detection_pipeline_end_to_end(det, tmp_path):
    from runtime_eval.coco import coco_dataset, evaluate_detection
    from runtime_eval.dense import MaskRCNNPredictor

    _, out, _ = det
    _coco_fixture(tmp_path)
    ds = coco_dataset(tmp_path)
    pred = MaskRCNNPredictor(out)
    for i in range(len(ds)):
        img = ds.image(i)
        d = pred(img, ds.info(i))
        W, H = img.size
        n = d.boxes.shape[0]
        assert 0 < n <= 100 and d.masks.shape == (n, H, W) and d.masks.dtype == bool
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= W + 1e-6).all() and (d.boxes[:, 3] <= H + 1e-6).all()
        assert (d.boxes[:, 2] >= d.boxes[:, 0]).all() and ((d.scores > 0.05) & (d.scores <= 1)).all()
        assert d.labels.min() >= 0 and d.labels.max() < K and np.all(np.diff(d.scores) <= 0)
    res = evaluate_detection(pred, ds)
    assert set(res) >= {"bbox", "segm"} and res["images"] == 2


def test_segmentation_pipeline_end_to_end(seg, tmp_path):
    from runtime_eval.ade20k import ade20k_dataset, evaluate_segmentation
    from runtime_eval.dense import UperNetPredictor

    _, p = seg
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 64), (70, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / "validation" / f"a{i}.jpg")
        Image.fromarray(rng.integers(0, 8, (h, w), dtype=np.uint8)).save(root / "annotations" / "validation" / f"a{i}.png")
    ds = ade20k_dataset(tmp_path)
    for mode, idx in (("whole", [0]), ("slide", [0, 1])):  # image 1 resizes to 96x55: too big for "whole"
        pred = UperNetPredictor(p, mode=mode)
        lab = pred(ds.image(0))
        assert lab.shape == (48, 64) and lab.min() >= 0 and lab.max() < 7
        res = evaluate_segmentation(pred, ds, indices=idx, num_classes=7)
        assert res["images"] == len(idx) and 0 <= res["aAcc"] <= 100
    from runtime_eval.errors import EvalError

    with pytest.raises(EvalError, match="canvas"):
        UperNetPredictor(p, mode="whole")(ds.image(1))
    # whole mode with a canvas equal to the resized size is the model itself
    img = np.asarray(ds.image(0).convert("RGB"))
    from runtime_eval.dense.segmentation import preprocess_segmentation

    x = preprocess_segmentation(img, UperNetPredictor(p).meta)
    assert x.shape == (3, 64, 85)
