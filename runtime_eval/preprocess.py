"""Image preprocessing from the model's own metadata (timm's eval transform, in PIL + numpy).

``maskaq.preprocessing`` = ``{"input_size": [C, H, W], "mean", "std", "crop_pct", "crop_mode",
"interpolation", "channels"}``. Classification (timm ``transforms_imagenet_eval``): resize the
shorter side to ``floor(H / crop_pct)`` with the given interpolation, centre crop H x W, to
float in [0, 1], ``(x - mean) / std``; images converted to RGB, or L when ``channels == 1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import EvalError
from .model import ModelInfo

log = logging.getLogger(__name__)

INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
CROP_MODES = ("center", "squash", "border")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resolved preprocessing for one model (see module docstring)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    source: str = "metadata"

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    @property
    def pil_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def report(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["channels"] = self.channels
        return d

    # -- transforms ------------------------------------------------------------------
    def resize_crop(self, img: Image.Image) -> Image.Image:
        """timm eval geometry: resize by ``crop_pct`` then centre crop to (H, W)."""
        h, w = self.height, self.width
        interp = INTERPOLATIONS[self.interpolation]
        scale_h, scale_w = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        if self.crop_mode == "squash":
            img = img.resize((scale_w, scale_h), interp)
        elif self.crop_mode == "border":
            img = _resize_keep_ratio(img, (scale_h, scale_w), interp, longest=True)
        elif scale_h == scale_w:
            img = _resize_shorter(img, scale_h, interp)
        else:
            img = _resize_keep_ratio(img, (scale_h, scale_w), interp, longest=False)
        return center_crop(img, h, w)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """PIL image (already H x W, in ``pil_mode``) -> normalised float32 [C, H, W]."""
        x = np.asarray(img, dtype=np.float32) / 255.0
        if x.ndim == 2:
            x = x[:, :, None]
        x = x.transpose(2, 0, 1)
        if x.shape[0] != self.channels:
            if x.shape[0] == 1:
                x = np.repeat(x, self.channels, axis=0)
            else:
                raise EvalError(f"image has {x.shape[0]} channels, the model takes {self.channels}")
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return (x - mean) / std

    def __call__(self, img: Image.Image) -> np.ndarray:
        """Full classification transform: convert mode, resize/crop, normalise."""
        if img.mode != self.pil_mode:
            img = img.convert(self.pil_mode)
        return self.to_array(self.resize_crop(img))


def _resize_shorter(img: Image.Image, size: int, interp: int) -> Image.Image:
    # torchvision Resize(int): shorter side -> size, longer side truncated
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), interp)


def _resize_keep_ratio(
    img: Image.Image, target: tuple[int, int], interp: int, longest: bool
) -> Image.Image:
    # timm ResizeKeepRatio (longest=0 or 1)
    w, h = img.size
    rh, rw = h / target[0], w / target[1]
    ratio = max(rh, rw) if longest else min(rh, rw)
    new_h, new_w = round(h / ratio), round(w / ratio)
    return img.resize((new_w, new_h), interp)


def center_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    """torchvision CenterCrop (pads with zeros when the image is smaller than the crop)."""
    iw, ih = img.size
    if iw < w or ih < h:
        canvas = Image.new(img.mode, (max(iw, w), max(ih, h)))
        canvas.paste(img, ((max(iw, w) - iw) // 2, (max(ih, h) - ih) // 2))
        img, (iw, ih) = canvas, canvas.size
    top = int(round((ih - h) / 2.0))
    left = int(round((iw - w) / 2.0))
    if (iw, ih) == (w, h):
        return img
    return img.crop((left, top, left + w, top + h))


def _static_chw(info: ModelInfo) -> tuple[int | None, int | None, int | None]:
    shape = info.input_shape
    if len(shape) != 4:
        raise EvalError(
            f"{info.path.name}: input {info.input_name!r} has shape {shape}; "
            "expected [batch, C, H, W]"
        )
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape[1:])  # type: ignore


def resolve_preprocessing(info: ModelInfo) -> Preprocessing:
    """Preprocessing from ``maskaq.preprocessing``, checked against the graph input.

    A model without the metadata gets ImageNet defaults (mean/std, crop_pct 0.875, bicubic)
    sized from its static input shape, with a warning (``source: "default"``).

    Raises:
        EvalError: malformed metadata, or metadata that disagrees with the graph input.
    """
    if info.input_dtype != "float":
        raise EvalError(
            f"{info.path.name}: input {info.input_name!r} is {info.input_dtype}; expected float32"
        )
    c, h, w = _static_chw(info)
    meta = info.preprocessing
    if meta is None:
        if None in (c, h, w):
            raise EvalError(
                f"{info.path.name}: no 'maskaq.preprocessing' metadata and the input shape "
                f"{info.input_shape} is not static; cannot tell the image size"
            )
        log.warning("model has no maskaq.preprocessing metadata: using ImageNet defaults")
        mean = IMAGENET_MEAN if c == 3 else (0.5,) * c
        std = IMAGENET_STD if c == 3 else (0.5,) * c
        return Preprocessing((c, h, w), mean, std, source="default")  # type: ignore[arg-type]
    if not isinstance(meta, dict):
        raise EvalError(f"{info.path.name}: 'maskaq.preprocessing' must be a JSON object")
    try:
        size = tuple(int(v) for v in meta["input_size"])
        if len(size) != 3:
            raise ValueError("input_size must be [C, H, W]")
        mean = tuple(float(v) for v in meta["mean"])
        std = tuple(float(v) for v in meta["std"])
        crop_pct = float(meta.get("crop_pct", 1.0) or 1.0)
        crop_mode = str(meta.get("crop_mode", "center"))
        interp = str(meta.get("interpolation", "bilinear"))
        channels = int(meta.get("channels", size[0]))
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(
            f"{info.path.name}: bad 'maskaq.preprocessing' metadata ({type(e).__name__}: {e}); "
            "expected input_size [C,H,W], mean, std, crop_pct, crop_mode, interpolation"
        ) from None
    if interp not in INTERPOLATIONS:
        raise EvalError(
            f"{info.path.name}: unknown interpolation {interp!r} in metadata "
            f"(valid: {', '.join(INTERPOLATIONS)})"
        )
    if crop_mode not in CROP_MODES:
        raise EvalError(
            f"{info.path.name}: unknown crop_mode {crop_mode!r} (valid: {', '.join(CROP_MODES)})"
        )
    if channels != size[0] or len(mean) != size[0] or len(std) != size[0]:
        raise EvalError(
            f"{info.path.name}: preprocessing metadata is inconsistent: input_size {list(size)}, "
            f"channels {channels}, {len(mean)} means, {len(std)} stds"
        )
    if any(s == 0 for s in std) or crop_pct <= 0:
        raise EvalError(f"{info.path.name}: preprocessing std must be non-zero, crop_pct > 0")
    for name, graph_dim, meta_dim in zip(("channels", "height", "width"), (c, h, w), size):
        if graph_dim is not None and graph_dim != meta_dim:
            raise EvalError(
                f"{info.path.name}: graph input {info.input_name!r} {info.input_shape} has "
                f"{name} {graph_dim} but maskaq.preprocessing says {meta_dim}"
            )
    return Preprocessing(size, mean, std, crop_pct, crop_mode, interp)  # type: ignore[arg-type]
