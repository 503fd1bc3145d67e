"""One alias table next to one loader (timm's habit).

``load_model("deit_t")`` returns the full-precision model P in eval mode together with its
preprocessing (:class:`DataConfig`) read from the model's own timm config, never from constants.

Weights come from, in order: a local checkpoint if given (``.pth``/``.pt``, ``.safetensors``,
or a self-describing maskaq checkpoint); the timm hub if reachable; otherwise a clear error saying
how to supply them. Loading is strict: missing, unexpected or mis-shaped keys are an error that
names them.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "ModelError",
    "ALIASES",
    "LOCAL_ALIASES",
    "BUILT_ALIASES",
    "cache_home",
    "local_checkpoint_path",
    "DataConfig",
    "LoadedModel",
    "resolve_name",
    "load_model",
    "load_checkpoint",
    "save_checkpoint",
    "check_finite_weights",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "maskaq-checkpoint/1"

# The project's committed reference models live here (issue 6).
ASSETS = Path(__file__).resolve().parent / "assets"

#: alias -> full timm name with pretrained tag, or a committed self-describing checkpoint.
ALIASES: dict[str, str] = {
    "deit_t": "deit_tiny_patch16_224.fb_in1k",
    "deit_s": "deit_small_patch16_224.fb_in1k",
    "deit_b": "deit_base_patch16_224.fb_in1k",
    "vit_t": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_s": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_b": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "swin_t": "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_s": "swin_small_patch4_window7_224.ms_in1k",
}

#: alias -> committed checkpoint file under maskaq/assets (offline, no download).
LOCAL_ALIASES: dict[str, str] = {
    "fmnist_vit": "fmnist_vit.maskaq.pt",
    "fmnist_vit_p7": "fmnist_vit_p7.maskaq.pt",
    "fmnist_dinov2": "fmnist_dinov2_s14.maskaq.pt",
}

#: local aliases whose checkpoint is too big to ship: built into :func:`cache_home` by a script.
BUILT_ALIASES: dict[str, str] = {
    "fmnist_dinov2": "benchmarks/build_dinov2_reference.py",
}


def cache_home() -> Path:
    """``$MASKAQ_HOME``, else ``~/.cache/maskaq``: where built reference checkpoints live."""
    return Path(os.environ.get("MASKAQ_HOME") or Path.home() / ".cache" / "maskaq").expanduser()


def local_checkpoint_path(name: str) -> Path:
    """The checkpoint file behind a local alias (shipped under assets/, or built into the cache)."""
    return (cache_home() if name in BUILT_ALIASES else ASSETS) / LOCAL_ALIASES[name]


class ModelError(ValueError):
    """Unknown model name, unreadable or mismatching checkpoint, or weights not reachable."""


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing that travels with the model (timm eval transform)."""

    input_size: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: str = "center"

    @property
    def channels(self) -> int:
        return self.input_size[0]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["channels"] = self.channels
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataConfig":
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=float(d.get("crop_pct", 0.875)),
            interpolation=str(d.get("interpolation", "bicubic")),
            crop_mode=str(d.get("crop_mode", "center")),
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> "DataConfig":
        """Read from timm's ``pretrained_cfg`` (and the model's real input size / channels)."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        c, h, w = cfg["input_size"]
        chans = getattr(getattr(model, "patch_embed", None), "proj", None)
        if isinstance(chans, nn.Conv2d):
            c = chans.in_channels
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            h, w = int(img_size[0]), int(img_size[1])
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != c:  # e.g. a grey model built from an RGB config
            mean, std = (float(sum(mean) / len(mean)),) * c, (float(sum(std) / len(std)),) * c
        return cls((c, h, w), mean, std, float(cfg.get("crop_pct", 0.875)),
                   str(cfg.get("interpolation", "bicubic")), str(cfg.get("crop_mode", "center")))


@dataclass
class LoadedModel:
    """P in eval mode, its preprocessing, where its weights came from, and class labels if known."""

    model: nn.Module
    data_config: DataConfig
    name: str  # full timm name with tag (or the architecture of a checkpoint)
    source: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    model_args: dict[str, Any] = field(default_factory=dict)


def resolve_name(name: str) -> str:
    """Alias or full timm name (optionally with ``.tag``) -> full timm name.

    Raises:
        ModelError: listing the aliases and how to find timm names if ``name`` is unknown.
    """
    import timm

    if name in ALIASES:
        return ALIASES[name]
    arch = name.split(".", 1)[0]
    if arch in timm.list_models():
        return name
    valid = ", ".join(sorted(ALIASES) + sorted(LOCAL_ALIASES))
    raise ModelError(
        f"unknown model {name!r}; valid: an alias ({valid}), a full timm model name such as "
        f"'deit_tiny_patch16_224' (optionally with '.tag'; see timm.list_models('*vit*')), "
        f"or a maskaq checkpoint file"
    )


def _strict_load(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {few(mismatched)}")
        raise ModelError(f"{what} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable checkpoint
        raise ModelError(
            f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "valid: a .pth/.pt state dict, a .safetensors file, or a maskaq checkpoint"
        ) from None
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap_state_dict(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_ema", "module"):
        if key in obj and isinstance(obj[key], dict) and not isinstance(obj.get(key), torch.Tensor):
            obj = obj[key]
            break
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"checkpoint {str(path)!r} is not a state dict (non-tensor entries: {', '.join(bad[:5])})")
    return sd


def _prepare(model: nn.Module) -> nn.Module:
    """Eval mode and the explicit attention path (:func:`maskaq.qmodel.prepare_model`), so the
    adapter sees q, k, logits and per-head outputs of P."""
    from .qmodel import prepare_model

    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return prepare_model(model.eval())


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    architecture: str,
    model_args: dict[str, Any],
    data_config: DataConfig,
    labels: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing checkpoint (atomically).

    It carries the timm architecture name, the constructor arguments, the preprocessing, the
    labels and the state dict, so ``load_model(path)`` rebuilds the model without code.

    Example:
        >>> save_checkpoint("m.maskaq.pt", model, "vit_tiny_patch16_224",
        ...                 dict(img_size=28, patch_size=4, in_chans=1, num_classes=10), dcfg)
    """
    obj = {
        "format": CHECKPOINT_FORMAT,
        "architecture": architecture,
        "model_args": json.loads(json.dumps(model_args)),
        "data_config": data_config.to_json(),
        "labels": list(labels) if labels else None,
        "extra": json.loads(json.dumps(extra or {})),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    from .io import atomic_torch_save

    atomic_torch_save(obj, Path(path))


def load_checkpoint(path: str | os.PathLike) -> LoadedModel:
    """Load a self-describing maskaq checkpoint (see :func:`save_checkpoint`)."""
    import timm

    path = Path(path)
    obj = _read_state_dict(path)
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"{str(path)!r} is not a maskaq checkpoint (no format {CHECKPOINT_FORMAT!r}); "
            "pass it with --checkpoint together with the timm model name it belongs to"
        )
    missing = [k for k, kind in (("architecture", str), ("data_config", dict), ("state_dict", dict))
               if not isinstance(obj.get(k), kind)]
    if missing:
        raise ModelError(f"maskaq checkpoint {str(path)!r} lacks {', '.join(repr(k) for k in missing)} "
                         "(a maskaq checkpoint carries architecture, model_args, data_config and state_dict; "
                         "write it with maskaq.models.save_checkpoint)")
    arch = obj["architecture"]
    args = dict(obj.get("model_args") or {})
    try:
        model = timm.create_model(arch.split(".", 1)[0], pretrained=False, **args)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"checkpoint {str(path)!r}: cannot build {arch!r} with {args}: {e}") from None
    _strict_load(model, _unwrap_state_dict(obj["state_dict"], path), f"checkpoint {str(path)!r}")
    try:
        dcfg = DataConfig.from_json(obj["data_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"maskaq checkpoint {str(path)!r}: data_config is not valid ({type(e).__name__}: {e}); "
                         "it needs input_size [C, H, W], mean and std") from None
    return LoadedModel(_prepare(model), dcfg, arch,
                       {"model": arch, "checkpoint": str(path), "weights": "checkpoint"},
                       obj.get("labels"), args)


def _alias_with_weights(ref: LoadedModel, path: Path) -> LoadedModel:
    """A local alias (``fmnist_vit``) with weights from ``path``: a maskaq checkpoint of the same
    architecture, or a state dict that fits the alias's model exactly (strict)."""
    import timm

    obj = _read_state_dict(path)
    if obj.get("format") == CHECKPOINT_FORMAT:
        lm = load_checkpoint(path)
        if lm.name.split(".", 1)[0] != ref.name.split(".", 1)[0] or lm.model_args != ref.model_args:
            raise ModelError(f"checkpoint {str(path)!r} holds {lm.name!r} {lm.model_args}, not the "
                             f"{ref.source.get('model')!r} architecture ({ref.name!r} {ref.model_args})")
        lm.source["model"] = ref.source.get("model", lm.name)
        return lm
    model = timm.create_model(ref.name.split(".", 1)[0], pretrained=False, **ref.model_args)
    _strict_load(model, _unwrap_state_dict(obj, path), f"checkpoint {str(path)!r}")
    return LoadedModel(_prepare(model), ref.data_config, ref.name,
                       {"model": ref.source.get("model", ref.name), "checkpoint": str(path), "weights": "checkpoint"},
                       ref.labels, dict(ref.model_args))


def check_finite_weights(model: nn.Module, what: str = "the model") -> None:
    """Raise :class:`ModelError` naming the first parameter or buffer holding NaN or Inf (checked
    once, before any work: non-finite weights make every synthesis step and loss non-finite)."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for k, t in items:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise ModelError(f"{what} has non-finite weights: {kind} {k!r} {tuple(t.shape)} holds "
                                 f"{n_nan} NaN and {n_inf} Inf values; use a checkpoint with finite weights")


def load_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    **model_args: Any,
) -> LoadedModel:
    """Load P (eval mode) and its preprocessing.

    Args:
        name: alias (``deit_t``, ``vit_s``, ``swin_t``, ``fmnist_vit`` ...), a full timm name with
            optional ``.tag``, or a path to a self-describing maskaq checkpoint.
        checkpoint: local ``.pth``/``.safetensors`` state dict (or maskaq checkpoint) for ``name``.
        pretrained: fetch timm hub weights when no checkpoint is given; ``False`` = random weights.
        device: where to put the model.
        **model_args: extra timm constructor arguments (``img_size``, ``num_classes``, ...).

    Returns:
        :class:`LoadedModel`.

    Raises:
        ModelError: unknown name, unreadable/mismatching checkpoint, or weights not reachable.

    Example:
        >>> lm = load_model("deit_t", checkpoint="deit_tiny.pth")
    """
    import timm

    if name in LOCAL_ALIASES:
        p = local_checkpoint_path(name)
        if not p.is_file() and name in BUILT_ALIASES:
            raise ModelError(f"the reference checkpoint for {name!r} is not built ({p} is missing); build it "
                             f"with 'python {BUILT_ALIASES[name]}' (from a source checkout; set MASKAQ_HOME "
                             "to keep it elsewhere)")
        if not p.is_file():
            raise ModelError(f"the reference checkpoint for {name!r} is missing ({p}); reinstall maskaq")
        lm = load_checkpoint(p)
        lm.source["model"] = name
        if checkpoint is not None:  # the alias's architecture with the caller's weights (never ignored)
            lm = _alias_with_weights(lm, Path(checkpoint))
        elif not pretrained:  # the alias's architecture, random weights (from the global RNG)
            m = timm.create_model(lm.name.split(".", 1)[0], pretrained=False, **lm.model_args)
            lm = LoadedModel(_prepare(m), lm.data_config, lm.name,
                             {"model": name, "checkpoint": None, "weights": "random"}, lm.labels, lm.model_args)
        lm.model.to(device)
        return lm
    if os.path.isfile(name) and checkpoint is not None:
        raise ModelError(f"MODEL {name!r} is a weights file (it carries its own weights); "
                         "--checkpoint does not apply to it")
    if os.path.isdir(name) and checkpoint is None:  # timm hub-style folder (issue 13)
        from .byo import load_hub_folder

        model, dcfg, arch_h, args_h, labels_h, source_h, msg = load_hub_folder(name, model_args)
        if msg:
            logging.getLogger("maskaq.byo").info("%s", msg)
        return LoadedModel(_prepare(model).to(device), dcfg, arch_h, source_h, labels_h, args_h)
    if os.path.isfile(name):
        obj = _read_state_dict(Path(name))
        if obj.get("format") != CHECKPOINT_FORMAT:  # a bare timm state dict: build it from its tensors
            from .byo import FAMILY_DEFAULT_ARCH, family_of

            fam = family_of(_unwrap_state_dict(obj, Path(name)))
            if fam is None:
                raise ModelError(f"{name!r} is neither a maskaq checkpoint nor a timm ViT/DeiT/Swin state dict; "
                                 "pass the timm model name with --checkpoint PATH")
            return load_model(FAMILY_DEFAULT_ARCH[fam], checkpoint=name, device=device, **model_args)
        lm = load_checkpoint(name)
        lm.model.to(device)
        return lm
    full = resolve_name(name)
    arch = full.split(".", 1)[0]
    if checkpoint is not None:
        path = Path(checkpoint)
        obj = _read_state_dict(path)
        if obj.get("format") == CHECKPOINT_FORMAT:
            lm = load_checkpoint(path)
            if lm.name.split(".", 1)[0] != arch:
                raise ModelError(f"checkpoint {str(path)!r} holds {lm.name!r}, not {arch!r}")
            lm.model.to(device)
            return lm
        sd = _unwrap_state_dict(obj, path)
        from .byo import FAMILY_DEFAULT_ARCH, family_of, infer_model_args

        fam = family_of(sd)
        if fam is not None:
            model_args, msg = infer_model_args(full, sd, model_args, what=str(path))
            if fam == "deit_distilled" and "distilled" not in arch:
                full = arch = FAMILY_DEFAULT_ARCH[fam]  # dist_token + head_dist: timm's distilled class
                msg += f"; built as {arch}"
            elif fam == "swin" and not arch.startswith("swin"):
                raise ModelError(f"checkpoint {str(path)!r} holds a Swin state dict but {arch!r} is not a Swin model; "
                                 f"use e.g. {FAMILY_DEFAULT_ARCH['swin']}")
            elif fam == "vit" and arch.startswith("swin"):
                raise ModelError(f"checkpoint {str(path)!r} holds a ViT state dict but {arch!r} is a Swin model; "
                                 f"use e.g. {FAMILY_DEFAULT_ARCH['vit']}")
            logging.getLogger("maskaq.byo").info("%s", msg)
        try:
            model = timm.create_model(full, pretrained=False, **model_args)
        except Exception as e:  # noqa: BLE001 - timm raises TypeError/ValueError/AssertionError
            raise ModelError(f"cannot build {full!r} with {model_args}: {type(e).__name__}: {e}") from None
        _strict_load(model, sd, f"checkpoint {str(path)!r}")
        source = {"model": full, "checkpoint": str(path), "weights": "checkpoint"}
    elif pretrained:
        try:
            model = timm.create_model(full, pretrained=True, **model_args)
        except TypeError as e:
            raise ModelError(f"cannot build {full!r} with {model_args}: {e}") from None
        except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
            raise ModelError(
                f"cannot fetch pretrained weights for {full!r} ({type(e).__name__}); offline? "
                "supply them with --checkpoint PATH (.pth/.safetensors), put them in the Hugging Face "
                "cache, or use --random-weights for a speed test"
            ) from None
        source = {"model": full, "checkpoint": None, "weights": "timm-hub"}
    else:
        try:
            model = timm.create_model(full, pretrained=False, **model_args)
        except Exception as e:  # noqa: BLE001 - timm raises TypeError/ValueError/AssertionError
            raise ModelError(f"cannot build {full!r} with {model_args}: {type(e).__name__}: {e}") from None
        source = {"model": full, "checkpoint": None, "weights": "random"}
    model = _prepare(model).to(device)
    return LoadedModel(model, DataConfig.from_model(model), full, source, None, dict(model_args))
