"""The pipeline: load -> quantize -> synthesise -> calibrate (with refresh) -> save.

Stages never call each other; this module sequences them (design.md). The methods share the
quantizer and the calibration; each is one declarative recipe in :mod:`maskaq.recipes` (its
data, synthesis objective and settings, image budget, calibration stage, ablations), which
:func:`resolve_plan` applies between the budget preset and the user's overrides. ``METHODS``
lists the registered ones (maskaq, mimiq, psaq, psaq_maskaq_settings, spdfq, noise, real).

MaskAQ ablations (paper Table 2): ``no_de``, ``no_maa``, ``no_calib_mask``, ``no_refresh``.

Everything lands in one output directory, written atomically: ``calibrated.pt`` (enough to
rebuild Q without re-running synthesis: :func:`load_calibrated`), ``params.json``, ``run.json``,
``samples.png``, ``losses.png``; checkpoints under ``ckpt/`` make an interrupted run resumable
(``resume=True``) with the same result as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .calibration import (
    CalibConfig,
    CalibResult,
    TensorBatches,
    calibrate,
    derive_seed,
    minmax_calibrate,
    peek_state,
)
from .io import atomic_torch_save, atomic_write_json
from .models import DataConfig, LoadedModel, ModelError, check_finite_weights, load_model
from .params import QuantParams, read_params
from .presets import Preset, PresetError, apply_overrides, get_preset
from .qmodel import QuantConfig, prepare_model, quantize_model
from .quant import SOFTMAX_QUANTS
from .recipes import RECIPES, get_recipe, method_names
from .synthesis import SynthConfig, SynthResult, synthesize

log = logging.getLogger(__name__)

__all__ = [
    "PipelineError",
    "METHODS",
    "ABLATIONS",
    "RunConfig",
    "Plan",
    "resolve_plan",
    "PipelineResult",
    "run_pipeline",
    "load_calibrated",
    "ImageFolderBatches",
    "image_folder_loop",
    "load_image",
    "IMAGE_EXTENSIONS",
    "CALIBRATED_FORMAT",
    "Checkpoints",
    "read_checkpoints",
    "check_resumable",
]

METHODS = method_names()
ABLATIONS = tuple(a for r in RECIPES.values() for a in r.ablations)
CALIBRATED_FORMAT = "maskaq-calibrated/1"
RUN_SCHEMA = "maskaq-run/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class PipelineError(ValueError):
    """A bad run configuration, an output directory in the way, or unusable calibration data."""


# --- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """One run, fully described (goes into run.json and the ONNX metadata).

    Args:
        model: alias (``fmnist_vit``, ``deit_t``...), timm name, or a maskaq checkpoint file.
        checkpoint: local weights for ``model`` (``.pth``/``.safetensors``).
        method: a registered method (:data:`METHODS`, :mod:`maskaq.recipes`): ``maskaq``,
            ``mimiq``, ``psaq``, ``psaq_maskaq_settings``, ``spdfq``, ``noise``, ``real``.
        w_bits, a_bits: 2..8. symmetric_activations, narrow_weights, keep_first_last_8bit: see
            :class:`maskaq.qmodel.QuantConfig`.
        preset: ``cpu`` (default), ``paper``, ``tiny``; overrides: dotted keys
            (``{"synth.steps": 50}``), applied after the method's own settings.
        seed: the one seed every random choice derives from.
        ablations: the method's own (``maskaq.recipes``): MaskAQ ``no_de``, ``no_maa``,
            ``no_calib_mask``, ``no_refresh``; SPDFQ ``own_stage`` (its block-wise stage + log2).
        calib_data: folder of images for ``method="real"``.
        random_weights: build the model with random weights (speed tests; seeded).
        model_args: extra timm constructor arguments (``--model-kwargs``, ``--img-size``...).
        keep_8bit: quantizer/layer names or fnmatch patterns kept at 8 bit (``--keep-8bit``).
        preprocessing: overrides of the model's own ``mean``/``std``/``crop_pct``/``interpolation``.
        labels: class names in output order (``--labels FILE``), replacing the model's own.
        weight_block, patch_embed: see :class:`maskaq.qmodel.QuantConfig` (weight-only flow:
            ``a_bits=16``, ``weight_block=32``).

    ``overrides`` may also hold quantizer settings under ``quant.``: ``quant.softmax_quant``
    (``linear`` (default) | ``log2``: the attention-probability quantizer, :class:`QuantConfig`;
    log2 applies when ``a_bits < 8``, 8-bit activations keep the linear quantizer).
    """

    model: str
    checkpoint: str | None = None
    method: str = "maskaq"
    w_bits: int = 4
    a_bits: int = 4
    symmetric_activations: bool = False
    narrow_weights: bool = False
    keep_first_last_8bit: bool = False
    preset: str = "cpu"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    ablations: tuple[str, ...] = ()
    calib_data: str | None = None
    random_weights: bool = False
    model_args: Mapping[str, Any] = field(default_factory=dict)
    keep_8bit: tuple[str, ...] = ()
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    weight_block: int | None = None
    patch_embed: str = "channel"

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_8bit", tuple(self.keep_8bit or ()))
        object.__setattr__(self, "preprocessing", {k: v for k, v in dict(self.preprocessing or {}).items()
                                                   if v is not None})
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if self.method not in RECIPES:  # the live registry (a method registered later counts)
            raise PipelineError(f"unknown method {self.method!r}; valid: {', '.join(method_names())}")
        object.__setattr__(self, "ablations", tuple(self.ablations))
        object.__setattr__(self, "overrides", dict(self.overrides))
        object.__setattr__(self, "model_args", dict(self.model_args))
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise PipelineError(f"unknown ablation(s) {bad}; valid: {', '.join(ABLATIONS)}")
        own = get_recipe(self.method).ablations
        if any(a not in own for a in self.ablations):
            owners = sorted({r.name for r in RECIPES.values() for a in self.ablations if a in r.ablations})
            raise PipelineError(f"ablations {list(self.ablations)} apply to method {' / '.join(repr(o) for o in owners)}"
                                f" only, not {self.method!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise PipelineError(f"seed {self.seed!r} is not an integer")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if self.calib_data is not None:
            object.__setattr__(self, "calib_data", str(self.calib_data))
        self.quant_config()  # validates the bit widths
        resolve_plan(self)  # validates preset and overrides now, not after loading the model

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.w_bits, self.a_bits, self.symmetric_activations, self.narrow_weights,
                           self.keep_first_last_8bit, tuple(self.keep_8bit), self.weight_block, self.patch_embed,
                           **_quant_overrides({**get_recipe(self.method).quant_overrides_for(self.ablations),
                                               **self.overrides}))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ablations"] = list(self.ablations)
        d["overrides"] = {k: v for k, v in self.overrides.items()}
        d["model_args"] = json.loads(json.dumps(dict(self.model_args), default=list))
        d["keep_8bit"] = list(self.keep_8bit)
        d["preprocessing"] = json.loads(json.dumps(dict(self.preprocessing), default=list))
        d["labels"] = None if self.labels is None else list(self.labels)
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PipelineError(f"unknown run settings {unknown}; valid: {', '.join(sorted(names))}")
        d = dict(d)
        d["ablations"] = tuple(d.get("ablations") or ())
        d["keep_8bit"] = tuple(d.get("keep_8bit") or ())
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """What a run will do, after preset, method and overrides are combined."""

    method: str
    preset: Preset
    synth: SynthConfig | None  # None: no synthesis (noise, real)
    calib: CalibConfig
    synth_uses_q: bool  # MaskAQ's L_MAA reads the current Q
    refresh: bool  # regenerate every calib.refresh_every epochs
    ptq: str  # "kd" (calibrate) | "minmax" (PSAQ)

    @property
    def num_images(self) -> int:
        return self.preset.num_images

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "preset": self.preset.name, "num_images": self.num_images,
                "synth": None if self.synth is None else self.synth.to_json(), "calib": self.calib.to_json(),
                "synth_uses_q": self.synth_uses_q, "refresh": self.refresh, "ptq": self.ptq}


#: ``--set`` keys that configure the quantizers (``quant.<field>`` of :class:`QuantConfig`); every
#: other key goes to the budget preset (``num_images``, ``synth.*``, ``calib.*``).
QUANT_OVERRIDES = ("softmax_quant",)


def _quant_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"quant.softmax_quant": "log2", ...}`` -> ``{"softmax_quant": "log2"}`` (validated keys)."""
    out: dict[str, Any] = {}
    for key, value in dict(overrides or {}).items():
        k = str(key).strip()
        if not k.startswith("quant."):
            continue
        name = k[len("quant."):]
        if name not in QUANT_OVERRIDES:
            raise PipelineError(f"unknown override key {key!r}; valid quant settings: "
                                f"{', '.join('quant.' + n for n in QUANT_OVERRIDES)}")
        v = str(value).strip().lower()
        if name == "softmax_quant" and v not in SOFTMAX_QUANTS:
            raise PipelineError(f"override {key}={value!r} does not fit; valid: {', '.join(SOFTMAX_QUANTS)}")
        out[name] = v
    return out


