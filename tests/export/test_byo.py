"""Issue 13: a user's own ViT from the command line (timm flags, bare state dicts, hub-style
folders), the float graph beside the quantized one, the sensitivity report and --keep-8bit."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import timm
import torch
from click.testing import CliRunner

from export.analyse_cli import main as analyse_main
from export.cli import main
from export.cli_common import expand_variadic
from maskaq.models import ModelError, load_model
from maskaq.qmodel import QuantConfig, quantize_model, quantizers
from maskaq.sensitivity import analyse_quantizers, format_text, write_report


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _ref(model, x):
    with torch.no_grad():
        return model.eval()(x)


# --- reading what a checkpoint says -----------------------------------------------------------

def test_bare_vit_state_dict_non_square_needs_only_heads(tmp_path, caplog):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=(24, 32), patch_size=8, in_chans=1, num_classes=5,
                          embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, qkv_bias=False).eval()
    p = tmp_path / "x.pth"
    torch.save(m.state_dict(), p)
    with pytest.raises(ModelError, match=r"--model-kwargs num_heads=N .*divides 32"):
        load_model("vit_tiny_patch16_224", checkpoint=p, img_size=[24, 32])
    # 3 x 4 patches + CLS = 13 positions: not square, so the image size must be given
    with pytest.raises(ModelError, match="--img-size HxW"):
        load_model("vit_tiny_patch16_224", checkpoint=p, num_heads=2)
    with caplog.at_level(logging.INFO, logger="maskaq.byo"):
        lm = load_model("vit_tiny_patch16_224", checkpoint=p, num_heads=2, img_size=[24, 32])
    msg = [r.getMessage() for r in caplog.records if r.name == "maskaq.byo"]
    assert len(msg) == 1 and "inferred from" in msg[0]
    for needle in ("patch_size=8", "in_chans=1", "embed_dim=32", "depth=3", "num_classes=5", "mlp_ratio=2.0"):
        assert needle in msg[0]
    assert lm.data_config.input_size == (1, 24, 32)
    assert lm.model_args["qkv_bias"] is False and lm.model_args["depth"] == 3
    x = torch.randn(2, 1, 24, 32)
    torch.testing.assert_close(_ref(lm.model, x), _ref(m, x), atol=1e-5, rtol=1e-5)


def test_square_image_size_and_width_default_heads(tmp_path):
    torch.manual_seed(1)
    # width 192 = vit_tiny's: its 3 heads apply; 28x28 image / patch 4 read from pos_embed
    m = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10,
                          depth=1, init_values=1e-5, global_pool="avg").eval()
    p = tmp_path / "ls.pth"
    torch.save({"state_dict": m.state_dict()}, p)
    lm = load_model("vit_tiny_patch16_224", checkpoint=p)
    assert lm.data_config.input_size == (1, 28, 28) and lm.model_args["num_heads"] == 3
    assert lm.model_args["global_pool"] == "avg" and lm.model_args["init_values"]
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(_ref(lm.model, x), _ref(m, x), atol=1e-5, rtol=1e-5)


def test_distilled_deit_with_wrapper_and_module_prefix(tmp_path):
    torch.manual_seed(2)
    m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, num_classes=7,
                          embed_dim=48, depth=2, num_heads=3).eval()
    p = tmp_path / "deit.pth"
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}, p)
    lm = load_model(str(p), num_heads=3)  # a bare state dict as MODEL: the family is read too
    assert type(lm.model).__name__ == "VisionTransformerDistilled"
    assert lm.name == "deit_tiny_distilled_patch16_224" and lm.model_args["num_classes"] == 7
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_ref(lm.model, x), _ref(m, x), atol=1e-5, rtol=1e-5)
    # a plain ViT name given for a distilled checkpoint: built as timm's distilled class
    lm2 = load_model("vit_tiny_patch16_224", checkpoint=p, num_heads=3)
    assert type(lm2.model).__name__ == "VisionTransformerDistilled"


def test_swin_heads_per_stage_from_bias_tables(tmp_path, caplog):
    torch.manual_seed(3)
    m = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, patch_size=4, in_chans=2, embed_dim=16,
                          depths=(2, 1), num_heads=(2, 4), window_size=7, num_classes=6).eval()
    p = tmp_path / "swin.pth"
    torch.save(m.state_dict(), p)
    with caplog.at_level(logging.INFO, logger="maskaq.byo"):
        lm = load_model("swin_tiny_patch4_window7_224", checkpoint=p, img_size=56)
    a = lm.model_args
    assert (a["depths"], a["num_heads"], a["window_size"], a["embed_dim"], a["in_chans"], a["num_classes"]) == \
        ([2, 1], [2, 4], 7, 16, 2, 6)
    assert any("num_heads=[2, 4]" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 2, 56, 56)
    torch.testing.assert_close(_ref(lm.model, x), _ref(m, x), atol=1e-5, rtol=1e-5)


def test_contradicting_arguments_and_unknown_layout(tmp_path):
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, depth=1)
    p = tmp_path / "v.pth"
    torch.save(m.state_dict(), p)
    with pytest.raises(ModelError, match=r"contradicts .*num_classes=9 \(the checkpoint says 4\)"):
        load_model("vit_tiny_patch16_224", checkpoint=p, num_classes=9)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "cnn.pth")
    with pytest.raises(ModelError, match="neither a maskaq checkpoint nor a timm ViT"):
        load_model(str(tmp_path / "cnn.pth"))


def test_hub_folder_written_by_timm(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(4)
    m = timm.create_model("vit_tiny_patch16_224", img_size=(24, 32), patch_size=8, in_chans=1, num_classes=3,
                          embed_dim=32, depth=1, num_heads=4).eval()
    d = tmp_path / "my_vit_hf"
    save_for_hf(m, str(d), model_config={"label_names": ["ant", "bee", "cat"]},
                data_config={"mean": (0.25,), "std": (0.5,), "crop_pct": 1.0, "interpolation": "bilinear"},
                safe_serialization=True)
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    lm = load_model(str(d))
    dc = lm.data_config
    assert dc.input_size == (1, 24, 32) and dc.mean == (0.25,) and dc.std == (0.5,)
    assert dc.crop_pct == 1.0 and dc.interpolation == "bilinear"
    assert lm.labels == ["ant", "bee", "cat"] and lm.source["weights"] == "hub-folder"
    x = torch.randn(2, 1, 24, 32)
    torch.testing.assert_close(_ref(lm.model, x), _ref(m, x), atol=1e-5, rtol=1e-5)
    # an older export without model_args: the tensors fill the gaps
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_args")
    cfg["pretrained_cfg"]["input_size"] = [1, 24, 32]
    (d / "config.json").write_text(json.dumps(cfg))
    lm2 = load_model(str(d), num_heads=4)
    torch.testing.assert_close(_ref(lm2.model, x), _ref(m, x), atol=1e-5, rtol=1e-5)


def test_variadic_options_expand_like_timm():
    argv = ["m", "--model-kwargs", "num_heads=4", "mlp_ratio=2.0", "--mean", "0.5", "0.4", "0.3", "--bits", "4",
            "--keep-8bit", "head,blocks.0.*", "blocks.1.attn", "-o", "x.onnx"]
    assert expand_variadic(argv) == [
        "m", "--model-kwargs", "num_heads=4", "--model-kwargs", "mlp_ratio=2.0", "--mean", "0.5", "--mean", "0.4",
        "--mean", "0.3", "--bits", "4", "--keep-8bit", "head", "--keep-8bit", "blocks.0.*", "--keep-8bit",
        "blocks.1.attn", "-o", "x.onnx"]
    # MODEL after --keep-8bit is not swallowed
    assert expand_variadic(["--keep-8bit", "head", "deit_t"]) == ["--keep-8bit", "head", "deit_t"]


# --- the sensitivity report ranks a deliberately fragile layer first --------------------------

def test_sensitivity_ranks_the_fragile_layer_first(tmp_path):
    from tests.tiny_models import tiny_model

    lm = tiny_model("vit", seed=5)
    P = lm.model
    with torch.no_grad():
        P.head.weight *= 30  # confident outputs, as a trained model's
        # input feature 0 of block 1's fc1 is always 0 (its LayerNorm gain and bias are 0), so an
        # outlier weight on it (30x the weights' std) leaves P unchanged but makes every row's 4-bit
        # grid so coarse that most of fc1's other weights round to zero; an 8-bit grid copes
        P.blocks[1].norm2.weight[0] = 0.0
        P.blocks[1].norm2.bias[0] = 0.0
        P.blocks[1].mlp.fc1.weight[:, 0] = 0.6
    x = torch.randn(16, *lm.data_config.input_size, generator=torch.Generator().manual_seed(0))

    def calibrated(cfg):
        Q = quantize_model(P, cfg)
        ws = [m for _, m in quantizers(Q) if m.kind == "weight"]
        for m in ws:  # activation ranges from P's own activations
            m.enabled = False
        with torch.no_grad():
            Q(x)
        for m in ws:
            m.enabled = True
        return Q

    Q = calibrated(QuantConfig(4, 8))
    res = analyse_quantizers(Q, x, batch_size=8, progress=False)
    rows = res["rows"]
    assert rows[0]["quantizer"] == "blocks.1.mlp.fc1.weight_quantizer"
    assert rows[0]["kl"] > 10 * rows[1]["kl"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(rows[i]["kl"] >= rows[i + 1]["kl"] for i in range(len(rows) - 1))
    names = {r["quantizer"] for r in rows}
    assert names == {n for n, m in Q.named_modules() if type(m).__name__ in ("ActQuantizer", "WeightQuantizer")}
    assert all(m.enabled for n, m in Q.named_modules() if hasattr(m, "enabled"))  # states restored
    paths = write_report(res, tmp_path / "sens")
    data = json.loads(open(paths["json"]).read())
    assert data["rows"][0]["quantizer"] == "blocks.1.mlp.fc1.weight_quantizer"
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = format_text(res)
    assert len(text.splitlines()) <= 30 and "--keep-8bit blocks.1.mlp.fc1.weight_quantizer" in text
    # the fix: that layer at 8 bit, the damage gone
    Q8 = calibrated(QuantConfig(4, 8, keep_8bit=("blocks.1.mlp.fc1",)))
    assert Q8.blocks[1].mlp.fc1.weight_quantizer.bits == 8 and Q8.blocks[0].mlp.fc1.weight_quantizer.bits == 4
    fixed = analyse_quantizers(Q8, x, batch_size=16, progress=False)
    assert fixed["whole_model"]["kl"] < 0.1 * res["whole_model"]["kl"]
    assert fixed["rows"][0]["quantizer"] != "blocks.1.mlp.fc1.weight_quantizer"


# --- one tiny run end to end through maskaq-export --------------------------------------------

@pytest.fixture(scope="module")
def byo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=(24, 32), patch_size=8, in_chans=1, num_classes=4,
                          embed_dim=32, depth=1, num_heads=2).eval()
    torch.save(m.state_dict(), d / "x.pth")
    (d / "labels.txt").write_text("ant\nbee\ncat\ndog\n")
    r = CliRunner().invoke(main, [
        "vit_tiny_patch16_224", "--checkpoint", str(d / "x.pth"), "--model-kwargs", "num_heads=2",
        "--img-size", "24x32", "--mean", "0.3", "--std", "0.2", "--crop-pct", "1.0", "--interpolation", "bilinear",
        "--labels", str(d / "labels.txt"), "--bits", "4", "--preset", "tiny",
        "--keep-8bit", "blocks.0.attn", "head.*", "--fp32-out", str(d / "f32.onnx"), "--analyse",
        "-o", str(d / "q.onnx")], catch_exceptions=False)
    return d, r, m


def test_byo_run_flags_land_in_metadata_and_report(byo_run):
    d, r, _ = byo_run
    assert r.exit_code == 0, r.output
    info = [ln for ln in r.stderr.splitlines() if "inferred from" in ln]
    assert len(info) == 1 and info[0].startswith("maskaq-export: info: inferred from")
    md = {p.key: p.value for p in onnx.load(str(d / "q.onnx")).metadata_props}
    pre = json.loads(md["maskaq.preprocessing"])
    assert pre["input_size"] == [1, 24, 32] and pre["mean"] == [0.3] and pre["std"] == [0.2]
    assert pre["crop_pct"] == 1.0 and pre["interpolation"] == "bilinear"
    assert json.loads(md["maskaq.labels"]) == ["ant", "bee", "cat", "dog"]
    run = json.loads(md["maskaq.config"])["run"]
    assert run["model_args"]["num_heads"] == 2 and run["model_args"]["img_size"] == [24, 32]
    assert run["keep_8bit"] == ["blocks.0.attn", "head.*"] and run["preprocessing"]["mean"] == [0.3]
    rep = json.loads((d / "q.report.json").read_text())
    assert rep["model"]["data_config"]["mean"] == [0.3] and rep["model"]["labels"][0] == "ant"
    assert rep["sensitivity"]["json"].endswith("q.sensitivity.json")


def test_keep_8bit_in_graph_sidecar_and_metadata(byo_run):
    d, _, _ = byo_run
    enc = json.loads((d / "q.encodings.json").read_text())
    bits = {k: v["bits"] for k, v in enc["maskaq"]["quantizers"].items()}
    kept = {"blocks.0.attn.q_quantizer", "blocks.0.attn.k_quantizer", "blocks.0.attn.softmax_quantizer",
            "blocks.0.attn.v_quantizer", "head.input_quantizer", "head.weight_quantizer"}
    assert {k for k, b in bits.items() if b == 8} == kept
    assert all(b == 4 for k, b in bits.items() if k not in kept)
    assert enc["param_encodings"]["head.weight"][0]["bitwidth"] == 8
    assert enc["param_encodings"]["blocks.0.mlp.fc1.weight"][0]["bitwidth"] == 4
    m = onnx.load(str(d / "q.onnx"))
    nodes = {n.name for n in m.graph.node}
    # low-bit activations carry the narrowing Clip in front of their QuantizeLinear; 8-bit ones do not
    assert "blocks.0.mlp.fc1.input_quantizer/Clip" in nodes and "blocks.0.attn.q_quantizer/Clip" not in nodes
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    assert np.abs(inits["head.weight_quantizer.qweight"]).max() > 7  # an 8-bit grid
    assert np.abs(inits["blocks.0.mlp.fc1.weight_quantizer.qweight"]).max() <= 8
    quant = json.loads({p.key: p.value for p in m.metadata_props}["maskaq.quant"])
    assert quant["keep_8bit"] == ["blocks.0.attn", "head.*"] and set(quant["mixed_bits"]) == kept


def test_fp32_graph_matches_pytorch_and_evaluates_beside_q(byo_run, tmp_path):
    import onnxruntime as ort

    from maskaq.pipeline import load_calibrated
    from runtime_eval.runner import evaluate

    d, _, m = byo_run
    f32 = onnx.load(str(d / "f32.onnx"))
    q = onnx.load(str(d / "q.onnx"))
    assert [i.name for i in f32.graph.input] == [i.name for i in q.graph.input] == ["input"]
    assert [o.name for o in f32.graph.output] == [o.name for o in q.graph.output] == ["logits"]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in f32.graph.node)
    mf, mq = ({p.key: p.value for p in x.metadata_props} for x in (f32, q))
    assert mf["maskaq.preprocessing"] == mq["maskaq.preprocessing"] and mf["maskaq.labels"] == mq["maskaq.labels"]
    assert json.loads(mf["maskaq.quant"])["profile"] == "fp32"
    assert not (d / "f32.encodings.json").exists()
    x = torch.randn(3, 1, 24, 32, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(d / "f32.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    _, loaded, _ = load_calibrated(d / "q.run" / "calibrated.pt")
    np.testing.assert_allclose(got, _ref(loaded.model, x).numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, _ref(m, x).numpy(), atol=1e-4, rtol=1e-4)  # the user's own model
    # maskaq-eval q.onnx --fp32 f32.onnx on a folder of images (class folders = the labels)
    from PIL import Image

    for k, name in enumerate(["ant", "bee", "cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.full((24, 32), 40 * k + 20, np.uint8), "L").save(tmp_path / "imgs" / name / "0.png")
    rep = evaluate(d / "q.onnx", "imagefolder", tmp_path / "imgs", fp32=d / "f32.onnx", providers=["cpu"])
    assert rep["fp32"] is not None and rep["fp32"]["metrics"]["top1"] is not None


def test_analyse_outputs_and_maskaq_analyse_cli(byo_run, tmp_path):
    d, _, _ = byo_run
    data = json.loads((d / "q.sensitivity.json").read_text())
    assert data["schema"] == "maskaq-sensitivity/1" and data["num_quantizers"] == 15
    enc = json.loads((d / "q.encodings.json").read_text())
    assert {r["quantizer"] for r in data["rows"]} == set(enc["maskaq"]["quantizers"])  # the ONNX names
    inits = {t.name for t in onnx.load(str(d / "q.onnx")).graph.initializer}
    assert all(r["onnx"]["scale"] in inits for r in data["rows"])
    assert (d / "q.sensitivity.png").stat().st_size > 1000 and (d / "q.sensitivity.txt").is_file()
    r = CliRunner().invoke(analyse_main, [str(d / "q.run" / "calibrated.pt"), "-n", "4", "-q",
                                          "-o", str(tmp_path / "s")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["num_images"] == 4 and s["rows"][0]["rank"] == 1
    r = CliRunner().invoke(analyse_main, [str(tmp_path / "nope.pt")])
    assert r.exit_code == 2 and r.stderr.strip().startswith("maskaq-analyse: error:") and \
        len(r.stderr.strip().splitlines()) == 1


BAD = [
    (("--num-classes", "5", "--model-kwargs", "num_classes=6"), "contradicts --model-kwargs num_classes=6"),
    (("--img-size", "abc"), "--img-size 'abc'"),
    (("--mean", "0.1", "0.2"), "--mean has 2 values"),
    (("--std", "0"), "--std values must be positive"),
    (("--interpolation", "cubic"), "--interpolation 'cubic'"),
    (("--crop-pct", "1.5"), "--crop-pct 1.5"),
    (("--labels", "{d}/nope.txt"), "labels file"),
    (("--keep-8bit", "nothing.like.this"), "matches no quantizer"),
    (("--model-kwargs", "num_heads"), "KEY=VALUE"),
    (("--model-kwargs", "num_heads=5"), "cannot build"),
    (("--fp32-out", "{d}/q.onnx"), "--fp32-out must differ"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_combinations_one_line_exit_2_nothing_written(tmp_path, extra, needle):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=4,
                          embed_dim=32, depth=1, num_heads=2)
    ck = tmp_path / "x.pth"
    torch.save(m.state_dict(), ck)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["vit_tiny_patch16_224", "--checkpoint", ck, "--bits", "4", "--preset", "tiny", "-o", tmp_path / "q.onnx",
            *(a.format(d=tmp_path) for a in extra)]
    if "num_heads" not in " ".join(extra):
        args += ["--model-kwargs", "num_heads=2"]
    r = invoke(*args)
    # an error found after loading comes after the one info line saying what was inferred
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("maskaq-export: info: inferred")]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("maskaq-export: error: ") and needle in lines[0], lines
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_from_state_refuses_architecture_flags(byo_run, tmp_path):
    d, _, _ = byo_run
    r = invoke("--from-state", d / "q.run" / "calibrated.pt", "--mean", "0.5", "--keep-8bit", "head",
               "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "--keep-8bit, --mean do not apply" in r.stderr
