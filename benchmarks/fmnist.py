"""A small reader for Fashion-MNIST's IDX files, shared by the benchmark scripts.

The files come from Debian's ``fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``);
another folder holding the same four files (gzipped or not) can be named with ``root=`` or the
``MASKAQ_FMNIST`` environment variable.

The project's one split (issue 6): of the 60,000 training images the first 55,000 train the
reference model and the **last 5,000 are the validation slice** on which quantization
hyper-parameters are tuned; the 10,000 ``t10k`` images are the test set, used for reported
numbers only.

Example:
    >>> from benchmarks.fmnist import load_split, normalize
    >>> x, y = load_split("val")            # uint8 (5000, 28, 28), int64 (5000,)
    >>> batch = normalize(x[:64], mean=(0.286,), std=(0.353,))   # float32 (64, 1, 28, 28)
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_ROOT",
    "CLASSES",
    "NUM_TRAIN",
    "VAL_SIZE",
    "FmnistMissing",
    "find_root",
    "available",
    "read_idx",
    "load_raw",
    "load_split",
    "normalize",
    "model_input",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: Fashion-MNIST's class names, in label order 0..9.
CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

NUM_TRAIN = 60_000
#: the last VAL_SIZE training images are the validation slice (never trained on).
VAL_SIZE = 5_000

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> numpy dtypes (big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FmnistMissing(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for."""


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    env = os.environ.get("MASKAQ_FMNIST")
    return ([Path(env)] if env else []) + [DEFAULT_ROOT]


def _file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = root / name
        if p.is_file():
            return p
    return None


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding all four files: ``root``, else ``$MASKAQ_FMNIST``, else Debian's.

    Raises:
        FmnistMissing: naming the folders looked in and how to get the files.
    """
    looked = _candidates(root)
    for r in looked:
        if all(_file(r, s) is not None for pair in _FILES.values() for s in pair):
            return r
    raise FmnistMissing(
        "Fashion-MNIST not found in " + ", ".join(repr(str(p)) for p in looked)
        + "; install Debian's 'fashion-mnist' package (apt-get install fashion-mnist), or point "
        "--data / MASKAQ_FMNIST at a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
    )


def available(root: str | os.PathLike | None = None) -> bool:
    """Whether the four files can be found (for skipping tests)."""
    try:
        find_root(root)
        return True
    except FmnistMissing:
        return False


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its stored shape.

    Raises:
        ValueError: the file is not an IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != need:
        raise ValueError(f"{str(path)!r}: expected {need} data bytes for shape {dims}, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def load_raw(which: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``"train"`` (60,000) or ``"test"`` (10,000): uint8 images (N, 28, 28), int64 labels."""
    if which not in _FILES:
        raise ValueError(f"unknown file set {which!r}; valid: train, test")
    r = find_root(root)
    img_stem, lbl_stem = _FILES[which]
    x = read_idx(_file(r, img_stem))  # type: ignore[arg-type]
    y = read_idx(_file(r, lbl_stem))  # type: ignore[arg-type]
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{which}: images {x.shape} and labels {y.shape} do not match")
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the project's splits.

    ``"train"``: training images 0..54,999; ``"val"``: training images 55,000..59,999 (the
    hyper-parameter tuning slice); ``"test"``: the 10,000 t10k images; ``"trainval"``: all 60,000.
    """
    if split == "test":
        return load_raw("test", root)
    if split not in ("train", "val", "trainval"):
        raise ValueError(f"unknown split {split!r}; valid: train, val, test, trainval")
    x, y = load_raw("train", root)
    cut = len(x) - VAL_SIZE
    if split == "train":
        return x[:cut], y[:cut]
    if split == "val":
        return x[cut:], y[cut:]
    return x, y


def model_input(images: torch.Tensor, data_config) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, C, H, W) exactly as the eval harness feeds the model.

    ``data_config`` is the model's :class:`maskaq.models.DataConfig` (or anything with
    ``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation``). A 1x28x28
    model gets :func:`normalize` (no resampling, as ``maskaq-eval`` does for native-size
    images); any other size or channel count goes through ``runtime_eval``'s own PIL transform
    (grey -> RGB replicated, resize by ``crop_pct``, centre crop, normalise), so numbers
    measured here agree with ``maskaq-eval --task fashion-mnist``.
    """
    c, h, w = (int(v) for v in data_config.input_size)
    if images.dim() == 4:
        images = images[:, 0]
    if (c, h, w) == (1, images.shape[-2], images.shape[-1]):
        return normalize(images, data_config.mean, data_config.std)
    from PIL import Image

    from runtime_eval.preprocess import Preprocessing

    pre = Preprocessing((c, h, w), tuple(data_config.mean), tuple(data_config.std),
                        float(data_config.crop_pct or 1.0), str(data_config.crop_mode or "center"),
                        str(data_config.interpolation))
    arr = images.cpu().numpy()
    out = np.stack([pre(Image.fromarray(a)) for a in arr]) if len(arr) else np.zeros((0, c, h, w), np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float32 (N, 1, 28, 28), ``(x/255 - mean) / std``."""
    x = images.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
