"""QDQ ONNX export of a calibrated fake-quantized model (issue 4).

Pipeline of one export (every step a function below)::

    Q --convert_for_profile--> Q' (tensorrt: symmetric activations, narrow weights)
      --freeze_model--> E + records (constant quantizers named like Q's)
      --torch.onnx.export(dynamo=True, custom_translation_table)--> graph with
            activations: Clip(bounds from s, z) -> QuantizeLinear -> DequantizeLinear
            weights:     W -> QuantizeLinear(axis 0) -> integer Clip -> DequantizeLinear
      --fold_constants (constant folding, no initializer de-duplication)-->
      --rewrite_quantizers--> the encodings below, every tensor named after its quantizer
      --metadata, checker--> OUT.onnx (+ OUT.encodings.json), written atomically

Encodings (docs/export-notes.md):
* activations, profile ``ort``: 8-bit grids -> Q -> DQ (int8 for signed grids, uint8 for
  unsigned); 2-7 bit grids -> float Clip to ``[(qmin-z)s, (qmax-z)s]`` -> Q -> DQ ("CQDQ": exact
  and ORT still fuses the MatMuls into integer kernels), stored as uint8 ``q - qmin`` with
  zero-point ``z - qmin`` (:func:`activation_storage`: exact in OpenVINO's float32 arithmetic
  too). Profile ``tensorrt``: the same, int8 only, zero-point 0.
* weights: int8 initializers holding the b-bit integers -> DequantizeLinear (per output channel),
  no Q, no Clip. Linear weights are stored transposed (``[in, out]``, axis 1) so the
  DequantizeLinear feeds the MatMul directly (ORT's QDQ fusion and TensorRT both want that).
* ``weight_only_int4_block=B``: opset 21, INT4 weights blocked by B along the reduction axis,
  float activations (no activation Q/DQ at all).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import maskaq
from maskaq.io import atomic_write, atomic_write_bytes
from maskaq.models import DataConfig
from maskaq.quant import export_mode

from .encodings import build_encodings
from .freeze import QuantRecord, freeze_model, uninitialized_quantizers
from .profiles import PROFILES, Conversion, convert_for_profile, pure_qdq_refusal

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "fold_constants",
    "rewrite_quantizers",
    "activation_storage",
    "translation_table",
    "ExportResult",
    "export_onnx",
    "block_quantize",
    "block_fake_quant",
    "DEFAULT_OPSET",
    "INT4_OPSET",
    "SUPPORTED_OPSETS",
    "WEIGHT_STORAGES",
    "gemm_to_matmul",
    "weight_blocks",
    "op_census",
    "log2_nodes",
]

DEFAULT_OPSET = 20
INT4_OPSET = 21
#: Storage of per-channel weights with b <= 4 bits: int8 (default: ORT's integer kernels take it)
#: or opset-21 INT4 (half the bytes; ORT runs the DequantizeLinear in float).
WEIGHT_STORAGES = ("int8", "int4")
# 18: the dynamo exporter's floor; 23: the newest opset onnxscript and ORT 1.31 both know.
SUPPORTED_OPSETS = range(18, 24)
_TWO_GB = 2**31
_ONNX_DTYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4}
#: Domain of the placeholder node the log2 quantizer exports as before the rewrite (never in a file).
LOG2_DOMAIN = "maskaq.export"


class ExportError(ValueError):
    """A model or setting the exporter cannot turn into a valid file (the message says why)."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: Path
    encodings_path: Path
    profile: str  # "ort" | "tensorrt" | "int4-weight-only"
    opset: int
    size_bytes: int
    num_quantizers: int
    census: dict[str, int]
    conversions: list[Conversion] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    external_data: Path | None = None
    #: blocked weights whose reduction size is not a multiple of the block (a last partial
    #: block): valid ONNX that ONNX Runtime runs, but OpenVINO 2026.4 rejects such a file
    partial_blocks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "encodings_path": str(self.encodings_path),
            "profile": self.profile,
            "opset": self.opset,
            "size_bytes": self.size_bytes,
            "num_quantizers": self.num_quantizers,
            "census": self.census,
            "conversions": [c.to_json() for c in self.conversions],
            "timings": self.timings,
            "external_data": str(self.external_data) if self.external_data else None,
            "partial_blocks": list(self.partial_blocks),
        }


# --- INT4 blocked weights (weight-only artifact) ------------------------------------------------

