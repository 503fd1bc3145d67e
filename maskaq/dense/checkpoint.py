"""Load the public mmdet / mmseg Swin checkpoints into :mod:`maskaq.dense.models` by key
remapping, strictly (docs/dense.md has the tables).

Two backbone layouts are accepted (detected from the keys):

* ``original`` (Swin-Transformer-Object-Detection / -Semantic-Segmentation, the mmdet 2.11-era
  checkpoints): ``backbone.layers.{i}.blocks.{j}.attn.qkv`` ... - identical to ours except the
  ``relative_position_index`` buffers, which are checked against ours and dropped;
* ``mmdet`` (mmdet >= 2.17 / mmseg >= 0.20 native ``SwinTransformer``):
  ``backbone.stages.{i}.blocks.{j}.attn.w_msa.*``, ``ffn.layers.0.0`` / ``ffn.layers.1``,
  ``patch_embed.projection``; its patch-merging ``reduction``/``norm`` use nn.Unfold's channel
  order, undone here (inverse of mmdet's ``swin2mmdet`` conversion).

Head keys (``neck.*``, ``rpn_head.*``, ``roi_head.bbox_head.*``, ``roi_head.mask_head.*``,
``decode_head.*``, ``auxiliary_head.*``) map one to one. Any checkpoint key left unmatched, any
model key left unfilled (``num_batches_tracked`` excepted) and any shape mismatch is an error
that names the keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "remap_state_dict", "load_dense_checkpoint", "detect_layout",
           "unfold_to_original_reduction", "unfold_to_original_norm"]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (names the offending keys)."""


_MMDET_RULES = [
    (re.compile(r"^backbone\.patch_embed\.projection\."), "backbone.patch_embed.proj."),
    (re.compile(r"^backbone\.stages\.(\d+)\."), r"backbone.layers.\1."),
    (re.compile(r"\.attn\.w_msa\."), ".attn."),
    (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."),
    (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
]


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("backbone.stages.") or ".attn.w_msa." in k for k in keys):
        return "mmdet"
    return "original"


def unfold_to_original_reduction(w: torch.Tensor) -> torch.Tensor:
    """Inverse of mmdet's ``correct_unfold_reduction_order`` ([out, 4C] weight)."""
    out_c, in_c = w.shape
    x = w.reshape(out_c, in_c // 4, 4).transpose(1, 2)
    return x[:, [0, 2, 1, 3], :].reshape(out_c, in_c)


def unfold_to_original_norm(w: torch.Tensor) -> torch.Tensor:
    """Inverse of mmdet's ``correct_unfold_norm_order`` ([4C] LayerNorm weight/bias)."""
    x = w.reshape(w.shape[0] // 4, 4).transpose(0, 1)
    return x[[0, 2, 1, 3], :].reshape(-1)


def _unwrap(ckpt: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, Mapping):
        for k in ("state_dict", "model"):
            if k in ckpt and isinstance(ckpt[k], Mapping):
                return ckpt[k]
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise CheckpointError("checkpoint is not a state dict or a dict with a 'state_dict' entry")


def remap_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> ``model``'s keys, strictly. Raises :class:`CheckpointError`."""
    layout = detect_layout(sd.keys())
    own = model.state_dict()
    # Relative-position indices are non-persistent buffers here: recompute and compare.
    own_buffers = dict(model.named_buffers())
    out: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, v in sd.items():
        if key.startswith("module."):
            key = key[len("module."):]
        new = key
        if layout == "mmdet":
            for pat, rep in _MMDET_RULES:
                new = pat.sub(rep, new)
            if re.match(r"^backbone\.layers\.\d+\.downsample\.reduction\.weight$", new):
                v = unfold_to_original_reduction(v)
            elif re.match(r"^backbone\.layers\.\d+\.downsample\.norm\.(weight|bias)$", new):
                v = unfold_to_original_norm(v)
        if new.endswith("relative_position_index"):
            ref = own_buffers.get(new)
            if ref is None:
                unexpected.append(key)
            elif tuple(ref.shape) != tuple(v.shape) or not torch.equal(ref.to(v.dtype), v):
                mismatched.append(f"{key}: values differ from the recomputed index")
            continue
        if new not in own:
            unexpected.append(key)
            continue
        if tuple(own[new].shape) != tuple(v.shape):
            mismatched.append(f"{key} -> {new}: checkpoint {tuple(v.shape)} vs model {tuple(own[new].shape)}")
            continue
        out[new] = v
    missing = [k for k in own if k not in out and not k.endswith("num_batches_tracked")]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) match nothing in the model: {unexpected[:20]}")
    if missing:
        problems.append(f"{len(missing)} model key(s) missing from the checkpoint: {missing[:20]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape/value mismatch(es): {mismatched[:20]}")
    if problems:
        hint = _architecture_hint(sd.keys(), own.keys())
        raise CheckpointError(f"checkpoint ({layout} layout) does not fit {type(model).__name__}: "
                              + "; ".join(problems) + (f" ({hint})" if hint else ""))
    return out


_CASCADE_KEY = re.compile(r"^(module\.)?roi_head\.bbox_head\.\d+\.")


def _architecture_hint(ckpt_keys, model_keys) -> str:
    """Name the likely mix-up when a Cascade checkpoint meets Mask R-CNN (or the reverse)."""
    ck = any(_CASCADE_KEY.match(k) for k in ckpt_keys)
    mk = any(_CASCADE_KEY.match(k) for k in model_keys)
    if ck and not mk:
        return "the checkpoint has per-stage roi_head.bbox_head.{i}: a Cascade Mask R-CNN, load it into CascadeMaskRCNN"
    if mk and not ck and any(k.startswith(("module.roi_head.", "roi_head.")) for k in ckpt_keys):
        return "the model is a Cascade Mask R-CNN but the checkpoint has a single-stage roi_head (Mask R-CNN)"
    return ""


def load_dense_checkpoint(model: nn.Module, checkpoint: str | Path | Mapping[str, Any]) -> nn.Module:
    """Load a mmdet/mmseg checkpoint (path or already-loaded dict) into ``model`` in place."""
    ckpt = checkpoint
    if isinstance(checkpoint, (str, Path)):
        ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    sd = remap_state_dict(_unwrap(ckpt), model)
    model.load_state_dict(sd, strict=False)
    return model
