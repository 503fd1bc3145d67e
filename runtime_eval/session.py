"""ONNX Runtime sessions: providers requested vs used, reference/deploy modes, CPU checks.

ORT silently falls back to CPU when an execution provider cannot start, so the providers the
session really uses are read back and compared with the request.

Modes (docs/export.md):
- ``reference``: ``session.disable_quant_qdq=1``: Q/DQ pairs run as written (fake-quant maths,
  exact), no fused integer kernels. This is the score of the quantized model itself.
- ``deploy``: ORT's defaults: QDQ fusions into integer kernels (QLinearMatMul,
  MatMulIntegerToFloat, MatMulNBits). On x86 CPUs without VNNI, the u8 x s8 kernels can
  saturate with full 8-bit weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .errors import EvalError

log = logging.getLogger(__name__)

MODES = ("reference", "deploy")

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}

GRAPH_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def normalise_provider(name: str) -> str:
    """``cuda`` / ``CUDA`` / ``CUDAExecutionProvider`` -> ``CUDAExecutionProvider``."""
    key = name.strip()
    if key.lower() in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key.lower()]
    for known in set(PROVIDER_ALIASES.values()) | set(ort.get_available_providers()):
        if key.lower() in (known.lower(), known.lower().replace("executionprovider", "")):
            return known
    return key


def _gpu_present() -> bool:
    """Cheap check that an NVIDIA driver is loaded (avoids ORT's noisy CUDA start failure)."""
    if platform.system() != "Linux":
        return True  # let ORT try; the used providers are checked anyway
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def default_providers() -> list[str]:
    """CUDA (then CPU) if this ORT build has it and a GPU is present, else CPU."""
    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail and _gpu_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolve_providers(requested: Sequence[str] | None) -> tuple[list[str], bool]:
    """Normalise and check a provider request.

    Returns:
        ``(providers, explicit)``; ``explicit`` is False when the default was chosen.

    Raises:
        EvalError: a requested provider is not in this onnxruntime build.
    """
    if not requested:
        return default_providers(), False
    provs: list[str] = []
    for r in requested:
        for part in str(r).split(","):
            if part.strip():
                p = normalise_provider(part)
                if p not in provs:
                    provs.append(p)
    avail = ort.get_available_providers()
    missing = [p for p in provs if p not in avail]
    if missing:
        raise EvalError(
            f"execution provider(s) {', '.join(missing)} not available in onnxruntime "
            f"{ort.__version__} (available: {', '.join(avail)}; aliases: cpu, cuda, tensorrt)"
        )
    return provs, True


def cpu_vnni() -> bool | None:
    """Whether this CPU has VNNI (``avx512_vnni`` or ``avx_vnni``); None when unknown.

    Read from /proc/cpuinfo (Linux x86 only). Without VNNI, ORT's fused u8 x s8 kernels can
    saturate when weights use the full 8-bit range.
    """
    if platform.system() != "Linux" or platform.machine().lower() not in (
        "x86_64",
        "amd64",
        "i686",
    ):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni", "avx_vnni_int8"} & flags)
    except OSError:
        return None
    return None


def cpu_model() -> str:
    """CPU model name (best effort)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_PRELOADED = False


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip packages (what ``import torch`` would do), so
    the CUDA provider starts without torch. Best effort: failures leave ORT's own search."""
    global _PRELOADED
    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            ort.preload_dlls()
    except Exception as e:  # pragma: no cover - depends on the machine
        log.debug("onnxruntime.preload_dlls failed: %s", e)
    if buf.getvalue().strip():
        log.debug("preload_dlls: %s", buf.getvalue().strip())


@dataclass
class SessionInfo:
    """A live session and how it was made (the ``runtime`` section of the report)."""

    session: ort.InferenceSession
    providers_requested: list[str]
    providers_used: list[str]
    explicit_providers: bool
    mode: str
    graph_optimization_level: str
    intra_op_threads: int
    inter_op_threads: int
    config_entries: dict[str, str] = field(default_factory=dict)
    runtime: str = "onnxruntime"

    def report(self) -> dict[str, Any]:
        # the same keys as runtime_eval.openvino_backend.OpenVINOSessionInfo.report()
        return {
            "runtime": self.runtime,
            "runtime_version": ort.__version__,
            "precision": "f32",  # ORT's CPU/CUDA providers compute the float parts in float32
            "precision_requested": None,
            "onnxruntime": ort.__version__,
            "openvino": None,
            "providers_requested": self.providers_requested,
            "providers_requested_explicitly": self.explicit_providers,
            "providers_used": self.providers_used,
            "mode": self.mode,
            "graph_optimization_level": self.graph_optimization_level,
            "session_config": self.config_entries,
            "threads": {
                "intra_op": self.intra_op_threads or "ort-default",
                "inter_op": self.inter_op_threads or "ort-default",
                "cpu_count": os.cpu_count(),
            },
            "kernels": None,  # OpenVINO only (its runtime model says which layers ran int8)
        }


def create_session(
    model_path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    mode: str = "reference",
    graph_opt: str = "all",
    threads: int = 0,
    inter_op_threads: int = 0,
    optimized_model_path: str | Path | None = None,
) -> SessionInfo:
    """Create an ORT session and check that the requested providers are really used.

    Args:
        model_path: the ``.onnx`` file.
        providers: e.g. ``["cuda"]`` or ``["CPUExecutionProvider"]``; None: CUDA if usable,
            else CPU (a default CUDA that fails to start falls back to CPU with a warning).
        mode: ``reference`` (exact fake-quant: ``session.disable_quant_qdq=1``) or ``deploy``.
        graph_opt: ``disable``, ``basic``, ``extended`` or ``all``.
        threads: intra-op threads, 0 = ORT's default.
        inter_op_threads: inter-op threads, 0 = ORT's default.
        optimized_model_path: save the graph ORT actually runs there (to see which Q/DQ
            pairs were fused into integer kernels).

    Raises:
        EvalError: unknown mode/level, missing provider, silent fallback, or a graph ORT rejects.

    Example:
        >>> s = create_session("m.onnx", providers=["cpu"], mode="deploy")  # doctest: +SKIP
        >>> s.providers_used  # doctest: +SKIP
        ['CPUExecutionProvider']
    """
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r} (valid: {', '.join(MODES)})")
    if graph_opt not in GRAPH_OPT_LEVELS:
        raise EvalError(
            f"unknown graph optimisation level {graph_opt!r} (valid: {', '.join(GRAPH_OPT_LEVELS)})"
        )
    if threads < 0 or inter_op_threads < 0:
        raise EvalError(f"thread counts must be >= 0 (0 = ORT default), got {threads}")
    provs, explicit = resolve_providers(providers)

    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in provs):
        _preload_cuda_libraries()
    so = ort.SessionOptions()
    so.graph_optimization_level = GRAPH_OPT_LEVELS[graph_opt]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = int(inter_op_threads)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    so.log_severity_level = 3  # provider fallback is checked below, not left to ORT's log
    entries: dict[str, str] = {}
    if mode == "reference":
        entries["session.disable_quant_qdq"] = "1"
    for k, v in entries.items():
        so.add_session_config_entry(k, v)

    try:
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=provs)
    except Exception as e:
        raise EvalError(f"ONNX Runtime cannot load {model_path}: {_short(e)}") from None
    used = list(sess.get_providers())
    missing = [p for p in provs if p not in used]
    if missing:
        if explicit:
            raise EvalError(
                f"requested provider(s) {', '.join(missing)} did not start; ONNX Runtime fell "
                f"back to {', '.join(used)} (check the GPU driver/CUDA/cuDNN install, or ask "
                f"for --provider cpu)"
            )
        log.warning("CUDA did not start; running on %s", ", ".join(used))
    return SessionInfo(
        session=sess,
        providers_requested=provs,
        providers_used=used,
        explicit_providers=explicit,
        mode=mode,
        graph_optimization_level=graph_opt,
        intra_op_threads=int(threads),
        inter_op_threads=int(inter_op_threads),
        config_entries=entries,
    )


def _short(e: Exception, limit: int = 400) -> str:
    """An ORT exception as one bounded line."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[:limit] + "..."


def run_session(info: Any, feeds: dict[str, Any], outputs: list[str] | None = None) -> list:
    """``session.run`` with runtime failures turned into :class:`EvalError` (``info``: a
    :class:`SessionInfo` or its OpenVINO twin)."""
    try:
        return info.session.run(outputs, feeds)
    except EvalError:
        raise
    except Exception as e:
        name = "OpenVINO" if getattr(info, "runtime", "onnxruntime") == "openvino" else "ONNX Runtime"
        raise EvalError(f"{name} failed running the model: {_short(e)}") from None
