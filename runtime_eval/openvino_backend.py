"""OpenVINO (CPU plugin) behind the same session interface as ONNX Runtime (:mod:`.session`).

``maskaq-eval ... --runtime openvino`` evaluates the exported ONNX file with OpenVINO's own ONNX
frontend and CPU plugin instead of ONNX Runtime. Everything downstream (the tasks, the report,
``--latency``, the dense predictors) calls ``session.run(output_names, feeds)`` exactly as on an
ORT session, so the backend only has to look like one:

* :class:`OpenVINOSession` wraps a ``CompiledModel`` and one ``InferRequest`` with ORT's
  ``run`` / ``get_providers`` / ``get_modelmeta`` / ``get_inputs`` / ``get_outputs``;
* :class:`OpenVINOSessionInfo` is the :class:`~.session.SessionInfo` twin (the report's
  ``runtime`` section), plus the kernel census.

OpenVINO has no "exact" Q/DQ mode: its ONNX frontend turns every QuantizeLinear/DequantizeLinear
pair into a ``FakeQuantize`` and the CPU plugin's low-precision transformations run the layers
behind them with int8 kernels (``brgemm_avx512_i8`` ...), so an OpenVINO run is always the
deploy flavour. ``precision`` is the CPU plugin's ``INFERENCE_PRECISION_HINT`` for the float
parts: ``f32`` (the default here, so results compare with ORT) or ``bf16`` (OpenVINO's own
default on CPUs with AMX or AVX512-BF16).

The kernel census reads ``compiled_model.get_runtime_model()`` after the run: every executed
layer's ``rt_info`` says its ``layerType``, ``runtimePrecision`` and ``primitiveType``, so the
report shows which layers really ran in int8 (e.g. ``{"FullyConnected": {"i8": 36, "f32": 1}}``)
and with which kernels. openvino is imported lazily: without it ``--runtime openvino`` is one
error line (``pip install 'maskaq[openvino]'``).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .errors import EvalError

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")
DEVICE = "CPU"
PROVIDER_NAME = "OpenVINO:CPU"
INSTALL_HINT = "pip install 'maskaq[openvino]'"

# Layers that do the arithmetic (the census's int8-vs-float count); every other executed layer
# is listed under ``layers`` too.
COMPUTE_LAYERS = (
    "FullyConnected",
    "MatMul",
    "Convolution",
    "GroupConvolution",
    "Deconvolution",
    "Gemm",
    "MHA",
    "ScaledDotProductAttention",
)
_INT8 = {"i8", "u8", "I8", "U8", "i4", "u4"}
_SKIP = {"Const", "Input", "Output", "Parameter", "Result"}


def import_openvino() -> Any:
    """``import openvino``, or :class:`EvalError` with the install line when it is missing."""
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise EvalError(
            f"--runtime openvino needs the openvino package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None


def openvino_version() -> str:
    ov = import_openvino()
    v = getattr(ov, "__version__", None)
    if v is None:  # older layouts
        v = ov.get_version() if hasattr(ov, "get_version") else "unknown"
    return str(v).split("-")[0]


_OV_NOISE = re.compile(r"(Exception from |Check '[^']*' failed at )\S+?\.(cpp|hpp):\d+:\s*")


def _short(e: Exception, limit: int = 400) -> str:
    """OpenVINO's exception as one bounded line, without its source-file breadcrumbs."""
    msg = _OV_NOISE.sub("", " ".join(str(e).split()))
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _precision_name(value: Any) -> str:
    """OpenVINO's element type / precision property -> ``f32`` / ``bf16`` / ``f16``."""
    s = str(getattr(value, "get_type_name", lambda: value)()).lower()
    for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("f16", "f16"), ("float16", "f16"),
                      ("f32", "f32"), ("float32", "f32")):
        if key in s:
            return name
    return s


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a file OpenVINO read but onnx cannot: no metadata
        return {}
    return {p.key: p.value for p in m.metadata_props}