def resolve_plan(run_cfg: RunConfig) -> Plan:
    """Preset -> the method's recipe (settings, budget, per-model settings, ablations;
    :mod:`maskaq.recipes`) -> the user's overrides (last word).

    Raises:
        PipelineError: unknown preset or override key, or a value that does not fit.
    """
    recipe = get_recipe(run_cfg.method)
    try:
        preset = get_preset(run_cfg.preset)
        for o in recipe.overrides_for(preset.name, run_cfg.model, run_cfg.ablations):
            preset = apply_overrides(preset, {k: v for k, v in o.items() if not str(k).startswith("quant.")})
        preset = apply_overrides(preset, {k: v for k, v in run_cfg.overrides.items()
                                          if not str(k).strip().startswith("quant.")})
    except PresetError as e:
        raise PipelineError(str(e)) from None
    synth = preset.synth if recipe.data == "synth" else None
    uses_q = bool(synth is not None and synth.uses_q)
    refresh = synth is not None and preset.calib.refresh_every > 0
    return Plan(run_cfg.method, preset, synth, preset.calib, uses_q, refresh, recipe.ptq)


# --- real images ----------------------------------------------------------------------------

def _resample(name: str) -> Any:
    from PIL import Image

    table = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
    if name not in table:
        raise PipelineError(f"interpolation {name!r} is unknown; valid: {', '.join(table)}")
    return table[name]


