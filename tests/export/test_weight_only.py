"""Issue 14, items 3-5: the INT4 weight-only file that OpenVINO accepts (patch conv per output
channel or float), the weight-only calibration flow (float activations, weights calibrated in the
file's own blocks), real INT4 weight storage, and the classifier head running integer in ORT's
deploy mode."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from export import export_onnx
from maskaq.models import load_model
from maskaq.qmodel import QuantConfig, quantize_model, quantizers
from maskaq.quant import ActQuantizer, QuantError, WeightQuantizer
from maskaq.ranges import init_ranges, search_weight_clip

INTEGER_MATMULS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger")


def _vit(in_chans: int, patch: int, img: int, seed: int = 0):
    torch.manual_seed(seed)
    return load_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch, in_chans=in_chans,
                      embed_dim=32, depth=1, num_heads=2, num_classes=10)


def _x(lm, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *lm.data_config.input_size, generator=torch.Generator().manual_seed(seed))


def _export(tmp_path, name, lm, Q, **kw):
    res = export_onnx(Q, tmp_path / f"{name}.onnx", data_config=lm.data_config, metadata={"method": "test"}, **kw)
    return res, onnx.load(str(res.path))


def _ov(path, x: np.ndarray) -> np.ndarray:
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    cm = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return cm(x)[0]


def _dq(model: onnx.ModelProto, prefix: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith(prefix))


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


# --- item 3: the patch conv in the INT4 artifact ------------------------------------------------

@pytest.mark.parametrize("in_chans,patch,img", [(1, 4, 16), (3, 8, 32)])
def test_int4_patch_conv_per_channel_and_openvino_compiles(tmp_path, helpers, in_chans, patch, img):
    lm = _vit(in_chans, patch, img)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    x = _x(lm)
    with torch.no_grad():
        Q(x)
    res, m = _export(tmp_path, f"int4_c{in_chans}", lm, Q, weight_only_int4_block=16)
    conv = _dq(m, "patch_embed.proj")
    a = _attrs(conv)
    assert "block_size" not in a and a["axis"] == 0  # per output channel, not blocked over 1-3 inputs
    q = numpy_helper.to_array(_inits(m)[conv.input[0]])
    s = numpy_helper.to_array(_inits(m)[conv.input[1]])
    assert _inits(m)[conv.input[0]].data_type == TensorProto.INT4 and s.shape == (32,)
    assert q.shape == (32, in_chans, patch, patch) and q.min() >= -8 and q.max() <= 7
    # the conv is the calibrated 4-bit per-channel quantizer itself (exact)
    w = Q.patch_embed.proj.weight
    sq = Q.patch_embed.proj.weight_quantizer.scale_for(w).numpy()
    assert np.array_equal(s, sq)
    assert res.partial_blocks == []
    ref = helpers.ort_session(res.path).run(None, {"input": x.numpy()})[0]
    got = _ov(res.path, x.numpy())  # OpenVINO rejected the blocked conv before ("cannot be divided by block_size")
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_int4_patch_conv_float_option(tmp_path, helpers):
    lm = _vit(1, 4, 16)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    x = _x(lm)
    with torch.no_grad():
        Q(x)
    res, m = _export(tmp_path, "int4_float_conv", lm, Q, weight_only_int4_block=16, patch_embed="float")
    assert not any(n.name.startswith("patch_embed") and n.op_type == "DequantizeLinear" for n in m.graph.node)
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    w = numpy_helper.to_array(_inits(m)[conv.input[1]])
    assert w.dtype == np.float32 and np.array_equal(w, lm.model.patch_embed.proj.weight.detach().numpy())
    import json

    assert json.loads({p.key: p.value for p in m.metadata_props}["maskaq.quant"])["patch_embed"] == "float"
    _ov(res.path, x.numpy())


def test_int4_swin_openvino(tmp_path, helpers):
    torch.manual_seed(0)
    lm = load_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=28, patch_size=2, in_chans=1,
                    embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=10)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    x = _x(lm, 2)
    with torch.no_grad():
        Q(x)
    res, m = _export(tmp_path, "swin_int4", lm, Q, weight_only_int4_block=16)
    assert "block_size" not in _attrs(_dq(m, "patch_embed.proj"))
    ref = helpers.ort_session(res.path).run(None, {"input": x.numpy()})[0]
    got = _ov(res.path, x.numpy())
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


# --- item 3: the weight-only calibration flow ---------------------------------------------------

def test_weight_only_config_has_no_activation_quantizers():
    lm = _vit(1, 4, 16)
    Q = quantize_model(lm.model, QuantConfig(4, 16, weight_block=16))
    qs = dict(quantizers(Q))
    assert qs and not any(isinstance(m, ActQuantizer) for m in qs.values())
    w = Q.blocks[0].mlp.fc2  # [32, 128]: 8 blocks of 16 per output channel
    assert w.weight_quantizer.scale_for(w.weight).shape == (32, 8)
    assert Q.patch_embed.proj.weight_quantizer.block == 0  # the conv stays per channel
    assert QuantConfig(4, 16).weight_only and not QuantConfig(4, 8).weight_only
    with pytest.raises(QuantError, match="weight-only"):
        QuantConfig(4, 4, weight_block=32)
    with pytest.raises(QuantError, match="power of two"):
        QuantConfig(4, 16, weight_block=24)
    Qf = quantize_model(lm.model, QuantConfig(4, 16, weight_block=16, patch_embed="float"))
    assert not hasattr(Qf.patch_embed.proj, "weight_quantizer")


def test_block_clip_search_beats_round_to_nearest():
    """No data at all: each block's clipping ratio minimises its own reconstruction error."""
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.05).sample((64, 96)) * (1 + torch.rand(64, 1, generator=g))
    wq = WeightQuantizer(4, block=32)
    rtn = ((wq(w) - w) ** 2).mean()
    wq.set_clip(search_weight_clip(w, 4, block=32))
    assert wq.clip.shape == (64 * 3,) and bool((wq.clip <= 1).all())
    assert ((wq(w) - w) ** 2).mean() < 0.9 * rtn


