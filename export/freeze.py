"""Freeze a calibrated Q for export: every quantizer becomes a constant-parameter module.

The training quantizers compute their parameters in forward (LSQ+ scale/zero-point with
straight-through tricks, weight scales from the latent weights, a data-dependent first-batch
initialisation), which ``torch.export`` cannot trace and which would land in the graph as
arithmetic. A frozen quantizer holds exactly the values the trained one uses - scale and
integer zero-point as buffers named ``<quantizer>.scale`` / ``<quantizer>.zero_point`` (so the
ONNX initializers carry the quantizer's name) - and calls the same custom op
``torch.ops.maskaq.fake_quant`` (bit-identical to :func:`maskaq.quant.fake_quant`).

Each frozen quantizer is described by a :class:`QuantRecord` (the exporter's table, keyed by the
quantizer name), which also feeds the encodings sidecar.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from maskaq.quant import ACTIVATION_QUANTIZERS, ActQuantizer, Log2Quantizer, WeightQuantizer, expand_blocks, log2_tables

from .profiles import INT8_RANGE, UINT8_RANGE, _sync, storage_dtype

__all__ = ["QuantRecord", "FrozenActQuantizer", "FrozenWeightQuantizer", "FrozenLog2Quantizer", "freeze_model",
           "uninitialized_quantizers"]

_TORCH_DTYPE = {"int8": torch.int8, "uint8": torch.uint8}


@dataclass
class QuantRecord:
    """One quantizer as exported.

    ``scale``/``zero_point``: float32 / int arrays (shape ``[]`` per tensor, ``[C]`` per channel).
    ``clip``: float32 ``(lo, hi)`` of the float Clip in front of the QuantizeLinear (activations
    whose grid is narrower than the storage type), else None. ``qweight``: the weight integers
    (torch layout of the owner's weight) for weight quantizers.
    """

    name: str
    kind: str  # "activation" | "weight"
    bits: int
    qmin: int
    qmax: int
    signed: bool
    narrow: bool
    symmetric: bool
    axis: int
    storage: str  # "int8" | "uint8" | "int4"
    scale: np.ndarray
    zero_point: np.ndarray
    clip: tuple[float, float] | None = None
    owner: str = ""  # module owning the weight (weights)
    qweight: np.ndarray | None = None
    block_size: int | None = None
    #: "linear" (Q/DQ) or "log2" (:class:`maskaq.quant.Log2Quantizer`: float ops, the two tables below)
    encoding: str = "linear"
    thresholds: np.ndarray | None = None  # log2: float32 [2^b - 1], ascending
    values: np.ndarray | None = None  # log2: float32 [2^b], indexed by the number of thresholds <= x
    # filled by the exporter: ONNX tensor names
    onnx_input: str | None = None
    onnx_output: str | None = None
    onnx_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def range(self) -> tuple[float, float]:
        """Float range of the grid, per tensor (first channel for per-channel records)."""
        s = float(np.asarray(self.scale, np.float32).reshape(-1)[0])
        z = int(np.asarray(self.zero_point).reshape(-1)[0])
        return float(np.float32(self.qmin - z) * np.float32(s)), float(np.float32(self.qmax - z) * np.float32(s))


class FrozenActQuantizer(nn.Module):
    """Per-tensor activation quantizer with constant scale/zero-point (export only)."""

    def __init__(self, rec: QuantRecord) -> None:
        super().__init__()
        self.qmin, self.qmax = rec.qmin, rec.qmax
        self.register_buffer("scale", torch.tensor(float(rec.scale), dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(int(rec.zero_point), dtype=_TORCH_DTYPE[rec.storage]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.maskaq.fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, -1)

    def extra_repr(self) -> str:
        return f"grid=[{self.qmin}, {self.qmax}], scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"


class FrozenWeightQuantizer(nn.Module):
    """Per-channel weight quantizer with constant scales (export only). The owner's latent
    weight still flows through it, so the exported graph shows ``W -> Q -> Clip -> DQ``, which the
    exporter then folds into an integer initializer feeding a DequantizeLinear."""

    def __init__(self, rec: QuantRecord) -> None:
        super().__init__()
        self.qmin, self.qmax, self.axis = rec.qmin, rec.qmax, rec.axis
        self.block = int(rec.block_size or 0)
        self.register_buffer("scale", torch.from_numpy(np.ascontiguousarray(rec.scale, np.float32)).clone())
        self.register_buffer("zero_point", torch.zeros(rec.scale.shape, dtype=torch.int8))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.block:  # [C, ceil(K / B)] scales: QuantizeLinear(axis=1, block_size=B)
            return torch.ops.maskaq.fake_quant_blocked(w, self.scale, self.zero_point, self.qmin, self.qmax, self.block)
        return torch.ops.maskaq.fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)


class FrozenLog2Quantizer(nn.Module):
    """Log2 quantizer with constant tables (export only): buffers ``<quantizer>.thresholds`` and
    ``<quantizer>.values``, the op ``torch.ops.maskaq.log2_quant`` (same maths as the trained one)."""

    def __init__(self, rec: QuantRecord) -> None:
        super().__init__()
        self.bits = rec.bits
        self.register_buffer("thresholds", torch.from_numpy(np.array(rec.thresholds, np.float32)))
        self.register_buffer("values", torch.from_numpy(np.array(rec.values, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.maskaq.log2_quant(x, self.thresholds, self.values, self.bits)

    def extra_repr(self) -> str:
        return f"log2, bits={self.bits}, scale={float(self.values[-1]):.6g}"


def uninitialized_quantizers(Q: nn.Module) -> list[str]:
    """Names of enabled activation quantizers that have never seen data."""
    return [n for n, m in Q.named_modules()
            if isinstance(m, ACTIVATION_QUANTIZERS) and m.enabled and not bool(m.initialized)]


@torch.no_grad()
def _log2_record(name: str, q: Log2Quantizer) -> QuantRecord:
    s = float(q.scale.reshape(-1)[0])
    t, v = log2_tables(s, q.bits)
    qmin, qmax = q.grid()
    return QuantRecord(name, "activation", q.bits, qmin, qmax, False, False, True, -1, "float32",
                       np.asarray(np.float32(s), np.float32), np.asarray(0, np.int64), None,
                       encoding="log2", thresholds=t.numpy(), values=v.numpy())


@torch.no_grad()
def _act_record(name: str, q: ActQuantizer, profile: str) -> QuantRecord:
    s, z = q.effective()
    qmin, qmax = q.grid()
    st = storage_dtype(profile, qmin, qmax)
    s32 = np.float32(float(s.reshape(-1)[0]))
    zi = int(z.reshape(-1)[0])
    full = INT8_RANGE if st == "int8" else UINT8_RANGE
    clip = None
    if (qmin, qmax) != full:
        # CQDQ: float Clip to the grid's exact range, then an 8-bit Q -> DQ (export.md)
        clip = (float(np.float32(qmin - zi) * s32), float(np.float32(qmax - zi) * s32))
    return QuantRecord(name, "activation", q.bits, qmin, qmax, q.signed, False, bool(q.symmetric or zi == 0), -1, st,
                       np.asarray(s32, np.float32), np.asarray(zi, np.int64), clip)


@torch.no_grad()
def _weight_record(name: str, owner_name: str, q: WeightQuantizer, w: torch.Tensor) -> QuantRecord:
    qmin, qmax = q.grid()
    s = q.scale_for(w).float()
    block = int(getattr(q, "block", 0) or 0)
    if block:  # blocked: [C, ceil(K / B)] scales along axis 1 (the reduction axis)
        s_full = expand_blocks(s, block, w.shape[1])
    else:
        shape = [1] * w.dim()
        shape[q.axis] = -1
        s_full = s.reshape(shape)
    # the same maths as maskaq.quant.fake_quant with z = 0
    qint = torch.clamp(torch.round(w.float() / s_full), qmin, qmax).to(torch.int8)
    return QuantRecord(name, "weight", q.bits, qmin, qmax, True, q.narrow, True, 1 if block else q.axis, "int8",
                       s.cpu().numpy().astype(np.float32), np.zeros(s.shape, np.int64), None, owner_name,
                       qint.cpu().numpy(), block_size=block or None)


def freeze_model(M: nn.Module, profile: str) -> dict[str, QuantRecord]:
    """In place: replace every enabled quantizer of ``M`` with its frozen twin (disabled ones with
    ``nn.Identity``) and return the records, in module order.

    ``M`` must be a throw-away copy (the exporter passes its converted deep copy).
    """
    records: dict[str, QuantRecord] = {}
    _sync(M)
    for name, owner in list(M.named_modules()):
        for cname, q in list(owner.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(q, Log2Quantizer):
                if not q.enabled:
                    setattr(owner, cname, nn.Identity())
                    continue
                rec = _log2_record(full, q)
                setattr(owner, cname, FrozenLog2Quantizer(rec))
                records[full] = rec
            elif isinstance(q, ActQuantizer):
                if not q.enabled:
                    setattr(owner, cname, nn.Identity())
                    continue
                rec = _act_record(full, q, profile)
                setattr(owner, cname, FrozenActQuantizer(rec))
                records[full] = rec
            elif isinstance(q, WeightQuantizer):
                if not q.enabled:
                    setattr(owner, cname, nn.Identity())
                    continue
                rec = _weight_record(full, name, q, owner.weight)
                setattr(owner, cname, FrozenWeightQuantizer(rec))
                records[full] = rec
    return records
