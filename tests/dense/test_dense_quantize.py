"""Data-free quantization of the dense models: pad-then-shift window geometry, synthesis on the
dense backbone, dense distillation in calibration, the export entry point (tiny random models)."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from maskaq import losses as L
from maskaq.calibration import CalibConfig, calibrate, feature_distill_loss, kd_loss, pixel_kd_loss
from maskaq.dense.models import BackboneNeck, MaskRCNN, RPNHeadPart, UperNet, UperNetFull
from maskaq.dense.quantize import (DENSE_MODELS, DenseError, DenseRunConfig, DistillTarget, QuantConvAct,
                                   build_dense_model, calibration_boxes, dense_data_config, dense_distill,
                                   load_dense_calibrated, quantize_dense, run_dense_pipeline)
from maskaq.dense.swin import SwinBackbone
from maskaq.qmodel import QuantConfig, QuantLinear, prepare_model, record_attention
from maskaq.synthesis import SynthConfig, SynthesisError, attention_layout, synthesize

HW = (60, 90)  # stage grids 15x23, 8x12, 4x6, 2x3: none a multiple of the window (7)


def _seg(seed: int = 0) -> UperNet:
    return build_dense_model("tiny_upernet", random_weights=True, seed=seed)[0]


def _det(seed: int = 0) -> MaskRCNN:
    return build_dense_model("tiny_mask_rcnn", random_weights=True, seed=seed)[0]


# --- window geometry -------------------------------------------------------------------------

def _direct_grid(scores, B, res, ws, s):
    """Token (i, j) of a pad-then-shift block sits at padded position ((i-s) mod Hp, (j-s) mod Wp)."""
    H, W = res
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    nWw = Wp // ws
    out = torch.empty(B, H, W)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                pi, pj = (i - s) % Hp, (j - s) % Wp
                w = (pi // ws) * nWw + pj // ws
                out[b, i, j] = scores[b * (Hp // ws) * nWw + w, (pi % ws) * ws + pj % ws]
    return out


@pytest.mark.parametrize("res,s", [((15, 23), 3), ((8, 12), 3), ((14, 14), 3), ((9, 10), 0)])
def test_pad_shift_windows_to_grid_matches_direct_index(res, s):
    ws, B = 7, 2
    Hp, Wp = -(-res[0] // ws) * ws, -(-res[1] // ws) * ws
    scores = torch.randn(B * (Hp // ws) * (Wp // ws), ws * ws, generator=torch.Generator().manual_seed(1))
    got = L.windows_to_grid(scores, B, res, (ws, ws), (s, s), order="pad_shift")
    torch.testing.assert_close(got, _direct_grid(scores, B, res, ws, s), rtol=0, atol=0)
    timm_order = L.windows_to_grid(scores, B, res, (ws, ws), (s, s))
    if s and (res[0] % ws or res[1] % ws):  # padding + shift: the two orders differ
        assert not torch.equal(got, timm_order)
    else:
        assert torch.equal(got, timm_order)
    with pytest.raises(ValueError, match="order"):
        L.windows_to_grid(scores, B, res, (ws, ws), (s, s), order="bogus")


def test_window_mapping_inverts_the_swin_block_forward():
    """Feed token ids through a SwinBlock (norm1 removed) and read the windows its attention gets:
    windows_to_grid with the block's own geometry must return the ids on the grid."""
    bb = DENSE_MODELS["tiny_upernet"][2]().swin
    model = SwinBackbone(bb)
    H, W = 15, 23
    blk = copy.deepcopy(model.layers[0].blocks[1])  # the shifted block
    blk.norm1 = torch.nn.Identity()
    seen = {}
    blk.attn.register_forward_pre_hook(lambda m, a, kw=None: seen.setdefault("win", a[0]))
    C = bb.embed_dim
    ids = torch.arange(1, H * W + 1, dtype=torch.float32)
    x = torch.zeros(2, H * W, C)
    x[0, :, 0], x[1, :, 0] = ids, ids + 1000
    Hp, Wp = 21, 28
    from maskaq.dense.swin import shifted_window_mask

    with torch.no_grad():
        blk(x, H, W, shifted_window_mask(Hp, Wp, 7, 3))
    geo = blk.window_geometry(H, W)
    assert geo.order == "pad_shift" and geo.shift == (3, 3) and geo.padded == (Hp, Wp)
    grid = L.windows_to_grid(seen["win"][..., 0], 2, geo.resolution, geo.window, geo.shift, geo.order)
    torch.testing.assert_close(grid[0].flatten(), ids, rtol=0, atol=0)
    torch.testing.assert_close(grid[1].flatten(), ids + 1000, rtol=0, atol=0)


