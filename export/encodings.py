"""The encodings sidecar ``<out>.onnx.encodings.json`` in the Qualcomm AIMET / QNN layout.

AIMET's encoding format (version 0.6.1, the one QNN's ``--quantization_overrides`` reads)::

    {"version": "0.6.1",
     "activation_encodings": {<tensor>: [Encoding]},
     "param_encodings":      {<tensor>: [Encoding, ...one per output channel]},
     "excluded_layers": [], "quantizer_args": {...}}
    Encoding = {"bitwidth": int, "dtype": "int", "is_symmetric": "True"|"False",
                "scale": float, "offset": int, "min": float, "max": float}

AIMET's convention is ``real = (q_u + offset) * scale`` with ``q_u`` in ``[0, 2^bitwidth - 1]``;
ours is ``real = (q - z) * s`` with ``q`` in ``[qmin, qmax]``, hence ``offset = qmin - z``,
``min = (qmin - z) s`` and ``max = (qmax - z) s`` (for narrow weight grids ``max`` is one step
below AIMET's ``(offset + 2^b - 1) s``: the grid really stops there).

Keys: an activation encoding is keyed by the float tensor entering the quantizer (the tensor that
is quantized, as AIMET does); a parameter encoding by the dequantized weight tensor, which the
exporter names ``<layer>.weight`` like the PyTorch parameter. The extra ``maskaq`` block maps every
quantizer name to its ONNX tensors, grid and storage type.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .freeze import QuantRecord

__all__ = ["build_encodings", "AIMET_VERSION"]

AIMET_VERSION = "0.6.1"


def _enc(bits: int, s: float, z: int, qmin: int, qmax: int, symmetric: bool) -> dict[str, Any]:
    s32 = np.float32(s)
    return {
        "bitwidth": int(bits),
        "dtype": "int",
        "is_symmetric": "True" if symmetric else "False",
        "scale": float(s32),
        "offset": int(qmin - z),
        "min": float(np.float32(qmin - z) * s32),
        "max": float(np.float32(qmax - z) * s32),
    }


def build_encodings(records: dict[str, QuantRecord], profile: str, opset: int) -> dict[str, Any]:
    """AIMET-layout encodings of every quantized tensor in the exported graph.

    Args:
        records: the exporter's quantizer table (after the graph rewrite filled the ONNX names).
        profile: profile tag written to the ``maskaq`` block.
        opset: ONNX opset of the graph.

    Returns:
        JSON-able dict (see module docstring).
    """
    act: dict[str, list[dict[str, Any]]] = {}
    par: dict[str, list[dict[str, Any]]] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, r in records.items():
        if r.onnx_output is None:  # activation left float (weight-only artifact)
            continue
        if r.encoding == "log2":
            # no AIMET encoding exists for it (not a linear grid): the maskaq block describes it
            table[name] = {
                "kind": r.kind, "encoding": "log2", "bits": r.bits, "codes": [r.qmin, r.qmax],
                "scale": float(np.asarray(r.scale, np.float32).reshape(-1)[0]),
                "rule": "code = clamp(round(-log2(x / scale)), 0, 2^bits - 1); value = scale * 2^-code, "
                        "top code = 0; computed as values[#(thresholds <= x)]",
                "thresholds": [float(v) for v in np.asarray(r.thresholds, np.float32)],
                "values": [float(v) for v in np.asarray(r.values, np.float32)],
                "runs_in": "float", "onnx_input": r.onnx_input, "onnx_output": r.onnx_output,
                "nodes": list(r.onnx_extra.get("nodes", [])),
            }
            continue
        scales = np.asarray(r.scale, np.float32).reshape(-1)
        zps = np.asarray(r.zero_point).reshape(-1).astype(int)
        encs = [_enc(r.bits, float(s), int(z), r.qmin, r.qmax, int(z) == 0 and r.signed)
                for s, z in zip(scales, zps)]
        if r.kind == "activation":
            key = r.onnx_input or name
            if key in act:  # one tensor feeding two quantizers: AIMET can hold one
                table.setdefault("_conflicts", []).append(name)  # type: ignore[arg-type]
            else:
                act[key] = encs
        else:
            par[r.onnx_output] = encs
        entry = {
            "kind": r.kind, "bits": r.bits, "grid": [r.qmin, r.qmax], "storage": r.storage,
            "axis": r.axis, "onnx_input": r.onnx_input, "onnx_output": r.onnx_output,
            "clip": list(r.clip) if r.clip else None, "narrow": r.narrow,
        }
        if r.block_size:
            entry["block_size"] = r.block_size
            entry["scale_shape"] = list(np.asarray(r.scale).shape)
        entry.update({k: v for k, v in r.onnx_extra.items() if k in ("qweight", "transposed", "nodes", "stored_zero_point")})
        table[name] = entry
    a_bits = sorted({r.bits for r in records.values() if r.kind == "activation" and r.onnx_output})
    log2 = [n for n, r in records.items() if r.encoding == "log2" and r.onnx_output]
    w_bits = sorted({r.bits for r in records.values() if r.kind == "weight"})
    return {
        "version": AIMET_VERSION,
        "activation_encodings": act,
        "param_encodings": par,
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": a_bits[0] if len(a_bits) == 1 else a_bits,
            "param_bitwidth": w_bits[0] if len(w_bits) == 1 else w_bits,
            "dtype": "int",
            "per_channel_quantization": True,
            "is_symmetric": all(int(z) == 0 for r in records.values() if r.onnx_output and r.encoding == "linear"
                                for z in np.asarray(r.zero_point).reshape(-1)),
        },
        "maskaq": {"profile": profile, "opset": opset, "quantizers": table,
                   # quantizers computed by float ops, not an AIMET grid (log2 softmax): not in
                   # activation_encodings; described in "quantizers"
                   **({"float_quantizers": log2} if log2 else {})},
    }
