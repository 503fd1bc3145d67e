"""Deployment profiles: what each target accepts, and the conversion of a calibrated Q into it.

``ort`` (default) exports Q exactly as calibrated: asymmetric activations (uint8 storage for
unsigned grids, int8 for signed ones), weights on the model's own grid.

``tensorrt`` needs symmetric quantization (every zero-point 0), int8 storage only, and narrow-range
weights. A model calibrated that way exports unchanged. A model calibrated with asymmetric
activations (the default) is *converted* rather than refused, so a calibrated state can be
re-exported without re-running synthesis (``maskaq-export --from-state S --profile tensorrt``):

* each activation quantizer keeps its bit width and is given the smallest symmetric grid that
  covers its calibrated range ``[lo, hi] = [(qmin - z) s, (qmax - z) s]``:

  - ``z == 0`` and the grid fits int8 (every signed grid; unsigned grids up to 7 bits): unchanged,
    exact - the unsigned grid ``[0, 2^b - 1]`` is stored in int8 with zero-point 0;
  - otherwise a signed grid ``[-2^(b-1), 2^(b-1) - 1]`` with
    ``s' = max(hi / (2^(b-1) - 1), -lo / 2^(b-1))``. Nothing that was representable is clipped,
    but the step grows by ``s'/s`` (reported per quantizer; about 2x for a one-sided range:
    one bit of resolution lost). An 8-bit unsigned grid (softmax) becomes ``[0, 127]``-in-int8,
    i.e. ``s' = hi / 127`` (one bit lost).

* weights: TensorRT's rule is on the int8 storage (weights in ``[-127, 127]``, -128 never used).
  A b < 8 grid ``[-2^(b-1), 2^(b-1) - 1]`` already satisfies it, so its integers are kept (the
  export stays exact and costs nothing). 8-bit grids switch to the narrow grid ``[-127, 127]``
  with the same per-channel scale; only weights that sat on -128 move (by one step); their count
  is reported. (A fresh ``maskaq-export --profile tensorrt`` run calibrates with narrow grids at
  the model's bit width from the start, ``narrow_weights=True``.)

The converted model is an ordinary maskaq Q (its torch forward is the reference the exported
graph reproduces exactly); the accuracy cost of the conversion is the difference between the
two torch models, which ``maskaq-export`` reports when it converts.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from maskaq.quant import ACTIVATION_QUANTIZERS, QuantError, ActQuantizer, Log2Quantizer, WeightQuantizer, qrange

log = logging.getLogger(__name__)

__all__ = ["PROFILES", "PURE_QDQ_PROFILES", "Conversion", "convert_for_profile", "storage_dtype", "low_bit_storage",
           "INT8_RANGE", "UINT8_RANGE", "float_quantizers", "pure_qdq_refusal"]

PROFILES = ("ort", "tensorrt")
#: Profiles whose graphs must be pure Q/DQ (every quantizer a QuantizeLinear/DequantizeLinear pair):
#: they refuse quantizers that export as float ops (the log2 softmax quantizer).
PURE_QDQ_PROFILES = ("tensorrt",)


def float_quantizers(Q: nn.Module) -> list[str]:
    """Names of Q's enabled quantizers that export as float ops instead of Q/DQ (log2)."""
    return [n for n, m in Q.named_modules() if isinstance(m, Log2Quantizer) and m.enabled]


def pure_qdq_refusal(Q: nn.Module, profile: str) -> str | None:
    """The one-line reason ``profile`` cannot take Q, or None when it can."""
    if profile not in PURE_QDQ_PROFILES:
        return None
    names = float_quantizers(Q)
    if not names:
        return None
    return (f"profile {profile} needs pure Q/DQ, but {len(names)} attention-probability quantizers are log2 "
            f"({names[0]}...; quant.softmax_quant=log2), which export as float ops; use --profile ort, "
            "or calibrate with quant.softmax_quant=linear")
INT8_RANGE = (-128, 127)
UINT8_RANGE = (0, 255)


@dataclass(frozen=True)
class Conversion:
    """One quantizer changed to meet a profile's rules."""

    name: str
    kind: str  # "activation" | "weight"
    what: str  # human-readable summary
    scale_ratio: float = 1.0  # new step / old step (activations)
    moved: int = 0  # weights moved off -2^(b-1) (narrow grid)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def storage_dtype(profile: str, qmin: int, qmax: int) -> str:
    """ONNX storage type of an integer grid under ``profile`` ("int8" or "uint8")."""
    if profile == "tensorrt":
        if qmin < INT8_RANGE[0] or qmax > INT8_RANGE[1]:
            raise ValueError(f"grid [{qmin}, {qmax}] does not fit int8 (TensorRT)")
        return "int8"
    return "int8" if qmin < 0 else "uint8"


