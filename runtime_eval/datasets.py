"""Classification datasets: ImageNet val layouts, any ImageFolder, Fashion-MNIST (IDX files).

Every reader gives a :class:`ClassificationDataset`: a list of (key, label) pairs plus a
``load(i)`` that returns a decoded PIL image (a corrupt file raises :class:`EvalError` naming
it). ImageNet labels index the sorted list of the 1000 ILSVRC2012 WNIDs (timm/torchvision
order).

ImageNet layouts (detected in ``--data`` or its ``val/`` subfolder):

- ``imagefolder``: ``val/n01440764/*.JPEG`` (torchvision's extracted layout);
- ``val.txt``: flat folder of ``ILSVRC2012_val_*.JPEG`` + ``val.txt`` (``name label``);
- ``devkit``: flat folder + ``ILSVRC2012_validation_ground_truth.txt`` (1-based ILSVRC2012
  IDs in file order), mapped through the shipped ID -> WNID table;
- ``tarball``: the torchvision download, ``ILSVRC2012_img_val.tar`` +
  ``ILSVRC2012_devkit_t12.tar.gz`` (or a ``val.txt``), read without extracting.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import tarfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import EvalError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".gif",
)
WNID_RE = re.compile(r"n\d{8}")
VAL_NAME_RE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
GT_FILE = "ILSVRC2012_validation_ground_truth.txt"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
ID_TABLE_RESOURCE = "ilsvrc2012_id_to_wnid.txt"

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def decode_image(source: str | Path | bytes, name: str) -> Image.Image:
    """Open and fully decode an image; any failure is an :class:`EvalError` naming ``name``."""
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise EvalError(f"image not found: {name}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise EvalError(f"corrupt or unreadable image {name}: {e}") from None


@dataclass
class ClassificationDataset:
    """A labelled image set. ``load(i)`` decodes image ``i``; ``labels[i]`` is its class."""

    name: str
    layout: str
    root: Path
    keys: list[str]
    labels: np.ndarray
    num_classes: int
    class_names: list[str] | None = None
    loader: Callable[[int], Image.Image] | None = None
    native_size: tuple[int, int] | None = None  # (H, W) when every image has one size
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int) -> Image.Image:
        if self.loader is not None:
            return self.loader(i)
        return decode_image(self.root / self.keys[i], str(self.root / self.keys[i]))

    def report(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "total_images": len(self),
            "num_classes": self.num_classes,
        }
        d.update(self.extra)
        return d


# ----------------------------------------------------------------- ImageNet tables


_ID_TABLE: list[str] | None = None


def ilsvrc2012_id_to_wnid() -> list[str]:
    """WNIDs in ILSVRC2012 ID order: ``table[id - 1]`` (ID 1 = n02119789, kit fox).

    From the ILSVRC2012 devkit (meta.mat / map_clsloc.txt), shipped as package data.
    """
    global _ID_TABLE
    if _ID_TABLE is None:
        try:
            text = resources.files("runtime_eval").joinpath("data", ID_TABLE_RESOURCE).read_text()
        except (FileNotFoundError, OSError):
            raise EvalError(
                "the ILSVRC2012 ID -> WNID table (runtime_eval/data/"
                f"{ID_TABLE_RESOURCE}) is not installed, so the devkit ground-truth layout cannot "
                "be read; use a val.txt or the WNID ImageFolder layout instead"
            ) from None
        table: list[str] = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            idx, wnid = line.split()[:2]
            if int(idx) != len(table) + 1:
                raise EvalError(f"corrupt {ID_TABLE_RESOURCE}: line for ID {idx} out of order")
            table.append(wnid)
        if len(table) != 1000 or len(set(table)) != 1000:
            raise EvalError(f"corrupt {ID_TABLE_RESOURCE}: expected 1000 distinct WNIDs")
        _ID_TABLE = table
    return _ID_TABLE


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC2012 WNIDs, sorted: label ``i`` of every ImageNet classifier."""
    return sorted(ilsvrc2012_id_to_wnid())


# ------------------------------------------------------------------------ helpers


def _check_dir(root: str | Path | None, what: str) -> Path:
    if root is None:
        raise EvalError(f"--data is required for {what}")
    p = Path(root).expanduser()
    if not p.exists():
        raise EvalError(f"{what} data folder not found: {p}")
    if not p.is_dir():
        raise EvalError(f"{what} data path is not a folder: {p}")
    return p.resolve()


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and is_image_file(p))


def _walk_images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))


def _read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e}") from None