def test_attention_layout_of_dense_backbone():
    P = _seg()
    prepare_model(P.backbone)
    with pytest.raises(SynthesisError, match="input_size"):
        attention_layout(P.backbone)
    lay = attention_layout(P.backbone, HW)
    res = [l.resolution for l in lay.layers.values()]
    assert res == [(15, 23), (15, 23), (8, 12), (4, 6), (2, 3)]
    assert [l.shift for l in lay.layers.values()] == [(0, 0), (3, 3), (0, 0), (0, 0), (0, 0)]
    assert all(l.order == "pad_shift" and l.window == (7, 7) for l in lay.layers.values())
    assert lay.grid == (15, 23)
    # the recorded windows fit the geometry
    x = torch.randn(1, 3, *HW)
    with torch.no_grad(), record_attention(P.backbone, what=("logits",)) as recs:
        P.backbone(x)
    for r, l in zip(recs, lay.layers.values()):
        Hp, Wp = -(-l.resolution[0] // 7) * 7, -(-l.resolution[1] // 7) * 7
        assert r.logits.shape[0] == (Hp // 7) * (Wp // 7)


# --- synthesis -------------------------------------------------------------------------------

def test_synthesis_runs_on_dense_backbone_at_odd_size():
    P = _seg()
    Q = quantize_dense(P, QuantConfig.parse("4w4a"))
    cfg = SynthConfig(steps=3, batch_size=2, use_ce=False)
    res = synthesize(P.backbone, Q.backbone, 3, cfg, dense_data_config(HW), seed=0, device="cpu", progress=False)
    assert res.images.shape == (3, 3, *HW) and torch.isfinite(res.images).all()
    assert res.masks is not None and res.masks.shape == (3, 15 * 23) and res.masks.dtype == torch.bool
    k = max(1, int(15 * 23 * (0.5 + (0.1 - 0.5) * 2 / 3)))
    assert (res.masks.sum(1) == max(1, round(0.7 * k))).all()
    assert set(res.losses[0]) == {"total", "iha", "tv", "de", "maa"}
    assert all(np.isfinite(v) for row in res.losses for v in row.values())
    assert res.losses[-1]["maa"] > 0  # Q's attention differs from P's
    with pytest.raises(SynthesisError, match="num_classes"):
        synthesize(P.backbone, None, 1, SynthConfig(steps=1, batch_size=1, objective="mimiq"), dense_data_config(HW),
                   seed=0, device="cpu", progress=False)


# --- distillation and calibration -----------------------------------------------------------

def test_dense_distill_losses():
    z = torch.randn(2, 5, 3, 4)
    assert float(pixel_kd_loss(z, z)) == pytest.approx(0.0, abs=1e-7)
    zq = torch.randn(2, 5, 3, 4)
    flat = kd_loss(zq.permute(0, 2, 3, 1).reshape(-1, 5), z.permute(0, 2, 3, 1).reshape(-1, 5), 5.0)
    torch.testing.assert_close(pixel_kd_loss(zq, z, 5.0), flat)
    f = [torch.ones(1, 2, 4, 4), 2 * torch.ones(1, 2, 2, 2)]
    assert float(feature_distill_loss(f, f)) == 0.0
    assert float(feature_distill_loss([torch.zeros(1, 2, 4, 4), 3 * torch.ones(1, 2, 2, 2)], f)) == pytest.approx((1 + 0.25) / 2)


@pytest.mark.parametrize("kind", ["seg", "det"])
def test_calibration_reduces_dense_distillation_loss(kind):
    P = _seg() if kind == "seg" else _det()
    if kind == "seg":  # random heads give near-uniform logits; make the classes distinguishable
        with torch.no_grad():
            P.decode_head.conv_seg.weight.mul_(30)
    Q = quantize_dense(P, QuantConfig.parse("4w4a"))
    Pd, Qd = DistillTarget(P), DistillTarget(Q)
    fn = dense_distill(Qd, 1.0)
    x = torch.randn(4, 3, 32, 48, generator=torch.Generator().manual_seed(0))

    def loss():
        with torch.no_grad():
            return float(fn(Qd(x), Pd(x)))

    with torch.no_grad():
        Qd(x)  # initialise the activation quantizers
    before = loss()
    cfg = CalibConfig(epochs=8, batch_size=4, lr=1e-3, lr_min=1e-4, warmup_gate_epochs=0, augment="none",
                      refresh_every=0, gamma=0.0)
    res = calibrate(Pd, Qd, x, cfg, seed=0, device="cpu", progress=False, distill=fn)
    after = loss()
    assert before > 0 and after < 0.8 * before, (before, after)
    assert res.epochs[-1]["kd"] < res.epochs[0]["kd"]


def test_quantize_dense_scope_all():
    P = _det()
    Q = quantize_dense(P, QuantConfig(4, 4, keep_first_last_8bit=True), "all")
    assert isinstance(Q.neck.lateral_convs[0].conv, QuantConvAct)
    assert isinstance(Q.roi_head.bbox_head.shared_fcs[0], QuantLinear)
    assert Q.roi_head.bbox_head.fc_cls.weight_quantizer.bits == 8
    assert Q.roi_head.bbox_head.shared_fcs[0].weight_quantizer.bits == 4
    assert type(Q.roi_head.mask_head.upsample) is torch.nn.ConvTranspose2d
    assert not any("quantizer" in n for n, _ in P.named_modules())  # P untouched
    out = DistillTarget(Q, heads=True)(torch.randn(1, 3, 64, 96))
    K = calibration_boxes((64, 96)).shape[0]
    assert out["cls"].shape[0] == K and out["mask"].shape[0] == K
    with pytest.raises(DenseError, match="scope"):
        quantize_dense(P, QuantConfig(4, 4), "heads")


def test_calibration_boxes_cover_all_roi_levels():
    b = calibration_boxes((800, 1344))
    scale = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sqrt()
    lv = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3)
    assert set(lv.tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 1344).all() and (b[:, 3] <= 800).all()


@pytest.mark.slow  # ~25-30 s on 2 busy cores (dynamo export + QDQ rewrite)
def test_det_parts_export_matches_torch_fake_quant(tmp_path):
    """scope=all: every Mask R-CNN part is quantized, rewritten to the classifier's encoding
    (shared RPN head included) and equals torch fake-quant in ORT's reference QDQ mode."""
    from export.dense_export import export_mask_rcnn

    P = _det()
    Q = quantize_dense(P, QuantConfig.parse("4w4a"), "all")
    with torch.no_grad():
        DistillTarget(Q, heads=True)(torch.randn(2, 3, 64, 96))
    paths = export_mask_rcnn(Q, tmp_path, (64, 96), optimize=False)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    r7, r14 = torch.randn(5, 32, 7, 7), torch.randn(5, 32, 14, 14)
    with torch.no_grad():
        feats = BackboneNeck(Q)(x)
        refs = {"backbone_neck": feats, "rpn_head": RPNHeadPart(Q)(*feats),
                "bbox_head": Q.roi_head.bbox_head(r7), "mask_head": (Q.roi_head.mask_head(r14),)}
    feeds = {"backbone_neck": {"input": x.numpy()}, "rpn_head": {f"p{i + 2}": f.numpy() for i, f in enumerate(feats)},
             "bbox_head": {"rois": r7.numpy()}, "mask_head": {"rois": r14.numpy()}}
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    for part, p in paths.items():
        m = onnx.load(str(p))
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Clip"} <= ops, part
        # weights are integer initializers read by a DequantizeLinear only (no weight Q)
        for n in m.graph.node:
            if n.op_type == "QuantizeLinear":
                assert n.input[1].endswith("input_quantizer.scale") or "attn." in n.input[1], (part, n.input[1])
        assert p.with_suffix(".encodings.json").is_file()
        assert json.loads({q.key: q.value for q in m.metadata_props}["maskaq.quant"])["scope"] == "all"
        ys = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, feeds[part])
        for y, r in zip(ys, refs[part]):
            np.testing.assert_allclose(y, r.numpy(), rtol=0, atol=1e-5, err_msg=part)
    # the shared RPN head: one set of weights, one quantizer node set per level
    m = onnx.load(str(paths["rpn_head"]))
    qn = [n.name for n in m.graph.node if n.op_type == "QuantizeLinear" and "rpn_conv.input" in n.name]
    assert len(qn) == 5


