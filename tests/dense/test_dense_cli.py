"""``maskaq-eval --task coco`` / ``--task ade20k`` on exported dense graphs, end to end through the
CLI (click runner, in process): Mask R-CNN, Cascade Mask R-CNN and UperNet on 2-image COCO and
ADE20K fixtures; the report against the harness called directly; bad input is one line, exit 2."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import dense_helpers as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime_eval"))
import rteval_helpers as RH  # noqa: E402

from runtime_eval.cli import main  # noqa: E402

pytest.importorskip("pycocotools")


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _stderr(r) -> str:
    try:
        return r.stderr
    except ValueError:  # click < 8.2 mixes the streams
        return r.output


@pytest.fixture(scope="module")
def det_export(tmp_path_factory):
    m = D.randomise(D.tiny_mask_rcnn())
    out = tmp_path_factory.mktemp("mask_rcnn")
    D.export_det(m, out)
    return out


@pytest.fixture(scope="module")
def seg_export(tmp_path_factory):
    m = D.randomise(D.tiny_upernet())
    return D.export_seg(m, tmp_path_factory.mktemp("upernet") / "upernet.onnx")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return D.coco_fixture(root / "coco"), RH.ade_fixture(root / "ade")


def _check_common(rep, task, model_file):
    assert rep["schema_version"] == 1 and rep["task"] == task
    m = rep["model"]
    assert Path(m["file"]).name == model_file and len(m["sha256"]) == 64 and m["opset"] == 20
    assert m["qdq"]["total"] == 0 and m["quant"] == {"profile": "fp32"}
    assert rep["dataset"]["images"] == 2
    pre = rep["preprocessing"]
    assert pre["source"] == "maskaq.dense" and pre["mean"] == [123.675, 116.28, 103.53] and pre["scale"] == "0-255"
    rt = rep["runtime"]
    assert rt["providers_requested"] == ["CPUExecutionProvider"] == rt["providers_used"]
    assert rt["mode"] == "reference" and rt["session_config"] == {"session.disable_quant_qdq": "1"}
    assert rep["wall_time_s"] > 0


@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade"])
def test_cli_coco_detection_end_to_end(kind, det_export, cascade_export, data, tmp_path):
    from runtime_eval.coco import coco_dataset, evaluate_detection
    from runtime_eval.dense import CascadeMaskRCNNPredictor, MaskRCNNPredictor

    coco, _ = data
    model_dir = det_export if kind == "mask_rcnn" else cascade_export[1]
    out = tmp_path / "report.json"
    # the directory for the model, its backbone_neck.onnx for the fp32 reference: both accepted
    r = _run([model_dir, "--task", "coco", "--data", coco, "--fp32", model_dir / "backbone_neck.onnx", "-o", out,
              "--provider", "cpu", "--latency", "--latency-iters", "2", "--threads", "1", "-q"])
    assert r.exit_code == 0, (_stderr(r), r.exception)
    rep = json.loads(out.read_text())
    _check_common(rep, "coco", "backbone_neck.onnx")
    parts = rep["model"]["dense"]
    n_parts = 4 if kind == "mask_rcnn" else 8
    assert parts["model"] == ("mask_rcnn_swin" if kind == "mask_rcnn" else "cascade_mask_rcnn_swin")
    assert parts["num_parts"] == n_parts == len(parts["parts"]) and parts["qdq_total"] == 0
    assert all(len(p["sha256"]) == 64 and Path(p["file"]).is_file() for p in parts["parts"].values())
    assert rep["model"]["task"] == ("coco_instance" if kind == "mask_rcnn" else "coco_instance_cascade")
    assert rep["preprocessing"]["resize"]["img_scale"] == D.IMG_SCALE and rep["preprocessing"]["canvas"] == list(D.CANVAS)
    met = rep["metrics"]
    assert met["images"] == 2 and set(met) >= {"bbox", "segm"}
    for t in ("bbox", "segm"):
        assert 0.0 <= met[t]["AP"] <= 100.0 and met[t]["detections"] > 0
    assert rep["deltas"]["bbox.AP"] == 0.0 and rep["deltas"]["segm.AP"] == 0.0  # its own fp32 reference
    assert rep["fp32"]["model"]["dense"]["num_parts"] == n_parts
    lat = rep["latency"]
    assert list(lat["batch_sizes"]) == ["1"] and "backbone_neck.onnx alone" in lat["scope"]
    assert "bbox[AP" in r.output and "segm[AP" in r.output
    # the CLI's numbers are the harness's own
    cls = MaskRCNNPredictor if kind == "mask_rcnn" else CascadeMaskRCNNPredictor
    direct = evaluate_detection(cls(model_dir), coco_dataset(coco))
    for t in ("bbox", "segm"):
        assert met[t] == pytest.approx(direct[t])


def test_cli_ade20k_segmentation_end_to_end(seg_export, data, tmp_path):
    from runtime_eval.ade20k import ade20k_dataset, evaluate_segmentation
    from runtime_eval.dense import UperNetPredictor

    _, ade = data
    for mode in ("whole", "slide"):
        out = tmp_path / f"{mode}.json"
        args = [seg_export, "--task", "ade20k", "--data", ade, "--fp32", seg_export, "-o", out, "--provider", "cpu",
                "-q", "--latency", "--latency-iters", "2"]
        if mode == "slide":
            args += ["--seg-mode", "slide"]
        r = _run(args)
        assert r.exit_code == 0, (_stderr(r), r.exception)
        rep = json.loads(out.read_text())
        _check_common(rep, "ade20k", "upernet.onnx")
        assert rep["model"]["dense"] == {"model": "upernet_swin"}
        assert rep["preprocessing"]["mode"] == mode and rep["preprocessing"]["pipeline"] == "mmseg ADE20K test"
        if mode == "slide":
            assert rep["preprocessing"]["stride"] == [32, 32] and rep["preprocessing"]["crop_size"] == list(D.SEG_CANVAS)
        met = rep["metrics"]
        assert met["images"] == 2 and all(0.0 <= met[k] <= 100.0 for k in ("mIoU", "mAcc", "aAcc"))
        assert rep["deltas"]["mIoU"] == 0.0 and "mIoU" in r.output
        direct = evaluate_segmentation(UperNetPredictor(seg_export, mode=mode), ade20k_dataset(ade))
        assert met["mIoU"] == pytest.approx(direct["mIoU"]) and met["aAcc"] == pytest.approx(direct["aAcc"])


def _bad_inputs(tmp, det, cascade, seg, coco, ade):
    broken = tmp / "broken"
    shutil.copytree(det, broken)
    (broken / "rpn_head.onnx").write_bytes(b"\x08\x07garbage")
    missing = tmp / "missing"
    shutil.copytree(det, missing)
    (missing / "mask_head.onnx").unlink()
    mixed = tmp / "mixed"
    shutil.copytree(det, mixed)
    shutil.copy(cascade / "rpn_head.onnx", mixed / "rpn_head.onnx")
    corrupt = tmp / "corrupt"
    shutil.copytree(det, corrupt)
    (corrupt / "backbone_neck.onnx").write_bytes(b"not an onnx file at all")
    coco3 = RH.coco_fixture(tmp / "coco3")  # 3 categories; the tiny detectors predict 5
    return {
        "missing dataset": ([det, "-t", "coco", "-d", tmp / "nope"], "coco data folder not found"),
        "no --data": ([det, "-t", "coco"], "--data is required for coco"),
        "wrong layout (ade for coco)": ([det, "-t", "coco", "-d", ade], "no COCO layout"),
        "wrong layout (coco for ade)": ([seg, "-t", "ade20k", "-d", coco], "no ADE20K tree"),
        "corrupt backbone": ([corrupt, "-t", "coco", "-d", coco], "cannot read ONNX model"),
        "corrupt sibling part": ([broken, "-t", "coco", "-d", coco], "cannot load"),
        "missing sibling part": ([missing, "-t", "coco", "-d", coco], "lacks mask_head.onnx"),
        "part from another export": ([mixed, "-t", "coco", "-d", coco], "does not belong"),
        "a head part given": ([det / "bbox_head.onnx", "-t", "coco", "-d", coco], "give the directory"),
        "segmenter for coco": ([seg, "-t", "coco", "-d", coco], "evaluated with --task ade20k, not --task coco"),
        "detector for ade20k": ([det, "-t", "ade20k", "-d", ade], "evaluated with --task coco, not --task ade20k"),
        "detector for imagenet": ([det, "-t", "imagenet", "-d", coco], "dense (detection/segmentation) export"),
        "class count": ([det, "-t", "coco", "-d", coco3], "predicts 5 classes but instances_val2017.json has 3"),
        "fp32 of another architecture": ([det, "-t", "coco", "-d", coco, "--fp32", cascade],
                                         "--fp32 model is a cascade_mask_rcnn_swin"),
        "fp32 not dense": ([seg, "-t", "ade20k", "-d", ade, "--fp32", RH.segmenter(tmp / "plain.onnx")],
                           "is not a maskaq dense export"),
        "seg mode for a detector": ([det, "-t", "coco", "-d", coco, "--seg-mode", "slide"],
                                    "--seg-mode applies to ade20k"),
        "bad seg mode": ([seg, "-t", "ade20k", "-d", ade, "--seg-mode", "tiles"], "--seg-mode"),
    }


def test_cli_dense_bad_input_one_line_exit_2(det_export, cascade_export, seg_export, data, tmp_path):
    coco, ade = data
    cases = _bad_inputs(tmp_path, det_export, cascade_export[1], seg_export, coco, ade)
    for name, (args, needle) in cases.items():
        out = tmp_path / f"{name.replace(' ', '_')}.json"
        r = _run([*args, "-o", out, "-q", "--provider", "cpu"])
        err = _stderr(r)
        assert r.exit_code == 2, (name, r.exit_code, err, r.exception)
        lines = [ln for ln in err.splitlines() if ln.strip() and "warning" not in ln]
        assert len(lines) == 1 and lines[0].startswith("maskaq-eval: error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in err and not out.exists(), name


@pytest.mark.slow  # quantized backbone export: ~1 min on 2 busy cores
def test_cli_quantized_cascade_against_fp32(cascade_export, data, tmp_path):
    import torch

    from maskaq.dense.models import quantize_backbone
    from maskaq.qmodel import QuantConfig

    m, fp_dir, _ = cascade_export
    Q = quantize_backbone(m, QuantConfig.parse("8w8a"))
    with torch.no_grad():
        Q.features(torch.randn(1, 3, *D.CANVAS))  # initialise the activation quantizers
    q_dir = tmp_path / "q"
    D.export_cascade(Q, q_dir)
    coco, _ = data
    out = tmp_path / "r.json"
    r = _run([q_dir, "--task", "coco", "--data", coco, "--fp32", fp_dir, "-o", out, "--provider", "cpu", "-q"])
    assert r.exit_code == 0, (_stderr(r), r.exception)
    rep = json.loads(out.read_text())
    assert rep["model"]["qdq"]["total"] > 0 and rep["model"]["quant"]["w_bits"] == 8
    parts = rep["model"]["dense"]["parts"]
    assert parts["backbone_neck"]["qdq"]["total"] > 0 and parts["bbox_head_0"]["qdq"]["total"] == 0
    assert rep["fp32"]["model"]["dense"]["qdq_total"] == 0
    assert set(rep["deltas"]) >= {"bbox.AP", "segm.AP"}
    # a float part dropped into the quantized export is refused
    shutil.copy(fp_dir / "rpn_head.onnx", q_dir / "rpn_head.onnx")
    r = _run([q_dir, "--task", "coco", "--data", coco, "-q", "--provider", "cpu"])
    assert r.exit_code == 2 and "does not belong" in _stderr(r) and "Traceback" not in _stderr(r)
