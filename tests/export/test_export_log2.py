"""The log2 attention-probability quantizer (``quant.softmax_quant=log2``) exported as float ops:
structure and names, bit-exact per quantizer in ORT, logits as the linear export's, the threshold
table on adversarial values, encodings/metadata, the refusal of the pure-Q/DQ profile, what
runtime_eval reports, and the CLI end to end."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from export import export_onnx
from export.cli import main
from export.freeze import QuantRecord
from export.onnx_export import LOG2_DOMAIN, ExportError, log2_nodes
from export.profiles import convert_for_profile
from maskaq.models import load_model
from maskaq.quant import ActQuantizer, Log2Quantizer, QuantError, log2_fake_quant, log2_tables

pytestmark = pytest.mark.usefixtures("one_thread")

SOFTMAX = ["blocks.0.attn.softmax_quantizer", "blocks.1.attn.softmax_quantizer"]


@pytest.fixture(scope="module")
def vlog(outdir, helpers):
    """Tiny ViT 4w4a with log2 attention probabilities, profile ort. Its q/k projections are
    scaled up so that the random model's attention is peaked (probabilities from near 1 down to
    below the lowest level, as a trained model's are) instead of near uniform."""
    from maskaq.qmodel import QuantConfig, quantize_model

    lm, _, _ = helpers.build("vit", "4w4a")
    with torch.no_grad():
        for blk in lm.model.blocks:
            blk.attn.qkv.weight[: 2 * 48].mul_(6.0)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a", softmax_quant="log2"))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        Q(x)  # first-batch initialisation of every activation quantizer (log2: s = max)
    e = helpers.do_export(outdir, "vit_4w4a_log2", lm, Q)
    return SimpleNamespace(lm=lm, Q=Q, x=x, **vars(e))