# --- the pipeline and the command line ------------------------------------------------------

def test_pipeline_resume_and_guard(tmp_path):
    cfg = DenseRunConfig("tiny_upernet", random_weights=True, preset="tiny", input_size=(40, 52))
    assert cfg.plan().synth.use_ce is False
    res = run_dense_pipeline(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "calibrated.pt").is_file() and (tmp_path / "run" / "run.json").is_file()
    assert res.report["distill"].startswith("per-pixel KD")
    assert res.calib.epochs[0]["hd"] > 0  # the masked L_HD on the backbone's window attention
    with pytest.raises(DenseError, match="resume"):
        run_dense_pipeline(cfg, tmp_path / "run", progress=False)
    again = run_dense_pipeline(cfg, tmp_path / "run", resume=True, progress=False)
    for (k, a), b in zip(res.Q.state_dict().items(), again.Q.state_dict().values()):
        assert torch.equal(a, b), k
    other = DenseRunConfig("tiny_upernet", random_weights=True, preset="tiny", input_size=(40, 52), seed=1)
    with pytest.raises(DenseError, match="differs in: seed"):
        run_dense_pipeline(other, tmp_path / "run", resume=True, progress=False)
    Q2, _, cfg2 = load_dense_calibrated(res.state_path)
    assert cfg2 == cfg
    for (k, a), b in zip(res.Q.state_dict().items(), Q2.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(DenseError, match="method"):
        DenseRunConfig("tiny_upernet", method="real")


@pytest.mark.slow  # ~25-30 s on 2 busy cores (dynamo export + QDQ rewrite)
def test_cli_upernet_end_to_end(tmp_path):
    from export.cli import main

    out = tmp_path / "seg"
    r = CliRunner().invoke(main, ["tiny_upernet", "--random-weights", "--bits", "4", "--preset", "tiny",
                                  "--input-size", "60x90", "--canvas", "64x96", "--test-scale", "96x64", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "upernet.encodings.json", "upernet.onnx"]
    report = json.loads((out / "report.json").read_text())
    assert report["canvas"] == [64, 96] and report["config"]["method"] == "maskaq"
    Q, _, _ = load_dense_calibrated(report["state"])
    m = onnx.load(str(out / "upernet.onnx"))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["maskaq.task"] == "ade20k_segmentation"
    assert json.loads(meta["maskaq.quant"]) == {"w_bits": 4, "a_bits": 4, "profile": "ort", "scope": "backbone",
                                                "method": "maskaq"}
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = UperNetFull(Q)(x).numpy()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    y_ref = ort.InferenceSession(str(out / "upernet.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(y_ref, ref, rtol=0, atol=1e-5)
    y = ort.InferenceSession(str(out / "upernet.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert (y.argmax(1) == ref.argmax(1)).mean() > 0.9
    # the numpy harness scores it
    from runtime_eval.dense.segmentation import UperNetPredictor

    pred = UperNetPredictor(out / "upernet.onnx")
    img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    seg = pred.predict_array(img)
    assert seg.shape == (50, 70) and seg.min() >= 0 and seg.max() < 150


@pytest.mark.slow
def test_cli_mask_rcnn_all_end_to_end(tmp_path):
    from export.cli import main

    out = tmp_path / "det"
    r = CliRunner().invoke(main, ["tiny_mask_rcnn", "--random-weights", "--bits", "4", "--quantize", "all",
                                  "--method", "mimiq", "--preset", "tiny", "--input-size", "60x90", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    for part in ("backbone_neck", "rpn_head", "bbox_head", "mask_head"):
        assert f"{part}.onnx" in names and f"{part}.encodings.json" in names
    from runtime_eval.dense.detection import MaskRCNNPredictor

    det = MaskRCNNPredictor(out)
    assert det.meta["input_size"] == [3, 64, 96]


@pytest.mark.parametrize("args,msg", [
    (["tiny_upernet", "--bits", "4"], "needs --checkpoint"),
    (["tiny_upernet", "--random-weights", "--bits", "9"], "bit width 9"),
    (["tiny_upernet", "--random-weights", "--bits", "4", "--input-size", "big"], "is not HxW"),
    (["tiny_mask_rcnn", "--random-weights", "--bits", "4", "--canvas", "60x90"], "multiples of 32"),
    (["tiny_upernet", "--random-weights", "--bits", "4", "--method", "real"], "is not one of"),
    (["tiny_upernet", "--random-weights", "--bits", "4", "--set", "calib.nope=1"], "unknown override key"),
    (["tiny_upernet", "--checkpoint", "MISSING.pth", "--bits", "4"], "does not exist"),
    (["tiny_upernet", "--checkpoint", "BAD.pth", "--bits", "4"], "checkpoint"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, msg):
    from export.cli import main

    torch.save({"state_dict": {"backbone.bogus": torch.zeros(1)}}, tmp_path / "BAD.pth")
    args = [str(tmp_path / a) if a.endswith(".pth") else a for a in args]
    out = tmp_path / "o"
    r = CliRunner().invoke(main, args + ["-q", "-o", str(out)])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("maskaq-export: error:") and msg in lines[0], r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not (tmp_path / "o.run").exists()


def test_cli_refuses_non_empty_output(tmp_path):
    from export.cli import main

    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    r = CliRunner().invoke(main, ["tiny_upernet", "--random-weights", "--bits", "4", "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    assert (out / "x").read_text() == "keep"


# --- Cascade Mask R-CNN ---------------------------------------------------------------------

CASCADE_PARTS = ("backbone_neck", "rpn_head", "bbox_head_0", "bbox_head_1", "bbox_head_2", "mask_head_0",
                 "mask_head_1", "mask_head_2")


def _cascade(seed: int = 0):
    return build_dense_model("tiny_cascade_mask_rcnn", random_weights=True, seed=seed)[0]


def _head_layers(model):
    """(name, module) of every Conv2d / Linear in the three box and three mask heads."""
    return [(n, m) for n, m in model.named_modules() if n.startswith("roi_head.")
            and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not isinstance(m, torch.nn.ConvTranspose2d)]


def test_cascade_alias_strict_checkpoint_and_scopes(tmp_path):
    from maskaq.dense.checkpoint import CheckpointError
    from maskaq.dense.models import CascadeMaskRCNN

    assert DENSE_MODELS["swin_t_cascade_mask_rcnn"][:2] == ("coco", CascadeMaskRCNN)
    assert DENSE_MODELS["tiny_cascade_mask_rcnn"][3] == (64, 96)
    src = _cascade(seed=3)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "c.pth")
    P, task = build_dense_model("tiny_cascade_mask_rcnn", tmp_path / "c.pth")
    assert task == "coco" and isinstance(P, CascadeMaskRCNN) and not P.training
    for (k, a), b in zip(src.state_dict().items(), P.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(_cascade(seed=0).roi_head.bbox_head[2].fc_cls.weight, P.roi_head.bbox_head[2].fc_cls.weight)
    torch.save({"state_dict": _det().state_dict()}, tmp_path / "mrcnn.pth")  # strict: a Mask R-CNN is refused
    with pytest.raises(CheckpointError, match="CascadeMaskRCNN|MaskRCNN"):
        build_dense_model("tiny_cascade_mask_rcnn", tmp_path / "mrcnn.pth")

    qb = quantize_dense(P, QuantConfig(4, 4), "backbone")
    assert all(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for _, m in _head_layers(qb))
    Q = quantize_dense(P, QuantConfig(4, 4, keep_first_last_8bit=True), "all")
    layers = _head_layers(Q)
    # per stage: 4 shared convs + 1 shared FC + fc_cls + fc_reg; 4 mask convs + conv_logits
    assert len(layers) == 3 * (7 + 5)
    for s in range(3):
        assert {n for n, _ in layers if n.startswith(f"roi_head.bbox_head.{s}.")} == \
            {f"roi_head.bbox_head.{s}.shared_convs.{i}.conv" for i in range(4)} | \
            {f"roi_head.bbox_head.{s}.{x}" for x in ("shared_fcs.0", "fc_cls", "fc_reg")}
    for n, m in layers:
        assert type(m) in (QuantConvAct, QuantLinear), n
        last = n.rsplit(".", 1)[-1] in ("fc_cls", "fc_reg", "conv_logits")
        assert m.weight_quantizer.bits == (8 if last else 4) == m.input_quantizer.bits, n
    for s in range(3):
        assert type(Q.roi_head.bbox_head[s].shared_convs[0].bn) is torch.nn.BatchNorm2d
        assert type(Q.roi_head.mask_head[s].upsample) is torch.nn.ConvTranspose2d
    assert isinstance(Q.neck.fpn_convs[0].conv, QuantConvAct) and isinstance(Q.rpn_head.rpn_conv, QuantConvAct)
    assert not any("quantizer" in n for n, _ in P.named_modules())  # P untouched


def test_cascade_distill_target_all_stages():
    from maskaq.dense.quantize import _roi_features

    P = _cascade()
    Q = quantize_dense(P, QuantConfig(4, 4), "all")
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    Pd, Qd = DistillTarget(P, heads=True), DistillTarget(Q, heads=True)
    with torch.no_grad():
        out = Pd(x)
    K = calibration_boxes((64, 96)).shape[0]
    assert all(len(out[k]) == 3 for k in ("cls", "reg", "mask"))
    fpn = list(P.features(x))
    boxes = calibration_boxes((64, 96))
    with torch.no_grad():
        r7, r14 = _roi_features(fpn, boxes, 7), _roi_features(fpn, boxes, 14)
        for s in range(3):  # every stage on the same fixed RoIs pooled from P's own FPN maps
            cls, reg = P.roi_head.bbox_head[s](r7)
            torch.testing.assert_close(out["cls"][s], cls, rtol=0, atol=0)
            torch.testing.assert_close(out["reg"][s], reg, rtol=0, atol=0)
            torch.testing.assert_close(out["mask"][s], P.roi_head.mask_head[s](r14), rtol=0, atol=0)
    assert out["cls"][0].shape == (2 * K, 81) and out["reg"][1].shape == (2 * K, 320)
    assert out["mask"][2].shape == (2 * K, 80, 28, 28)
    fn = dense_distill(Qd, 2.0)
    assert float(fn(out, out)) == pytest.approx(0.0, abs=1e-6)
    for key in ("cls", "reg", "mask"):  # a change in any stage's output is seen
        noise = torch.randn(out[key][2].shape, generator=torch.Generator().manual_seed(1)) * out[key][2].std()
        bad = dict(out, **{key: (out[key][0], out[key][1], out[key][2] + noise)})
        assert float(fn(bad, out)) > 1e-4, key
    with torch.no_grad():
        Qd(x)  # initialise the activation quantizers
    loss = fn(Qd(x), out)
    loss.backward()
    for s in range(3):  # all three box and mask heads are trained
        for m in (Q.roi_head.bbox_head[s].shared_convs[0].conv, Q.roi_head.bbox_head[s].fc_cls,
                  Q.roi_head.mask_head[s].conv_logits, Q.roi_head.mask_head[s].upsample):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, s
    # Mask R-CNN keeps its single-head outputs and the same loss as before Cascade was added
    D_ = _det()
    Qm = quantize_dense(D_, QuantConfig(4, 4), "all")
    Pm, Qmd = DistillTarget(D_, heads=True), DistillTarget(Qm, heads=True)
    with torch.no_grad():
        Qmd(x)
        oq, op = Qmd(x), Pm(x)
    assert isinstance(op["cls"], torch.Tensor)
    ref = (feature_distill_loss(oq["fpn"], op["fpn"])
           + feature_distill_loss(list(oq["rpn"]) + [oq["reg"], oq["mask"]], list(op["rpn"]) + [op["reg"], op["mask"]])
           + kd_loss(oq["cls"], op["cls"], 2.0))
    torch.testing.assert_close(dense_distill(Qmd, 2.0)(oq, op), ref, rtol=0, atol=0)


def _coco80(root):
    """dense_helpers.coco_fixture (2 images) with 80 categories, as the tiny COCO detectors predict."""
    import dense_helpers as D

    coco = D.coco_fixture(root)
    ann = coco / "annotations" / "instances_val2017.json"
    d = json.loads(ann.read_text())
    ids = [c["id"] for c in d["categories"]]
    d["categories"] += [{"id": i, "name": f"c{i}"} for i in range(max(ids) + 1, max(ids) + 1 + 80 - len(ids))]
    ann.write_text(json.dumps(d))
    return coco


@pytest.fixture(scope="module")
def cascade_ckpt(tmp_path_factory):
    """An mmdet-layout tiny Cascade checkpoint with non-trivial BN statistics and confident class
    logits: random 81-way logits, averaged over the stages, stay under the harness's 0.05 score
    threshold, so every stage favours the fixture's two annotated classes (contiguous 0 and 2)."""
    import dense_helpers as D

    m = D.randomise(_cascade(seed=5))
    with torch.no_grad():
        for h in m.roi_head.bbox_head:
            h.fc_cls.weight.mul_(10)
            h.fc_cls.bias.zero_()
            h.fc_cls.bias[[0, 2]] = 4.0
    path = tmp_path_factory.mktemp("cascade_ckpt") / "cascade.pth"
    torch.save({"meta": {"mmdet_version": "2.11.0"}, "state_dict": m.state_dict()}, path)
    return path, m


def _ref_session_factory():
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.intra_op_num_threads = 1
    return lambda p: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])


def _check_cascade_parts_against_torch(out, Q, canvas, quantized_parts):
    """Every graph in ORT reference QDQ mode equals Q (torch fake-quant) on its own input."""
    x = torch.randn(1, 3, *canvas, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    r7, r14 = torch.randn(6, 32, 7, 7, generator=g), torch.randn(6, 32, 14, 14, generator=g)
    with torch.no_grad():
        feats = BackboneNeck(Q)(x)
        refs = {"backbone_neck": feats, "rpn_head": RPNHeadPart(Q)(*feats)}
        for s in range(3):
            refs[f"bbox_head_{s}"] = Q.roi_head.bbox_head[s](r7)
            refs[f"mask_head_{s}"] = (Q.roi_head.mask_head[s](r14),)
    feeds = {"backbone_neck": {"input": x.numpy()}, "rpn_head": {f"p{i + 2}": f.numpy() for i, f in enumerate(feats)},
             **{f"bbox_head_{s}": {"rois": r7.numpy()} for s in range(3)},
             **{f"mask_head_{s}": {"rois": r14.numpy()} for s in range(3)}}
    make = _ref_session_factory()
    for part in CASCADE_PARTS:
        p = out / f"{part}.onnx"
        m = onnx.load(str(p))
        meta = {q.key: q.value for q in m.metadata_props}
        assert meta["maskaq.task"] == "coco_instance_cascade" and json.loads(meta["maskaq.dense"])["part"] == part
        qdq = {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in m.graph.node}
        assert qdq == (part in quantized_parts), part
        assert (out / f"{part}.encodings.json").is_file() == (part in quantized_parts), part
        ys = make(p).run(None, feeds[part])
        assert len(ys) == len(refs[part]), part
        for y, r in zip(ys, refs[part]):
            np.testing.assert_allclose(y, r.numpy(), rtol=0, atol=1e-5 if part in quantized_parts else 1e-4,
                                       err_msg=part)


@pytest.mark.slow  # ~25-30 s on 2 busy cores (calibration, 8 dynamo exports, the harness on 2 images)
def test_cli_cascade_end_to_end_scored_by_maskaq_eval(tmp_path, cascade_ckpt):
    """maskaq-export tiny_cascade_mask_rcnn --checkpoint X.pth --bits 4 -o out/ writes the 8 graphs
    of export_cascade_mask_rcnn; maskaq-eval out/ --task coco scores them with the harness's
    CascadeMaskRCNNPredictor (same numbers as calling it directly)."""
    from export.cli import main
    from runtime_eval.cli import main as eval_main
    from runtime_eval.coco import coco_dataset, evaluate_detection
    from runtime_eval.dense import CascadeMaskRCNNPredictor

    pytest.importorskip("pycocotools")
    ckpt, src = cascade_ckpt
    out = tmp_path / "cascade"
    r = CliRunner().invoke(main, ["tiny_cascade_mask_rcnn", "--checkpoint", str(ckpt), "--bits", "4", "--preset",
                                  "tiny", "--canvas", "96x96", "--test-scale", "96x64", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{p}.onnx" for p in CASCADE_PARTS]
                                                           + ["backbone_neck.encodings.json", "report.json"])
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["files"]) == sorted(CASCADE_PARTS) and report["canvas"] == [96, 96]
    assert report["distill"] == "normalised FPN feature distillation"
    Q, P, cfg = load_dense_calibrated(report["state"])
    assert cfg.model == "tiny_cascade_mask_rcnn" and cfg.checkpoint == str(ckpt) and cfg.scope == "backbone"
    for (k, a), b in zip(src.state_dict().items(), P.state_dict().values()):  # the checkpoint, loaded strictly
        assert torch.equal(a, b), k
    dense = json.loads({q.key: q.value for q in onnx.load(str(out / "bbox_head_1.onnx")).metadata_props}["maskaq.dense"])
    assert dense["model"] == "cascade_mask_rcnn_swin" and dense["num_stages"] == 3
    assert dense["test_cfg"]["img_scale"] == [96, 64] and len(dense["test_cfg"]["stage_target_stds"]) == 3
    assert dense["maskaq_run"]["config"]["model"] == "tiny_cascade_mask_rcnn"
    _check_cascade_parts_against_torch(out, Q, (96, 96), {"backbone_neck"})

    coco = _coco80(tmp_path / "coco")
    rep_path = tmp_path / "rep.json"
    r = CliRunner().invoke(eval_main, [str(out), "--task", "coco", "--data", str(coco), "-o", str(rep_path),
                                       "--provider", "cpu", "--threads", "1", "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    rep = json.loads(rep_path.read_text())
    assert rep["model"]["task"] == "coco_instance_cascade" and rep["model"]["quant"]["scope"] == "backbone"
    parts = rep["model"]["dense"]
    assert parts["model"] == "cascade_mask_rcnn_swin" and parts["num_parts"] == 8 == len(parts["parts"])
    assert parts["parts"]["backbone_neck"]["qdq"]["total"] > 0 and parts["parts"]["bbox_head_2"]["qdq"]["total"] == 0
    assert rep["runtime"]["mode"] == "reference"
    met = rep["metrics"]
    assert met["images"] == 2
    for t in ("bbox", "segm"):
        assert 0.0 <= met[t]["AP"] <= 100.0 and met[t]["detections"] > 0, met[t]
    direct = evaluate_detection(CascadeMaskRCNNPredictor(out, session_factory=_ref_session_factory()),
                                coco_dataset(coco))
    for t in ("bbox", "segm"):
        assert met[t] == pytest.approx(direct[t])


@pytest.mark.slow  # ~30-35 s on 2 busy cores (8 QDQ exports)
def test_cli_cascade_quantize_all_quantizes_every_stage(tmp_path, cascade_ckpt):
    """--quantize all: the neck, RPN and all three box and mask heads are quantized (calibrated on
    the fixed calibration RoIs) and exported with Q/DQ; ORT reference mode equals torch."""
    from export.cli import main
    from runtime_eval.dense import CascadeMaskRCNNPredictor

    ckpt, _ = cascade_ckpt
    out = tmp_path / "cascade_all"
    r = CliRunner().invoke(main, ["tiny_cascade_mask_rcnn", "--checkpoint", str(ckpt), "--bits", "4", "--quantize",
                                  "all", "--method", "psaq", "--preset", "tiny", "--canvas", "96x96",
                                  "--test-scale", "96x64", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["distill"].endswith("RPN/RoI-head outputs on fixed calibration RoIs")
    for part in CASCADE_PARTS:
        meta = {q.key: q.value for q in onnx.load(str(out / f"{part}.onnx")).metadata_props}
        assert json.loads(meta["maskaq.quant"]) == {"w_bits": 4, "a_bits": 4, "profile": "ort", "scope": "all",
                                                    "method": "psaq"}, part
    for s in range(3):  # every stage's box head: its convs, FC and predictors read int8 weights through DQ
        m = onnx.load(str(out / f"bbox_head_{s}.onnx"))
        dq_in = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        int8 = {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8}
        for name in [f"shared_convs.{i}.conv" for i in range(4)] + ["shared_fcs.0", "fc_cls", "fc_reg"]:
            w = f"{name}.weight_quantizer.qweight"
            assert w in dq_in and w in int8, (s, name, sorted(dq_in))
            assert f"{name}.input_quantizer.quantized" in dq_in, (s, name)
    Q, _, cfg = load_dense_calibrated(report["state"])
    assert cfg.scope == "all"
    _check_cascade_parts_against_torch(out, Q, (96, 96), set(CASCADE_PARTS))
    # the harness runs the quantized cascade
    from runtime_eval.coco import coco_dataset

    ds = coco_dataset(_coco80(tmp_path / "coco"))
    pred = CascadeMaskRCNNPredictor(out, session_factory=_ref_session_factory())
    info = ds.info(0)
    det = pred(ds.image(0), info)
    assert len(det.scores) > 0 and det.masks.shape[1:] == (info["height"], info["width"])
