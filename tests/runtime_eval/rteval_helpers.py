"""Tiny ONNX models and dataset fixtures for the runtime_eval tests (no torch, no downloads)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

OPSET = 17

# Distinct, far-apart colours: a nearest-centroid classifier on the mean colour is exact.
COLOURS = [
    (230, 20, 20),
    (20, 230, 20),
    (20, 20, 230),
    (230, 230, 20),
    (20, 230, 230),
    (230, 20, 230),
    (128, 128, 128),
    (250, 250, 250),
    (10, 10, 10),
    (128, 20, 200),
]
GREYS = [5 + 27 * k for k in range(10)]  # class k of the grey fixtures has this pixel value


def preprocessing(
    c: int, h: int, w: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> dict:
    return {
        "input_size": [c, h, w],
        "mean": [0.5] * c,
        "std": [0.5] * c,
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "interpolation": interpolation,
        "channels": c,
    }


def _centroids(colours: list, c: int) -> np.ndarray:
    """Class centroids in normalised space ((x/255 - 0.5) / 0.5)."""
    arr = np.asarray(colours, np.float32).reshape(len(colours), c)
    return (arr / 255.0 - 0.5) / 0.5


def nearest_centroid_weights(
    colours: list, c: int, num_classes: int, class_ids: list[int] | None = None
):
    """W [C, N], b [N] such that argmax(mean(x) @ W + b) is the nearest colour's class."""
    cent = _centroids(colours, c)
    ids = class_ids if class_ids is not None else list(range(len(colours)))
    w = np.zeros((c, num_classes), np.float32)
    b = np.full((num_classes,), -1e4, np.float32)
    for k, cls in enumerate(ids):
        w[:, cls] = cent[k]
        b[cls] = -0.5 * float(cent[k] @ cent[k])
    return w, b


def set_metadata(model: onnx.ModelProto, meta: dict[str, object]) -> None:
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key = k
        entry.value = v if isinstance(v, str) else json.dumps(v)


