"""Reading an exported ONNX file: I/O, metadata (docs/onnx-contract.md), QDQ census.

Everything the evaluator needs travels inside the ``.onnx`` file, so this module only uses
``onnx`` (no torch, no maskaq): it parses the graph once, hashes the file, reads the
``maskaq.*`` metadata_props and counts the QuantizeLinear/DequantizeLinear nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import EvalError

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

# Integer range of each Q/DQ dtype; sub-8-bit ones never get ORT's integer kernels.
_DTYPE_RANGE: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int2": (-2, 1),
    "uint2": (0, 3),
}
_SUB8_DTYPES = {"int4", "uint4", "int2", "uint2"}


def dtype_name(elem_type: int) -> str:
    """ONNX TensorProto element type -> short lower-case name (``int8``, ``uint4``...)."""
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type{elem_type}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    out: list[int | str] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


@dataclass
class ModelInfo:
    """What the harness knows about one ONNX file (see :func:`load_model_info`)."""

    path: Path
    sha256: str
    size_bytes: int
    ir_version: int
    opset: int
    opsets: dict[str, int]
    producer: str
    input_name: str
    input_shape: list[int | str]
    input_dtype: str
    output_names: list[str]
    output_shapes: list[list[int | str]]
    metadata: dict[str, str]
    census: dict[str, Any]
    quant: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    labels: list[str] | None = None
    task: str | None = None
    preprocessing: dict[str, Any] | None = None
    seed: str | None = None
    sub8bit_reasons: list[str] = field(default_factory=list)
    #: parts of the graph that are quantized but computed with float ops (no Q/DQ, no integer
    #: kernel in any mode): one line each (:func:`float_parts`)
    float_parts: list[str] = field(default_factory=list)

    @property
    def is_quantized(self) -> bool:
        """True when the graph holds any QuantizeLinear/DequantizeLinear node."""
        return self.census["total"] > 0

    @property
    def num_classes(self) -> int | None:
        """Static size of the last dim of the first output, if the graph says so."""
        if not self.output_shapes or not self.output_shapes[0]:
            return None
        last = self.output_shapes[0][-1] if len(self.output_shapes[0]) == 2 else None
        return last if isinstance(last, int) and last > 0 else None

    def report(self) -> dict[str, Any]:
        """The ``model`` section of the report."""
        src = self.source or {}
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "ir_version": self.ir_version,
            "opset": self.opset,
            "opsets": self.opsets,
            "producer": self.producer,
            "input": {
                "name": self.input_name,
                "shape": self.input_shape,
                "dtype": self.input_dtype,
            },
            "outputs": [
                {"name": n, "shape": s} for n, s in zip(self.output_names, self.output_shapes)
            ],
            "task": self.task,
            "source": self.source,
            "tag": src.get("model"),
            "weights": src.get("weights"),
            "quant": self.quant,
            "seed": self.seed,
            "qdq": self.census,
            "sub8bit": self.sub8bit_reasons,
            "float_parts": self.float_parts,
        }


def _json_meta(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None


def load_model_info(path: str | Path) -> tuple[ModelInfo, onnx.ModelProto]:
    """Parse an ONNX file and collect what evaluation needs.

    Args:
        path: the ``.onnx`` file (external data, if any, is not loaded: only small constants
            are needed here; ONNX Runtime reads the weights itself).

    Returns:
        ``(info, model)``; ``model`` is the parsed ModelProto without external data.

    Raises:
        EvalError: missing, unreadable or non-ONNX file; not exactly one graph input.

    Example:
        >>> info, _ = load_model_info("deit_tiny_w4a4.onnx")  # doctest: +SKIP
        >>> info.census["by_dtype"]  # doctest: +SKIP
        {'uint8': {'QuantizeLinear': 73, 'DequantizeLinear': 145}, ...}
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"model file not found: {p}")
    if not p.is_file():
        raise EvalError(f"model path is not a file: {p} (give the .onnx file)")
    size = p.stat().st_size
    if size == 0:
        raise EvalError(f"model file is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError, ...
        raise EvalError(
            f"cannot read ONNX model {p} ({type(e).__name__}: {e}); expected an .onnx file as "
            "written by maskaq-export"
        ) from None
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise EvalError(f"{p} is not a valid ONNX model (no graph, nodes or outputs)")

    g = model.graph
    init_names = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1:
        raise EvalError(
            f"{p}: the model must have exactly one input (the image batch, named 'input'); "
            f"it has {len(inputs)}: {[i.name for i in inputs]}"
        )
    inp = inputs[0]
    if inp.name != "input":
        log.warning("model input is named %r, the contract says 'input'", inp.name)
    meta = {m.key: m.value for m in model.metadata_props}
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    census, dtypes = qdq_census(model)
    info = ModelInfo(
        path=p.resolve(),
        sha256=file_sha256(p),
        size_bytes=size,
        ir_version=int(model.ir_version),
        opset=opsets.get("ai.onnx", 0),
        opsets=opsets,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        input_name=inp.name,
        input_shape=_dims(inp),
        input_dtype=dtype_name(inp.type.tensor_type.elem_type),
        output_names=[o.name for o in g.output],
        output_shapes=[_dims(o) for o in g.output],
        metadata=meta,
        census=census,
        quant=_json_meta(meta, "maskaq.quant", p),
        source=_json_meta(meta, "maskaq.source", p),
        labels=_json_meta(meta, "maskaq.labels", p),
        task=meta.get("maskaq.task"),
        preprocessing=_json_meta(meta, "maskaq.preprocessing", p),
        seed=meta.get("maskaq.seed"),
    )
    if info.labels is not None and not (
        isinstance(info.labels, list) and all(isinstance(x, str) for x in info.labels)
    ):
        raise EvalError(f"{p}: metadata 'maskaq.labels' must be a JSON list of strings")
    info.sub8bit_reasons = sub8bit_reasons(model, info.quant, dtypes)
    info.float_parts = float_parts(model, info.quant)
    return info, model


def float_parts(model: onnx.ModelProto, quant: dict[str, Any] | None) -> list[str]:
    """Quantized parts of the graph that run in float in every mode: the log2 attention-probability
    quantizers (``maskaq.quant.float_quantizers``; in the graph: ``<quantizer>/Log2/...`` Less /
    Where / Gather nodes) and the MatMuls they feed (``softmax @ v``: one operand is not a
    DequantizeLinear output, so no runtime fuses it into an integer kernel)."""
    names = list((quant or {}).get("float_quantizers") or [])
    g = model.graph
    finals = [n for n in g.node if n.op_type == "Gather" and "/Log2/GatherValue" in n.name]
    if not names:
        names = sorted({n.name.split("/Log2/")[0] for n in finals})
    if not names and not finals:
        return []
    outs = {o for n in finals for o in n.output}
    mm = sum(1 for n in g.node if n.op_type == "MatMul" and any(i in outs for i in n.input))
    first = names[0] if names else "?"
    out = [f"{len(names)} log2 attention-probability quantizers ({first}{', ...' if len(names) > 1 else ''}) "
           "computed as float ops (Less/Where/Gather on a threshold table, exact in every mode)"]
    if mm:
        out.append(f"{mm} attention MatMuls (softmax @ v) fed by them run in float (no integer kernel)")
    return out


# ----------------------------------------------------------------------------- census


class _Graph:
    """Name lookups over one graph: producers, constant values and element types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers[i].append(n)
        self.const: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.const[n.output[0]] = a.t
        self.elem_type: dict[str, int] = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type
        for name, t in self.const.items():
            self.elem_type[name] = t.data_type

    def value(self, name: str) -> np.ndarray | None:
        t = self.const.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:  # exotic dtypes (int2...) on old onnx: no value, not fatal
            return None

    def qdq_dtype(self, node: onnx.NodeProto, _depth: int = 0) -> str:
        """Integer dtype a Q/DQ node works in: its zero-point's dtype, else inferred."""
        if len(node.input) > 2 and node.input[2]:
            et = self.elem_type.get(node.input[2])
            if et:
                return dtype_name(et)
        if node.op_type == "QuantizeLinear":
            for a in node.attribute:
                if a.name == "output_dtype" and a.i:
                    return dtype_name(a.i)
            return "uint8"  # ONNX default when no zero-point is given
        # DequantizeLinear without zero point: the dtype of x
        x = node.input[0]
        if x in self.elem_type:
            return dtype_name(self.elem_type[x])
        prod = self.producer.get(x)
        if prod is not None and _depth < 8:
            if prod.op_type in QDQ_OPS:
                return self.qdq_dtype(prod, _depth + 1)
            if prod.op_type in ("Clip", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze"):
                inner = self.producer.get(prod.input[0])
                if inner is not None and inner.op_type == "QuantizeLinear":
                    return self.qdq_dtype(inner, _depth + 1)
        return "unknown"


_OP_TOKEN = re.compile(r"^(QuantizeLinear|DequantizeLinear|Constant|Clip)(_\d+)?$")


def region_of(name: str) -> str:
    """Group a node/tensor name: ``blocks.N`` style prefixes, else its first two components.

    ``/blocks.3/attn/qkv/QuantizeLinear`` and ``blocks.3.attn.qkv.input_quantizer`` give
    ``blocks.3``; ``layers.1.blocks.0.attn`` gives ``layers.1``; ``patch_embed.proj.weight``
    gives ``patch_embed.proj``; ``head/DequantizeLinear`` gives ``head``.
    """
    toks = [t for t in re.split(r"[./:]+", name) if t and not _OP_TOKEN.match(t)]
    if not toks:
        return "(unnamed)"
    for i in range(len(toks) - 1):
        if toks[i + 1].isdigit() and not toks[i].isdigit():
            return f"{toks[i]}.{toks[i + 1]}"
    if len(toks) >= 2 and toks[1] in ("weight", "bias"):
        return toks[0]
    return ".".join(toks[:2])


def qdq_census(model: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, str]]:
    """Count QuantizeLinear/DequantizeLinear nodes by zero-point dtype and by region.

    Returns:
        ``(census, dtype_of_node)``: census has ``total``, ``QuantizeLinear``,
        ``DequantizeLinear``, ``by_dtype`` ({dtype: {op: n}}) and ``by_region``
        ({region: {op: n}}); the second maps each Q/DQ node's name (or index) to its dtype.
    """
    gi = _Graph(model)
    by_dtype: dict[str, Counter] = defaultdict(Counter)
    by_region: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    dtypes: dict[str, str] = {}
    for idx, n in enumerate(gi.nodes):
        if n.op_type not in QDQ_OPS or n.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        dt = gi.qdq_dtype(n)
        dtypes[n.name or f"#{idx}"] = dt
        totals[n.op_type] += 1
        by_dtype[dt][n.op_type] += 1
        # prefer the node name; exporters sometimes leave it empty, then use the tensor name
        name = n.name or (n.output[0] if n.output else "")
        region = region_of(name)
        if region == "(unnamed)" and n.input:
            region = region_of(n.input[0])
        by_region[region][n.op_type] += 1
    census = {
        "total": sum(totals.values()),
        "QuantizeLinear": totals["QuantizeLinear"],
        "DequantizeLinear": totals["DequantizeLinear"],
        "by_dtype": {k: dict(v) for k, v in sorted(by_dtype.items())},
        "by_region": {k: dict(v) for k, v in sorted(by_region.items(), key=_region_key)},
    }
    return census, dtypes


def _region_key(item: tuple[str, Any]) -> tuple:
    # natural sort: blocks.2 before blocks.10
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0]))


