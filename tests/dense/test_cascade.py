"""Cascade Mask R-CNN (Swin-T, ``..._giou_4conv1f_...`` layout): head layout and strict checkpoint
loading, part-wise export parity, and the numpy cascade (``CascadeMaskRCNNPredictor``) against a
torch/torchvision re-implementation of mmdet 2.x ``CascadeRoIHead.simple_test``."""
from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tvo

from maskaq.dense.checkpoint import CheckpointError, load_dense_checkpoint
from maskaq.dense.heads import ConvFCBBoxHead
from maskaq.dense.models import CascadeDetConfig, CascadeMaskRCNN, DetConfig, MaskRCNN

from dense_helpers import CANVAS, K, SWIN, coco_fixture, randomise as _randomise, tiny_cascade


def _official_checkpoint(model):
    sd = dict(model.state_dict())
    for n, b in model.named_buffers():
        if n.endswith("relative_position_index"):
            sd[n] = b.clone()
    return {"meta": {"mmdet_version": "2.11.0"}, "state_dict": sd}


def _mmdet_roi_head_keys(stages=3, convs=4, fcs=1, mask_convs=4):
    """The roi_head keys mmdet 2.x builds for CascadeRoIHead with ConvFCBBoxHead(num_shared_convs=4,
    num_shared_fcs=1, norm_cfg=SyncBN) and FCNMaskHead(num_convs=4): ConvModule with a norm has no
    conv bias, its norm is registered as ``bn``; empty cls/reg branches have no parameters."""
    keys = set()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for s in range(stages):
        b = f"roi_head.bbox_head.{s}."
        for i in range(convs):
            keys.add(f"{b}shared_convs.{i}.conv.weight")
            keys.update(f"{b}shared_convs.{i}.bn.{k}" for k in bn)
        for j in range(fcs):
            keys.update({f"{b}shared_fcs.{j}.weight", f"{b}shared_fcs.{j}.bias"})
        keys.update(f"{b}{n}.{k}" for n in ("fc_cls", "fc_reg") for k in ("weight", "bias"))
        m = f"roi_head.mask_head.{s}."
        for i in range(mask_convs):
            keys.update({f"{m}convs.{i}.conv.weight", f"{m}convs.{i}.conv.bias"})
        keys.update(f"{m}{n}.{k}" for n in ("upsample", "conv_logits") for k in ("weight", "bias"))
    return keys


def test_full_size_cascade_layout():
    with torch.device("meta"):
        sd = CascadeMaskRCNN().state_dict()
    assert {k for k in sd if k.startswith("roi_head.")} == _mmdet_roi_head_keys()
    assert sd["roi_head.bbox_head.0.shared_convs.0.conv.weight"].shape == (256, 256, 3, 3)
    assert sd["roi_head.bbox_head.2.shared_convs.3.bn.running_var"].shape == (256,)
    assert sd["roi_head.bbox_head.1.shared_fcs.0.weight"].shape == (1024, 256 * 49)
    assert sd["roi_head.bbox_head.2.fc_cls.weight"].shape == (81, 1024)
    assert sd["roi_head.bbox_head.0.fc_reg.weight"].shape == (320, 1024)  # reg_class_agnostic=False
    assert sd["roi_head.mask_head.2.conv_logits.weight"].shape == (80, 256, 1, 1)
    assert sd["roi_head.mask_head.1.upsample.weight"].shape == (256, 256, 2, 2)
    with torch.device("meta"):
        ag = CascadeMaskRCNN(CascadeDetConfig(reg_class_agnostic=True)).state_dict()
    assert ag["roi_head.bbox_head.0.fc_reg.weight"].shape == (4, 1024)
    with pytest.raises(ValueError, match="stage_target_stds"):
        CascadeDetConfig(num_stages=2)


@torch.no_grad()
def test_conv_fc_bbox_head_forward():
    h = _randomise(ConvFCBBoxHead(8, 7, 6, 4, 1, 10, 3)).eval()
    x = torch.randn(5, 8, 7, 7)
    y = x
    for m in h.shared_convs:  # conv (no bias) -> BN (running stats) -> ReLU
        assert m.conv.bias is None
        y = F.conv2d(y, m.conv.weight, padding=1)
        y = F.batch_norm(y, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.0, m.bn.eps)
        y = F.relu(y)
    y = F.relu(F.linear(y.flatten(1), h.shared_fcs[0].weight, h.shared_fcs[0].bias))
    cls, reg = h(x)
    assert cls.shape == (5, 4) and reg.shape == (5, 12)
    torch.testing.assert_close(cls, F.linear(y, h.fc_cls.weight, h.fc_cls.bias))
    torch.testing.assert_close(reg, F.linear(y, h.fc_reg.weight, h.fc_reg.bias))