def test_structure_names_and_tables(vlog):
    m = vlog.model
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain or "" for o in m.opset_import} == {""}  # the placeholder domain is gone
    assert not any(n.domain == LOG2_DOMAIN or n.op_type == "Log2Quant" for n in m.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    prod = {o: n for n in m.graph.node for o in n.output}
    for name in SOFTMAX:
        q = vlog.Q.get_submodule(name)
        assert isinstance(q, Log2Quantizer)
        t, v = log2_tables(float(q.scale), 4)
        assert np.array_equal(inits[f"{name}.thresholds"], t.numpy()) and inits[f"{name}.thresholds"].dtype == np.float32
        assert np.array_equal(inits[f"{name}.values"], v.numpy())
        g = nodes[f"{name}/Log2/GatherValue"]
        assert g.op_type == "Gather" and g.input[0] == f"{name}.values" and g.output == [f"{name}.dequantized"]
        assert prod[nodes[f"{name}/Log2/Less3"].input[0]].op_type == "Softmax"  # reads the probabilities
        # it feeds softmax @ v directly; no Q/DQ anywhere on it
        (mm,) = [n for n in m.graph.node if f"{name}.dequantized" in n.input]
        assert mm.op_type == "MatMul" and prod[mm.input[1]].op_type == "DequantizeLinear"
        assert not [n for n in m.graph.node if n.name.startswith(name) and n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    ops = vlog.res.census
    assert ops["QuantizeLinear"] == 15 and ops["Less"] == 8 and ops["Where"] == 8  # 17 - 2 linear activations


def test_every_quantizer_bit_exact_and_logits(vlog, helpers):
    """ORT's exact mode: each log2 quantizer's output equals the PyTorch quantizer applied to ORT's
    own softmax output bit for bit (so does every linear one); logits equal PyTorch fake-quant's up
    to float summation order, like the linear export."""
    info = vlog.enc["maskaq"]["quantizers"]
    names = sorted({v["onnx_input"] for v in info.values() if v["kind"] == "activation"}
                   | {v["onnx_output"] for v in info.values()})
    sess = helpers.ort_session(vlog.path, extra_outputs=names)
    got = helpers.run(sess, vlog.x, names)
    for qname in SOFTMAX:
        v = info[qname]
        with torch.no_grad():
            ref = vlog.Q.get_submodule(qname)(torch.from_numpy(got[v["onnx_input"]])).numpy()
        assert np.array_equal(got[v["onnx_output"]], ref), qname
        assert len(np.unique(ref)) >= 6  # many codes in use, not one level
    sess = helpers.ort_session(vlog.path)
    worst = 0.0
    for b in (1, 8):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(10 + b))
        with torch.no_grad():
            ref = vlog.Q(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        assert (out.argmax(1) == ref.argmax(1)).all()
        worst = max(worst, float(np.abs(out - ref).max()))
    assert worst <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    # ORT's default (deploy) mode runs the same float ops for the log2 part: the same codes
    dep = helpers.ort_session(vlog.path, exact=False, extra_outputs=names)
    got2 = helpers.run(dep, vlog.x, names)
    for qname in SOFTMAX:
        v = info[qname]
        with torch.no_grad():
            ref = vlog.Q.get_submodule(qname)(torch.from_numpy(got2[v["onnx_input"]])).numpy()
        assert np.array_equal(got2[v["onnx_output"]], ref)


@pytest.mark.parametrize("bits,scale", [(2, 1.0), (4, 0.8125), (5, 0.3), (7, 1.0)])
def test_threshold_table_on_adversarial_values(bits, scale):
    """The graph ``log2_nodes`` writes against torch.bucketize on the same table, on every
    threshold, one float32 step either side of it, 0, -0, s, above s, tiny values and inf."""
    import onnxruntime as ort

    t, v = log2_tables(scale, bits)
    rec = QuantRecord("q", "activation", bits, 0, 2**bits - 1, False, False, True, -1, "float32",
                      np.asarray(scale, np.float32), np.asarray(0), encoding="log2",
                      thresholds=t.numpy(), values=v.numpy())
    nodes, inits = log2_nodes(rec, "x", "y")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    s32 = torch.tensor(scale, dtype=torch.float32)
    xs = torch.cat([t, torch.nextafter(t, torch.zeros_like(t)), torch.nextafter(t, torch.ones_like(t)),
                    torch.tensor([0.0, -0.0, 1.0, 2.0, 1e-30, 1e-45, float("inf")]), s32.reshape(1),
                    torch.rand(5000, generator=torch.Generator().manual_seed(bits)) ** 8])
    ref = log2_fake_quant(xs, t, v)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": xs.numpy()})[0]
    assert np.array_equal(out, ref.numpy())
    assert ref[-5001].item() == float(s32) and ref[3 * len(t)].item() == 0.0  # s -> s, 0 -> 0


def test_encodings_and_metadata(vlog):
    enc = vlog.enc
    info = enc["maskaq"]["quantizers"]
    assert enc["maskaq"]["float_quantizers"] == SOFTMAX
    assert len(enc["activation_encodings"]) == 15 and len(enc["param_encodings"]) == 10
    for name in SOFTMAX:
        e = info[name]
        assert e["encoding"] == "log2" and e["bits"] == 4 and e["runs_in"] == "float"
        assert e["codes"] == [0, 15] and len(e["thresholds"]) == 15 and len(e["values"]) == 16
        assert e["scale"] == float(np.float32(float(vlog.Q.get_submodule(name).scale)))
        assert e["onnx_input"] not in enc["activation_encodings"]
    meta = {p.key: p.value for p in vlog.model.metadata_props}
    assert json.loads(meta["maskaq.quant"]) == {"w_bits": 4, "a_bits": 4, "profile": "ort", "method": "test",
                                                "softmax_quant": "log2", "float_quantizers": SOFTMAX}


def test_tensorrt_profile_refuses(vlog, outdir):
    with pytest.raises(ExportError, match="profile tensorrt needs pure Q/DQ") as ei:
        export_onnx(vlog.Q, outdir / "log2_trt.onnx", data_config=vlog.lm.data_config, profile="tensorrt")
    assert "\n" not in str(ei.value)
    assert not (outdir / "log2_trt.onnx").exists() and not (outdir / "log2_trt.encodings.json").exists()
    with pytest.raises(QuantError, match="needs pure Q/DQ"):
        convert_for_profile(vlog.Q, "tensorrt")


def test_runtime_eval_names_the_float_parts(vlog, vit):
    from runtime_eval.model import load_model_info

    info, _ = load_model_info(vlog.path)
    assert len(info.float_parts) == 2
    assert info.float_parts[0].startswith("2 log2 attention-probability quantizers (blocks.0.attn.softmax_quantizer")
    assert info.float_parts[1].startswith("2 attention MatMuls (softmax @ v)")
    assert info.report()["float_parts"] == info.float_parts
    plain, _ = load_model_info(vit.path)  # the default (linear) export: nothing in float
    assert plain.float_parts == []


def test_default_is_linear(vit):
    assert not any(isinstance(q, Log2Quantizer) for q in vit.Q.modules())
    assert all(isinstance(vit.Q.get_submodule(n), ActQuantizer) for n in SOFTMAX)
    assert "float_quantizers" not in vit.enc["maskaq"]
    assert vit.Q.maskaq_quant_config.softmax_quant == "linear"


# --- the command line -------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


FAST = ("--preset", "tiny", "--set", "num_images=4", "--set", "synth.steps=1", "--set", "calib.epochs=1")


def test_cli_set_softmax_quant_log2_end_to_end(tmp_path, tiny_ckpt, helpers):
    out = tmp_path / "log2.onnx"
    r = invoke(tiny_ckpt, "--bits", "4", *FAST, "--set", "quant.softmax_quant=log2", "-q", "-o", out)
    assert r.exit_code == 0, r.output
    m = onnx.load(str(out))
    quant = json.loads({p.key: p.value for p in m.metadata_props}["maskaq.quant"])
    assert quant["softmax_quant"] == "log2" and quant["float_quantizers"] == ["blocks.0.attn.softmax_quantizer"]
    from maskaq.pipeline import load_calibrated

    state = tmp_path / "log2.run" / "calibrated.pt"
    Q, _, rc = load_calibrated(state)
    assert isinstance(Q.get_submodule("blocks.0.attn.softmax_quantizer"), Log2Quantizer)
    assert rc.quant_config().softmax_quant == "log2" and bool(Q.get_submodule("blocks.0.attn.softmax_quantizer").initialized)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = Q(x).numpy()
    got = helpers.ort_session(out).run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # re-export of that state to the pure-Q/DQ profile: one error line, nothing written
    r = invoke("--from-state", state, "--profile", "tensorrt", "-o", tmp_path / "trt.onnx")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "needs pure Q/DQ" in lines[0], r.stderr
    assert not (tmp_path / "trt.onnx").exists()


def test_cli_refusals_before_any_work(tmp_path, tiny_ckpt):
    r = invoke(tiny_ckpt, "--bits", "4", *FAST, "--set", "quant.softmax_quant=log2", "--profile", "tensorrt",
               "-o", tmp_path / "m.onnx")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "profile tensorrt needs pure Q/DQ" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    for bad, needle in (("quant.softmax_quant=exp", "valid: linear, log2"), ("quant.nope=1", "quant.softmax_quant")):
        r = invoke(tiny_ckpt, "--bits", "4", *FAST, "--set", bad, "-o", tmp_path / "m.onnx")
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_config_quant_keys():
    from maskaq.pipeline import PipelineError, RunConfig, resolve_plan

    rc = RunConfig(model="fmnist_vit", overrides={"quant.softmax_quant": "log2", "calib.epochs": "2"})
    assert rc.quant_config().softmax_quant == "log2" and resolve_plan(rc).calib.epochs == 2
    assert RunConfig(model="fmnist_vit").quant_config().softmax_quant == "linear"
    assert RunConfig(model="fmnist_vit", a_bits=8, overrides={"quant.softmax_quant": "log2"}).quant_config().log2_softmax is False
    with pytest.raises(PipelineError, match="valid: linear, log2"):
        RunConfig(model="fmnist_vit", overrides={"quant.softmax_quant": "exp"})


def test_spdfq_own_stage_variant_sets_its_learning_stage_and_log2():
    """SPDFQ's own learning stage is one variant of its recipe: block-wise reconstruction and the log2
    softmax quantizer below 8 bit (linear at 8); the user's --set still has the last word; other methods
    refuse it."""
    from maskaq.pipeline import PipelineError, RunConfig, resolve_plan

    rc = RunConfig(model="fmnist_vit", method="spdfq", ablations=("own_stage",))
    assert rc.quant_config().log2_softmax and resolve_plan(rc).calib.stage == "blockwise"
    plain = RunConfig(model="fmnist_vit", method="spdfq")
    assert not plain.quant_config().log2_softmax and resolve_plan(plain).calib.stage == "blockwise+distill"  # the default
    assert RunConfig(model="fmnist_vit", method="spdfq", a_bits=8, ablations=("own_stage",)).quant_config().log2_softmax is False
    mine = RunConfig(model="fmnist_vit", method="spdfq", ablations=("own_stage",),
                     overrides={"quant.softmax_quant": "linear", "calib.stage": "distill"})
    assert mine.quant_config().softmax_quant == "linear" and resolve_plan(mine).calib.stage == "distill"
    with pytest.raises(PipelineError, match="apply to method 'spdfq' only"):
        RunConfig(model="fmnist_vit", method="maskaq", ablations=("own_stage",))


def test_cli_spdfq_own_stage_end_to_end(tmp_path, tiny_ckpt):
    out = tmp_path / "own.onnx"
    r = invoke(tiny_ckpt, "--bits", "4", "--method", "spdfq", "--ablation", "own_stage", *FAST,
               "--set", "calib.recon_iters=2", "-q", "-o", out)
    assert r.exit_code == 0, r.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["maskaq.quant"])["softmax_quant"] == "log2"
    run = json.loads(meta["maskaq.config"])["run"]
    assert run["method"] == "spdfq" and run["ablations"] == ["own_stage"]
    r = invoke(tiny_ckpt, "--bits", "4", "--method", "maskaq", "--ablation", "own_stage", *FAST, "-o", tmp_path / "m.onnx")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "apply to method 'spdfq' only" in lines[0], r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_maskaq_eval_deploy_report_says_what_runs_in_float(tmp_path):
    """maskaq-eval on a log2 file in deploy mode: the report's model section and the summary name
    the float parts (the log2 quantizers and the softmax @ v MatMuls they feed)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime_eval"))
    import rteval_helpers as H

    from maskaq.qmodel import QuantConfig, quantize_model
    from runtime_eval import evaluate
    from runtime_eval.report import summary

    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1, embed_dim=48,
                    depth=1, num_heads=3, num_classes=10)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a", softmax_quant="log2"))
    with torch.no_grad():
        Q(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    path = tmp_path / "fm_log2.onnx"
    export_onnx(Q, path, data_config=lm.data_config, labels=[f"c{i}" for i in range(10)], source=lm.source)
    root, _ = H.fashion_fixture(tmp_path / "fm", n=6)
    for mode in ("deploy", "reference"):
        rep = evaluate(path, "fashion-mnist", root, providers=["cpu"], mode=mode, batch_size=4)
        parts = rep["model"]["float_parts"]
        assert len(parts) == 2 and "log2 attention-probability quantizers" in parts[0] and "softmax @ v" in parts[1]
        assert f"float     {parts[0]}" in summary(rep).splitlines()


def test_openvino_runs_the_log2_graph_like_ort(vlog, helpers):
    """OpenVINO's CPU plugin (f32) compiles the log2 part (Less/Where/Gather on the threshold table)
    and gives ORT exact mode's logits (to float summation order: no code differs on these inputs)."""
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    comp = core.compile_model(core.read_model(str(vlog.path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    sess = helpers.ort_session(vlog.path)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5)).numpy()
    ref = sess.run(None, {"input": x})[0]
    got = comp(x)[comp.output(0)]
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert float(np.abs(got - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))  # measured: 4.5e-8
