"""``maskaq-export``: bad input is one line and exit status 2 with nothing written; a tiny run goes
end to end; a finished run re-exports to TensorRT and to INT4 without re-running synthesis."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from export.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_help_has_examples():
    r = invoke("--help")
    assert r.exit_code == 0
    for needle in ("Examples:", "--from-state", "--profile tensorrt", "--weight-only-int4", "fmnist_vit --bits 4"):
        assert needle in r.output


BAD = [
    (("fmnist_vit", "--bits", "9", "-o", "{d}/m.onnx"), "bit width 9"),
    (("fmnist_vit", "--bits", "4", "--a-bits", "1", "-o", "{d}/m.onnx"), "bit width 1"),
    (("no_such_model", "--bits", "4", "-o", "{d}/m.onnx"), "unknown model 'no_such_model'"),
    (("fmnist_vit", "--bits", "4", "-o", "{d}/missing/m.onnx"), "output directory"),
    (("fmnist_vit", "--bits", "4", "--set", "synth.nope=1", "-o", "{d}/m.onnx"), "unknown override key"),
    (("fmnist_vit", "--bits", "4", "--set", "synth.steps", "-o", "{d}/m.onnx"), "KEY=VALUE"),
    (("fmnist_vit", "--bits", "4", "--set", "calib.epochs=many", "-o", "{d}/m.onnx"), "does not fit"),
    (("deit_t", "--bits", "4", "--checkpoint", "{d}/nope.pth", "-o", "{d}/m.onnx"), "does not exist"),
    (("fmnist_vit", "-o", "{d}/m.onnx"), "--bits"),
    (("fmnist_vit", "--bits", "4"), "--output"),
    (("fmnist_vit", "--bits", "4", "--method", "magic", "-o", "{d}/m.onnx"), "--method"),
    (("fmnist_vit", "--bits", "4", "--block-size", "64", "-o", "{d}/m.onnx"), "--weight-only-int4"),
    (("fmnist_vit", "--bits", "4", "--opset", "11", "-o", "{d}/m.onnx"), "opset 11"),
    (("fmnist_vit", "--bits", "4", "--weight-only-int4", "--opset", "20", "-o", "{d}/m.onnx"), "opset >= 21"),
    (("fmnist_vit", "--bits", "4", "--device", "tpu", "-o", "{d}/m.onnx"), "device 'tpu'"),
    (("fmnist_vit", "--bits", "4", "--method", "real", "-o", "{d}/m.onnx"), "--calib-data"),
    (("--from-state", "{d}/nope.pt", "-o", "{d}/m.onnx"), "does not exist"),
    (("--bits", "4", "-o", "{d}/m.onnx"), "MODEL"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[a[1] for a in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, needle):
    before = files(tmp_path)
    r = invoke(*(a.format(d=tmp_path) for a in args))
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskaq-export: error: "), r.stderr
    assert needle in lines[0] and "Traceback" not in r.output
    assert files(tmp_path) == before


def test_unreadable_checkpoint_leaves_nothing(tmp_path, tiny_ckpt):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    before = files(tmp_path)
    r = invoke("vit_tiny_patch16_224", "--bits", "4", "--checkpoint", bad, "--preset", "tiny", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("maskaq-export: error: cannot read checkpoint")
    assert files(tmp_path) == before  # the run directory made for it is gone again


def test_no_weights_offline_is_one_line(tmp_path, monkeypatch):
    """Hub unreachable and no local weights: one line saying how to supply them (no 45 s of
    retries on stderr)."""
    import huggingface_hub.constants as hc

    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", hc.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    out = tmp_path / "o"
    out.mkdir()
    r = invoke("deit_t", "--bits", "4", "-o", out / "m.onnx")
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert "cannot fetch pretrained weights" in line and "--checkpoint" in line
    assert files(out) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("cli")
    out = d / "tiny.onnx"
    r = invoke(tiny_ckpt, "--bits", "4", "--preset", "tiny", "--set", "num_images=4", "--set", "synth.steps=1",
               "--set", "calib.epochs=1", "--seed", "3", "-q", "-o", out)
    assert r.exit_code == 0, r.output
    return d, out, r


def test_end_to_end_tiny_preset(tiny_run, helpers):
    d, out, r = tiny_run
    assert r.stdout == ""  # --quiet
    assert {p.name for p in d.iterdir()} == {"tiny.onnx", "tiny.encodings.json", "tiny.report.json", "tiny.run"}
    run_dir = d / "tiny.run"
    assert {"calibrated.pt", "params.json", "run.json", "samples.png"} <= {p.name for p in run_dir.iterdir()}
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["maskaq.quant"]) == {"w_bits": 4, "a_bits": 4, "profile": "ort", "method": "maskaq"}
    assert meta["maskaq.seed"] == "3"
    cfg = json.loads(meta["maskaq.config"])
    assert cfg["run"]["preset"] == "tiny" and cfg["run"]["overrides"]["synth.steps"] == "1"
    assert json.loads(meta["maskaq.labels"])[0] == "c0"
    assert json.loads(meta["maskaq.source"])["weights"] == "checkpoint"
    rep = json.loads((d / "tiny.report.json").read_text())
    assert rep["seed"] == 3 and rep["config"]["run"]["w_bits"] == 4
    assert rep["files"]["onnx"]["bytes"] == out.stat().st_size and len(rep["files"]["onnx"]["sha256"]) == 64
    assert rep["timings"]["export_s"] > 0 and rep["timings"]["pipeline_s"] > 0
    assert rep["export"]["census"]["QuantizeLinear"] > 0
    # the file reproduces the calibrated state
    from maskaq.pipeline import load_calibrated

    Q, loaded, rc = load_calibrated(run_dir / "calibrated.pt")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = Q(x).numpy()
    got = helpers.ort_session(out).run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_from_state_reexports_to_tensorrt_and_int4(tiny_run):
    d, out, _ = tiny_run
    state = d / "tiny.run" / "calibrated.pt"
    r = invoke("--from-state", state, "--profile", "tensorrt", "-o", d / "trt.onnx")
    assert r.exit_code == 0, r.output
    assert "converted for TensorRT" in r.stderr  # calibrated asymmetric: converted, with its cost
    m = onnx.load(str(d / "trt.onnx"))
    zps = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith(".zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    rep = json.loads((d / "trt.report.json").read_text())
    assert rep["tensorrt_conversion"]["activations_converted"] > 0
    assert rep["pipeline"] == {"from_state": str(state)}
    r = invoke("--from-state", state, "--weight-only-int4", "--block-size", "32", "-q", "-o", d / "w4.onnx")
    assert r.exit_code == 0, r.output
    m = onnx.load(str(d / "w4.onnx"))
    assert {o.domain or "": o.version for o in m.opset_import}[""] == 21
    assert json.loads({p.key: p.value for p in m.metadata_props}["maskaq.quant"])["profile"] == "int4-weight-only"
    r = invoke("--from-state", state, "--seed", "1", "-o", d / "x.onnx")
    assert r.exit_code == 2 and "--seed does not apply" in r.stderr
    assert not (d / "x.onnx").exists()