@torch.no_grad()
def test_cascade_checkpoint_strict_roundtrip(tmp_path):
    src = _randomise(tiny_cascade())
    ck = _official_checkpoint(src)
    path = tmp_path / "cascade.pth"
    torch.save(ck, path)
    dst = load_dense_checkpoint(tiny_cascade(seed=1), path)
    x = torch.randn(1, 3, *CANVAS)
    for a, b in zip(src.features(x), dst.features(x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    r = torch.randn(3, 32, 7, 7)
    m = torch.randn(3, 32, 14, 14)
    for s in range(3):
        for a, b in zip(src.roi_head.bbox_head[s](r), dst.roi_head.bbox_head[s](r)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(src.roi_head.mask_head[s](m), dst.roi_head.mask_head[s](m), atol=0, rtol=0)
    # "module." prefixes (DDP-saved) are accepted
    load_dense_checkpoint(tiny_cascade(), {"state_dict": {"module." + k: v for k, v in ck["state_dict"].items()}})


def test_cascade_checkpoint_errors_are_loud():
    sd = _official_checkpoint(tiny_cascade())["state_dict"]
    k = "roi_head.bbox_head.2.shared_convs.3.bn.running_var"
    with pytest.raises(CheckpointError, match="missing.*shared_convs.3.bn.running_var"):
        load_dense_checkpoint(tiny_cascade(), {"state_dict": {a: b for a, b in sd.items() if a != k}})
    extra = dict(sd, **{"roi_head.bbox_head.1.shared_convs.0.conv.bias": torch.zeros(16)})
    with pytest.raises(CheckpointError, match="match nothing.*shared_convs.0.conv.bias"):
        load_dense_checkpoint(tiny_cascade(), {"state_dict": extra})
    with pytest.raises(CheckpointError, match="fc_reg.weight"):  # class-agnostic checkpoint, class-specific model
        load_dense_checkpoint(tiny_cascade(), {"state_dict": tiny_cascade(agnostic=True).state_dict()})
    det = MaskRCNN(DetConfig(swin=SWIN, fpn_channels=32, fc_dim=64, mask_conv_dim=16, num_classes=K))
    with pytest.raises(CheckpointError, match="load it into CascadeMaskRCNN"):
        load_dense_checkpoint(det, {"state_dict": sd})
    with pytest.raises(CheckpointError, match="single-stage roi_head"):
        load_dense_checkpoint(tiny_cascade(), {"state_dict": det.state_dict()})


# --- export + harness --------------------------------------------------------------------------

def _sess(p):
    return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])


@torch.no_grad()
def test_cascade_export_parts_parity(cascade_export):
    exported = cascade_export
    m, out, paths = exported
    assert sorted(paths) == sorted(["backbone_neck", "rpn_head"] + [f"{h}_{i}" for h in ("bbox_head", "mask_head")
                                                                  for i in range(3)])
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(paths["bbox_head_1"])).metadata_props}
    assert meta["maskaq.task"] == "coco_instance_cascade"
    dense = json.loads(meta["maskaq.dense"])
    assert dense["part"] == "bbox_head_1" and dense["num_stages"] == 3
    assert dense["test_cfg"]["stage_target_stds"] == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                                                      [0.033, 0.033, 0.067, 0.067]]
    assert dense["test_cfg"]["reg_class_agnostic"] is False and dense["test_cfg"]["rcnn"]["score_thr"] == 0.05
    x = torch.randn(1, 3, *CANVAS)
    for a, b in zip(_sess(paths["backbone_neck"]).run(None, {"input": x.numpy()}), m.features(x)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    for s in range(3):
        for n in (1, 7):
            r = torch.randn(n, 32, 7, 7)
            got = _sess(paths[f"bbox_head_{s}"]).run(None, {"rois": r.numpy()})
            assert got[0].shape == (n, K + 1) and got[1].shape == (n, 4 * K)
            for a, b in zip(got, m.roi_head.bbox_head[s](r)):
                np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
            r = torch.randn(n, 32, 14, 14)
            np.testing.assert_allclose(_sess(paths[f"mask_head_{s}"]).run(None, {"rois": r.numpy()})[0],
                                       m.roi_head.mask_head[s](r).numpy(), atol=1e-4, rtol=1e-4)


# torch / torchvision re-implementation of the mmdet 2.x test path, for the comparison

def _t_decode(rois, deltas, stds, max_shape):
    """mmdet 2.x delta2bbox (means 0), rois [N, 4], deltas [N, 4k] -> [N, 4k], clipped."""
    d = deltas.reshape(deltas.shape[0], -1, 4) * torch.tensor(stds, dtype=deltas.dtype)
    clip = abs(math.log(16 / 1000))
    dw, dh = d[..., 2].clamp(-clip, clip), d[..., 3].clamp(-clip, clip)
    px, py = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None], ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw, ph = (rois[:, 2] - rois[:, 0])[:, None], (rois[:, 3] - rois[:, 1])[:, None]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
    H, W = max_shape
    x1, x2 = (gx - gw * 0.5).clamp(0, W), (gx + gw * 0.5).clamp(0, W)
    y1, y2 = (gy - gh * 0.5).clamp(0, H), (gy + gh * 0.5).clamp(0, H)
    return torch.stack([x1, y1, x2, y2], -1).reshape(deltas.shape[0], -1)