def test_weight_only_export_matches_pytorch(tmp_path, helpers):
    lm = _vit(3, 8, 32)
    Q = quantize_model(lm.model, QuantConfig(4, 16, weight_block=16))
    x = _x(lm, 8)
    init_ranges(Q, lambda M: M(x), method="mse", weight_clip="mse")  # block-wise clips, no activations
    assert any(m.clip.numel() for _, m in quantizers(Q))
    res, m = _export(tmp_path, "wo", lm, Q)
    assert res.profile == "int4-weight-only" and res.opset == 21
    assert not any(n.op_type in ("QuantizeLinear", "Clip") for n in m.graph.node)  # activations float
    inits = _inits(m)
    fc2 = _dq(m, "blocks.0.mlp.fc2")
    a = _attrs(fc2)
    assert a["block_size"] == 16 and a["axis"] == 0  # stored [in, out]: blocks along the input
    assert inits[fc2.input[0]].data_type == TensorProto.INT4
    wq = Q.blocks[0].mlp.fc2.weight_quantizer
    assert np.array_equal(numpy_helper.to_array(inits[fc2.input[1]]), wq.scale_for(Q.blocks[0].mlp.fc2.weight).numpy().T)
    with torch.no_grad():
        ref = Q(x).numpy()
    got = helpers.ort_session(res.path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())  # the calibrated weights, exactly
    opt = tmp_path / "wo.opt.onnx"
    sess = helpers.ort_session(res.path, exact=False, optimized_path=opt,
                               **{"session.qdq_matmulnbits_accuracy_level": "0"})
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops.count("MatMulNBits") == 5  # qkv, proj, fc1, fc2, head
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(_ov(res.path, x.numpy()) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    with pytest.raises(Exception, match="blocks of 16"):
        _export(tmp_path, "wo32", lm, Q, weight_only_int4_block=32)


def test_partial_blocks_are_reported(tmp_path):
    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                    embed_dim=24, depth=1, num_heads=2, num_classes=10)
    Q = quantize_model(lm.model, QuantConfig(4, 16, weight_block=16))
    res, _ = _export(tmp_path, "partial", lm, Q)
    assert "blocks.0.attn.qkv.weight_quantizer" in res.partial_blocks  # 24 inputs: a block of 16 and one of 8


