"""QDQ ONNX export of MaskAQ-calibrated models and the ``maskaq-export`` command.

Public API::

    from export import export_onnx
    res = export_onnx(Q, "model.onnx", data_config=lm.data_config, profile="ort",
                      metadata={"method": "maskaq", "seed": 0}, labels=lm.labels, source=lm.source)

See docs/export-notes.md for the encodings per profile and their exactness.
"""
from __future__ import annotations

from .encodings import build_encodings
from .freeze import QuantRecord, freeze_model
from .onnx_export import (
    DEFAULT_OPSET,
    INT4_OPSET,
    ExportError,
    ExportResult,
    block_fake_quant,
    block_quantize,
    export_onnx,
    op_census,
    translation_table,
)
from .profiles import PROFILES, Conversion, convert_for_profile

__all__ = [
    "export_onnx", "ExportResult", "ExportError", "PROFILES", "DEFAULT_OPSET", "INT4_OPSET",
    "convert_for_profile", "Conversion", "freeze_model", "QuantRecord", "build_encodings",
    "block_quantize", "block_fake_quant", "op_census", "translation_table",
]
