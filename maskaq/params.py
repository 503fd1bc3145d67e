"""Quantization parameters read out of Q into a serialisable, name-keyed object and loaded back.

Keys are the quantizer module names (``blocks.3.attn.qkv.input_quantizer``). Weight scales are
derived from the latent weights, so for weights the file records them (the exporter and the
encodings sidecar use them) and loading checks they agree with the model instead of setting them.
Floats are written with Python's shortest round-trip repr of the float32 value, so a
save/load/read cycle is exact.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .io import atomic_write_json
from .quant import ACTIVATION_QUANTIZERS, ActQuantizer, Log2Quantizer, QuantError, QuantizerSpec, WeightQuantizer, check_log2_bits

__all__ = ["QuantParams", "read_params", "load_params", "quantizer_specs"]

SCHEMA = "maskaq-quant-params/1"


def quantizer_specs(model: nn.Module) -> list[QuantizerSpec]:
    """One :class:`QuantizerSpec` per quantizer, in module order (weights read from their owner)."""
    specs = []
    for name, owner in model.named_modules():
        for cname, child in owner.named_children():
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, WeightQuantizer):
                specs.append(child.spec(full, owner.weight))
            elif isinstance(child, ACTIVATION_QUANTIZERS):
                specs.append(child.spec(full))
    return specs


@dataclass
class QuantParams:
    """Name-keyed quantization parameters. ``entries[name]`` is a JSON-able dict."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "meta": self.meta, "quantizers": self.entries}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "QuantParams":
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            raise QuantError(f"not a maskaq quantization-parameter file (expected schema {SCHEMA!r})")
        return cls(dict(obj["quantizers"]), dict(obj.get("meta") or {}))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantParams":
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise QuantError(f"cannot read quantization parameters {str(path)!r}: {e}") from None
        return cls.from_json(obj)

    def __len__(self) -> int:
        return len(self.entries)


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().float().cpu().reshape(-1).tolist()]


def read_params(model: nn.Module) -> QuantParams:
    """Read every quantizer's parameters out of Q."""
    out: dict[str, dict[str, Any]] = {}
    for s in quantizer_specs(model):
        out[s.name] = {
            "kind": s.kind, "bits": s.bits, "signed": s.signed, "narrow": s.narrow,
            "symmetric": s.symmetric, "axis": s.axis, "qmin": s.qmin, "qmax": s.qmax,
            "scale": _floats(s.scale), "zero_point": [int(v) for v in _floats(s.zero_point)],
            "enabled": s.enabled,
        }
        if s.encoding != "linear":  # log2 attention probabilities; absent = linear (older files)
            out[s.name]["encoding"] = s.encoding
    # weight clipping ratios (range search): recorded so that loading restores the same scales
    mods = dict(model.named_modules())
    for name, e in out.items():
        m = mods[name]
        if isinstance(m, WeightQuantizer) and m.clip.numel():
            e["clip"] = _floats(m.clip)
    return QuantParams(out)


def load_params(model: nn.Module, params: QuantParams, check_weights: bool = True) -> None:
    """Load activation scales/zero-points (and bit widths, signedness, enabled flags) into Q.

    Raises:
        QuantError: names present in one but not the other, or (``check_weights``) weight
            scales that disagree with the model's latent weights.
    """
    mods = dict(model.named_modules())
    names = {s.name for s in quantizer_specs(model)}
    missing, extra = sorted(names - set(params.entries)), sorted(set(params.entries) - names)
    if missing or extra:
        raise QuantError(f"quantization parameters do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, e in params.entries.items():
        m = mods[name]
        if m.kind != e["kind"]:
            raise QuantError(f"{name}: kind {e['kind']!r} in the file, {m.kind!r} in the model")
        have, want = getattr(m, "encoding", "linear"), e.get("encoding", "linear")
        if have != want:
            raise QuantError(f"{name}: a {want} quantizer in the file, {have} in the model "
                             "(quant.softmax_quant differs)")
        if isinstance(m, Log2Quantizer):
            m.bits = check_log2_bits(int(e["bits"]))
            m.enabled = bool(e["enabled"])
            m.set_scale(float(e["scale"][0]))
            continue
        m.bits = int(e["bits"])
        m.enabled = bool(e["enabled"])
        if isinstance(m, ActQuantizer):
            with torch.no_grad():
                m.symmetric = bool(e["symmetric"])
                m.is_signed.fill_(bool(e["signed"]))
                m.scale.copy_(torch.tensor(e["scale"], dtype=m.scale.dtype).reshape(m.scale.shape))
                m.zero_point.copy_(torch.tensor(e["zero_point"], dtype=m.zero_point.dtype).reshape(m.zero_point.shape))
                m.initialized.fill_(True)
                m.sync_flags()
        else:
            m.narrow = bool(e["narrow"])
            m.set_clip(torch.tensor(e["clip"], dtype=torch.float32) if e.get("clip") else None)
            if check_weights:
                owner = mods[name.rpartition(".")[0]]
                have = _floats(m.scale_for(owner.weight))
                if have != e["scale"]:
                    raise QuantError(f"{name}: weight scales in the file do not match the model's weights")
