"""Dataset layouts (ImageNet x4, ImageFolder, Fashion-MNIST IDX), the ID table, preprocessing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rteval_helpers as H
from PIL import Image

from runtime_eval import EvalError, evaluate
from runtime_eval.datasets import (
    FASHION_MNIST_DIR,
    fashion_mnist_dataset,
    ilsvrc2012_id_to_wnid,
    imagefolder_dataset,
    imagenet_dataset,
    imagenet_wnids,
    read_idx,
)
from runtime_eval.model import load_model_info
from runtime_eval.preprocess import Preprocessing, resolve_preprocessing

TIMM_SYNSETS = (
    "n01440764 n01443537 n01484850 n01491361 n01494475".split()
)  # first five of timm's imagenet_synsets.txt (sorted WNIDs)


# ------------------------------------------------------------------ the ID table


def test_id_table_is_the_devkit_order():
    table = ilsvrc2012_id_to_wnid()
    assert len(table) == 1000 and len(set(table)) == 1000
    assert table[0] == "n02119789"  # ILSVRC2012_ID 1 = kit fox
    assert table[489] == "n01751748"  # ID 490 (ground truth of val image 1): sea snake
    wnids = imagenet_wnids()
    assert wnids == sorted(table) and wnids[:5] == TIMM_SYNSETS
    assert wnids.index("n01751748") == 65  # val.txt label of ILSVRC2012_val_00000001


def test_id_table_matches_timm_if_installed():
    import importlib.util

    spec = importlib.util.find_spec("timm")  # locates the package without importing it (or torch)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm not installed")
    f = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info" / "imagenet_synsets.txt"
    if not f.is_file():
        pytest.skip("timm has no imagenet_synsets.txt")
    text = f.read_text()
    assert [s for s in text.split() if s] == imagenet_wnids()


# ------------------------------------------------------------------ ImageNet layouts


def _check_imagenet(tmp_path: Path, data: Path, layout: str, n: int):
    ds = imagenet_dataset(data)
    assert ds.layout == layout and len(ds) == n and ds.num_classes == 1000
    model = H.imagenet_model(tmp_path / "in.onnx")
    rep = evaluate(model, "imagenet", data, providers=["cpu"], batch_size=3, workers=2)
    assert rep["dataset"]["layout"] == layout
    assert rep["metrics"]["top1"] == 100.0 and rep["metrics"]["images"] == n
    return ds


def test_imagenet_imagefolder(tmp_path):
    root = tmp_path / "imagenet"
    for ci, (_, wnid) in enumerate(H.imagenet_classes()):
        for j in range(2):
            H.save_jpeg(H.solid(H.COLOURS[ci]), root / "val" / wnid / f"img{j}.JPEG")
    ds = _check_imagenet(tmp_path, root, "imagefolder", 8)  # found through root/val
    assert sorted(set(ds.labels.tolist())) == [i for i, _ in H.imagenet_classes()]


def test_imagenet_imagefolder_rejects_unknown_wnid(tmp_path):
    H.save_jpeg(H.solid((1, 2, 3)), tmp_path / "val" / "n00000000" / "a.JPEG")
    H.save_jpeg(H.solid((1, 2, 3)), tmp_path / "val" / "n01440764" / "a.JPEG")
    with pytest.raises(EvalError, match="n00000000 are not ILSVRC2012 WNIDs"):
        imagenet_dataset(tmp_path)


def test_imagenet_flat_val_txt(tmp_path):
    files = H.imagenet_val_files(tmp_path / "val")
    (tmp_path / "val" / "val.txt").write_text("".join(f"{n} {lab}\n" for n, lab, _ in files))
    ds = _check_imagenet(tmp_path, tmp_path / "val", "val.txt", len(files))
    assert dict(zip(ds.keys, ds.labels.tolist())) == {n: lab for n, lab, _ in files}


def test_imagenet_flat_devkit_ground_truth(tmp_path):
    files = H.imagenet_val_files(tmp_path / "val")
    table = H.id_table()
    wnids = imagenet_wnids()
    ids = [table.index(wnids[lab]) + 1 for _, lab, _ in files]  # sorted label -> ILSVRC2012_ID
    gt = tmp_path / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.parent.mkdir(parents=True)
    gt.write_text("".join(f"{i}\n" for i in ids))
    ds = _check_imagenet(tmp_path, tmp_path, "devkit", len(files))  # found through root/val
    assert ds.labels.tolist() == [lab for _, lab, _ in files]


def test_devkit_first_val_image_is_label_65(tmp_path):
    H.save_jpeg(H.solid((0, 0, 0)), tmp_path / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("490\n")
    assert imagenet_dataset(tmp_path).labels.tolist() == [65]


def test_imagenet_torchvision_tarballs(tmp_path):
    files = H.imagenet_val_files(tmp_path / "src")
    members = {n: (tmp_path / "src" / n).read_bytes() for n, _, _ in files}
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(H.tar_bytes(members))
    table, wnids = H.id_table(), imagenet_wnids()
    gt = "".join(f"{table.index(wnids[lab]) + 1}\n" for _, lab, _ in files)
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(
        H.tar_bytes(
            {"ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": gt.encode()},
            gz=True,
        )
    )
    _check_imagenet(tmp_path, tmp_path, "tarball", len(files))


def test_imagenet_errors(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        imagenet_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no ImageNet validation set found"):
        imagenet_dataset(tmp_path / "empty")
    H.imagenet_val_files(tmp_path / "flat")
    with pytest.raises(EvalError, match="no labels: add val.txt"):
        imagenet_dataset(tmp_path / "flat")
    (tmp_path / "flat" / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 1000\n")
    with pytest.raises(EvalError, match="outside 0..999"):
        imagenet_dataset(tmp_path / "flat")
    (tmp_path / "flat" / "val.txt").write_text("ILSVRC2012_val_99999999.JPEG 3\n")
    with pytest.raises(EvalError, match="not found in"):
        imagenet_dataset(tmp_path / "flat")


# ------------------------------------------------------------------ ImageFolder


def _folder(root: Path, names: list[str], mode="RGB", colours=H.COLOURS) -> Path:
    for ci, name in enumerate(names):
        for j in range(2):
            img = H.solid(colours[ci] if mode == "RGB" else H.GREYS[ci], mode=mode)
            H.save_jpeg(img, root / name / f"{j}.jpg") if j == 0 else img.save(
                root / name / f"{j}.png"
            )
    return root


def test_imagefolder_sorted_classes(tmp_path):
    root = _folder(tmp_path / "data", ["b_class", "a_class", "c_class"])
    ds = imagefolder_dataset(root)
    assert ds.class_names == ["a_class", "b_class", "c_class"] and len(ds) == 6
    # model whose class k is the colour of the k-th sorted folder
    colours = [H.COLOURS[1], H.COLOURS[0], H.COLOURS[2]]
    model = H.classifier(tmp_path / "m.onnx", 3, 16, 16, H.nearest_centroid_weights(colours, 3, 3))
    rep = evaluate(model, "imagefolder", root, providers=["cpu"], batch_size=4)
    assert rep["metrics"]["top1"] == 100.0


def test_imagefolder_uses_model_labels(tmp_path):
    root = _folder(tmp_path / "data", ["cat", "dog"])
    labels = ["dog", "bird", "cat"]  # output order differs from folder order
    w = H.nearest_centroid_weights([H.COLOURS[1], H.COLOURS[0]], 3, 3, class_ids=[0, 2])
    model = H.classifier(tmp_path / "m.onnx", 3, 16, 16, w, labels=labels)
    info, _ = load_model_info(model)
    ds = imagefolder_dataset(root, labels=info.labels)
    assert sorted(set(ds.labels.tolist())) == [0, 2]
    assert evaluate(model, "imagefolder", root, providers=["cpu"])["metrics"]["top1"] == 100.0
    _folder(root, ["cat", "dog", "zebra"])
    with pytest.raises(EvalError, match="zebra match none of the model's 3 labels"):
        imagefolder_dataset(root, labels=info.labels)


def test_imagefolder_grey_model_gets_L_images(tmp_path):
    root = _folder(tmp_path / "data", ["c0", "c1", "c2"], colours=H.COLOURS)
    # colour images into a 1-channel model: converted to L (ITU-R 601 luma)
    lumas = [[round(0.299 * r + 0.587 * g + 0.114 * b)] for r, g, b in H.COLOURS[:3]]
    model = H.classifier(tmp_path / "m.onnx", 1, 12, 12, H.nearest_centroid_weights(lumas, 1, 3))
    rep = evaluate(model, "imagefolder", root, providers=["cpu"])
    assert rep["preprocessing"]["channels"] == 1 and rep["metrics"]["top1"] == 100.0


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="is empty"):
        imagefolder_dataset(tmp_path / "empty")
    H.save_jpeg(H.solid((1, 1, 1)), tmp_path / "flat" / "x.jpg")
    with pytest.raises(EvalError, match="no class subfolders"):
        imagefolder_dataset(tmp_path / "flat")
    _folder(tmp_path / "many", ["a", "b", "c"])
    with pytest.raises(EvalError, match="3 class folders but the model has 2 outputs"):
        imagefolder_dataset(tmp_path / "many", num_classes=2)


def test_corrupt_image_is_named(tmp_path):
    root = _folder(tmp_path / "data", ["a", "b"])
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = H.classifier(
        tmp_path / "m.onnx", 3, 16, 16, H.nearest_centroid_weights(H.COLOURS[:2], 3, 2)
    )
    with pytest.raises(EvalError, match=r"corrupt or unreadable image .*b/broken\.jpg"):
        evaluate(model, "imagefolder", root, providers=["cpu"], batch_size=2)


# ------------------------------------------------------------------ Fashion-MNIST


def test_idx_reader_roundtrip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(H.write_idx(tmp_path / "a.gz", arr)), arr)
    np.testing.assert_array_equal(read_idx(H.write_idx(tmp_path / "a", arr)), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(EvalError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(EvalError, match="header says"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_fixture_28_and_resized(tmp_path):
    root, labels = H.fashion_fixture(tmp_path / "fm", n=20)
    ds = fashion_mnist_dataset(root)
    assert len(ds) == 20 and ds.native_size == (28, 28) and ds.labels.tolist() == labels.tolist()
    m28 = H.grey_classifier(tmp_path / "g28.onnx")
    assert evaluate(m28, "fashion-mnist", root, providers=["cpu"])["metrics"]["top1"] == 100.0
    # 3-channel model at another size: grey replicated, PIL resize + crop
    w = H.nearest_centroid_weights([[g, g, g] for g in H.GREYS], 3, 10)
    m3 = H.classifier(tmp_path / "c3.onnx", 3, 32, 32, w)
    rep = evaluate(m3, "fashion-mnist", root, providers=["cpu"])
    assert rep["metrics"]["top1"] == 100.0 and rep["preprocessing"]["input_size"] == [3, 32, 32]


def test_fashion_mnist_train_split_and_errors(tmp_path):
    root, _ = H.fashion_fixture(tmp_path / "fm", n=12, split="train")
    assert fashion_mnist_dataset(root, split="train").report()["split"] == "train"
    with pytest.raises(EvalError, match="t10k-images-idx3-ubyte"):
        fashion_mnist_dataset(root)  # no test files there
    with pytest.raises(EvalError, match="valid: test, train"):
        fashion_mnist_dataset(root, split="dev")
    H.write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    H.write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((2,), np.uint8))
    with pytest.raises(EvalError, match="3 images but .* 2 labels"):
        fashion_mnist_dataset(root)


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian fashion-mnist not installed",
)
def test_fashion_mnist_debian_files():
    ds = fashion_mnist_dataset()
    assert len(ds) == 10000 and ds.native_size == (28, 28)
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.load(0).size == (28, 28)


# ------------------------------------------------------------------ preprocessing


def test_timm_eval_geometry():
    pre = Preprocessing(
        (3, 224, 224), (0.5,) * 3, (0.5,) * 3, crop_pct=0.9, interpolation="bicubic"
    )
    img = Image.new("RGB", (500, 375))
    resized = pre.resize_crop(img)
    assert resized.size == (224, 224)
    # shorter side -> floor(224 / 0.9) = 248, longer truncated: 500 * 248 / 375 = 330.67 -> 330
    from runtime_eval.preprocess import _resize_shorter

    assert _resize_shorter(img, math.floor(224 / 0.9), Image.BICUBIC).size == (330, 248)
    x = pre(Image.new("RGB", (300, 300), (255, 0, 127)))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -1.0, 127 / 255 * 2 - 1], atol=1e-6)


def test_center_crop_matches_torchvision_rounding():
    from runtime_eval.preprocess import center_crop

    img = Image.fromarray(np.arange(7 * 9, dtype=np.uint8).reshape(7, 9))
    out = np.asarray(center_crop(img, 4, 4))
    # torchvision: top = round((7 - 4) / 2) = 2, left = round((9 - 4) / 2) = 2
    np.testing.assert_array_equal(out, np.arange(63).reshape(7, 9)[2:6, 2:6])


def test_preprocessing_metadata_checked_against_graph(tmp_path):
    p = H.classifier(
        tmp_path / "m.onnx",
        3,
        16,
        16,
        H.nearest_centroid_weights(H.COLOURS[:2], 3, 2),
        meta={"maskaq.preprocessing": H.preprocessing(3, 32, 32)},
    )
    with pytest.raises(EvalError, match="height 16 but maskaq.preprocessing says 32"):
        resolve_preprocessing(load_model_info(p)[0])
    p2 = H.classifier(
        tmp_path / "n.onnx",
        3,
        16,
        16,
        H.nearest_centroid_weights(H.COLOURS[:2], 3, 2),
        with_preprocessing=False,
    )
    pre = resolve_preprocessing(load_model_info(p2)[0])
    assert pre.source == "default" and pre.input_size == (3, 16, 16)
