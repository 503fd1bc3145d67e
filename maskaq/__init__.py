"""maskaq: data-free quantization of Vision Transformers (MaskAQ, ICML 2026)."""
from __future__ import annotations

__version__ = "0.1.0"

from .models import ALIASES, DataConfig, LoadedModel, ModelError, load_model, resolve_name, save_checkpoint
from .params import QuantParams, load_params, read_params
from .qmodel import (
    QuantConfig,
    prepare_model,
    quantize_model,
    quantizers,
    quantizers_disabled,
    record_attention,
)
from .quant import QuantError, export_mode, fake_quant, qrange

__all__ = [
    "__version__", "ALIASES", "DataConfig", "LoadedModel", "ModelError", "load_model", "resolve_name",
    "save_checkpoint", "QuantParams", "load_params", "read_params", "QuantConfig", "prepare_model",
    "quantize_model", "quantizers", "quantizers_disabled", "record_attention", "QuantError",
    "export_mode", "fake_quant", "qrange",
]
