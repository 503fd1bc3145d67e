"""``maskaq-eval --task imagefolder`` on folders whose names are not the model's labels:
``--class-order sorted`` (timm's default order) and ``--class-map FILE`` instead of refusing."""

from __future__ import annotations

import json

import pytest
import rteval_helpers as H
from click.testing import CliRunner

from runtime_eval import EvalError, evaluate
from runtime_eval.cli import main
from runtime_eval.datasets import imagefolder_dataset, read_class_map


def _folder(root, names, colours):
    for name, col in zip(names, colours):
        for j in range(2):
            H.save_jpeg(H.solid(col, (16, 16)), root / name / f"{j}.jpg")
    return root


@pytest.fixture
def setup(tmp_path):
    # model outputs: 0 = COLOURS[0], 1 = COLOURS[1], 2 = COLOURS[2]; labels unlike the folder names
    labels = ["tench", "goldfish", "shark"]
    model = H.classifier(tmp_path / "m.onnx", 3, 16, 16, H.nearest_centroid_weights(H.COLOURS[:3], 3, 3),
                         labels=labels)
    # sorted folder order a, b, c holds colours 0, 1, 2: sorted order is the right mapping
    root = _folder(tmp_path / "data", ["a_dir", "b_dir", "c_dir"], H.COLOURS[:3])
    return tmp_path, model, root, labels


def test_default_refuses_and_names_the_flags(setup):
    _, model, root, _ = setup
    with pytest.raises(EvalError, match="--class-order sorted .* --class-map FILE"):
        evaluate(model, "imagefolder", root, providers=["cpu"])


def test_class_order_sorted(setup):
    _, model, root, labels = setup
    rep = evaluate(model, "imagefolder", root, providers=["cpu"], class_order="sorted")
    assert rep["metrics"]["top1"] == 100.0
    ds = imagefolder_dataset(root, labels=labels, num_classes=3, class_order="sorted")
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_class_map_txt_and_json(setup):
    tmp, model, root, labels = setup
    # timm layout: one folder name a line, index = line number; here a permuted folder naming
    _folder(tmp / "perm", ["x", "y", "z"], [H.COLOURS[2], H.COLOURS[0], H.COLOURS[1]])
    txt = tmp / "map.txt"
    txt.write_text("y\nz\nx\n")
    assert read_class_map(txt) == {"y": 0, "z": 1, "x": 2}
    assert evaluate(model, "imagefolder", tmp / "perm", providers=["cpu"], class_map=txt)["metrics"]["top1"] == 100.0
    # sorted order would be wrong here: x (colour 2) -> 0
    wrong = evaluate(model, "imagefolder", tmp / "perm", providers=["cpu"], class_order="sorted")
    assert wrong["metrics"]["top1"] == 0.0
    js = tmp / "map.json"
    js.write_text(json.dumps({"x": "shark", "y": 0, "z": "goldfish"}))
    assert evaluate(model, "imagefolder", tmp / "perm", providers=["cpu"], class_map=js)["metrics"]["top1"] == 100.0


def test_cli_flags_and_bad_input_one_line(setup):
    tmp, model, root, _ = setup
    r = CliRunner().invoke(main, [str(model), "-t", "imagefolder", "-d", str(root), "--class-order", "sorted",
                                  "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    (tmp / "short.txt").write_text("a_dir\nb_dir\n")
    (tmp / "big.json").write_text(json.dumps({"a_dir": 0, "b_dir": 1, "c_dir": 7}))
    cases = {
        "missing folder in map": (["--class-map", str(tmp / "short.txt")], "c_dir are not in the class map"),
        "index out of range": (["--class-map", str(tmp / "big.json")], "out of range"),
        "both": (["--class-map", str(tmp / "short.txt"), "--class-order", "sorted"], "exclude each other"),
        "no file": (["--class-map", str(tmp / "nope.txt")], "does not exist"),
        "wrong task": (["--class-order", "sorted", "-t", "fashion-mnist"], "imagefolder only"),
    }
    for name, (extra, needle) in cases.items():
        args = [str(model), "-t", "imagefolder", "-d", str(root), "--provider", "cpu", *extra]
        r = CliRunner().invoke(main, args)
        lines = r.stderr.strip().splitlines() if hasattr(r, "stderr") else r.output.strip().splitlines()
        assert r.exit_code == 2, (name, r.output)
        assert len(lines) == 1 and needle in lines[0], (name, lines)