def _t_roi_feats(feats, rois, size, strides=(4, 8, 16, 32)):
    scale = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).sqrt()
    lvl = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, len(strides) - 1).long()
    out = torch.zeros(rois.shape[0], feats[0].shape[1], size, size)
    for i, s in enumerate(strides):
        idx = (lvl == i).nonzero().flatten()
        if idx.numel():
            out[idx] = tvo.roi_align(feats[i], [rois[idx].float()], size, 1.0 / s, 0, aligned=True)
    return out


@torch.no_grad()
def _t_cascade_detect(m, feats, props, info, cfg, refine=True):
    stds = cfg["stage_target_stds"]
    rois = torch.from_numpy(props[:, :4]).double()
    ms = []
    for s in range(3):
        cls, reg = m.roi_head.bbox_head[s](_t_roi_feats(feats, rois, 7))
        ms.append(cls.double())
        if s < 2 and refine:  # regress_by_class with the argmax non-background label
            lab = cls[:, :-1].argmax(1)
            d = reg
            if reg.shape[1] != 4:
                d = torch.gather(reg, 1, torch.stack([lab * 4, lab * 4 + 1, lab * 4 + 2, lab * 4 + 3], 1))
            rois = _t_decode(rois, d.double(), stds[s], info["img_shape"])
    scores = F.softmax(sum(ms) / 3.0, dim=-1)  # mmdet averages the raw cls_score
    boxes = _t_decode(rois, reg.double(), stds[2], info["img_shape"])
    boxes = boxes[:, None, :].expand(-1, K, 4) if boxes.shape[1] == 4 else boxes.reshape(-1, K, 4)
    boxes = (boxes / torch.from_numpy(info["scale_factor"])).reshape(-1, 4)
    sc = scores[:, :K].reshape(-1)
    labels = torch.arange(K).repeat(rois.shape[0])
    ok = sc > cfg["rcnn"]["score_thr"]
    boxes, sc, labels = boxes[ok], sc[ok], labels[ok]
    keep = tvo.batched_nms(boxes, sc, labels, cfg["rcnn"]["iou_threshold"])[:100]
    return boxes[keep].numpy(), sc[keep].numpy(), labels[keep].numpy()


class _TorchSession:
    """A RoI head as a session (``run(None, {"rois": x})``), to run heads the export lacks."""

    def __init__(self, module):
        self.module = module

    @torch.no_grad()
    def run(self, _, feeds):
        out = self.module(torch.from_numpy(feeds["rois"]))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("agnostic", [False, True], ids=["class-specific", "class-agnostic"])