# --- item 4: INT4 storage of per-channel weights ------------------------------------------------

def test_int4_storage_exact_and_smaller(tmp_path, helpers):
    lm = _vit(3, 8, 32)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a", keep_8bit=("head",)))
    x = _x(lm, 8)
    with torch.no_grad():
        Q(x)
    r8, m8 = _export(tmp_path, "s8", lm, Q)
    r4, m4 = _export(tmp_path, "s4", lm, Q, weight_storage="int4")
    assert r8.opset == 20 and r4.opset == 21
    inits = _inits(m4)
    n4 = 0
    for n in m4.graph.node:
        if n.op_type == "DequantizeLinear" and "weight_quantizer" in n.name:
            t = inits[n.input[0]]
            want = TensorProto.INT8 if n.name.startswith("head.") else TensorProto.INT4  # the 8-bit head stays int8
            assert t.data_type == want, n.name
            assert np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(_inits(m8)[n.input[0]]))
            n4 += int(np.prod(t.dims)) if want == TensorProto.INT4 else 0
    assert n4 and r8.size_bytes - r4.size_bytes >= 0.45 * n4  # half a byte saved per 4-bit weight
    with torch.no_grad():
        ref = Q(x).numpy()
    a = helpers.ort_session(r4.path).run(None, {"input": x.numpy()})[0]
    b = helpers.ort_session(r8.path).run(None, {"input": x.numpy()})[0]
    assert np.array_equal(a, b) and np.abs(a - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    d = helpers.ort_session(r4.path, exact=False).run(None, {"input": x.numpy()})[0]
    assert (d.argmax(1) == ref.argmax(1)).mean() >= 0.75
    assert np.abs(_ov(r4.path, x.numpy()) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    with pytest.raises(Exception, match="opset"):
        _export(tmp_path, "s4_20", lm, Q, weight_storage="int4", opset=20)


# --- item 5: the head in integer ----------------------------------------------------------------

def test_head_runs_integer_in_deploy_mode(tmp_path, helpers):
    lm = _vit(1, 4, 16)
    with torch.no_grad():  # timm initialises the head bias to 0 (which the exporter folds away)
        lm.model.head.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    x = _x(lm, 64, seed=3)
    with torch.no_grad():
        Q(x[:8])
        # a signed head input (a ViT's final LayerNorm output): the case that stayed a float Gemm
        Q.head.input_quantizer.is_signed.fill_(True)
        Q.head.input_quantizer.zero_point.fill_(-1.0)
        Q.head.input_quantizer.sync_flags()
    res, m = _export(tmp_path, "head", lm, Q)
    assert res.census.get("Gemm", 0) == 0 and res.census.get("Sub", 0) >= 1
    # a signed 4-bit grid is stored as uint8 q - qmin (the OpenVINO-exact encoding, export-notes.md)
    zp = _inits(m)["head.input_quantizer.zero_point"]
    assert zp.data_type == TensorProto.UINT8 and onnx.numpy_helper.to_array(zp) == -1 + 8
    opt = tmp_path / "head.opt.onnx"
    deploy = helpers.ort_session(res.path, exact=False, optimized_path=opt)
    c: dict[str, int] = {}
    for n in onnx.load(str(opt)).graph.node:
        c[n.op_type] = c.get(n.op_type, 0) + 1
    assert sum(c.get(k, 0) for k in INTEGER_MATMULS) == 7, c  # qkv, q@k, p@v, proj, fc1, fc2 + head
    assert c.get("Gemm", 0) == 0 and c.get("MatMul", 0) == 0, c
    with torch.no_grad():
        ref = Q(x).numpy()
    ex = helpers.ort_session(res.path).run(None, {"input": x.numpy()})[0]
    assert np.abs(ex - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    dp = deploy.run(None, {"input": x.numpy()})[0]
    assert (dp.argmax(1) == ex.argmax(1)).mean() >= 0.95


def test_weight_only_state_round_trip(tmp_path):
    """A weight-only Q's config rebuilds the same quantizers (what --from-state relies on)."""
    lm = _vit(1, 4, 16)
    cfg = QuantConfig(4, 16, weight_block=16)
    Q = quantize_model(lm.model, cfg)
    init_ranges(Q, lambda M: M(_x(lm)), weight_clip="mse")
    Q2 = quantize_model(lm.model, QuantConfig(**{**cfg.to_json(), "keep_8bit": tuple(cfg.keep_8bit)}))
    Q2.load_state_dict(copy.deepcopy(Q.state_dict()))
    x = _x(lm)
    with torch.no_grad():
        assert torch.equal(Q(x), Q2(x))


# --- the command line ---------------------------------------------------------------------------

def _invoke(*args):
    from click.testing import CliRunner

    from export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_weight_only_flow(tmp_path, helpers):
    from maskaq.models import save_checkpoint
    from maskaq.pipeline import load_calibrated

    args = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, **args)
    ck = tmp_path / "tiny.maskaq.pt"
    save_checkpoint(ck, lm.model, "vit_tiny_patch16_224", args, lm.data_config)
    out = tmp_path / "w4.onnx"
    r = _invoke(ck, "--bits", "4", "--weight-only", "--block-size", "32", "--preset", "tiny", "--set", "num_images=4",
                "--set", "synth.steps=1", "--set", "calib.epochs=1", "-q", "-o", out)
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out))
    assert not any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    assert {_attrs(n).get("block_size") for n in m.graph.node if n.op_type == "DequantizeLinear"} == {32, None}
    Q, loaded, rc = load_calibrated(tmp_path / "w4.run" / "calibrated.pt")
    assert rc.a_bits == 16 and rc.weight_block == 32
    assert not any(isinstance(q, ActQuantizer) for _, q in quantizers(Q))
    x = _x(loaded, 4)
    with torch.no_grad():
        ref = Q(x).numpy()
    got = helpers.ort_session(out).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())  # the calibrated weights are the file's