def _symmetric_act(aq: ActQuantizer) -> tuple[bool, float, bool] | None:
    """New (signed, scale, changed) for a symmetric int8-storable version of ``aq``;
    None when ``aq`` already qualifies."""
    s, z = aq.effective()
    s, z = float(s.reshape(-1)[0]), int(z.reshape(-1)[0])
    qmin, qmax = aq.grid()
    if z == 0 and qmin >= INT8_RANGE[0] and qmax <= INT8_RANGE[1]:
        return None
    lo, hi = (qmin - z) * s, (qmax - z) * s
    b = aq.bits
    if lo >= 0:  # one-sided range starting at 0 (only z == 0 reaches here: 8-bit unsigned)
        return True, hi / (2 ** (b - 1) - 1), True
    pos = 2 ** (b - 1) - 1
    neg = 2 ** (b - 1)
    new_s = max(hi / pos if hi > 0 else 0.0, -lo / neg)
    return True, new_s, True


def _sync(M: nn.Module) -> None:
    """Refresh the activation quantizers' Python mirrors of their buffers (``signed``,
    initialised) after the buffers were written directly (state dicts, conversions)."""
    for m in M.modules():
        if isinstance(m, ACTIVATION_QUANTIZERS) and hasattr(m, "sync_flags"):
            m.sync_flags()


@torch.no_grad()
def convert_for_profile(Q: nn.Module, profile: str, *, copy_model: bool = True) -> tuple[nn.Module, list[Conversion]]:
    """Return Q converted to ``profile``'s rules and the list of changes (empty: exported as is).

    Args:
        Q: calibrated fake-quantized model (activation quantizers initialised).
        profile: "ort" or "tensorrt".
        copy_model: convert a deep copy (default) instead of Q itself.

    Example:
        >>> Qt, changes = convert_for_profile(Q, "tensorrt")
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    reason = pure_qdq_refusal(Q, profile)
    if reason:
        raise QuantError(reason)
    M = copy.deepcopy(Q) if copy_model else Q
    _sync(M)
    changes: list[Conversion] = []
    if profile == "ort":
        return M, changes
    for name, owner in M.named_modules():
        for cname, q in owner.named_children():
            full = f"{name}.{cname}" if name else cname
            if isinstance(q, ActQuantizer) and q.enabled:
                new = _symmetric_act(q)
                if new is None:
                    q.symmetric = True  # already symmetric in value; make it so by construction
                    q.zero_point.requires_grad_(False)
                    continue
                signed, new_s, _ = new
                old_s, old_z = (float(t.reshape(-1)[0]) for t in q.effective())
                old_grid = q.grid()
                q.symmetric = True
                q.is_signed.fill_(signed)
                q.scale.fill_(new_s)
                q.zero_point.fill_(0.0)
                q.zero_point.requires_grad_(False)
                _sync(q)
                changes.append(Conversion(
                    full, "activation",
                    f"grid {list(old_grid)} z={old_z:g} s={old_s:.6g} -> grid {list(q.grid())} z=0 s={new_s:.6g}",
                    scale_ratio=new_s / old_s if old_s > 0 else math.inf,
                ))
            elif isinstance(q, WeightQuantizer) and q.enabled and not q.narrow and q.grid()[0] < -127:
                w = owner.weight
                s = q.scale_for(w)
                shape = [1] * w.dim()
                shape[q.axis] = -1
                lo = qrange(q.bits, True, False)[0]
                moved = int((torch.clamp(torch.round(w / s.reshape(shape)), lo, None) == lo).sum())
                q.narrow = True
                changes.append(Conversion(full, "weight", f"narrow grid {list(q.grid())}", moved=moved))
    return M, changes


def low_bit_storage(Q: nn.Module, profile: str) -> dict[str, Any] | None:
    """For ``profile="tensorrt"``: which quantizers are narrower than 8 bit. TensorRT has no
    integer type below int8, so a b < 8 grid is written as int8 storage that only uses the
    b-bit values (weights: int8 initializers in ``[-2^(b-1)+1, 2^(b-1)-1]``; activations: a Clip
    to the b-bit range before an int8 QuantizeLinear): the graph computes what the b-bit model
    computes, but TensorRT runs it with int8 kernels and int8 weight memory, not b-bit ones.
    None when every quantizer is 8-bit or the profile is not tensorrt."""
    if profile != "tensorrt":
        return None
    w = sorted({int(m.bits) for m in Q.modules() if isinstance(m, WeightQuantizer) and m.bits < 8})
    a = sorted({int(m.bits) for m in Q.modules() if isinstance(m, ActQuantizer) and m.bits < 8})
    nw = sum(1 for m in Q.modules() if isinstance(m, WeightQuantizer) and m.bits < 8)
    na = sum(1 for m in Q.modules() if isinstance(m, ActQuantizer) and m.bits < 8)
    if not (nw or na):
        return None
    return {"storage": "int8", "weight_bits": w, "activation_bits": a, "weight_quantizers": nw,
            "activation_quantizers": na,
            "note": "TensorRT has no sub-8-bit integer type: these grids are stored as int8 holding only the "
                    "low-bit values (weights) or clipped to the low-bit range before an int8 Q/DQ "
                    "(activations); accuracy is the low-bit model's, speed and weight size are int8's"}
