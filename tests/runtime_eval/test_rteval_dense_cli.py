"""The CLI's coco / ade20k reports carry the metrics of whatever predictor the graph's
``maskaq.task`` selects: ground truth fed back through the CLI scores 100 AP / 100 mIoU, a
permuted label map drops to 0 (torch-free; the exported-model runs are in tests/dense)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rteval_helpers as H
from click.testing import CliRunner

from runtime_eval.cli import main
from runtime_eval.metrics import reduce_zero_label

pytest.importorskip("pycocotools")


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _model(tmp_path, task):
    return H.classifier(
        tmp_path / f"{task}.onnx", 3, 16, 16, H.nearest_centroid_weights(H.COLOURS[:2], 3, 2),
        meta={"maskaq.task": task},
    )


@pytest.mark.parametrize("permute", [False, True], ids=["ground-truth", "permuted"])
def test_cli_coco_ground_truth_scores_100(tmp_path, permute):
    from runtime_eval import coco

    root = H.coco_fixture(tmp_path / "coco")
    ds = coco.coco_dataset(root)
    gt = coco.ground_truth_predictor(ds)

    def factory(sess, info, pre):
        if not permute:
            return gt
        return lambda img, info: (lambda d: coco.Detections(d.boxes, d.scores, (d.labels + 1) % 3, d.masks))(
            gt(img, info))

    coco.register_detection_predictor("test-cli-detection", factory)
    out = tmp_path / "r.json"
    try:
        r = _run([_model(tmp_path, "test-cli-detection"), "-t", "coco", "-d", root, "-o", out, "-q",
                  "--provider", "cpu"])
    finally:
        coco.DETECTION_PREDICTORS.pop("test-cli-detection")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    want = 0.0 if permute else 100.0
    for t in ("bbox", "segm"):
        assert rep["metrics"][t]["AP"] == pytest.approx(want) and rep["metrics"][t]["AP50"] == pytest.approx(want)
    assert rep["metrics"]["images"] == 2 and rep["dataset"]["num_classes"] == 3
    assert f"bbox[AP {want:.2f}" in r.output


@pytest.mark.parametrize("permute", [False, True], ids=["ground-truth", "permuted"])
def test_cli_ade20k_ground_truth_scores_100(tmp_path, permute):
    from runtime_eval import ade20k

    root = H.ade_fixture(tmp_path / "ade")
    ds = ade20k.ade20k_dataset(root)
    labels = {ds.image(i).tobytes(): ds.label(i) for i in range(len(ds))}
    perm = np.roll(np.arange(150), 1) if permute else np.arange(150)

    def factory(sess, info, pre):
        return lambda img: perm[reduce_zero_label(labels[img.tobytes()]).clip(0, 149)]

    ade20k.register_segmentation_predictor("test-cli-segmentation", factory)
    out = tmp_path / "r.json"
    try:
        r = _run([_model(tmp_path, "test-cli-segmentation"), "-t", "ade20k", "-d", root, "-o", out, "-q",
                  "--provider", "cpu"])
    finally:
        ade20k.SEGMENTATION_PREDICTORS.pop("test-cli-segmentation")
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())["metrics"]
    want = 0.0 if permute else 100.0
    assert m["mIoU"] == pytest.approx(want) and m["mAcc"] == pytest.approx(want) and m["images"] == 2
    assert f"mIoU {want:.2f}" in r.output