@pytest.mark.parametrize("args,needle", [
    (("--weight-only", "--a-bits", "4"), "contradicts"),
    (("--weight-only", "--weight-storage", "int4"), "--weight-storage"),
    (("--weight-storage", "int4", "--opset", "20"), "opset >= 21"),
    (("--patch-embed", "half"), "--patch-embed"),
])
def test_cli_bad_weight_options_one_line(tmp_path, args, needle):
    r = _invoke("fmnist_vit", "--bits", "4", *args, "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2 and needle in r.output
    assert list(tmp_path.iterdir()) == []


def test_float_activations_per_channel_weights(tmp_path, helpers):
    """``--a-bits 16`` alone: float activations, per-channel weights (opset 20, int8; or INT4 storage)."""
    lm = _vit(1, 4, 16)
    Q = quantize_model(lm.model, QuantConfig(4, 16))
    x = _x(lm)
    r8, m8 = _export(tmp_path, "wo_pc", lm, Q)
    r4, m4 = _export(tmp_path, "wo_pc4", lm, Q, weight_storage="int4")
    import json

    for r, m, dt in ((r8, m8, TensorProto.INT8), (r4, m4, TensorProto.INT4)):
        assert r.profile == "ort" and not any(n.op_type == "QuantizeLinear" for n in m.graph.node)
        dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert dqs and all("block_size" not in _attrs(n) and _inits(m)[n.input[0]].data_type == dt for n in dqs)
        assert json.loads({p.key: p.value for p in m.metadata_props}["maskaq.quant"])["a_bits"] == 32
    with torch.no_grad():
        ref = Q(x).numpy()
    for r in (r8, r4):
        got = helpers.ort_session(r.path).run(None, {"input": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