def test_cascade_predictor_matches_mmdet_simple_test(cascade_export, agnostic):
    exported = cascade_export
    from runtime_eval.dense import CascadeMaskRCNNPredictor, preprocess_detection

    m, out, _ = exported
    factory = None
    if agnostic:  # reg_class_agnostic=True (the base cascade config): same backbone, 4-delta box heads
        m = _randomise(tiny_cascade(agnostic=True, seed=2))
        m.load_state_dict({k: v for k, v in exported[0].state_dict().items() if not k.startswith("roi_head.")},
                          strict=False)

        def factory(p):
            stage = p.stem.rsplit("_", 1)
            if p.stem.startswith(("bbox_head_", "mask_head_")):
                return _TorchSession(getattr(m.roi_head, stage[0])[int(stage[1])])
            return _sess(p)
    pred = CascadeMaskRCNNPredictor(out, session_factory=factory)
    img = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x, info = preprocess_detection(img, pred.meta)
    g, feats, cls, reg = pred.features(x)
    props = pred.proposals(cls, reg, info["img_shape"])
    assert props.shape[0] > 20
    boxes, scores, labels = pred.detect(g, feats, props, info)
    assert 10 < boxes.shape[0] <= 100
    tb, ts, tl = _t_cascade_detect(m, [torch.from_numpy(f) for f in feats], props, info, pred.cfg)
    assert boxes.shape == tb.shape
    np.testing.assert_array_equal(labels, tl)
    np.testing.assert_allclose(scores, ts, atol=1e-5)
    np.testing.assert_allclose(boxes, tb, atol=1e-3)
    # the refinement matters here: without it the reference gives other boxes
    nb, _, _ = _t_cascade_detect(m, [torch.from_numpy(f) for f in feats], props, info, pred.cfg, refine=False)
    assert nb.shape != boxes.shape or np.abs(nb - boxes).max() > 0.1
    # masks: every stage's head on the detections, sigmoid, mean over stages (merge_aug_masks)
    xr = pred.roi_features(feats, boxes * info["scale_factor"], 14)
    probs = pred.mask_probs(g, xr, labels)
    with torch.no_grad():
        xt = _t_roi_feats([torch.from_numpy(f) for f in feats], torch.from_numpy(boxes * info["scale_factor"]), 14)
        ref = torch.stack([m.roi_head.mask_head[s](xt).sigmoid() for s in range(3)]).mean(0)
        ref = ref[torch.arange(len(labels)), torch.from_numpy(labels)].numpy()
    assert probs.shape == (len(labels), 28, 28)
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    full = pred.predict_array(img)
    assert full["masks"].shape == (boxes.shape[0], 50, 70) and full["masks"].dtype == bool
    np.testing.assert_allclose(full["boxes"], boxes)


def test_cascade_predictor_rejects_wrong_directories(cascade_export, tmp_path):
    import shutil

    from runtime_eval.dense import CascadeMaskRCNNPredictor, MaskRCNNPredictor
    from runtime_eval.errors import EvalError

    _, out, _ = cascade_export
    with pytest.raises(EvalError, match="'cascade_mask_rcnn_swin' export.*needs 'mask_rcnn_swin'"):
        MaskRCNNPredictor(out)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "mask_head_2.onnx").unlink()
    with pytest.raises(EvalError, match="lacks mask_head_2.onnx"):
        CascadeMaskRCNNPredictor(bad)
    shutil.copy(out / "bbox_head_0.onnx", bad / "mask_head_2.onnx")  # a part under the wrong name
    with pytest.raises(EvalError, match="does not belong"):
        CascadeMaskRCNNPredictor(bad)
    (bad / "mask_head_2.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(EvalError, match="cannot load"):
        CascadeMaskRCNNPredictor(bad)


def test_cascade_end_to_end_coco(cascade_export, tmp_path):
    from runtime_eval.coco import coco_dataset, evaluate_detection
    from runtime_eval.dense import CascadeMaskRCNNPredictor

    _, out, _ = cascade_export
    ds = coco_dataset(coco_fixture(tmp_path))
    pred = CascadeMaskRCNNPredictor(out)
    for i in range(len(ds)):
        img = ds.image(i)
        d = pred(img, ds.info(i))
        W, H = img.size
        n = d.boxes.shape[0]
        assert 0 < n <= 100 and d.masks.shape == (n, H, W)
        assert ((d.scores > 0.05) & (d.scores <= 1)).all() and np.all(np.diff(d.scores) <= 0)
        assert d.labels.min() >= 0 and d.labels.max() < K
    res = evaluate_detection(pred, ds)
    assert set(res) >= {"bbox", "segm"} and res["images"] == 2