# ------------------------------------------------------------- sub-8-bit detection


def _int_bounds(lo: float, hi: float, scale: float, zp: float) -> tuple[float, float]:
    if scale == 0:
        return -np.inf, np.inf
    return float(np.round(lo / scale + zp)), float(np.round(hi / scale + zp))


def sub8bit_reasons(
    model: onnx.ModelProto, quant: dict[str, Any] | None, dtypes: dict[str, str] | None = None
) -> list[str]:
    """Why this graph carries sub-8-bit quantization that ORT runs in (at best) 8-bit or float.

    Detected from: ``maskaq.quant`` bits < 8; 4/2-bit Q/DQ dtypes; a float Clip feeding a
    QuantizeLinear whose bounds map to fewer integer levels than the Q dtype holds ("CQDQ");
    an integer Clip between Q and DQ narrower than the dtype ("QCDQ"). Empty list: none.
    """
    reasons: list[str] = []
    if quant and quant.get("profile") != "fp32":
        for key in ("w_bits", "a_bits"):
            bits = quant.get(key)
            if isinstance(bits, (int, float)) and 0 < bits < 8:
                reasons.append(f"maskaq.quant {key}={bits}")
    if dtypes:
        sub = sorted({d for d in dtypes.values() if d in _SUB8_DTYPES})
        if sub:
            reasons.append(f"native {'/'.join(sub)} Q/DQ (ORT has no fused kernels for them)")
    gi = _Graph(model)
    n_cqdq = n_qcdq = 0
    for n in gi.nodes:
        if n.op_type != "Clip":
            continue
        lo, hi = _clip_bounds(gi, n)
        # CQDQ: float Clip -> QuantizeLinear
        for q in gi.consumers.get(n.output[0], []):
            if q.op_type != "QuantizeLinear" or len(q.input) < 2:
                continue
            rng = _DTYPE_RANGE.get(gi.qdq_dtype(q))
            scale = gi.value(q.input[1])
            zp = gi.value(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros(1)
            if rng is None or scale is None or zp is None or scale.size != 1:
                continue
            qlo, qhi = _int_bounds(lo, hi, float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0]))
            if qlo > rng[0] or qhi < rng[1]:
                n_cqdq += 1
        # QCDQ: QuantizeLinear -> integer Clip -> DequantizeLinear
        prod = gi.producer.get(n.input[0])
        if prod is not None and prod.op_type == "QuantizeLinear":
            rng = _DTYPE_RANGE.get(gi.qdq_dtype(prod))
            if rng is not None and (lo > rng[0] or hi < rng[1]):
                n_qcdq += 1
    if n_cqdq:
        reasons.append(f"{n_cqdq} float Clip->QuantizeLinear narrower than the Q dtype (CQDQ)")
    if n_qcdq:
        reasons.append(f"{n_qcdq} integer Clip between Q and DQ narrower than the dtype (QCDQ)")
    return reasons


def _clip_bounds(gi: _Graph, clip: onnx.NodeProto) -> tuple[float, float]:
    """Constant Clip bounds; a missing or non-constant bound counts as unbounded."""
    lo, hi = -np.inf, np.inf
    for a in clip.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        elif a.name == "max":
            hi = a.f
    if len(clip.input) > 1 and clip.input[1]:
        v = gi.value(clip.input[1])
        lo = float(v.reshape(-1)[0]) if v is not None and v.size == 1 else -np.inf
    if len(clip.input) > 2 and clip.input[2]:
        v = gi.value(clip.input[2])
        hi = float(v.reshape(-1)[0]) if v is not None and v.size == 1 else np.inf
    return lo, hi