def load_image(path: str | os.PathLike, data_config: DataConfig) -> torch.Tensor:
    """One image file -> ``[C, H, W]`` float32 with timm's eval preprocessing: resize (shorter
    side to ``floor(H / crop_pct)`` for square inputs, else both sides), centre crop H x W, to
    [0, 1], normalise. Grey models read the image as ``L``, others as ``RGB``."""
    import numpy as np
    from PIL import Image

    c, h, w = data_config.input_size
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise PipelineError(f"cannot read image {str(path)!r} ({type(e).__name__}: {e})") from None
    crop_pct = float(data_config.crop_pct or 1.0)
    interp = _resample(data_config.interpolation)
    iw, ih = im.size
    if h == w:
        size = math.floor(h / crop_pct)
        if iw <= ih:
            nw, nh = size, int(size * ih / iw)
        else:
            nw, nh = int(size * iw / ih), size
    else:
        nh, nw = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if (nw, nh) != (iw, ih):
        im = im.resize((nw, nh), interp)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if nh < h or nw < w:  # torchvision pads with zeros when the crop is larger than the image
        ph, pw = max(h - nh, 0), max(w - nw, 0)
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        nh, nw = x.shape[1], x.shape[2]
    top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
    x = x[:, top:top + h, left:left + w]
    mean = torch.tensor(data_config.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(data_config.std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


class ImageFolderBatches:
    """Real calibration images from a folder (searched recursively for jpg/jpeg/png/bmp), as a
    re-iterable batch source for :func:`maskaq.calibration.calibrate` and a ``forward_loop`` for
    :func:`maskaq.calibration.minmax_calibrate`.

    ``limit`` keeps a seeded random subset of that many files; with ``shuffle`` the order changes
    every epoch (seeded by ``seed`` and the epoch, see ``set_epoch``). Decoded images are kept in
    memory when they fit in ``cache_bytes``.
    """

    def __init__(self, path: str | os.PathLike, data_config: DataConfig, batch_size: int, *,
                 limit: int | None = None, seed: int = 0, shuffle: bool = True, cache_bytes: int = 1 << 30) -> None:
        root = Path(path)
        if not root.exists():
            raise PipelineError(f"calibration image folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise PipelineError(f"calibration data {str(root)!r} is not a folder of images")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise PipelineError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
        if limit is not None and limit < len(files):
            g = torch.Generator().manual_seed(derive_seed(seed, "real", "subset"))
            keep = sorted(torch.randperm(len(files), generator=g)[:limit].tolist())
            files = [files[i] for i in keep]
        self.files, self.data_config = files, data_config
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle
        self._epoch = 0
        c, h, w = data_config.input_size
        self._cache: dict[int, torch.Tensor] | None = {} if len(files) * c * h * w * 4 <= cache_bytes else None

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def split_holdout(self, n: int, seed: int) -> tuple["ImageFolderBatches", torch.Tensor]:
        """``(train, held_out)``: ``n`` seeded files decoded into a tensor (the calibration guard's
        hold-out), the rest as a batch source of their own."""
        if not 1 <= n < len(self.files):
            raise PipelineError(f"cannot hold {n} of {len(self.files)} calibration images back")
        g = torch.Generator().manual_seed(derive_seed(seed, "real", "holdout"))
        perm = torch.randperm(len(self.files), generator=g).tolist()
        hold = sorted(perm[:n])
        held = torch.stack([self._get(i) for i in hold])
        train = copy.copy(self)
        train.files = [f for i, f in enumerate(self.files) if i not in set(hold)]
        train._cache = {} if self._cache is not None else None
        return train, held

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def _get(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        x = load_image(self.files[i], self.data_config)
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = len(self.files)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "real", "shuffle", self._epoch))).tolist()
        else:
            order = list(range(n))
        for i in range(0, n, self.batch_size):
            yield torch.stack([self._get(j) for j in order[i:i + self.batch_size]])

    def __call__(self, model: nn.Module) -> None:
        dev = next(model.parameters()).device
        with torch.no_grad():
            for b in self:
                model(b.to(dev))


def image_folder_loop(path: str | os.PathLike, data_config: DataConfig, batch_size: int, **kw: Any) -> ImageFolderBatches:
    """Real images from a folder as a batch source / forward loop (see :class:`ImageFolderBatches`).

    Raises:
        PipelineError: the folder is missing or holds no images.

    Example:
        >>> loop = image_folder_loop("calib_images/", loaded.data_config, 16)
        >>> calibrate(P, Q, loop, CalibConfig(epochs=10), seed=0)
    """
    return ImageFolderBatches(path, data_config, batch_size, **kw)


# --- results --------------------------------------------------------------------------------

@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced (the files are in ``out_dir``)."""

    Q: nn.Module
    P: nn.Module
    loaded: LoadedModel
    params: QuantParams
    report: dict[str, Any]
    state_path: Path
    samples_png: Path
    losses_png: Path
    out_dir: Path
    calib: CalibResult | None = None


def _versions() -> dict[str, str]:
    import numpy
    import timm

    from . import __version__

    v = {"maskaq": __version__, "torch": torch.__version__, "timm": timm.__version__,
         "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}
    return {k: str(x) for k, x in v.items()}  # torch's version is a str subclass torch.load refuses


def _dist() -> tuple[bool, int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return True, d.get_rank(), d.get_world_size()
    return False, 0, 1


def _barrier() -> None:
    if _dist()[0]:
        torch.distributed.barrier()


def _thin(rows: list[dict[str, Any]], limit: int = 20_000) -> list[dict[str, Any]]:
    """At most ``limit`` rows (every k-th), so run.json stays readable for paper-sized runs."""
    if len(rows) <= limit:
        return rows
    k = math.ceil(len(rows) / limit)
    return rows[::k]


def _rebuild_model(name: str, model_args: Mapping[str, Any]) -> nn.Module:
    import timm

    try:
        m = timm.create_model(name.split(".", 1)[0], pretrained=False, **dict(model_args))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot rebuild {name!r} with {dict(model_args)}: {e}") from None
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return prepare_model(m.eval())


def load_calibrated(state_path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, LoadedModel, RunConfig]:
    """Rebuild the calibrated Q (and P, its preprocessing and labels) from ``calibrated.pt``,
    without the original weights file and without re-running synthesis.

    Returns:
        ``(Q, loaded, run_config)``; ``loaded.model`` is P.

    Raises:
        PipelineError: the file is missing or not a maskaq calibrated state.

    Example:
        >>> Q, loaded, rc = load_calibrated("run/calibrated.pt")
        >>> export_onnx(Q, "model_trt.onnx", data_config=loaded.data_config, profile="tensorrt")
    """
    path = Path(state_path)
    if not path.is_file():
        raise PipelineError(f"calibrated state {str(path)!r} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot read calibrated state {str(path)!r} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != CALIBRATED_FORMAT:
        raise PipelineError(f"{str(path)!r} is not a maskaq calibrated state (format {CALIBRATED_FORMAT!r})")
    info = obj["model"]
    P = _rebuild_model(info["name"], info.get("model_args") or {})
    try:
        P.load_state_dict(obj["p_state"], strict=True)
        Q = quantize_model(P, QuantConfig(**obj["quant_config"]))
        Q.load_state_dict(obj["q_state"], strict=True)
    except RuntimeError as e:
        raise PipelineError(f"calibrated state {str(path)!r} does not fit its model: {str(e).splitlines()[0]}") from None
    loaded = LoadedModel(P.to(device), DataConfig.from_json(info["data_config"]), info["name"],
                         dict(info.get("source") or {}), info.get("labels"), dict(info.get("model_args") or {}))
    return Q.to(device).eval(), loaded, RunConfig.from_json(obj["run_config"])


# --- the pipeline ---------------------------------------------------------------------------

@dataclass
class Checkpoints:
    """What a run folder's ``ckpt/`` holds (what ``resume=True`` would reuse).

    ``rounds``: synthesis rounds finished (their images are kept for the current one);
    ``batches``: round -> finished batches of a round in progress; ``epochs``: calibration epochs
    finished (``calib.pt``).
    """

    rounds: list[int] = field(default_factory=list)
    batches: dict[int, int] = field(default_factory=dict)
    epochs: int = 0

    @property
    def empty(self) -> bool:
        return not (self.rounds or any(self.batches.values()) or self.epochs)

    def describe(self, num_batches: int | None = None, epochs: int | None = None) -> str:
        """``"synthesis round 0 (done), round 1: 3 of 4 batches; calibration: 8 of 16 epochs"``."""
        parts = []
        if self.rounds:
            rs = ", ".join(str(r) for r in self.rounds)
            parts.append(f"synthesis round{'s' if len(self.rounds) > 1 else ''} {rs} (done)")
        for r, n in sorted(self.batches.items()):
            if n:
                of = f" of {num_batches}" if num_batches else ""
                parts.append(f"synthesis round {r}: {n}{of} batch{'es' if (num_batches or n) != 1 else ''}")
        if self.epochs:
            of = f" of {epochs}" if epochs else ""
            parts.append(f"calibration: {self.epochs}{of} epoch{'s' if (epochs or self.epochs) != 1 else ''}")
        return "; ".join(parts) if parts else "nothing"


def read_checkpoints(run_dir: str | os.PathLike) -> Checkpoints:
    """What ``run_dir/ckpt`` holds, without loading any model (classification and dense runs
    share the layout: ``synth_rNNN.pt`` / ``.json`` per finished round, ``synth_rNNN/batch_*.pt``
    for a round in progress, ``calib.pt`` with the calibration epoch)."""
    ck = Path(run_dir) / "ckpt"
    out = Checkpoints()
    if not ck.is_dir():
        return out
    rounds = {int(p.stem[7:]) for p in ck.glob("synth_r*.json") if p.stem[7:].isdigit()}
    rounds |= {int(p.stem[7:]) for p in ck.glob("synth_r*.pt") if p.stem[7:].isdigit()}
    out.rounds = sorted(rounds)
    for d in sorted(ck.glob("synth_r*")):
        if d.is_dir() and d.name[7:].isdigit():
            n = len(list(d.glob("batch_*.pt")))
            if n:
                out.batches[int(d.name[7:])] = n
    st = peek_state(ck / "calib.pt") if (ck / "calib.pt").is_file() else None
    out.epochs = int(st["epoch"]) if st else 0
    return out


def check_resumable(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> Checkpoints:
    """What ``--resume`` would reuse in ``run_dir``, after checking it can: the folder holds
    checkpoints, made with the same run config (``config``: ``RunConfig.to_json()`` or the dense
    run's).

    Raises:
        PipelineError: nothing to resume, or the checkpoints belong to another config.
    """
    out = Path(run_dir)
    ck = out / "ckpt"
    if not _has_checkpoints(ck):
        why = "does not exist" if not out.exists() else "holds no checkpoints"
        raise PipelineError(f"nothing to resume: run directory {str(out)!r} {why}; run the same command "
                            "without --resume to start")
    stored = ck / "run_config.json"
    if stored.is_file():
        with open(stored) as f:
            old = json.load(f)
        new = json.loads(json.dumps(dict(config), default=str))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise PipelineError(
                f"cannot resume in {str(out)!r}: its checkpoints were made with a different run config "
                f"(differs in: {', '.join(diff)}); use the same settings or another output directory")
    return read_checkpoints(out)


def _has_checkpoints(ck: Path) -> bool:
    """Anything besides run_config.json (written before any work) counts."""
    return ck.is_dir() and any(p.name != "run_config.json" for p in ck.iterdir())


def _check_out_dir(out: Path, ck: Path, resume: bool, run_cfg: RunConfig) -> None:
    if _has_checkpoints(ck) and not resume:
        raise PipelineError(
            f"{str(out)!r} already holds checkpoints of a run ({str(ck)!r}); pass --resume "
            "(resume=True) to continue it, or choose another output directory"
        )
    stored = ck / "run_config.json"
    if resume and stored.is_file() and _has_checkpoints(ck):
        with open(stored) as f:
            old = json.load(f)
        new = run_cfg.to_json()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise PipelineError(
                f"cannot resume in {str(out)!r}: its checkpoints were made with a different run config "
                f"(differs in: {', '.join(diff)}); use the same settings or another output directory"
            )


def _q_uncalibrated(Q: nn.Module) -> bool:
    """True while some enabled activation quantizer of Q has no range yet."""
    from .quant import ACTIVATION_QUANTIZERS

    return any(isinstance(m, ACTIVATION_QUANTIZERS) and m.enabled and not bool(m.initialized) for m in Q.modules())


def run_pipeline(
    run_cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    real_data: torch.Tensor | Any = None,
) -> PipelineResult:
    """Load -> quantize -> synthesise -> calibrate (with refresh) -> save (method.md §2-4).

    Args:
        run_cfg: the run (:class:`RunConfig`).
        out_dir: output directory (created); checkpoints go to ``out_dir/ckpt``.
        resume: continue from the checkpoints in ``out_dir/ckpt``. Without it, a non-empty
            checkpoint folder is an error (nothing is overwritten by accident).
        device: where models and computation live.
        progress: progress bars (stderr; hidden when it is not a terminal).
        real_data: for ``method="real"``: a tensor ``[N, C, H, W]`` of normalised images or a
            batch source, instead of ``run_cfg.calib_data``.

    Returns:
        :class:`PipelineResult`.

    Raises:
        PipelineError, ModelError, QuantError: bad settings, inputs or output directory.

    Example:
        >>> res = run_pipeline(RunConfig(model="fmnist_vit", w_bits=4, a_bits=4), "run/")
        >>> res.params.save("params.json")
    """
    t_all = time.perf_counter()
    timings: dict[str, Any] = {}
    device = torch.device(device)
    ddp, rank, world = _dist()
    main = rank == 0
    out = Path(out_dir)
    ck = out / "ckpt"
    _check_out_dir(out, ck, resume, run_cfg)
    resumed = bool(resume and _has_checkpoints(ck))
    plan = resolve_plan(run_cfg)
    if run_cfg.method == "real" and real_data is None and not run_cfg.calib_data:
        raise PipelineError("method 'real' needs calibration images: set calib_data (--calib-data DIR) "
                            "or pass real_data")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ck.mkdir(exist_ok=True)
        if not resumed or not (ck / "run_config.json").is_file():
            atomic_write_json(ck / "run_config.json", run_cfg.to_json())
    _barrier()
    seed = run_cfg.seed
    seeds = {k: derive_seed(seed, k) for k in ("model", "synth", "calib", "noise", "real")}
    log.info("run: %s %s on %s, preset %s, seed %d -> %s", run_cfg.method, run_cfg.quant_config().tag,
             run_cfg.model, run_cfg.preset, seed, out)

    # load + quantize
    t0 = time.perf_counter()
    if run_cfg.random_weights:
        torch.manual_seed(seeds["model"])  # timm initialises from the global RNG
    loaded = load_model(run_cfg.model, checkpoint=run_cfg.checkpoint, pretrained=not run_cfg.random_weights,
                        device=device, **dict(run_cfg.model_args))
    if run_cfg.preprocessing or run_cfg.labels is not None:
        from .byo import apply_data_overrides

        loaded.data_config = apply_data_overrides(loaded.data_config, run_cfg.preprocessing)
        if run_cfg.labels is not None:
            n_out = int(getattr(loaded.model, "num_classes", len(run_cfg.labels)) or 0)
            if n_out and len(run_cfg.labels) != n_out:
                raise ModelError(f"--labels has {len(run_cfg.labels)} class names but the model has {n_out} outputs")
            loaded.labels = list(run_cfg.labels)
        loaded.source["preprocessing_overrides"] = dict(run_cfg.preprocessing)
    P = loaded.model.to(device).eval()
    check_finite_weights(P, f"model {run_cfg.model!r}")  # once, before any work (not after 4 redraws)
    for p in P.parameters():
        p.requires_grad_(False)
    dcfg = loaded.data_config
    qcfg = run_cfg.quant_config()
    Q = quantize_model(P, qcfg).to(device)
    timings["load_quantize_s"] = round(time.perf_counter() - t0, 3)

    calib_ckpt = ck / "calib.pt"
    state = peek_state(calib_ckpt) if plan.ptq == "kd" else None
    epochs_done = int(state["epoch"]) if state else 0
    if state is not None:
        Q.load_state_dict(state["q_state"], strict=True)  # Q as of the last finished epoch
        log.info("resuming: %d of %d calibration epochs done", epochs_done, plan.calib.epochs)
    R = plan.calib.refresh_every if plan.refresh else 0
    E = plan.calib.epochs
    cur_round = (min(epochs_done, max(E - 1, 0)) // R) if R else 0

    synth_log: dict[int, dict[str, Any]] = {}
    last: dict[str, Any] = {"images": None, "masks": None, "round": 0}

    def synth_round(r: int) -> torch.Tensor:
        assert plan.synth is not None
        path = ck / f"synth_r{r:03d}.pt"
        meta_path = ck / f"synth_r{r:03d}.json"
        t_r = time.perf_counter()
        if path.is_file():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            images, masks = obj["images"], obj["masks"]
            log.info("synthesis round %d: loaded %d images from %s", r, images.shape[0], path)
        else:
            scfg, q_for = plan.synth, (Q if plan.synth_uses_q else None)
            if q_for is not None and _q_uncalibrated(Q):
                # [ours, issue 11] L_MAA aligns P with the Q being calibrated; before calibration Q has
                # no ranges from calibration data (each batch would initialise it on its own noise),
                # so the first round synthesises without L_MAA, as the reference's first data set is
                # generated with P alone (generate_dataset.sh) before training; L_MAA acts from the
                # first refresh on, with the calibrated Q.
                scfg, q_for = dataclasses.replace(scfg, use_maa=False), None
                log.info("synthesis round %d: Q has no calibrated ranges yet: L_MAA starts at the first refresh", r)
            res: SynthResult = synthesize(
                P, q_for, plan.num_images, scfg, dcfg,
                seed=seeds["synth"], round=r, device=device, progress=progress,
                checkpoint_dir=ck / f"synth_r{r:03d}",
            )
            images, masks = res.images, res.masks
            if main:
                atomic_torch_save({"images": images, "masks": masks, "labels": res.labels}, path)
                atomic_write_json(meta_path, {"round": r, "losses": res.losses,
                                              "timings": json.loads(json.dumps(res.timings, default=str))})
                shutil.rmtree(ck / f"synth_r{r:03d}", ignore_errors=True)  # merged into the file above
                for old in ck.glob("synth_r*.pt"):  # only the current round is needed to resume
                    if old != path:
                        old.unlink(missing_ok=True)
            _barrier()
            log.info("synthesis round %d: %d images in %.1f s", r, images.shape[0], time.perf_counter() - t_r)
        if meta_path.is_file():
            with open(meta_path) as f:
                synth_log[r] = json.load(f)
        timings.setdefault("synthesis_s", {})[str(r)] = round(time.perf_counter() - t_r, 3)
        last.update(images=images, masks=masks, round=r)
        return images

    # calibration data
    t0 = time.perf_counter()
    data: Any
    if plan.synth is not None:
        data = synth_round(cur_round)
    elif get_recipe(run_cfg.method).data == "noise":
        g = torch.Generator().manual_seed(seeds["noise"])
        data = torch.randn((plan.num_images, *dcfg.input_size), generator=g)
        last.update(images=data)
    else:  # real
        if real_data is not None:
            data = real_data
        else:
            data = image_folder_loop(run_cfg.calib_data, dcfg, plan.calib.batch_size, limit=plan.num_images,
                                     seed=seeds["real"])
        if isinstance(data, torch.Tensor):
            if data.dim() != 4 or tuple(data.shape[1:]) != tuple(dcfg.input_size) or data.shape[0] == 0:
                raise PipelineError(f"real_data has shape {tuple(data.shape)}; expected [N, "
                                    f"{', '.join(str(v) for v in dcfg.input_size)}] normalised images")
            last.update(images=data[:32])
        else:
            it = iter(data) if hasattr(data, "__iter__") else iter(data())
            first = next(it, None)
            if isinstance(first, (tuple, list)):
                first = first[0]
            last.update(images=first if isinstance(first, torch.Tensor) else None)
    timings["data_s"] = round(time.perf_counter() - t0, 3)

    # calibrate
    t0 = time.perf_counter()
    calib_res: CalibResult | None = None
    if plan.ptq == "minmax":
        loop = TensorBatches(data, plan.calib.batch_size) if isinstance(data, torch.Tensor) else data
        Q.to(device)
        minmax_calibrate(Q, loop)
    else:
        calib_res = calibrate(
            P, Q, data, plan.calib, seed=seeds["calib"], device=device, progress=progress,
            checkpoint_path=calib_ckpt, refresh=synth_round if plan.refresh else None,
            data_round=cur_round, data_config=dcfg,
        )
    timings["calibration_s"] = round(time.perf_counter() - t0, 3)
    Q.eval()

    # save
    t0 = time.perf_counter()
    state_path = out / "calibrated.pt"
    samples_png, losses_png = out / "samples.png", out / "losses.png"
    params = read_params(Q)
    params.meta.update({"model": run_cfg.model, "method": run_cfg.method, "quant": qcfg.to_json(),
                        "seed": seed, "preset": run_cfg.preset})
    # synthesis losses of every round (also rounds finished before a resume)
    for meta in sorted(ck.glob("synth_r*.json")):
        with open(meta) as f:
            m = json.load(f)
        synth_log.setdefault(int(m["round"]), m)
    report = {
        "schema": RUN_SCHEMA,
        "config": run_cfg.to_json(),
        "plan": plan.to_json(),
        "seed": seed,
        "seeds": seeds,
        "quant": qcfg.to_json(),
        "model": {"name": loaded.name, "source": loaded.source, "data_config": dcfg.to_json(),
                  "labels": loaded.labels, "model_args": json.loads(json.dumps(loaded.model_args, default=list))},
        "device": str(device),
        "world_size": world,
        "resumed": resumed,
        "losses": {
            "synthesis": {str(r): _thin(m["losses"]) for r, m in sorted(synth_log.items())},
            "calibration": None if calib_res is None else {"epochs": calib_res.epochs, "steps": _thin(calib_res.steps)},
        },
        "timings": {**timings, "synthesis_detail": {str(r): m.get("timings") for r, m in sorted(synth_log.items())},
                    "calibration_detail": None if calib_res is None else calib_res.timings},
        "versions": _versions(),
        "outputs": {"state": state_path.name, "params": "params.json", "samples": samples_png.name,
                    "losses": losses_png.name},
    }
    if main:
        from .viz import save_loss_curves, save_sample_grid

        atomic_torch_save({
            "format": CALIBRATED_FORMAT,
            "q_state": {k: v.detach().cpu() for k, v in Q.state_dict().items()},
            "p_state": {k: v.detach().cpu() for k, v in P.state_dict().items()},
            "quant_config": qcfg.to_json(),
            "run_config": run_cfg.to_json(),
            "model": {"name": loaded.name, "model_args": json.loads(json.dumps(loaded.model_args, default=list)),
                      "source": json.loads(json.dumps(loaded.source, default=str)), "labels": loaded.labels,
                      "data_config": dcfg.to_json()},
            "versions": _versions(),
        }, state_path)
        params.save(out / "params.json")
        imgs = last["images"]
        if imgs is not None:
            what = get_recipe(run_cfg.method).title
            rnd = f", round {last['round']}" if plan.synth is not None else ""
            save_sample_grid(imgs, samples_png, mean=dcfg.mean, std=dcfg.std, masks=last["masks"],
                             title=f"{what} calibration samples{rnd}"
                                   + (" (red: informative-region mask)" if last["masks"] is not None else ""))
        save_loss_curves(losses_png,
                         calib_steps=None if calib_res is None else calib_res.steps,
                         calib_epochs=None if calib_res is None else calib_res.epochs,
                         synth_rounds={r: m["losses"] for r, m in synth_log.items()},
                         title=f"{run_cfg.model} {qcfg.tag} {run_cfg.method}")
        timings["save_s"] = round(time.perf_counter() - t0, 3)
        timings["total_s"] = round(time.perf_counter() - t_all, 3)
        report["timings"].update(save_s=timings["save_s"], total_s=timings["total_s"])
        atomic_write_json(out / "run.json", report)
    _barrier()
    log.info("run finished in %.1f s: %s", time.perf_counter() - t_all, out)
    return PipelineResult(Q, P, loaded, params, report, state_path, samples_png, losses_png, out, calib_res)