def _parse_val_txt(lines: Sequence[str], source: str, num_classes: int = 1000) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise EvalError(f"{source} line {n}: expected 'IMAGE LABEL', got {line.strip()!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise EvalError(f"{source} line {n}: label {parts[1]!r} is not an integer") from None
        if not 0 <= label < num_classes:
            raise EvalError(f"{source} line {n}: label {label} outside 0..{num_classes - 1}")
        out[parts[0]] = label
    if not out:
        raise EvalError(f"{source} has no labels")
    return out


def _parse_ground_truth(lines: Sequence[str], source: str) -> list[int]:
    ids: list[int] = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            raise EvalError(f"{source} line {n}: {s!r} is not an ILSVRC2012 ID") from None
        if not 1 <= v <= 1000:
            raise EvalError(f"{source} line {n}: ILSVRC2012 ID {v} outside 1..1000")
        ids.append(v)
    if not ids:
        raise EvalError(f"{source} is empty")
    return ids


def _labels_from_ground_truth(names: Sequence[str], gt: list[int], source: str) -> list[int]:
    table = ilsvrc2012_id_to_wnid()
    index = {w: i for i, w in enumerate(sorted(table))}
    labels = []
    for name in names:
        m = VAL_NAME_RE.search(Path(name).name)
        if not m:
            raise EvalError(
                f"{name}: the devkit ground truth needs files named ILSVRC2012_val_NNNNNNNN.JPEG"
            )
        k = int(m.group(1))
        if not 1 <= k <= len(gt):
            raise EvalError(f"{name}: image number {k} has no line in {source} ({len(gt)} lines)")
        labels.append(index[table[gt[k - 1] - 1]])
    return labels


# ----------------------------------------------------------------------- ImageNet


def imagenet_dataset(root: str | Path | None) -> ClassificationDataset:
    """ILSVRC2012 validation set in any of the supported layouts (see module docstring).

    Args:
        root: the folder given as ``--data`` (``~/imagenet`` or ``~/imagenet/val``).

    Raises:
        EvalError: missing/empty folder, unknown layout, unknown WNID folders, bad label files.

    Example:
        >>> ds = imagenet_dataset("~/imagenet")  # doctest: +SKIP
        >>> ds.layout, len(ds)  # doctest: +SKIP
        ('imagefolder', 50000)
    """
    base = _check_dir(root, "imagenet")
    if (base / VAL_TAR).is_file():
        return _imagenet_tarball(base)
    candidates = [base] + [
        base / d for d in ("val", "validation", "ILSVRC2012_img_val") if (base / d).is_dir()
    ]
    seen_flat: tuple[Path, int] | None = None
    for d in candidates:
        subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        wnid_dirs = [p for p in subdirs if WNID_RE.fullmatch(p.name)]
        if wnid_dirs:
            return _imagenet_imagefolder(d, subdirs)
        images = _list_images(d)
        if images:
            ds = _imagenet_flat(d, base, images)
            if ds is not None:
                return ds
            seen_flat = seen_flat or (d, len(images))
    if seen_flat is not None:
        d, n = seen_flat
        raise EvalError(
            f"{d} holds {n} image{'' if n == 1 else 's'} but no labels: add val.txt ('ILSVRC2012_val_00000001.JPEG 65' "
            f"lines) or the devkit's {GT_FILE}, or use WNID subfolders (val/n01440764/...)"
        )
    raise EvalError(
        f"no ImageNet validation set found in {base}: expected WNID folders "
        f"(val/n01440764/*.JPEG), a flat folder with val.txt or {GT_FILE}, or {VAL_TAR} + "
        f"{DEVKIT_TAR}"
    )


def _imagenet_imagefolder(d: Path, subdirs: list[Path]) -> ClassificationDataset:
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [p.name for p in subdirs if p.name not in index]
    if unknown:
        raise EvalError(
            f"{d}: folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are "
            "not ILSVRC2012 WNIDs (the 1000 classes, e.g. n01440764); for another class set use "
            "--task imagefolder"
        )
    keys, labels = [], []
    for sd in subdirs:
        for img in _walk_images(sd):
            keys.append(str(img.relative_to(d)))
            labels.append(index[sd.name])
    if not keys:
        raise EvalError(f"{d}: the WNID folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ClassificationDataset(
        name="imagenet-val",
        layout="imagefolder",
        root=d,
        keys=keys,
        labels=np.asarray(labels, np.int64),
        num_classes=1000,
        class_names=wnids,
        extra={"class_folders": len(subdirs)},
    )


def _find_first(paths: Sequence[Path]) -> Path | None:
    for p in paths:
        if p.is_file():
            return p
    return None


def _imagenet_flat(d: Path, base: Path, images: list[Path]) -> ClassificationDataset | None:
    dirs = [d, d.parent] if d != base else [d]
    val_txt = _find_first([x / "val.txt" for x in dirs])
    gt = _find_first(
        [x / GT_FILE for x in dirs]
        + [x / "ILSVRC2012_devkit_t12" / "data" / GT_FILE for x in dirs]
        + [x / "data" / GT_FILE for x in dirs]
    )
    names = [p.name for p in images]
    if val_txt is not None:
        table = _parse_val_txt(_read_text_lines(val_txt), str(val_txt))
        keys = [n for n in names if n in table]
        missing = [k for k in table if not (d / k).is_file()]
        if missing:
            raise EvalError(
                f"{val_txt} lists {len(missing)} image(s) not found in {d}, e.g. {missing[0]}"
            )
        if len(keys) < len(names):
            log.warning("%d images in %s are not in val.txt; skipped", len(names) - len(keys), d)
        keys = sorted(table)
        labels = [table[k] for k in keys]
        layout, label_file = "val.txt", val_txt
    elif gt is not None:
        ids = _parse_ground_truth(_read_text_lines(gt), str(gt))
        keys = names
        labels = _labels_from_ground_truth(keys, ids, str(gt))
        layout, label_file = "devkit", gt
    else:
        return None
    return ClassificationDataset(
        name="imagenet-val",
        layout=layout,
        root=d,
        keys=keys,
        labels=np.asarray(labels, np.int64),
        num_classes=1000,
        class_names=imagenet_wnids(),
        extra={"label_file": str(label_file)},
    )


class _TarReader:
    """Random access to members of an uncompressed tar, one file handle per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if m.isfile() and is_image_file(Path(m.name)):
                        self.members[Path(m.name).name] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            raise EvalError(f"cannot read {path}: {e} (expected an uncompressed tar)") from None
        self._local = threading.local()

    def read(self, name: str) -> bytes:
        fh = getattr(self._local, "fh", None)
        if fh is None:
            fh = self._local.fh = open(self.path, "rb")
        off, size = self.members[name]
        fh.seek(off)
        data = fh.read(size)
        if len(data) != size:
            raise EvalError(f"{self.path}: member {name} is truncated")
        return data


def _devkit_ground_truth(devkit: Path) -> list[int]:
    try:
        with tarfile.open(devkit, "r:*") as tf:
            for m in tf:
                if m.isfile() and Path(m.name).name == GT_FILE:
                    f = tf.extractfile(m)
                    assert f is not None
                    lines = f.read().decode("utf-8", "replace").splitlines()
                    return _parse_ground_truth(lines, f"{devkit}:{m.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise EvalError(f"cannot read {devkit}: {e}") from None
    raise EvalError(f"{devkit} has no {GT_FILE}")


def _imagenet_tarball(base: Path) -> ClassificationDataset:
    reader = _TarReader(base / VAL_TAR)
    if not reader.members:
        raise EvalError(f"{base / VAL_TAR} holds no images")
    names = sorted(reader.members)
    val_txt = base / "val.txt"
    if val_txt.is_file():
        table = _parse_val_txt(_read_text_lines(val_txt), str(val_txt))
        missing = [k for k in table if k not in reader.members]
        if missing:
            raise EvalError(
                f"{val_txt} lists {len(missing)} image(s) not in the tar, e.g. {missing[0]}"
            )
        names = sorted(table)
        labels = [table[k] for k in names]
        label_file = str(val_txt)
    elif (base / DEVKIT_TAR).is_file():
        labels = _labels_from_ground_truth(
            names, _devkit_ground_truth(base / DEVKIT_TAR), DEVKIT_TAR
        )
        label_file = str(base / DEVKIT_TAR)
    else:
        raise EvalError(f"{base} has {VAL_TAR} but neither {DEVKIT_TAR} nor val.txt for the labels")

    def load(i: int) -> Image.Image:
        return decode_image(reader.read(names[i]), f"{VAL_TAR}:{names[i]}")

    return ClassificationDataset(
        name="imagenet-val",
        layout="tarball",
        root=base,
        keys=names,
        labels=np.asarray(labels, np.int64),
        num_classes=1000,
        class_names=imagenet_wnids(),
        loader=load,
        extra={"label_file": label_file},
    )


# -------------------------------------------------------------------- ImageFolder


def _norm_label(s: str) -> str:
    return re.sub(r"[\s_\-/]+", "", s).lower()


CLASS_ORDERS = ("labels", "sorted")


def read_class_map(path: str | Path, labels: Sequence[str] | None = None) -> dict[str, int]:
    """A class map file -> ``{folder name: output index}``.

    ``.json``: ``{"folder": index}`` or ``{"folder": "label name"}`` (a name in the model's
    ``maskaq.labels``). Any other file: timm's ``--class-map`` layout, one folder name a line,
    the line number (from 0) is its output index.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"class map {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read class map {p} ({type(e).__name__})") from None
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise EvalError(f"class map {p} is not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not obj:
            raise EvalError(f"class map {p} must be a JSON object {{folder: index or label name}}")
        out: dict[str, int] = {}
        for k, v in obj.items():
            if isinstance(v, bool):
                v = None
            if isinstance(v, int):
                out[str(k)] = v
            elif isinstance(v, str) and labels is not None and v in labels:
                out[str(k)] = list(labels).index(v)
            else:
                valid = "an integer index" + (" or one of the model's labels" if labels else "")
                raise EvalError(f"class map {p}: {k!r} -> {v!r} is not {valid}")
        return out
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise EvalError(f"class map {p} is empty (one class folder name a line, index = line number)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"class map {p} lists {', '.join(dup[:5])} more than once")
    return {n: i for i, n in enumerate(names)}


def imagefolder_dataset(
    root: str | Path | None,
    labels: Sequence[str] | None = None,
    num_classes: int | None = None,
    class_order: str | None = None,
    class_map: str | Path | None = None,
) -> ClassificationDataset:
    """Any classification ImageFolder: ``root/<class>/**/*.{jpg,png,...}``.

    Args:
        root: the folder holding one subfolder per class.
        labels: the model's ``maskaq.labels`` (output order). When given, folder names are
            matched to them (exactly, else ignoring case, spaces, ``_``, ``-``, ``/``); an
            unknown folder is an error. Otherwise class index = sorted folder order.
        num_classes: the model's output size, to catch more folders than classes.
        class_order: ``"sorted"``: class index = sorted folder order (timm's ImageFolder
            default) even when the model has labels; ``"labels"`` (default): as above.
        class_map: a file mapping folder names to output indices (:func:`read_class_map`).

    Raises:
        EvalError: missing/empty folder, no class subfolders, unknown class folders.
    """
    if class_order is not None and class_order not in CLASS_ORDERS:
        raise EvalError(f"unknown --class-order {class_order!r} (valid: {', '.join(CLASS_ORDERS)})")
    if class_order is not None and class_map is not None:
        raise EvalError("--class-order and --class-map exclude each other; give one")
    d = _check_dir(root, "imagefolder")
    subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(sd, _walk_images(sd)) for sd in subdirs]
    classes = [(sd, imgs) for sd, imgs in classes if imgs]
    if not classes:
        flat = _list_images(d)
        if flat:
            raise EvalError(
                f"{d} holds {len(flat)} image{'' if len(flat) == 1 else 's'} but no class subfolders; "
                "an ImageFolder needs "
                "root/<class>/<image> (for ImageNet with val.txt use --task imagenet)"
            )
        raise EvalError(
            f"{d} is empty: no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    names = [sd.name for sd, _ in classes]
    if class_map is not None:
        cmap = read_class_map(class_map, labels)
        missing = [n for n in names if n not in cmap]
        if missing:
            raise EvalError(
                f"{d}: class folder(s) {', '.join(missing[:5])} are not in the class map {class_map}"
            )
        limit = num_classes if num_classes is not None else (len(labels) if labels else None)
        bad = [f"{n}->{cmap[n]}" for n in names if cmap[n] < 0 or (limit is not None and cmap[n] >= limit)]
        if bad:
            raise EvalError(
                f"class map {class_map}: index out of range for the model's {limit} outputs: {', '.join(bad[:5])}"
            )
        index = {n: cmap[n] for n in names}
        n_classes = limit if limit is not None else max(index.values()) + 1
        class_names = list(labels) if labels else [
            next((f for f, i in cmap.items() if i == k), str(k)) for k in range(n_classes)
        ]
        mapping = f"class map {Path(class_map).name}"
        labels = None
    elif class_order == "sorted":
        labels = None
    if class_map is not None:
        pass  # index, n_classes, class_names, mapping set above
    elif labels is not None:
        exact = {lab: i for i, lab in enumerate(labels)}
        loose = {_norm_label(lab): i for i, lab in enumerate(labels)}
        index: dict[str, int] = {}
        unknown = []
        for n in names:
            if n in exact:
                index[n] = exact[n]
            elif _norm_label(n) in loose:
                index[n] = loose[_norm_label(n)]
            else:
                unknown.append(n)
        if unknown:
            shown = ", ".join(repr(x) for x in list(labels)[:10])
            raise EvalError(
                f"{d}: class folder(s) {', '.join(unknown[:5])} match none of the model's "
                f"{len(labels)} labels (maskaq.labels: {shown}{' ...' if len(labels) > 10 else ''}); "
                "use --class-order sorted (index = sorted folder order) or --class-map FILE"
            )
        n_classes = len(labels)
        class_names = list(labels)
        mapping = "maskaq.labels"
    else:
        index = {n: i for i, n in enumerate(names)}
        n_classes = len(names)
        class_names = names
        mapping = "sorted folders" + (" (--class-order sorted)" if class_order == "sorted" else "")
        if num_classes is not None and len(names) > num_classes:
            raise EvalError(
                f"{d} has {len(names)} class folders but the model has {num_classes} outputs"
            )
    keys, labs = [], []
    for sd, imgs in classes:
        for img in imgs:
            keys.append(str(img.relative_to(d)))
            labs.append(index[sd.name])
    return ClassificationDataset(
        name="imagefolder",
        layout="imagefolder",
        root=d,
        keys=keys,
        labels=np.asarray(labs, np.int64),
        num_classes=n_classes,
        class_names=class_names,
        extra={"class_folders": len(classes), "class_mapping": mapping},
    )


# ------------------------------------------------------------------ Fashion-MNIST


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise EvalError(f"cannot read {path}: {e}") from None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format; ``.gz`` or raw) into a numpy array.

    Raises:
        EvalError: not an IDX file, or a size that does not match its header.
    """
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise EvalError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes or ndim == 0:
        raise EvalError(f"{path} is not an IDX file (type 0x{code:02x}, {ndim} dims)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise EvalError(f"{path} is truncated (header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dt = np.dtype(dtypes[code])
    n = int(np.prod(shape)) * dt.itemsize
    if len(data) - header != n:
        raise EvalError(
            f"{path}: header says shape {shape} ({n} bytes) but the file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dt, offset=header).reshape(shape)


def _find_idx(d: Path, stem: str) -> Path:
    for name in (
        stem + ".gz",
        stem,
        stem.replace("-idx", ".idx") + ".gz",
        stem.replace("-idx", ".idx"),
    ):
        if (d / name).is_file():
            return d / name
    raise EvalError(f"Fashion-MNIST file {stem}[.gz] not found in {d}")


def fashion_mnist_dataset(
    root: str | Path | None = None, split: str = "test"
) -> ClassificationDataset:
    """Fashion-MNIST from its IDX files (Debian's ``fashion-mnist`` package by default).

    Args:
        root: folder with ``t10k-images-idx3-ubyte.gz`` etc.; default
            ``/usr/share/datasets/fashion-mnist``.
        split: ``test`` (10k, ``t10k-*``) or ``train`` (60k).

    Raises:
        EvalError: missing files, bad IDX data, image/label count mismatch, bad split.
    """
    if split not in ("test", "train"):
        raise EvalError(f"unknown Fashion-MNIST split {split!r} (valid: test, train)")
    d = _check_dir(root if root is not None else FASHION_MNIST_DIR, "fashion-mnist")
    prefix = "t10k" if split == "test" else "train"
    img_path = _find_idx(d, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(d, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise EvalError(f"{img_path}/{lab_path}: expected [N, 28, 28] images and [N] labels")
    if images.shape[0] != labels.shape[0]:
        raise EvalError(
            f"{img_path.name} has {images.shape[0]} images but {lab_path.name} has "
            f"{labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise EvalError(f"{img_path} holds no images")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise EvalError(f"{lab_path}: label {int(labels.max())} outside 0..9")
    images = np.ascontiguousarray(images.astype(np.uint8))

    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i])

    return ClassificationDataset(
        name="fashion-mnist",
        layout="idx",
        root=d,
        keys=[f"{img_path.name}[{i}]" for i in range(images.shape[0])],
        labels=labels.astype(np.int64),
        num_classes=10,
        class_names=list(FASHION_MNIST_CLASSES),
        loader=load,
        native_size=(int(images.shape[1]), int(images.shape[2])),
        extra={"split": split, "images_file": str(img_path), "labels_file": str(lab_path)},
    )