class OpenVINOSession:
    """An OpenVINO compiled model that answers like an ``onnxruntime.InferenceSession``."""

    def __init__(self, compiled: Any, path: Path) -> None:
        self.compiled = compiled
        self.path = path
        self.request = compiled.create_infer_request()
        self._outputs = {}
        for port in compiled.outputs:
            for name in port.get_names():
                self._outputs.setdefault(name, port)
        self.output_names = [min(p.get_names()) if p.get_names() else str(i)
                             for i, p in enumerate(compiled.outputs)]
        self._meta: dict[str, str] | None = None

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer(feeds)
        if not output_names:
            return [np.array(res[p], copy=True) for p in self.compiled.outputs]
        out = []
        for name in output_names:
            port = self._outputs.get(name)
            if port is None:
                raise EvalError(f"OpenVINO model has no output {name!r} (outputs: {self.output_names})")
            out.append(np.array(res[port], copy=True))
        return out

    def get_providers(self) -> list[str]:
        return [PROVIDER_NAME]

    def get_modelmeta(self) -> Any:
        if self._meta is None:
            self._meta = _onnx_metadata(self.path)
        return SimpleNamespace(custom_metadata_map=dict(self._meta))

    def _ports(self, ports: Any) -> list[Any]:
        return [SimpleNamespace(name=min(p.get_names()) if p.get_names() else "",
                                shape=[d.get_length() if d.is_static else None for d in p.get_partial_shape()])
                for p in ports]

    def get_inputs(self) -> list[Any]:
        return self._ports(self.compiled.inputs)

    def get_outputs(self) -> list[Any]:
        return self._ports(self.compiled.outputs)


def kernel_census(compiled: Any) -> dict[str, Any]:
    """Which layers the CPU plugin ran, in which precision and with which kernels.

    Returns:
        ``{"compute": {layerType: {precision: n}}, "primitives": {layerType: {primitiveType: n}},
        "int8_layers": n, "float_layers": n, "layers": {layerType: {precision: n}}}``;
        ``compute`` / ``primitives`` / the two counts cover :data:`COMPUTE_LAYERS`, ``layers``
        every executed layer but constants and inputs/outputs. Read after an inference: with
        dynamic shapes the plugin picks its primitives at the first run (``undef_*`` before).
    """
    layers: dict[str, Counter] = defaultdict(Counter)
    compute: dict[str, Counter] = defaultdict(Counter)
    prims: dict[str, Counter] = defaultdict(Counter)
    n_int = n_float = 0
    def get(info: Any, key: str) -> str:
        if key not in info:
            return "?"
        v = info[key]
        return str(v.astype(str)) if hasattr(v, "astype") else str(v)

    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        lt = get(info, "layerType")
        if lt in _SKIP:
            continue
        prec = get(info, "runtimePrecision")
        layers[lt][prec] += 1
        if lt in COMPUTE_LAYERS:
            compute[lt][prec] += 1
            prims[lt][get(info, "primitiveType")] += 1
            if prec in _INT8:
                n_int += 1
            else:
                n_float += 1
    return {
        "compute": {k: dict(v) for k, v in sorted(compute.items())},
        "primitives": {k: dict(v) for k, v in sorted(prims.items())},
        "int8_layers": n_int,
        "float_layers": n_float,
        "layers": {k: dict(v) for k, v in sorted(layers.items())},
    }