def classifier(
    path: Path,
    c: int,
    h: int,
    w: int,
    weights: tuple[np.ndarray, np.ndarray],
    *,
    qdq: bool = False,
    narrow_clip_bits: int | None = None,
    batch: int | str = "batch",
    meta: dict | None = None,
    with_preprocessing: bool = True,
    labels: list[str] | None = None,
    quant: dict | None = None,
    opset: int = OPSET,
    act_scale: float = 2.0 / 255,
    act_zp: int = 128,
) -> Path:
    """GlobalAveragePool -> Flatten -> MatMul -> (+ bias), output ``logits``.

    ``qdq``: QuantizeLinear/DequantizeLinear (uint8) on the pooled activation and an int8
    weight initializer feeding a DequantizeLinear. ``narrow_clip_bits``: a float Clip before the
    activation Q, narrowed to that many bits (the "CQDQ" encoding of low-bit activations).
    """
    wmat, bias = weights
    n = wmat.shape[1]
    nodes = [
        helper.make_node(
            "GlobalAveragePool", ["input"], ["pooled"], name="/pool/GlobalAveragePool"
        ),
        helper.make_node("Flatten", ["pooled"], ["feat"], name="/flatten/Flatten"),
    ]
    # Sub of the negated bias rather than Add: MatMul+Add would become a Gemm, which blocks
    # ORT's QDQ MatMul fusion (deploy mode then keeps float maths).
    inits = [numpy_helper.from_array(-bias, "head.neg_bias")]
    feat = "feat"
    if qdq:
        s = np.array(act_scale, np.float32)
        zp = np.array(act_zp, np.uint8)
        inits += [numpy_helper.from_array(s, "act_scale"), numpy_helper.from_array(zp, "act_zp")]
        if narrow_clip_bits is not None:
            qmin, qmax = 0, 2**narrow_clip_bits - 1
            lo = np.array((qmin - act_zp) * act_scale, np.float32)
            hi = np.array((qmax - act_zp) * act_scale, np.float32)
            inits += [
                numpy_helper.from_array(lo, "clip_lo"),
                numpy_helper.from_array(hi, "clip_hi"),
            ]
            nodes.append(
                helper.make_node(
                    "Clip",
                    ["feat", "clip_lo", "clip_hi"],
                    ["feat_c"],
                    name="/head/input_quantizer/Clip",
                )
            )
            feat = "feat_c"
        nodes += [
            helper.make_node(
                "QuantizeLinear",
                [feat, "act_scale", "act_zp"],
                ["feat_q"],
                name="/head/input_quantizer/QuantizeLinear",
            ),
            helper.make_node(
                "DequantizeLinear",
                ["feat_q", "act_scale", "act_zp"],
                ["feat_dq"],
                name="/head/input_quantizer/DequantizeLinear",
            ),
        ]
        feat = "feat_dq"
        wscale = np.float32(np.abs(wmat).max() / 127.0 if np.abs(wmat).max() > 0 else 1.0)
        wq = np.clip(np.round(wmat / wscale), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(wq, "head.weight_q"),
            numpy_helper.from_array(np.array(wscale, np.float32), "head.weight_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "head.weight_zp"),
        ]
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                ["head.weight_q", "head.weight_scale", "head.weight_zp"],
                ["head.weight"],
                name="/head/weight_quantizer/DequantizeLinear",
            )
        )
    else:
        inits.append(numpy_helper.from_array(wmat.astype(np.float32), "head.weight"))
    nodes += [
        helper.make_node("MatMul", [feat, "head.weight"], ["mm"], name="/head/MatMul"),
        helper.make_node("Sub", ["mm", "head.neg_bias"], ["logits"], name="/head/Sub"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rteval-tests"
    )
    model.ir_version = 8
    md: dict[str, object] = {"maskaq.schema": "1", "maskaq.task": "classification"}
    if with_preprocessing:
        md["maskaq.preprocessing"] = preprocessing(c, h, w)
    md["maskaq.source"] = {"model": "tiny_test.tag", "checkpoint": None, "weights": "random"}
    md["maskaq.quant"] = (
        quant
        if quant is not None
        else (
            {"w_bits": 8, "a_bits": 8, "profile": "ort", "method": "test"}
            if qdq
            else {"profile": "fp32"}
        )
    )
    md["maskaq.seed"] = "0"
    if labels is not None:
        md["maskaq.labels"] = labels
    md.update(meta or {})
    set_metadata(model, md)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def segmenter(path: Path, h: int = 16, w: int = 16, num_classes: int = 150, seed: int = 0) -> Path:
    """Conv 1x1 (3 -> num_classes) then AveragePool 2x2: output [B, num_classes, h/2, w/2]."""
    rng = np.random.default_rng(seed)
    wt = rng.standard_normal((num_classes, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="/head/Conv"),
        helper.make_node(
            "AveragePool", ["c"], ["logits"], kernel_shape=[2, 2], strides=[2, 2], name="/head/Pool"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_seg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, h, w])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", num_classes, h // 2, w // 2]
            )
        ],
        [numpy_helper.from_array(wt, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    set_metadata(
        model,
        {
            "maskaq.schema": "1",
            "maskaq.task": "segmentation",
            "maskaq.preprocessing": preprocessing(3, h, w, 1.0, "bilinear"),
        },
    )
    onnx.save(model, str(path))
    return path


def solid(colour, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def save_jpeg(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95)
    return path


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write a uint8 IDX file (gzipped when the name ends in .gz)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(
        struct.pack(">I", d) for d in arr.shape
    )
    data = header + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fashion_fixture(root: Path, n: int = 20, split: str = "t10k") -> tuple[Path, np.ndarray]:
    """IDX files whose class-k images have constant grey value GREYS[k] (28x28)."""
    labels = np.arange(n) % 10
    images = np.stack([np.full((28, 28), GREYS[k], np.uint8) for k in labels])
    write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root, labels


def grey_classifier(path: Path, h: int = 28, w: int = 28, **kw) -> Path:
    return classifier(path, 1, h, w, nearest_centroid_weights([[g] for g in GREYS], 1, 10), **kw)


def id_table() -> list[str]:
    from runtime_eval.datasets import ilsvrc2012_id_to_wnid

    return ilsvrc2012_id_to_wnid()


def imagenet_classes(k: int = 4) -> list[tuple[int, str]]:
    """k (sorted index, wnid) pairs spread over the 1000 classes."""
    from runtime_eval.datasets import imagenet_wnids

    wn = imagenet_wnids()
    return [(i, wn[i]) for i in np.linspace(0, 999, k).astype(int)]


def imagenet_model(path: Path, k: int = 4, **kw) -> Path:
    cls = imagenet_classes(k)
    weights = nearest_centroid_weights(COLOURS[:k], 3, 1000, [i for i, _ in cls])
    return classifier(path, 3, 16, 16, weights, **kw)


def imagenet_val_files(root: Path, k: int = 4, per_class: int = 2) -> list[tuple[str, int, int]]:
    """Flat ILSVRC2012_val_*.JPEG files; returns (name, sorted label, colour index)."""
    cls = imagenet_classes(k)
    out = []
    num = 1
    for _ in range(per_class):
        for ci, (label, _) in enumerate(cls):
            name = f"ILSVRC2012_val_{num:08d}.JPEG"
            save_jpeg(solid(COLOURS[ci]), root / name)
            out.append((name, label, ci))
            num += 1
    return out


def coco_fixture(root: Path) -> Path:
    """2 images, 3 categories with non-contiguous ids 1, 3, 7; image 1: a polygon (cat 3) and
    a box-like polygon (cat 1); image 2: an uncompressed RLE annotation (cat 7)."""
    from pycocotools import mask as mask_utils

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    w1, h1, w2, h2 = 64, 48, 50, 40
    save_jpeg(solid((120, 60, 30), (w1, h1)), root / "val2017" / "000000000001.jpg")
    save_jpeg(solid((30, 60, 120), (w2, h2)), root / "val2017" / "000000000002.jpg")
    poly = [10.0, 10.0, 40.0, 10.0, 40.0, 30.0, 10.0, 30.0]
    poly2 = [45.0, 5.0, 60.0, 5.0, 60.0, 20.0]
    m = np.zeros((h2, w2), np.uint8)
    m[8:30, 12:40] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    # uncompressed RLE (counts as a list), as in COCO's crowd annotations, but not crowd here
    counts: list[int] = []
    flat = m.flatten(order="F")
    cur, run = 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)

    def area_bbox_poly(p, h, w):
        r = mask_utils.frPyObjects([p], h, w)
        r = mask_utils.merge(r)
        return float(mask_utils.area(r)), [float(v) for v in mask_utils.toBbox(r)]

    a1, b1 = area_bbox_poly(poly, h1, w1)
    a2, b2 = area_bbox_poly(poly2, h1, w1)
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "segmentation": [poly],
            "area": a1,
            "bbox": b1,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [poly2],
            "area": a2,
            "bbox": b2,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 7,
            "segmentation": {"size": [h2, w2], "counts": counts},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        },
    ]
    js = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "width": w1, "height": h1},
            {"id": 2, "file_name": "000000000002.jpg", "width": w2, "height": h2},
        ],
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 3, "name": "car"},
            {"id": 7, "name": "train"},
        ],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(js))
    return root


def ade_fixture(root: Path, n: int = 2, size=(20, 16)) -> Path:
    """ADEChallengeData2016 tree with n images and label maps using 0 (ignore) and a few classes."""
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"ADE_val_{i + 1:08d}"
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        save_jpeg(img, base / "images" / "validation" / f"{name}.jpg")
        lab = np.zeros((size[1], size[0]), np.uint8)
        lab[:, : size[0] // 2] = 1 + i
        lab[: size[1] // 2, size[0] // 2 :] = 150
        lab[-2:, -2:] = 0
        p = base / "annotations" / "validation" / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab).save(p)
    return base


def tar_bytes(members: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()
