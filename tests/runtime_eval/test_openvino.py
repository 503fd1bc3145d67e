"""maskaq-eval --runtime openvino: a tiny model exported with the project's exporter runs in both
runtimes through the CLI, with the same report fields, the same top-1 and OpenVINO's kernel
census; a missing openvino package is one line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rteval_helpers as H
from click.testing import CliRunner

from runtime_eval.cli import main

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 48


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # click < 8.2 mixes the streams
        return result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 1x28x28 ViT (2 blocks) quantized 8w8a, calibrated on one batch, exported by
    export.export_onnx; Fashion-MNIST-layout IDX files of random images whose labels are the
    PyTorch model's own predictions (so top-1 measures agreement with fake quant)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from export import export_onnx
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model

    d = tmp_path_factory.mktemp("ov")
    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                    embed_dim=48, depth=2, num_heads=3, num_classes=10)
    Q = quantize_model(lm.model, QuantConfig.parse("8w8a"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, 28, 28), dtype=np.uint8)
    x = torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5).unsqueeze(1)
    with torch.no_grad():
        Q.eval()
        Q(x[:16])  # first-batch initialisation of every activation quantizer
        labels = Q(x).argmax(1).numpy().astype(np.uint8)
    res = export_onnx(Q, d / "q.onnx", data_config=lm.data_config, source=lm.source,
                      labels=[f"c{i}" for i in range(10)], metadata={"method": "test", "seed": 0})
    root = d / "fm"
    H.write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    H.write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    return res.path, root, d


def _eval(exported, name, *extra):
    path, root, d = exported
    out = d / f"{name}.json"
    r = _run([path, "--task", "fashion-mnist", "--data", root, "-o", out, "-q", "--batch-size", "16",
              "--latency", "--latency-batch", "1,4", "--latency-iters", "2", *extra])
    assert r.exit_code == 0, _stderr(r)
    return json.loads(out.read_text()), r.output


def _keys(obj, prefix=""):
    """Every dotted key path of a report, lists and per-class values aside."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if prefix.endswith(("by_region.", "layers.", "compute.", "session_config.")):
                continue
            out.add(prefix + k)
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_both_runtimes_same_fields_same_top1_and_int8_census(exported):
    ort_rep, _ = _eval(exported, "ort", "--runtime", "ort")
    ov_rep, ov_text = _eval(exported, "ov", "--runtime", "openvino")

    # same report layout: the runtime section differs only in its values
    assert _keys(ort_rep) - {"runtime.kernels"} == _keys(ov_rep) - {
        k for k in _keys(ov_rep) if k.startswith("runtime.kernels")
    }
    for rep, name in ((ort_rep, "onnxruntime"), (ov_rep, "openvino")):
        rt = rep["runtime"]
        assert rt["runtime"] == name and rt["runtime_version"] and rt["precision"] == "f32"
        assert rep["dataset"]["images"] == N_IMAGES
        assert set(rep["latency"]["batch_sizes"]) == {"1", "4"}
    assert ov_rep["runtime"]["openvino"] == ov_rep["runtime"]["runtime_version"]
    assert ov_rep["runtime"]["mode"] == "deploy" and ov_rep["runtime"]["providers_used"] == ["OpenVINO:CPU"]
    assert ort_rep["runtime"]["mode"] == "reference" and ort_rep["runtime"]["kernels"] is None

    # labels are the fake-quant model's predictions: ORT exact reproduces them, OpenVINO agrees
    assert ort_rep["metrics"]["top1"] == 100.0
    assert ov_rep["metrics"]["top1"] >= 100.0 * (N_IMAGES - 1) / N_IMAGES

    # kernel census: every Linear (2 blocks x qkv/proj/fc1/fc2 + head = 9) ran as an int8
    # FullyConnected; the patch-embedding conv (float input image) stays float
    k = ov_rep["runtime"]["kernels"]
    fc = k["compute"]["FullyConnected"]
    assert fc.get("i8", 0) + fc.get("u8", 0) == 9 and k["int8_layers"] == 9
    assert k["float_layers"] >= 1 and "Convolution" in k["compute"]
    assert any("i8" in p.lower() for p in k["primitives"]["FullyConnected"])
    assert "undef" not in json.dumps(k["primitives"])  # read after the run: real kernels
    assert "kernels   9 int8 /" in ov_text and "FullyConnected" in ov_text
    assert "runtime   openvino" in ov_text and "precision f32" in ov_text


def test_bf16_precision_is_reported(exported):
    rep, text = _eval(exported, "bf16", "--runtime", "openvino", "--precision", "bf16")
    rt = rep["runtime"]
    assert rt["precision_requested"] == "bf16"
    assert rt["precision"] in ("bf16", "f32")  # f32 where the CPU has no bf16 (with a warning)
    assert rt["session_config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert f"precision {rt['precision']}" in text


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--runtime", "ort", "--precision", "bf16"], "--precision applies to --runtime openvino only"),
        (["--runtime", "openvino", "--mode", "reference"], "no exact fake-quant (reference) mode"),
        (["--runtime", "openvino", "--provider", "cpu"], "--provider applies to --runtime ort only"),
        (["--runtime", "tflite"], "'tflite' is not one of"),
    ],
)
def test_bad_runtime_options_are_one_line(exported, args, msg):
    path, root, _ = exported
    r = _run([path, "--task", "fashion-mnist", "--data", root, "-q", *args])
    assert r.exit_code == 2
    err = _stderr(r).strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert "Traceback" not in err


def test_missing_openvino_is_one_line_exit_2(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    path, root, d = exported
    out = d / "none.json"
    r = _run([path, "--task", "fashion-mnist", "--data", root, "-q", "--runtime", "openvino", "-o", out])
    assert r.exit_code == 2
    err = _stderr(r).strip()
    assert err == ("maskaq-eval: error: --runtime openvino needs the openvino package, which is not "
                   "installed: pip install 'maskaq[openvino]'")
    assert not out.exists()


def test_ade20k_segmenter_runs_in_openvino_like_ort(tmp_path):
    """A dense task goes through the same session interface: same mIoU in both runtimes."""
    from runtime_eval import evaluate

    H.ade_fixture(tmp_path / "ade")
    model = H.segmenter(tmp_path / "seg.onnx")
    reps = {rt: evaluate(model, "ade20k", tmp_path / "ade", runtime=rt, workers=1,
                         **({"providers": ["cpu"]} if rt == "ort" else {})) for rt in ("ort", "openvino")}
    assert reps["openvino"]["metrics"]["mIoU"] == pytest.approx(reps["ort"]["metrics"]["mIoU"], abs=1e-6)
    assert reps["openvino"]["runtime"]["runtime"] == "openvino"
    assert reps["openvino"]["runtime"]["kernels"]["compute"]["Convolution"]