@dataclass
class OpenVINOSessionInfo:
    """A live OpenVINO session and how it was made (twin of :class:`.session.SessionInfo`)."""

    session: OpenVINOSession
    precision_requested: str
    precision: str
    threads: int
    config: dict[str, str] = field(default_factory=dict)
    version: str = ""
    # the attributes of SessionInfo the rest of the harness reads
    providers_requested: list[str] = field(default_factory=lambda: [PROVIDER_NAME])
    providers_used: list[str] = field(default_factory=lambda: [PROVIDER_NAME])
    explicit_providers: bool = False
    mode: str = "deploy"
    graph_optimization_level: str = "openvino"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    config_entries: dict[str, str] = field(default_factory=dict)
    runtime: str = "openvino"

    def kernels(self) -> dict[str, Any]:
        return kernel_census(self.session.compiled)

    def open_sibling(self, path: str | Path) -> OpenVINOSession:
        """Another graph (a dense export's part) compiled with the same settings."""
        p = Path(path)
        if p.resolve() == self.session.path.resolve():
            return self.session
        return _compile(p, self.config).session  # type: ignore[return-value]

    def report(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "runtime_version": self.version,
            "precision": self.precision,
            "precision_requested": self.precision_requested,
            "onnxruntime": None,
            "openvino": self.version,
            "providers_requested": self.providers_requested,
            "providers_requested_explicitly": False,
            "providers_used": self.providers_used,
            "mode": self.mode,
            "graph_optimization_level": self.graph_optimization_level,
            "session_config": dict(self.config),
            "threads": {
                "intra_op": self.threads or "openvino-default",
                "inter_op": "openvino-default",
                "cpu_count": os.cpu_count(),
            },
            "kernels": self.kernels(),
        }


def _compile(path: Path, config: dict[str, str]) -> SimpleNamespace:
    ov = import_openvino()
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError/its own types
        raise EvalError(f"OpenVINO cannot read {path}: {_short(e)}") from None
    try:
        compiled = core.compile_model(model, DEVICE, dict(config))
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"OpenVINO cannot compile {path} for {DEVICE}: {_short(e)}") from None
    return SimpleNamespace(session=OpenVINOSession(compiled, path), compiled=compiled)


def create_openvino_session(
    model_path: str | Path, *, precision: str = "f32", threads: int = 0
) -> OpenVINOSessionInfo:
    """Read and compile an ONNX file with OpenVINO's CPU plugin.

    Args:
        model_path: the ``.onnx`` file.
        precision: ``f32`` or ``bf16``: ``INFERENCE_PRECISION_HINT`` for the float parts
            (int8 layers stay int8 either way).
        threads: ``INFERENCE_NUM_THREADS``; 0 = OpenVINO's default.

    Raises:
        EvalError: openvino missing, unknown precision, a file OpenVINO cannot read or compile.
    """
    if precision not in PRECISIONS:
        raise EvalError(f"unknown precision {precision!r} (valid: {', '.join(PRECISIONS)})")
    if threads < 0:
        raise EvalError(f"thread counts must be >= 0 (0 = OpenVINO default), got {threads}")
    version = openvino_version()
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    c = _compile(Path(model_path), config)
    try:
        actual = _precision_name(c.compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # noqa: BLE001 - property unknown to this build
        actual = precision
    if actual != precision:
        log.warning(
            "OpenVINO was asked for %s inference precision but runs %s on this CPU", precision, actual
        )
    return OpenVINOSessionInfo(
        session=c.session,
        precision_requested=precision,
        precision=actual,
        threads=int(threads),
        config=config,
        version=version,
        intra_op_threads=int(threads),
    )


def summary_line(kernels: dict[str, Any] | None) -> str | None:
    """``FullyConnected i8 36, f32 1; MatMul f32 12 | brgemm_avx512_i8 36, ...`` or None."""
    if not kernels or not kernels.get("compute"):
        return None
    parts = []
    for lt, precs in kernels["compute"].items():
        parts.append(f"{lt} " + ", ".join(f"{p} {n}" for p, n in sorted(precs.items())))
    sub = kernels.get("layers", {}).get("Subgraph")
    if sub:  # fused snippets: eltwise chains and attention (the MatMuls of q k^T and attn v)
        parts.append("Subgraph (fused, incl. attention) " + ", ".join(f"{p} {n}" for p, n in sorted(sub.items())))
    prims: Counter = Counter()
    for per in kernels.get("primitives", {}).values():
        prims.update(per)
    return (
        f"{kernels['int8_layers']} int8 / {kernels['float_layers']} float layers: "
        + "; ".join(parts)
        + " | "
        + ", ".join(f"{k} {v}" for k, v in prims.most_common())
    )
