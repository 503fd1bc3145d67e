"""Bring your own ViT: read what a checkpoint already says, load a timm hub-style folder, and
apply the user's architecture / preprocessing / label settings (timm's flag names).

* :func:`infer_model_args` reads the constructor arguments a bare timm state dict determines
  (ViT / DeiT / DeiT-distilled / Swin): patch size and channels from the patch-embedding
  weight, width, depth, classes, prefix tokens, image size from the position embedding, MLP
  ratio, qkv bias, LayerScale, final norm vs ``fc_norm``; Swin's stage depths, window size and
  heads per stage from its relative-position bias tables. The one thing a ViT's tensors do not
  say is its number of heads: that comes from the named architecture when the width matches
  it, else from ``--model-kwargs num_heads=N`` (an error says so).
* :func:`load_hub_folder` loads what timm's ``save_for_hf`` / ``push_to_hf_hub`` writes:
  ``config.json`` (architecture, num_classes, model_args, pretrained_cfg, label_names) plus
  ``model.safetensors`` or ``pytorch_model.bin``, with its own preprocessing.
* :func:`parse_model_kwargs`, :func:`apply_data_overrides`, :func:`read_labels`: the command
  line's ``--model-kwargs``, ``--mean/--std/--crop-pct/--interpolation`` and ``--labels``.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    "infer_model_args",
    "family_of",
    "load_hub_folder",
    "is_hub_folder",
    "parse_model_kwargs",
    "parse_img_size",
    "apply_data_overrides",
    "read_labels",
    "INTERPOLATIONS",
    "FAMILY_DEFAULT_ARCH",
]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")

#: the timm architecture a bare state dict is built as when no model name is given
FAMILY_DEFAULT_ARCH = {
    "vit": "vit_tiny_patch16_224",
    "deit_distilled": "deit_tiny_distilled_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
}


def _error(msg: str) -> Exception:
    from .models import ModelError

    return ModelError(msg)


# --- command-line values ----------------------------------------------------------------------

def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["num_heads=4", "qkv_bias=False", "act_layer=gelu"]`` -> dict; values are Python
    literals where they parse (timm train.py's ``ParseKwargs``), else strings."""
    out: dict[str, Any] = {}
    for it in items:
        for part in [it]:
            if "=" not in part or part.startswith("="):
                raise _error(f"--model-kwargs {part!r} is not KEY=VALUE (e.g. num_heads=4, mlp_ratio=2.0)")
            k, v = part.split("=", 1)
            k = k.strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise _error(f"--model-kwargs key {k!r} is not a valid argument name")
            try:
                val: Any = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                val = v
            out[k] = list(val) if isinstance(val, tuple) else val
    return out


def parse_img_size(text: str) -> int | list[int]:
    """``"224"`` -> 224; ``"24x32"`` (H x W) -> [24, 32]."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) <= 0 or (m.group(2) is not None and int(m.group(2)) <= 0):
        raise _error(f"--img-size {text!r} is not a positive size; valid: N (square) or HxW such as 24x32")
    if m.group(2) is None:
        return int(m.group(1))
    h, w = int(m.group(1)), int(m.group(2))
    return h if h == w else [h, w]


def read_labels(path: str | os.PathLike) -> list[str]:
    """One class name a line (blank lines skipped; index = line order)."""
    p = Path(path)
    if not p.is_file():
        raise _error(f"labels file {str(p)!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _error(f"cannot read labels file {str(p)!r} ({type(e).__name__})") from None
    labels = [ln.strip() for ln in lines if ln.strip()]
    if not labels:
        raise _error(f"labels file {str(p)!r} holds no class names (one name a line)")
    return labels


def apply_data_overrides(data_config: Any, overrides: Mapping[str, Any] | None) -> Any:
    """``DataConfig`` with ``mean``/``std``/``crop_pct``/``interpolation``/``crop_mode`` replaced
    (timm validate.py's flags). A single mean/std value is repeated for every channel."""
    if not overrides:
        return data_config
    c = data_config.channels
    kw: dict[str, Any] = {}
    for key in ("mean", "std"):
        if overrides.get(key) is not None:
            vals = [float(v) for v in (overrides[key] if isinstance(overrides[key], (list, tuple)) else [overrides[key]])]
            if len(vals) == 1:
                vals = vals * c
            if len(vals) != c:
                raise _error(f"--{key} has {len(vals)} values but the model takes {c} channel(s); "
                             + ("give 1 value" if c == 1 else f"give 1 or {c} values"))
            if key == "std" and any(v <= 0 for v in vals):
                raise _error(f"--std values must be positive, got {vals}")
            kw[key] = tuple(vals)
    if overrides.get("crop_pct") is not None:
        cp = float(overrides["crop_pct"])
        if not 0 < cp <= 1.0 or math.isnan(cp):
            raise _error(f"--crop-pct {cp} is out of range; valid: 0 < crop_pct <= 1 (1.0 = no crop)")
        kw["crop_pct"] = cp
    if overrides.get("interpolation") is not None:
        it = str(overrides["interpolation"])
        if it not in INTERPOLATIONS:
            raise _error(f"--interpolation {it!r} is unknown; valid: {', '.join(INTERPOLATIONS)}")
        kw["interpolation"] = it
    bad = sorted(set(overrides) - {"mean", "std", "crop_pct", "interpolation"})
    if bad:
        raise _error(f"unknown preprocessing settings {bad}; valid: mean, std, crop_pct, interpolation")
    return replace(data_config, **kw)


# --- state-dict inference ---------------------------------------------------------------------

def family_of(sd: Mapping[str, torch.Tensor]) -> str | None:
    """``vit`` | ``deit_distilled`` | ``swin`` | None (not a ViT layout this module knows)."""
    if any(k.startswith("layers.") and ".blocks." in k and k.endswith("relative_position_bias_table") for k in sd):
        return "swin"
    if "patch_embed.proj.weight" in sd and any(re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k) for k in sd):
        return "deit_distilled" if "dist_token" in sd else "vit"
    return None


