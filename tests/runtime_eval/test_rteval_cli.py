"""maskaq-eval CLI: a good run writes a valid report; every bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rteval_helpers as H
from click.testing import CliRunner

from runtime_eval.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # click < 8.2 mixes the streams
        return result.output


@pytest.fixture()
def fm(tmp_path):
    root, _ = H.fashion_fixture(tmp_path / "fm", n=20)
    q = H.grey_classifier(tmp_path / "q.onnx", qdq=True, narrow_clip_bits=4)
    f = H.grey_classifier(tmp_path / "f.onnx")
    return root, q, f


def test_successful_run_writes_a_valid_report(tmp_path, fm):
    root, q, f = fm
    (tmp_path / "reports").mkdir()
    out = tmp_path / "reports" / "report.json"
    r = _run(
        [
            q,
            "--task",
            "fashion-mnist",
            "--data",
            root,
            "-o",
            out,
            "--fp32",
            f,
            "--provider",
            "cpu",
            "--mode",
            "deploy",
            "--batch-size",
            "8",
            "--latency",
            "--latency-batch",
            "1,4",
            "--latency-iters",
            "3",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert r.exit_code == 0, _stderr(r)
    rep = json.loads(out.read_text())
    assert rep["schema_version"] == 1 and rep["task"] == "fashion-mnist"
    m = rep["model"]
    assert m["sha256"] and m["opset"] == H.OPSET and m["tag"] == "tiny_test.tag"
    assert m["qdq"]["by_dtype"]["uint8"] == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    assert rep["dataset"]["images"] == 20 and rep["dataset"]["layout"] == "idx"
    assert rep["preprocessing"]["input_size"] == [1, 28, 28]
    rt = rep["runtime"]
    assert rt["providers_requested"] == ["CPUExecutionProvider"] == rt["providers_used"]
    assert rt["mode"] == "deploy" and rt["graph_optimization_level"] == "all"
    assert rt["threads"]["intra_op"] == 1 and rt["batch_size"] == 8
    assert rep["fp32"]["metrics"]["top1"] == 100.0
    assert rep["deltas"]["top1"] == pytest.approx(rep["metrics"]["top1"] - 100.0)
    lat = rep["latency"]
    assert set(lat["batch_sizes"]) == {"1", "4"} and lat["simulated"] is True
    assert {"p50_ms", "p90_ms", "p99_ms", "throughput_img_s"} <= set(lat["batch_sizes"]["4"])
    assert rep["wall_time_s"] > 0
    assert "top1" in r.stdout and "report" in r.stdout  # the human summary
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_reference_mode_and_limit(tmp_path, fm):
    root, q, f = fm
    out = tmp_path / "r.json"
    r = _run(
        [q, "-t", "fashion-mnist", "-d", root, "-o", out, "--limit", "7", "--provider", "cpu", "-q"]
    )
    assert r.exit_code == 0, _stderr(r)
    rep = json.loads(out.read_text())
    assert rep["runtime"]["mode"] == "reference"
    assert rep["runtime"]["session_config"] == {"session.disable_quant_qdq": "1"}
    assert rep["dataset"]["images"] == 7 and rep["dataset"]["subset"] == {
        "limit": 7,
        "selection": "evenly spaced",
    }
    assert rep["fp32"] is None and rep["latency"] is None


def _bad_inputs(tmp_path: Path, fm) -> dict[str, tuple[list, str]]:
    root, q, f = fm
    (tmp_path / "empty").mkdir()
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "notes.txt").write_text("hello")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage-not-onnx" * 50)
    imgs = tmp_path / "imgs"
    H.save_jpeg(H.solid((255, 0, 0)), imgs / "a" / "ok.jpg")
    H.save_jpeg(H.solid((0, 255, 0)), imgs / "b" / "ok.jpg")
    (imgs / "b" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    rgb = H.classifier(
        tmp_path / "rgb.onnx", 3, 16, 16, H.nearest_centroid_weights(H.COLOURS[:2], 3, 2)
    )
    in1k = H.imagenet_model(tmp_path / "in1k.onnx")
    grey1k = H.classifier(
        tmp_path / "grey1k.onnx",
        1,
        16,
        16,
        (np.zeros((1, 1000), np.float32), np.zeros(1000, np.float32)),
    )
    H.save_jpeg(H.solid((1, 2, 3)), tmp_path / "inet" / "n01440764" / "x.JPEG")
    return {
        "missing data": (
            [q, "-t", "fashion-mnist", "-d", tmp_path / "nope"],
            "fashion-mnist data folder not found",
        ),
        "empty data": ([rgb, "-t", "imagefolder", "-d", tmp_path / "empty"], "is empty"),
        "unknown layout": (
            [in1k, "-t", "imagenet", "-d", tmp_path / "unknown"],
            "no ImageNet validation set found",
        ),
        "corrupt image": ([rgb, "-t", "imagefolder", "-d", imgs], "bad.jpg"),
        "channels": (
            [grey1k, "-t", "imagenet", "-d", tmp_path / "inet"],
            "takes 1-channel input but imagenet images are RGB",
        ),
        "classes": (
            [rgb, "-t", "fashion-mnist", "-d", root],
            "has 2 outputs but fashion-mnist has 10 classes",
        ),
        "corrupt onnx": (
            [tmp_path / "corrupt.onnx", "-t", "fashion-mnist", "-d", root],
            "corrupt.onnx",
        ),
        "missing onnx": (
            [tmp_path / "none.onnx", "-t", "fashion-mnist", "-d", root],
            "model file not found",
        ),
        "unknown task": (
            [q, "-t", "cifar", "-d", root],
            "unknown task 'cifar' (valid: imagenet, imagefolder, fashion-mnist, ade20k, coco)",
        ),
        "unknown mode": (
            [q, "-t", "fashion-mnist", "-d", root, "--mode", "fast"],
            "valid: reference, deploy",
        ),
        "missing provider": (
            [q, "-t", "fashion-mnist", "-d", root, "--provider", "NoSuchExecutionProvider"],
            "not available",
        ),
        "bad latency batch": (
            [q, "-t", "fashion-mnist", "-d", root, "--latency", "--latency-batch", "1,x"],
            "not an integer",
        ),
        "bad option type": (
            [q, "-t", "fashion-mnist", "-d", root, "--limit", "many"],
            "'many' is not a valid integer",
        ),
        "missing task": ([q, "-d", root], "Missing option"),
        "bad fp32": (
            [q, "-t", "fashion-mnist", "-d", root, "--fp32", tmp_path / "corrupt.onnx"],
            "corrupt.onnx",
        ),
    }


def test_bad_inputs_one_line_exit_2_no_report(tmp_path, fm):
    cases = _bad_inputs(tmp_path, fm)
    for name, (args, needle) in cases.items():
        out = tmp_path / f"{name.replace(' ', '_')}.json"
        r = _run([*args, "-o", out, "-q"])
        err = _stderr(r)
        assert r.exit_code == 2, (name, r.exit_code, err, r.exception)
        lines = [ln for ln in err.splitlines() if ln.strip() and "warning" not in ln]
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("maskaq-eval: error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in err and not out.exists(), name


def test_report_path_that_is_a_folder_fails_early(tmp_path, fm):
    root, q, _ = fm
    r = _run([q, "-t", "fashion-mnist", "-d", root, "-o", tmp_path, "-q"])
    assert r.exit_code == 2 and "is a folder" in _stderr(r)


def test_python_dash_m(tmp_path, fm):
    root, q, _ = fm
    p = subprocess.run(
        [sys.executable, "-m", "runtime_eval", str(q), "--task", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip().startswith("maskaq-eval: error: unknown task 'nope'")
    h = subprocess.run(
        [sys.executable, "-m", "runtime_eval", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert h.returncode == 0 and "--fp32" in h.stdout and "--latency-batch" in h.stdout