def block_quantize(w: torch.Tensor, axis: int, block: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric blocked quantization of ``w`` along ``axis`` (the reduction axis).

    Per block of ``block`` consecutive elements along ``axis``: ``s = 2 max|w| / (2^b - 1)``
    (the project's weight formula, method.md §1; all-zero blocks get s = 1), integers
    ``clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``. A last partial block is allowed (ONNX
    blocked DequantizeLinear uses ``ceil(D / block)`` scales).

    Returns:
        ``(q, scale)``: int8 tensor shaped like ``w``; float32 scale shaped like ``w`` with
        ``ceil(D / block)`` along ``axis`` (the DequantizeLinear ``x_scale`` layout).
    """
    w = w.detach().float()
    axis = axis % w.dim()
    d = w.shape[axis]
    nb = math.ceil(d / block)
    wt = w.movedim(axis, -1)
    pad = nb * block - d
    wp = torch.nn.functional.pad(wt, (0, pad)) if pad else wt
    blocks = wp.reshape(*wt.shape[:-1], nb, block)
    amax = blocks.abs().amax(dim=-1)
    s = 2 * amax / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(blocks / s.unsqueeze(-1)), lo, hi)
    q = q.reshape(*wt.shape[:-1], nb * block)[..., :d]
    return q.to(torch.int8).movedim(-1, axis).contiguous(), s.movedim(-1, axis).contiguous()


def block_fake_quant(w: torch.Tensor, axis: int, block: int, bits: int = 4) -> torch.Tensor:
    """``DequantizeLinear(block_quantize(w))`` in torch: the reference for the INT4 artifact."""
    q, s = block_quantize(w, axis, block, bits)
    return q.float() * s.repeat_interleave(block, dim=axis % w.dim()).narrow(axis % w.dim(), 0, w.shape[axis])


# --- the custom-op translation ------------------------------------------------------------------

def _opset_module(opset: int) -> Any:
    import onnxscript

    mod = getattr(onnxscript, f"opset{opset}", None)
    if mod is None:
        raise ExportError(f"onnxscript has no opset {opset}")
    return mod


def _log2_schema() -> onnx.defs.OpSchema:
    """Schema of the log2 placeholder node (it only lives between tracing and the rewrite)."""
    S = onnx.defs.OpSchema
    return S("Log2Quant", LOG2_DOMAIN, 1,
             inputs=[S.FormalParameter("x", "tensor(float)"), S.FormalParameter("thresholds", "tensor(float)"),
                     S.FormalParameter("values", "tensor(float)")],
             outputs=[S.FormalParameter("y", "tensor(float)")],
             attributes=[S.Attribute("bits", S.AttrType.INT, "bit width")])


def translation_table(opset: int) -> dict[Callable, Callable]:
    """``custom_translation_table`` mapping ``maskaq::fake_quant`` to standard ONNX.

    Per tensor (activations): ``Clip(x, (qmin-z)s, (qmax-z)s) -> QuantizeLinear -> DequantizeLinear``
    in the zero-point's 8-bit type; exact for every grid of 2-8 bits. Per channel (weights):
    ``QuantizeLinear(axis) -> integer Clip(qmin, qmax) -> DequantizeLinear(axis)`` (a float Clip
    cannot take per-channel bounds); the exporter then folds the constant weight part into an
    integer initializer. The translated graph is exact on its own.
    """
    op = _opset_module(opset)
    FLOAT = TensorProto.FLOAT

    def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int):  # noqa: ANN001,ANN202
        if axis < 0:
            zf = op.Cast(zero_point, to=FLOAT)
            lo = op.Mul(op.Sub(op.Constant(value_float=float(qmin)), zf), scale)
            hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zf), scale)
            q = op.QuantizeLinear(op.Clip(x, lo, hi), scale, zero_point)
            return op.DequantizeLinear(q, scale, zero_point)
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)  # weights: int8 zero-points
        lo = op.Constant(value=helper.make_tensor("qmin", TensorProto.INT8, [], [qmin]))
        hi = op.Constant(value=helper.make_tensor("qmax", TensorProto.INT8, [], [qmax]))
        return op.DequantizeLinear(op.Clip(q, lo, hi), scale, zero_point, axis=axis)

    from onnxscript.values import Op, Opset

    log2_op = Op(Opset(LOG2_DOMAIN, 1), "Log2Quant", _log2_schema())

    def log2_quant(x, thresholds, values, bits: int):  # noqa: ANN001,ANN202
        # one placeholder node that constant folding leaves alone; rewrite_quantizers replaces it
        # with standard float ops (log2_nodes) named after the quantizer
        return log2_op(x, thresholds, values, bits=bits)

    table = {torch.ops.maskaq.fake_quant.default: fake_quant, torch.ops.maskaq.log2_quant.default: log2_quant}
    if opset >= INT4_OPSET:
        def fake_quant_blocked(x, scale, zero_point, qmin: int, qmax: int, block: int):
            # blocked weights (weight-only flow): QuantizeLinear-21 with block_size along axis 1
            q = op.QuantizeLinear(x, scale, zero_point, axis=1, block_size=block)
            lo = op.Constant(value=helper.make_tensor("qmin", TensorProto.INT8, [], [qmin]))
            hi = op.Constant(value=helper.make_tensor("qmax", TensorProto.INT8, [], [qmax]))
            return op.DequantizeLinear(op.Clip(q, lo, hi), scale, zero_point, axis=1, block_size=block)

        table[torch.ops.maskaq.fake_quant_blocked.default] = fake_quant_blocked
    return table


# --- graph passes -------------------------------------------------------------------------------

def _rewrite_rules(keep_relu: bool) -> Any:
    """onnxscript's default rewrite rules; ``keep_relu`` drops the Relu/Clip fusion, which would
    merge a ReLU into the Clip of a following activation quantizer (CNN heads: conv -> ReLU ->
    quantized conv) and so hide the quantizer's own range from :func:`rewrite_quantizers`."""
    from onnxscript import rewriter

    if not keep_relu:
        return None  # the default rules
    fuse = getattr(rewriter, "_fuse_relus_clips", None)
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if fuse is None or rules is None:
        return ()  # unknown onnxscript layout: no rewrite rules at all (folding still runs)
    drop = {id(r) for r in fuse.rules}
    return tuple(r for r in rules if id(r) not in drop)


def fold_constants(model: Any, keep_relu: bool = False) -> None:
    """Constant folding and clean-up on the ``onnx_ir`` model, like torch's default
    ``optimize=True`` but without de-duplicating initializers (that would merge equal-valued
    scales of different quantizers and lose their names). Q/DQ are never folded.
    ``keep_relu``: see :func:`_rewrite_rules` (the dense exporter sets it)."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as opt
    from onnxscript import rewriter

    rules = _rewrite_rules(keep_relu)
    opt.inline(model)
    for _ in range(2):
        changed = bool(opt.fold_constants_ir(model, onnx_shape_inference=True).modified)
        if rules is None:
            rewriter.rewrite(model)
        elif rules:
            rewriter.rewrite(model, pattern_rewrite_rules=list(rules))
        opt.remove_unused_nodes(model)
        if not changed:
            break
    for p in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass()):
        p(model)


class _Graph:
    """Producer/consumer maps over a GraphProto (rebuilt after each structural edit)."""

    def __init__(self, g: onnx.GraphProto) -> None:
        self.g = g
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _tensor(name: str, arr: np.ndarray, storage: str | None = None) -> onnx.TensorProto:
    if storage == "int4":  # two values a byte, the first in the low nibble (ONNX's packing), as raw data
        flat = np.asarray(arr, np.int8).reshape(-1)
        if flat.size and (flat.min() < -8 or flat.max() > 7):
            raise ExportError(f"{name}: values outside the INT4 range [-8, 7]")
        nib = (flat.astype(np.uint8) & 0x0F)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
        return helper.make_tensor(name, TensorProto.INT4, list(arr.shape), packed.tobytes(), raw=True)
    if storage is not None:
        arr = np.asarray(arr).astype({"int8": np.int8, "uint8": np.uint8}[storage])
    return numpy_helper.from_array(np.array(arr, order="C", copy=True), name)


def activation_storage(rec: QuantRecord, profile: str = "ort") -> tuple[str, int]:
    """ONNX storage type and stored zero-point of an activation quantizer.

    Profile ``ort``: a sub-8-bit grid ``[qmin, qmax]`` with ``qmin < 0`` (signed, symmetric or
    not) is stored as uint8 ``q_u = q - qmin`` with zero-point ``z - qmin`` (in ``[0, 2^b - 1]``,
    AIMET's own convention). ``(q_u - zp_u) s == (q - z) s``, so ORT's QDQ maths is unchanged to
    the bit; but OpenVINO computes a QuantizeLinear as ``round(x * (1/s') + shift)`` in float32
    with ``shift = zp - storage_min`` (``128 + z`` for int8), and adding a shift of ~128 to a
    value of a few units rounds away its last ~7 bits: near-half-way values then round the
    other way than ORT's ``round(x / s) + z`` (docs/export-notes.md, "OpenVINO agreement"). With
    the small uint8 zero-point the shift is ``z - qmin <= 2^b - 1`` and the float32 sum stays
    (almost) exact. 8-bit grids gain nothing (``z - qmin`` is ``128 + z`` again) and keep their
    type; profile ``tensorrt`` is int8 by rule.
    """
    z = int(np.asarray(rec.zero_point).reshape(-1)[0])
    if profile == "ort" and rec.kind == "activation" and rec.qmin < 0 and rec.qmax - rec.qmin < 255:
        return "uint8", z - rec.qmin
    return rec.storage, z


def log2_nodes(rec: QuantRecord, x: str, out: str, tag: str = "") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard float ONNX ops computing the log2 quantizer ``rec`` of tensor ``x`` into ``out``
    (exactly :func:`maskaq.quant.log2_fake_quant`): with ``A = <q>.thresholds`` (``[M]``,
    ascending, ``M = 2^b - 1``), the number ``n`` of thresholds ``<= x`` by binary search in ``b``
    steps (step ``j``: ``n <- Where(Less(x, A[n + 2^j - 1]), n, n + 2^j)``, the first step on a
    constant threshold), then ``out = Gather(<q>.values, n)``. Only comparisons, int64 additions
    and gathers: no float arithmetic, so any runtime computes the same numbers. Returns
    ``(nodes, initializers)``."""
    q = rec.name
    b = int(rec.bits)
    A = np.asarray(rec.thresholds, np.float32)
    V = np.asarray(rec.values, np.float32)
    if A.shape != (2**b - 1,) or V.shape != (2**b,):
        raise ExportError(f"{q}: log2 tables of shape {A.shape}/{V.shape} do not fit {b} bits")
    inits = [_tensor(f"{q}.thresholds", A), _tensor(f"{q}.values", V)]
    nodes: list[onnx.NodeProto] = []
    top = 2 ** (b - 1)
    inits += [_tensor(f"{q}.threshold_mid", np.asarray(A[top - 1], np.float32)),
              _tensor(f"{q}.zero_index", np.asarray(0, np.int64))]
    pre = f"{q}/Log2"
    nodes.append(helper.make_node("Less", [x, f"{q}.threshold_mid"], [f"{q}.below{b - 1}{tag}"], name=f"{pre}/Less{b - 1}{tag}"))
    inits.append(_tensor(f"{q}.step{b - 1}", np.asarray(top, np.int64)))
    n = f"{q}.index{b - 1}{tag}"
    nodes.append(helper.make_node("Where", [f"{q}.below{b - 1}{tag}", f"{q}.zero_index", f"{q}.step{b - 1}"], [n],
                                  name=f"{pre}/Where{b - 1}{tag}"))
    for j in range(b - 2, -1, -1):
        inits += [_tensor(f"{q}.probe{j}", np.asarray(2**j - 1, np.int64)),
                  _tensor(f"{q}.step{j}", np.asarray(2**j, np.int64))]
        nodes += [
            helper.make_node("Add", [n, f"{q}.probe{j}"], [f"{q}.probe_index{j}{tag}"], name=f"{pre}/AddProbe{j}{tag}"),
            helper.make_node("Gather", [f"{q}.thresholds", f"{q}.probe_index{j}{tag}"], [f"{q}.threshold{j}{tag}"],
                             name=f"{pre}/GatherThreshold{j}{tag}", axis=0),
            helper.make_node("Less", [x, f"{q}.threshold{j}{tag}"], [f"{q}.below{j}{tag}"], name=f"{pre}/Less{j}{tag}"),
            helper.make_node("Add", [n, f"{q}.step{j}"], [f"{q}.up{j}{tag}"], name=f"{pre}/AddStep{j}{tag}"),
            helper.make_node("Where", [f"{q}.below{j}{tag}", n, f"{q}.up{j}{tag}"], [f"{q}.index{j}{tag}"],
                             name=f"{pre}/Where{j}{tag}"),
        ]
        n = f"{q}.index{j}{tag}"
    nodes.append(helper.make_node("Gather", [f"{q}.values", n], [out], name=f"{pre}/GatherValue{tag}", axis=0))
    return nodes, inits


def rewrite_quantizers(model: onnx.ModelProto, records: dict[str, QuantRecord], *, int4_block: int | None,
                 shared_modules: bool = False, profile: str = "ort", weight_storage: str = "int8") -> None:
    """Rebuild every quantizer's nodes in its final encoding, named after the quantizer.

    ``profile`` picks the activations' storage (:func:`activation_storage`).

    ``weight_storage="int4"``: per-channel weights of ``b <= 4`` bits are stored as opset-21
    INT4 initializers (the same integers; wider weights stay int8). Blocked weights (the
    weight-only flow) are always stored in INT4 at ``b <= 4``.

    ``shared_modules``: a quantizer may appear more than once (a module called on several
    inputs, e.g. the RPN head shared by the FPN levels): each call of an activation quantizer
    gets its own nodes (names suffixed ``.1``, ``.2``...) on the same scale/zero-point
    initializers; a weight is stored once and every call reads its DequantizeLinear. Off for the
    classifier path, where a repeated quantizer means something went wrong.

    Finds each DequantizeLinear by its scale initializer ``<quantizer>.scale``, checks the
    pattern the translation emitted, and replaces it (see module docstring). Raises
    :class:`ExportError` on anything unexpected, so no quantizer can be silently left in an
    intermediate form.
    """
    g = model.graph
    G = _Graph(g)
    drop: set[int] = set()  # ids of nodes to remove
    at: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes replacing it (in place)
    rename: dict[str, str] = {}
    new_inits: list[onnx.TensorProto] = []
    done: set[str] = set()
    uses_of: Counter = Counter()

    def fail(msg: str) -> None:
        raise ExportError(f"unexpected graph while folding quantizers: {msg}")

    # log2 quantizers: one placeholder node each (translation_table) -> float ops (log2_nodes)
    for node in list(g.node):
        if node.domain != LOG2_DOMAIN:
            continue
        tname = node.input[1] if len(node.input) > 1 else ""
        qname = tname[: -len(".thresholds")] if tname.endswith(".thresholds") else None
        rec = records.get(qname) if qname else None
        if node.op_type != "Log2Quant" or rec is None or rec.encoding != "log2":
            fail(f"{node.op_type} {node.name!r} does not belong to a log2 quantizer (tables {tname!r})")
        k = uses_of[qname]
        uses_of[qname] += 1
        if qname in done and not shared_modules:
            fail(f"quantizer {qname} appears twice (shared module?)")
        done.add(qname)
        tag = f".{k}" if k else ""
        src = node.input[0]
        if not k:
            rec.onnx_input = src
        if int4_block is not None:  # weight-only artifact: activations stay float
            rename[node.output[0]] = src
            at[id(node)] = []
            continue
        out = node.output[0] if node.output[0] in G.outputs else f"{qname}.dequantized{tag}"
        rename[node.output[0]] = out
        nodes, inits = log2_nodes(rec, src, out, tag)
        if not k:
            rec.onnx_input, rec.onnx_output = src, out
            rec.onnx_extra = {"nodes": [n.name for n in nodes]}
        else:
            rec.onnx_extra["calls"] = k + 1
        new_inits += inits
        at[id(node)] = nodes

    for dq in list(g.node):
        if dq.op_type != "DequantizeLinear":
            continue
        sname = dq.input[1]
        qname = sname[: -len(".scale")] if sname.endswith(".scale") else None
        rec = records.get(qname) if qname else None
        if rec is None:
            fail(f"DequantizeLinear {dq.name!r} does not belong to a quantizer (scale {sname!r})")
        k = uses_of[qname]
        uses_of[qname] += 1
        if qname in done and not shared_modules:
            fail(f"quantizer {qname} appears twice (shared module?)")
        if qname in done and rec.kind == "weight":
            # a shared module's later call re-quantizes the same weight: read the first call's
            # dequantized weight instead (same integers, same scales)
            clip = G.producer.get(dq.input[0])
            q = G.producer.get(clip.input[0]) if clip is not None else None
            if clip is None or clip.op_type != "Clip" or q is None or q.op_type != "QuantizeLinear":
                fail(f"{qname}: expected QuantizeLinear -> Clip -> DequantizeLinear on the weight")
            if rec.onnx_extra.get("transposed"):
                fail(f"{qname}: a shared Linear weight stored transposed is not supported")
            drop.update((id(q), id(clip)))
            at[id(dq)] = []
            rename[dq.output[0]] = str(rec.onnx_output)
            continue
        done.add(qname)
        if rec.kind == "activation":
            tag = f".{k}" if k else ""  # a shared module's later calls: same quantizer, own nodes
            q = G.producer.get(dq.input[0])
            clip = G.producer.get(q.input[0]) if q is not None else None
            if q is None or q.op_type != "QuantizeLinear" or clip is None or clip.op_type != "Clip":
                fail(f"{qname}: expected Clip -> QuantizeLinear -> DequantizeLinear")
            lo, hi = G.const(clip.input[1]), G.const(clip.input[2])
            want = rec.range
            if lo is None or hi is None or float(lo) != want[0] or float(hi) != want[1]:
                fail(f"{qname}: Clip bounds {lo}, {hi} are not the quantizer's range {want}")
            drop.update((id(q), id(clip)))
            src = clip.input[0]
            if not k:
                rec.onnx_input = src
            if int4_block is not None:  # weight-only: activations stay float
                rename[dq.output[0]] = src
                at[id(dq)] = []
                continue
            out = dq.output[0] if dq.output[0] in G.outputs else f"{qname}.dequantized{tag}"
            rename[dq.output[0]] = out
            if not k:
                rec.onnx_output = out
            nodes = []
            x = src
            uses = G.consumers[dq.output[0]]
            if (len(uses) == 1 and uses[0].op_type == "Transpose" and dq.output[0] not in G.outputs
                    and len(G.consumers[src]) == 1):
                # k^T: transpose first, then quantize (per-tensor Q/DQ commute with a transpose),
                # so the DequantizeLinear feeds the attention MatMul directly. ORT >= 1.31 fails
                # to create a session at opset >= 21 when its QDQ propagation has to move a Q
                # across this Transpose itself; TensorRT wants DQ -> MatMul too.
                t = uses[0]
                tn = helper.make_node("Transpose", [src], [f"{qname}.transposed{tag}"], name=f"{qname}/Transpose{tag}")
                tn.attribute.extend(t.attribute)
                nodes.append(tn)
                x = f"{qname}.transposed{tag}"
                if not k:
                    rec.onnx_input = x
                drop.add(id(t))
                rename[t.output[0]] = out
            if rec.clip is not None:
                new_inits += [_tensor(f"{qname}.clip_min", np.asarray(rec.clip[0], np.float32)),
                              _tensor(f"{qname}.clip_max", np.asarray(rec.clip[1], np.float32))]
                nodes.append(helper.make_node("Clip", [x, f"{qname}.clip_min", f"{qname}.clip_max"],
                                              [f"{qname}.clipped{tag}"], name=f"{qname}/Clip{tag}"))
                x = f"{qname}.clipped{tag}"
            if not k:
                st, zp_stored = activation_storage(rec, profile)
                rec.storage = st  # the ONNX type; the record's grid [qmin, qmax] and z stay the model's
                rec.onnx_extra["stored_zero_point"] = zp_stored
            else:
                st, zp_stored = rec.storage, int(rec.onnx_extra.get("stored_zero_point", int(rec.zero_point)))
            new_inits += [_tensor(f"{qname}.scale", rec.scale.astype(np.float32)),
                          _tensor(f"{qname}.zero_point", np.asarray(zp_stored), st)]
            nodes.append(helper.make_node("QuantizeLinear", [x, f"{qname}.scale", f"{qname}.zero_point"],
                                          [f"{qname}.quantized{tag}"], name=f"{qname}/QuantizeLinear{tag}"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{qname}.quantized{tag}", f"{qname}.scale", f"{qname}.zero_point"],
                                          [out], name=f"{qname}/DequantizeLinear{tag}"))
            if not k:
                rec.onnx_extra = {"nodes": [n.name for n in nodes],
                                  **{k2: v for k2, v in rec.onnx_extra.items() if k2 == "stored_zero_point"}}
            else:
                rec.onnx_extra["calls"] = k + 1
            at[id(dq)] = nodes
            continue

        # weights: W -> QuantizeLinear -> integer Clip -> DequantizeLinear
        clip = G.producer.get(dq.input[0])
        q = G.producer.get(clip.input[0]) if clip is not None else None
        if clip is None or clip.op_type != "Clip" or q is None or q.op_type != "QuantizeLinear":
            fail(f"{qname}: expected QuantizeLinear -> Clip -> DequantizeLinear on the weight")
        wname = q.input[0]
        if wname not in G.inits:
            fail(f"{qname}: the weight {wname!r} is not an initializer")
        drop.update((id(q), id(clip)))
        uses = G.consumers[dq.output[0]]
        w_shared = len(G.consumers[wname]) > 1
        out_name = f"{rec.owner}.weight" if not w_shared else f"{qname}.dequantized"
        # Store Linear weights as [in, out] so the DQ feeds MatMul/Gemm without a Transpose.
        transpose = bool(uses) and rec.qweight is not None and rec.qweight.ndim == 2 and all(
            (u.op_type == "Transpose" and list(_attr(u, "perm", [1, 0])) == [1, 0])
            or (u.op_type == "Gemm" and list(u.input[1:2]) == [dq.output[0]] and _attr(u, "transB", 0) == 1
                and u.input[0] != dq.output[0])
            for u in uses)
        if int4_block is not None and rec.block_size is None and rec.qweight is not None and rec.qweight.ndim == 2:
            # a Q calibrated per channel re-exported as the INT4 artifact: round-to-nearest blocks
            # of its latent Linear weights (the conv below stays per channel)
            w = torch.from_numpy(numpy_helper.to_array(G.inits[wname]).copy())
            qi_t, sc_t = block_quantize(w, 1, int4_block)
            rec.storage, rec.bits, rec.qmin, rec.qmax, rec.narrow = "int4", 4, -8, 7, False
            rec.block_size, rec.axis = int4_block, 1
            rec.scale, rec.zero_point, rec.qweight = sc_t.numpy().astype(np.float32), np.zeros(tuple(sc_t.shape), np.int64), qi_t.numpy()
        elif int4_block is not None and rec.block_size is None and rec.bits > 4:
            # the INT4 artifact's per-channel weights (patch conv) of a wider state: 4-bit, per channel
            w = torch.from_numpy(numpy_helper.to_array(G.inits[wname]).copy())
            s4 = (2 * w.abs().amax(dim=tuple(range(1, w.dim()))) / 15).float()
            s4 = torch.where(s4 > 0, s4, torch.ones_like(s4))
            qi_t = torch.clamp(torch.round(w / s4.reshape(-1, *([1] * (w.dim() - 1)))), -8, 7).to(torch.int8)
            rec.bits, rec.qmin, rec.qmax, rec.narrow, rec.axis = 4, -8, 7, False, 0
            rec.scale, rec.zero_point, rec.qweight = s4.numpy(), np.zeros(tuple(s4.shape), np.int64), qi_t.numpy()
        if rec.block_size is not None and int4_block is not None and rec.block_size != int4_block:
            fail(f"{qname}: calibrated with blocks of {rec.block_size}, exported with blocks of {int4_block}")
        four = rec.bits <= 4 and (rec.block_size is not None or int4_block is not None or weight_storage == "int4")
        storage = "int4" if four else "int8"
        rec.storage = storage
        qi, sc = rec.qweight, np.asarray(rec.scale, np.float32)
        if rec.block_size is not None:  # [C, K] integers, [C, ceil(K / B)] scales, blocks on axis 1
            axis = 1
            if transpose:
                qi, sc, axis = qi.T.copy(), sc.T.copy(), 0
            rec.axis = axis
            new_inits += [_tensor(f"{qname}.qweight", qi, storage), _tensor(f"{qname}.scale", sc)]
            dq_new = helper.make_node("DequantizeLinear", [f"{qname}.qweight", f"{qname}.scale"], [out_name],
                                      name=f"{qname}/DequantizeLinear", axis=axis, block_size=int(rec.block_size))
            rec.onnx_extra = {"stored_transposed": transpose, "axis": axis}
        else:
            axis = rec.axis
            if transpose:
                qi, axis = qi.T.copy(), 1 - rec.axis
            new_inits += [_tensor(f"{qname}.qweight", qi, storage), _tensor(f"{qname}.scale", sc),
                          _tensor(f"{qname}.zero_point", np.zeros(sc.shape, np.int8), storage)]
            dq_new = helper.make_node("DequantizeLinear", [f"{qname}.qweight", f"{qname}.scale", f"{qname}.zero_point"],
                                      [out_name], name=f"{qname}/DequantizeLinear", axis=axis)
            rec.onnx_extra = {"stored_transposed": transpose, "axis": axis}
        rec.onnx_input = wname
        rec.onnx_output = out_name
        rec.onnx_extra.update({"qweight": f"{qname}.qweight", "transposed": transpose})
        if not w_shared:
            g.initializer.remove(G.inits[wname])
        at[id(dq)] = [dq_new]
        rename[dq.output[0]] = out_name
        if transpose:
            for u in uses:
                if u.op_type == "Transpose":
                    drop.add(id(u))
                    rename[u.output[0]] = out_name
                else:  # Gemm(transB=1) now reads [in, out]
                    _set_attr(u, "transB", 0)

    missing = sorted(set(records) - done)
    if missing:
        fail(f"quantizers missing from the graph: {missing[:5]}")

    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in at:
            nodes.extend(at[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    # resolve renames (chains: a -> b -> c)
    def res(name: str) -> str:
        seen = 0
        while name in rename and rename[name] != name and seen < 8:
            name, seen = rename[name], seen + 1
        return name

    for n in nodes:
        for i, name in enumerate(n.input):
            if name:
                n.input[i] = res(name)
    for o in g.output:
        if o.name in rename and res(o.name) != o.name:
            fail(f"graph output {o.name!r} would be renamed")
    del g.node[:]
    g.node.extend(nodes)
    have = {t.name for t in g.initializer}
    for t in new_inits:
        if t.name in have:
            g.initializer.remove(next(x for x in g.initializer if x.name == t.name))
        g.initializer.append(t)
        have.add(t.name)
    _remove_dead(model)
    if any(n.domain == LOG2_DOMAIN for n in g.node):
        fail("a log2 placeholder node is left in the graph")
    for o in [o for o in model.opset_import if o.domain == LOG2_DOMAIN]:
        model.opset_import.remove(o)


def _remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    del g.value_info[:]


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Make a Linear on a 2-D input with quantized input and weight (the classifier head) read
    ``MatMul -> Sub(-bias)`` instead of ``Gemm`` or ``MatMul -> Add(bias)``.

    Why: ORT's CPU QDQ fusion turns ``DQ -> MatMul`` into ``MatMulIntegerToFloat`` for int8 and
    uint8 activations, but ``DQ -> Gemm`` into ``QGemm`` only for uint8 ones, so a head whose input
    quantizer is signed (a ViT's final LayerNorm output, usually) stayed a float Gemm in deploy
    mode. ``MatMul -> Add`` on a 2-D input is no better: ORT's MatMulAddFusion (a basic-level pass,
    before the QDQ fusions) turns it back into a Gemm. ``Sub`` of the negated bias computes the
    same float (``x - (-b) == x + b`` exactly in IEEE) and leaves the MatMul to the integer
    fusion. 3-D MatMul + Add (every other Linear) is left alone: ORT fuses that Add into the
    MatMulIntegerToFloat as its bias. Returns the number of heads rewritten."""
    g = model.graph
    G = _Graph(g)
    rank: dict[str, int] = {}
    try:
        inf = onnx.shape_inference.infer_shapes(model)
        for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
            if vi.type.tensor_type.HasField("shape"):
                rank[vi.name] = len(vi.type.tensor_type.shape.dim)
    except Exception:  # noqa: BLE001 - no shapes (e.g. > 2 GB): Gemms only
        rank = {}

    def from_dq(name: str) -> bool:
        p = G.producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def bias_of(name: str) -> onnx.TensorProto | None:
        t = G.inits.get(name)
        return t if t is not None and len(t.dims) == 1 else None

    n_done = 0
    skip: set[int] = set()
    nodes: list[onnx.NodeProto] = []
    negated: dict[str, str] = {}

    def neg(bname: str) -> str:
        if bname not in negated:
            negated[bname] = f"{bname}_negated"
            g.initializer.append(_tensor(negated[bname], -numpy_helper.to_array(G.inits[bname])))
        return negated[bname]

    for n in g.node:
        if id(n) in skip:
            continue
        if (n.op_type == "Gemm" and len(n.input) >= 2 and from_dq(n.input[0]) and from_dq(n.input[1])
                and float(_attr(n, "alpha", 1.0)) == 1.0 and float(_attr(n, "beta", 1.0)) == 1.0
                and not _attr(n, "transA", 0) and not _attr(n, "transB", 0)
                and (len(n.input) < 3 or not n.input[2] or bias_of(n.input[2]) is not None)):
            base = n.name or n.output[0]
            has_bias = len(n.input) > 2 and bool(n.input[2])
            mm_out = f"{base}.matmul" if has_bias else n.output[0]
            nodes.append(helper.make_node("MatMul", list(n.input[:2]), [mm_out], name=f"{base}/MatMul"))
            if has_bias:
                nodes.append(helper.make_node("Sub", [mm_out, neg(n.input[2])], [n.output[0]], name=f"{base}/Sub"))
            n_done += 1
            continue
        if (n.op_type == "MatMul" and from_dq(n.input[0]) and from_dq(n.input[1]) and rank.get(n.input[0]) == 2
                and G.inits.get(n.input[1]) is None and len(G.consumers[n.output[0]]) == 1
                and n.output[0] not in G.outputs):
            add = G.consumers[n.output[0]][0]
            other = [i for i in add.input if i != n.output[0]]
            if add.op_type == "Add" and len(other) == 1 and bias_of(other[0]) is not None:
                nodes.append(n)
                nodes.append(helper.make_node("Sub", [n.output[0], neg(other[0])], list(add.output),
                                              name=f"{add.name or add.output[0]}/Sub"))
                skip.add(id(add))
                n_done += 1
                continue
        nodes.append(n)
    if n_done:
        # keep the order topological: an Add skipped here may sit later than its MatMul
        del g.node[:]
        g.node.extend(nodes)
        _remove_dead(model)
    return n_done


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    """Op-type counts of the main graph, most common first."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


# --- metadata -----------------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    """Versions of the packages that shaped the file."""
    out = {"python": platform.python_version(), "maskaq": maskaq.__version__}
    for mod in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "timm", "numpy"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:  # noqa: BLE001 - optional packages
                continue
        out[mod] = str(getattr(m, "__version__", "unknown"))
    return out


def _quant_config(Q: nn.Module, records: dict[str, QuantRecord]) -> tuple[int, int, dict[str, Any]]:
    cfg = getattr(Q, "maskaq_quant_config", None)
    if cfg is not None:
        return int(cfg.w_bits), int(cfg.a_bits), cfg.to_json()
    wb = Counter(r.bits for r in records.values() if r.kind == "weight").most_common(1)
    ab = Counter(r.bits for r in records.values() if r.kind == "activation").most_common(1)
    return (wb[0][0] if wb else 32), (ab[0][0] if ab else 32), {}


def _metadata(
    Q: nn.Module, records: dict[str, QuantRecord], data_config: DataConfig, profile_tag: str, opset: int,
    metadata: dict[str, Any], labels: list[str] | None, source: dict[str, Any] | None,
    conversions: list[Conversion], int4_block: int | None, weight_storage: str = "int8",
    patch_embed: str = "channel",
) -> dict[str, str]:
    w_bits, a_bits, qcfg = _quant_config(Q, records)
    if int4_block is not None:
        w_bits = w_bits if weight_blocks(Q) else 4
        a_bits = 32
    elif not any(r.kind == "activation" for r in records.values()):
        a_bits = 32  # weight-only: float activations
    quant = {"w_bits": w_bits, "a_bits": a_bits, "profile": profile_tag, "method": str(metadata.get("method", "unknown"))}
    if not records:  # every quantizer disabled: a float model (contract: profile fp32)
        quant = {"profile": "fp32", "method": quant["method"]}
    if qcfg.get("keep_first_last_8bit"):
        quant["keep_first_last_8bit"] = True
    if qcfg.get("keep_8bit") and records:
        quant["keep_8bit"] = list(qcfg["keep_8bit"])
    if int4_block is None:  # mixed widths: every quantizer whose width differs from its kind's
        mixed = {n: int(r.bits) for n, r in records.items() if r.bits != (w_bits if r.kind == "weight" else a_bits)}
        if mixed:
            quant["mixed_bits"] = mixed
    if int4_block is not None:
        quant["block_size"] = int4_block
    if weight_storage == "int4" and int4_block is None:
        quant["weight_storage"] = "int4"
    if patch_embed == "float" or qcfg.get("patch_embed") == "float":
        quant["patch_embed"] = "float"
    log2 = [n for n, r in records.items() if r.encoding == "log2"]
    if log2 and int4_block is None:
        # float parts of the graph: the log2 quantizers (comparisons + Gather) and the attention
        # matmul (softmax @ v) they feed, which no runtime can fuse into an integer kernel
        quant["softmax_quant"] = "log2"
        quant["float_quantizers"] = log2
    if conversions:
        quant["converted"] = {"activations": sum(c.kind == "activation" for c in conversions),
                              "weights": sum(c.kind == "weight" for c in conversions)}
    pre = data_config.to_json()
    pre = {"input_size": list(pre["input_size"]), "mean": list(pre["mean"]), "std": list(pre["std"]),
           "crop_pct": float(pre["crop_pct"]), "crop_mode": pre.get("crop_mode", "center"),
           "interpolation": pre["interpolation"], "channels": int(pre["channels"])}
    src = dict(source) if source else {"model": type(Q).__name__, "checkpoint": None, "weights": "unknown"}
    config = metadata.get("config")
    if config is None:
        config = {"quant": qcfg, "profile": profile_tag, "opset": opset}
    meta = {
        "maskaq.schema": "1",
        "maskaq.task": str(metadata.get("task", "classification")),
        "maskaq.preprocessing": json.dumps(pre),
        "maskaq.source": json.dumps(src),
        "maskaq.quant": json.dumps(quant),
        "maskaq.config": json.dumps(config, default=str),
        "maskaq.versions": json.dumps(package_versions()),
    }
    if labels:
        meta["maskaq.labels"] = json.dumps(list(labels))
    if metadata.get("seed") is not None:
        meta["maskaq.seed"] = str(int(metadata["seed"]))
    for k, v in metadata.items():  # anything else the caller wants to carry
        if k in ("method", "config", "seed", "task"):
            continue
        key = k if k.startswith("maskaq.") else f"maskaq.{k}"
        meta[key] = v if isinstance(v, str) else json.dumps(v, default=str)
    return meta


def encodings_path_for(path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.encodings.json`` (other names: ``<name>.encodings.json``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() == ".onnx" else p
    return Path(f"{stem}.encodings.json")


# --- the public verb ----------------------------------------------------------------------------

def weight_blocks(Q: nn.Module) -> set[int]:
    """Block sizes of Q's blocked weight quantizers (the weight-only flow); empty: per channel."""
    from maskaq.quant import WeightQuantizer

    return {int(m.block) for m in Q.modules() if isinstance(m, WeightQuantizer) and m.enabled and getattr(m, "block", 0)}


def _check_args(Q: nn.Module, profile: str, opset: int | None, int4_block: int | None,
                weight_storage: str = "int8", patch_embed: str = "channel") -> int:
    if profile not in PROFILES:
        raise ExportError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if weight_storage not in WEIGHT_STORAGES:
        raise ExportError(f"weight storage {weight_storage!r} is not known; valid: {', '.join(WEIGHT_STORAGES)}")
    if patch_embed not in ("channel", "float"):
        raise ExportError(f"patch embedding mode {patch_embed!r} is not known; valid: channel, float")
    blocks = weight_blocks(Q)
    if blocks and int4_block is not None and blocks != {int4_block}:
        raise ExportError(f"the model was calibrated with weight blocks of {'/'.join(map(str, sorted(blocks)))}; "
                          f"export it with that block size, not {int4_block}")
    if blocks and int4_block is None:
        int4_block = min(blocks)
    if weight_storage == "int4" and int4_block is None:
        if opset is not None and opset < INT4_OPSET:
            raise ExportError(f"INT4 weight storage needs opset >= {INT4_OPSET}, got --opset {opset}")
        opset = opset or INT4_OPSET
    if int4_block is not None:
        if not isinstance(int4_block, int) or int4_block < 16 or int4_block & (int4_block - 1):
            raise ExportError(f"block size {int4_block!r} is not supported; valid: a power of two >= 16 (32, 64, 128)")
        if opset is not None and opset < INT4_OPSET:
            raise ExportError(f"INT4 weights need opset >= {INT4_OPSET}, got --opset {opset}")
        opset = opset or INT4_OPSET
    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; valid: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    reason = pure_qdq_refusal(Q, profile) if int4_block is None else None  # INT4 artifact: float activations
    if reason:
        raise ExportError(reason)
    bad = uninitialized_quantizers(Q)
    if bad:
        raise ExportError(
            f"{len(bad)} activation quantizers were never initialised ({', '.join(bad[:3])}...); "
            "run at least one batch through the model (calibrate it) before exporting")
    return opset


def export_onnx(
    Q: nn.Module,
    path: str | os.PathLike,
    *,
    data_config: DataConfig,
    profile: str = "ort",
    opset: int | None = None,
    metadata: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    source: dict[str, Any] | None = None,
    weight_only_int4_block: int | None = None,
    weight_storage: str = "int8",
    patch_embed: str = "channel",
    check: bool = True,
    write_encodings: bool = True,
) -> ExportResult:
    """Export a calibrated fake-quantized model Q to a QDQ ONNX file (docs/onnx-contract.md).

    Args:
        Q: calibrated model from :func:`maskaq.qmodel.quantize_model` (not modified).
        path: output ``.onnx``; the AIMET-layout sidecar ``<path without .onnx>.encodings.json``
            is written beside it.
        data_config: preprocessing written into the metadata; its input size shapes the graph.
        profile: ``"ort"`` (exact CQDQ, asymmetric) or ``"tensorrt"`` (symmetric int8, narrow
            weights; an asymmetric Q is converted, see :mod:`export.profiles`).
        opset: ONNX opset (default 20; 21 with INT4 weights).
        metadata: ``{"method": str, "config": dict, "seed": int, "task": str, ...}``; other keys
            become ``maskaq.<key>`` metadata.
        labels: class names in output order.
        source: where the weights came from (``LoadedModel.source``).
        weight_only_int4_block: write the weight-only INT4 artifact instead (block size B along
            the reduction axis, float activations). A Q calibrated with blocked weights (the
            weight-only flow, ``QuantConfig(a_bits=16, weight_block=B)``) always writes it, with
            its own calibrated integers; a Q calibrated per channel gets round-to-nearest blocks of
            its Linear weights. The patch-embedding conv stays per output channel.
        weight_storage: ``"int8"`` (default) or ``"int4"``: per-channel weights of ``b <= 4`` bits
            stored as opset-21 INT4 initializers (same integers, exact; opset 21).
        patch_embed: ``"channel"`` (default) or ``"float"``: the patch-embedding conv's weight
            left in float.
        check: run ``onnx.checker.check_model(full_check=True)`` before writing.
        write_encodings: write the encodings sidecar (off for a float graph, which has none).

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: bad profile/opset/block size, uninitialised quantizers, output directory
            missing, or a graph the exporter does not recognise. Nothing is written then.

    Example:
        >>> res = export_onnx(Q, "deit_t.4w4a.onnx", data_config=lm.data_config,
        ...                   metadata={"method": "maskaq", "seed": 0})
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"output directory {str(path.parent)!r} does not exist")
    metadata = dict(metadata or {})
    opset = _check_args(Q, profile, opset, weight_only_int4_block, weight_storage, patch_embed)
    blocks = weight_blocks(Q)
    int4 = weight_only_int4_block if weight_only_int4_block is not None else (min(blocks) if blocks else None)
    profile_tag = "int4-weight-only" if int4 is not None else profile

    was_training = Q.training
    M, conversions = convert_for_profile(Q, profile if int4 is None else "ort")
    M = M.cpu().eval()  # trace on the CPU, whatever device Q lives on
    if patch_embed == "float":
        for name, mod in M.named_modules():
            if name.endswith("patch_embed.proj") and hasattr(mod, "weight_quantizer"):
                mod.weight_quantizer.enabled = False
    records = freeze_model(M, profile if int4 is None else "ort")
    if was_training:
        log.debug("exporting a copy of Q in eval mode (Q itself is in training mode)")
    for c in conversions:
        log.info("tensorrt conversion: %s: %s", c.name, c.what)
    c, h, w = data_config.input_size
    example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    import warnings

    with export_mode(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(
                M, (example,), dynamo=True, optimize=False, verbose=False, opset_version=opset,
                custom_translation_table=translation_table(opset),
                input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            )
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx.export failed for {type(Q).__name__}: {first}") from e
    t2 = time.perf_counter()
    fold_constants(prog.model)
    model = prog.model_proto
    del prog, M
    if len(model.graph.output) != 1:
        raise ExportError(f"the model has {len(model.graph.output)} outputs; a classifier must have one (logits)")
    rewrite_quantizers(model, records, int4_block=int4, profile=profile, weight_storage=weight_storage)
    gemm_to_matmul(model)
    partial = [n for n, r in records.items() if r.block_size and r.qweight is not None
               and r.qweight.shape[1] % r.block_size]
    if partial:
        log.warning("%d weights are not a multiple of the block size %s along the reduction axis (%s...): "
                    "ONNX Runtime runs the file, OpenVINO rejects it; choose a block size that divides every "
                    "Linear input width", len(partial), int4, ", ".join(partial[:3]))
    model.graph.name = "maskaq"
    model.producer_name = "maskaq"
    model.producer_version = maskaq.__version__
    model.doc_string = f"MaskAQ QDQ export, profile {profile_tag}, opset {opset}"
    meta = _metadata(Q, records, data_config, profile_tag, opset, metadata, labels, source, conversions, int4,
                     weight_storage, patch_embed)
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    t3 = time.perf_counter()
    enc = build_encodings(records, profile_tag, opset)
    enc_path = encodings_path_for(path)
    size = model.ByteSize()
    external = None
    if size < _TWO_GB - (1 << 24):
        data = model.SerializeToString()
        if check:
            onnx.checker.check_model(model, full_check=True)
        t4 = time.perf_counter()
        if write_encodings:
            atomic_write_bytes(enc_path, (json.dumps(enc, indent=1) + "\n").encode())
        try:
            atomic_write_bytes(path, data)
        except BaseException:
            if write_encodings:
                enc_path.unlink(missing_ok=True)
            raise
        size = len(data)
    else:  # > 2 GB: protobuf's limit; weights go to <path>.data beside the file
        external = Path(str(path) + ".data")
        t4 = time.perf_counter()
        if write_encodings:
            atomic_write_bytes(enc_path, (json.dumps(enc, indent=1) + "\n").encode())

        def writer(tmp: str) -> None:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external.name, size_threshold=1024)
            if check:
                onnx.checker.check_model(tmp, full_check=True)

        atomic_write(path, writer)
        size = path.stat().st_size + external.stat().st_size
    t5 = time.perf_counter()
    return ExportResult(
        path=path, encodings_path=enc_path, profile=profile_tag, opset=opset, size_bytes=size,
        num_quantizers=len(records), census=op_census(model), conversions=conversions,
        timings={"prepare_s": t1 - t0, "torch_export_s": t2 - t1, "rewrite_s": t3 - t2,
                 "check_s": t4 - t3, "write_s": t5 - t4, "total_s": t5 - t0},
        external_data=external, partial_blocks=partial,
    )