def _arch_defaults(arch: str) -> dict[str, Any]:
    """The named architecture's own embed_dim / num_heads (built on the meta device: no memory)."""
    import timm

    try:
        with torch.device("meta"):
            m = timm.create_model(arch.split(".", 1)[0], pretrained=False)
    except Exception:  # noqa: BLE001 - defaults are a convenience only
        return {}
    out: dict[str, Any] = {}
    if hasattr(m, "embed_dim"):
        out["embed_dim"] = int(m.embed_dim)
    blocks = getattr(m, "blocks", None)
    if blocks is not None and len(blocks):
        out["num_heads"] = int(blocks[0].attn.num_heads)
    pe = getattr(m, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        out["img_size"] = [int(v) for v in pe.img_size]
    return out


def _fmt_size(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(int(x)) for x in v)
    return f"{v}x{v}"


def _img_hw(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _infer_vit(sd: Mapping[str, torch.Tensor], arch: str, given: Mapping[str, Any], what: str
               ) -> tuple[dict[str, Any], list[str]]:
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4:
        raise _error(f"{what}: patch_embed.proj.weight has shape {tuple(w.shape)}; expected [dim, chans, ph, pw]")
    dim, chans, ph, pw = (int(v) for v in w.shape)
    args: dict[str, Any] = {"embed_dim": dim, "in_chans": chans, "patch_size": ph if ph == pw else [ph, pw]}
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    args["depth"] = depth
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        args["mlp_ratio"] = float(fc1.shape[0]) / dim
    args["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    if "blocks.0.attn.q_norm.weight" in sd:
        args["qk_norm"] = True
    if "blocks.0.ls1.gamma" in sd:
        args["init_values"] = 1e-5  # any value: the checkpoint's gammas replace it
    if "norm_pre.weight" in sd:
        args["pre_norm"] = True
    has_cls = "cls_token" in sd
    distilled = "dist_token" in sd
    reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    if not distilled:
        args["class_token"] = has_cls
        if reg:
            args["reg_tokens"] = reg
    prefix = int(has_cls) + int(distilled) + reg
    if "fc_norm.weight" in sd:
        args["global_pool"], args["fc_norm"] = "avg", True
    elif not has_cls:
        args["global_pool"] = "avg"
        args["fc_norm"] = False
        if "norm.weight" not in sd:
            args["final_norm"] = False
    elif "norm.weight" not in sd and not distilled:
        args["final_norm"] = False
    head = sd.get("head.weight")
    args["num_classes"] = int(head.shape[0]) if head is not None else 0
    # image size: the position embedding holds one entry per patch (+ the prefix tokens unless
    # no_embed_class)
    notes = []
    pos = sd.get("pos_embed")
    if pos is not None:
        n = int(pos.shape[1])
        g_user = given.get("img_size")
        if g_user is not None:
            h, wd = _img_hw(g_user)
            want = (h // ph) * (wd // pw)
            if want == n - prefix:
                pass
            elif want == n and prefix and not distilled:
                args["no_embed_class"] = True
            else:
                raise _error(f"{what}: --img-size {_fmt_size(g_user)} with patch {ph}x{pw} gives {want} patches, but "
                             f"the position embedding holds {n} entries ({prefix} prefix token(s))")
            args["img_size"] = g_user
        else:
            if _square(n - prefix):
                patches = n - prefix
            elif reg and not distilled and _square(n):  # timm's register models keep prefix tokens out
                patches, args["no_embed_class"] = n, True
            else:
                raise _error(f"{what}: the position embedding holds {n} entries ({prefix} prefix token(s)), not a "
                             f"square grid of patches; give the image size: --img-size HxW (multiples of the patch "
                             f"size {ph}x{pw})")
            side = int(round(math.sqrt(patches)))
            args["img_size"] = side * ph if ph == pw else [side * ph, side * pw]
    if args.get("no_embed_class"):
        notes.append("no_embed_class")
    # heads: not in the tensors
    if "num_heads" not in given:
        dflt = _arch_defaults(arch)
        if dflt.get("embed_dim") == dim and dflt.get("num_heads"):
            args["num_heads"] = dflt["num_heads"]
            notes.append(f"num_heads={dflt['num_heads']} from {arch.split('.', 1)[0]} (same width)")
        else:
            divs = [h for h in (1, 2, 3, 4, 6, 8, 12, 16) if dim % h == 0]
            raise _error(f"{what}: the number of attention heads is not stored in a state dict (width {dim}"
                         + (f" differs from {arch.split('.', 1)[0]}'s {dflt['embed_dim']}" if dflt.get("embed_dim") else "")
                         + f"); give it with --model-kwargs num_heads=N (N divides {dim}, e.g. "
                         + ", ".join(str(d) for d in divs[-3:]) + ")")
    return args, notes


def _square(n: int) -> bool:
    r = int(round(math.sqrt(n))) if n > 0 else 0
    return r * r == n and n > 0


def _infer_swin(sd: Mapping[str, torch.Tensor], arch: str, given: Mapping[str, Any], what: str
                ) -> tuple[dict[str, Any], list[str]]:
    w = sd["patch_embed.proj.weight"]
    dim, chans, ph, pw = (int(v) for v in w.shape)
    stages = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    depths, heads, win = [], [], None
    for i in range(stages):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        t = sd.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
        if t is None:
            raise _error(f"{what}: Swin stage {i} has no relative_position_bias_table")
        heads.append(int(t.shape[1]))
        side = int(round(math.sqrt(int(t.shape[0]))))
        if side * side != int(t.shape[0]) or side % 2 == 0:
            raise _error(f"{what}: relative_position_bias_table of stage {i} has {t.shape[0]} rows; not (2w-1)^2")
        win = win or (side + 1) // 2
    args: dict[str, Any] = {"embed_dim": dim, "in_chans": chans, "patch_size": ph if ph == pw else [ph, pw],
                            "depths": depths, "num_heads": heads, "window_size": win}
    fc1 = sd.get("layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        args["mlp_ratio"] = float(fc1.shape[0]) / dim
    args["qkv_bias"] = "layers.0.blocks.0.attn.qkv.bias" in sd
    head = sd.get("head.fc.weight")
    args["num_classes"] = int(head.shape[0]) if head is not None else 0
    notes = []
    if "img_size" in given:
        args["img_size"] = given["img_size"]
    else:
        dflt = _arch_defaults(arch).get("img_size")
        # the image size is not in Swin's tensors: the architecture's own, if its grid fits
        if dflt:
            args["img_size"] = dflt[0] if dflt[0] == dflt[1] else dflt
            notes.append(f"img_size {_fmt_size(args['img_size'])} from {arch.split('.', 1)[0]} (not stored in "
                         "Swin's tensors; --img-size to change)")
    return args, notes


def infer_model_args(arch: str, sd: Mapping[str, torch.Tensor], given: Mapping[str, Any] | None = None,
                     what: str = "checkpoint") -> tuple[dict[str, Any], str]:
    """Constructor arguments a bare timm state dict determines, merged under ``given`` (the
    user's ``--model-kwargs`` etc., which win), and the one-line message saying what was read.

    Raises:
        ModelError: not a ViT/DeiT/Swin layout, a user value contradicting the tensors, or the
            number of heads needed (``--model-kwargs num_heads=N``).
    """
    given = dict(given or {})
    fam = family_of(sd)
    if fam is None:
        raise _error(f"{what}: not a timm ViT/DeiT/Swin state dict (no patch_embed.proj.weight with "
                     "blocks.N.attn.qkv or layers.N.blocks.M.attn); pass the model's own timm name and arguments")
    if fam == "swin":
        args, notes = _infer_swin(sd, arch, given, what)
    else:
        args, notes = _infer_vit(sd, arch, given, what)
    clash = []
    for k, v in given.items():
        if k in args and k not in ("img_size",) and _norm(args[k]) != _norm(v) and k not in (
                "init_values", "mlp_ratio", "global_pool", "fc_norm", "num_heads"):
            clash.append(f"{k}={v!r} (the checkpoint says {args[k]!r})")
    if clash:
        raise _error(f"{what} contradicts the given model arguments: {', '.join(clash)}")
    inferred = {k: v for k, v in args.items() if k not in given}
    args.update(given)
    shown = []
    for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "depths", "num_heads", "window_size",
              "num_classes", "mlp_ratio", "class_token", "reg_tokens", "global_pool", "init_values", "qk_norm"):
        if k in inferred and not (k == "num_heads" and fam != "swin"):
            v = inferred[k]
            shown.append("LayerScale" if k == "init_values" else
                         f"{k}={_fmt_size(v) if k == 'img_size' else (round(v, 4) if isinstance(v, float) else v)}")
    if fam == "deit_distilled":
        shown.append("distilled (dist_token, head_dist)")
    msg = f"inferred from {what}: {fam}, " + ", ".join(shown) + (f"; {'; '.join(notes)}" if notes else "")
    return args, msg


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


# --- hub-style folder -------------------------------------------------------------------------

HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_hub_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_hub_folder(path: str | os.PathLike, model_args: Mapping[str, Any] | None = None) -> Any:
    """Load a folder in timm's hub layout (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) with its own preprocessing and label names.

    Returns:
        ``(model, data_config, arch, args, labels, source, message)``; the model is not prepared.
    """
    import timm

    from .models import DataConfig, _read_state_dict, _strict_load, _unwrap_state_dict

    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise _error(f"{str(root)!r} is a folder without config.json; a hub-style model folder holds config.json "
                     f"and {' or '.join(HUB_WEIGHTS)} (what timm's save_for_hf writes)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise _error(f"cannot read {str(cfg_path)!r} ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise _error(f"{str(cfg_path)!r} names no 'architecture' (timm's hub config layout)")
    arch = cfg["architecture"]
    if arch.split(".", 1)[0] not in timm.list_models():
        raise _error(f"{str(cfg_path)!r}: architecture {arch!r} is not a timm model")
    wpath = next((root / w for w in HUB_WEIGHTS if (root / w).is_file()), None)
    if wpath is None:
        raise _error(f"{str(root)!r} holds config.json but no weights ({' or '.join(HUB_WEIGHTS)})")
    sd = _unwrap_state_dict(_read_state_dict(wpath), wpath)
    args: dict[str, Any] = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        args.setdefault("num_classes", int(cfg["num_classes"]))
    args.update(dict(model_args or {}))
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    msg = ""
    if not cfg.get("model_args") and family_of(sd) is not None:
        # an older export without model_args: its input size, and the tensors say the rest
        isz = pcfg.get("input_size")
        if "img_size" not in args and isinstance(isz, (list, tuple)) and len(isz) == 3:
            args["img_size"] = int(isz[1]) if isz[1] == isz[2] else [int(isz[1]), int(isz[2])]
        args, msg = infer_model_args(arch, sd, args, what=str(wpath))
    try:
        model = timm.create_model(arch.split(".", 1)[0], pretrained=False, **args)
    except Exception as e:  # noqa: BLE001
        raise _error(f"{str(root)!r}: cannot build {arch!r} with {args}: {type(e).__name__}: {e}") from None
    _strict_load(model, sd, f"weights {str(wpath)!r}")
    dc = DataConfig.from_model(model)
    c = dc.channels
    mean = tuple(float(v) for v in pcfg.get("mean", dc.mean))
    std = tuple(float(v) for v in pcfg.get("std", dc.std))
    if len(mean) != c:
        mean = (float(sum(mean) / len(mean)),) * c
    if len(std) != c:
        std = (float(sum(std) / len(std)),) * c
    dc = replace(dc, mean=mean, std=std, crop_pct=float(pcfg.get("crop_pct", dc.crop_pct)),
                 interpolation=str(pcfg.get("interpolation", dc.interpolation)),
                 crop_mode=str(pcfg.get("crop_mode", dc.crop_mode)))
    labels = cfg.get("label_names") or pcfg.get("label_names")
    if isinstance(labels, dict):
        labels = [str(labels[k]) for k in sorted(labels, key=lambda x: int(x))]
    labels = [str(x) for x in labels] if labels else None
    source = {"model": str(root), "checkpoint": str(wpath), "weights": "hub-folder", "architecture": arch}
    return model, dc, arch, args, labels, source, msg
