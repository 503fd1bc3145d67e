"""The run report: one JSON per run (written atomically) and a one-screen text summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EvalError

SCHEMA_VERSION = 1


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None, paths to str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(report: dict[str, Any]) -> str:
    """Serialise a report (strict JSON: no NaN)."""
    return json.dumps(_clean(report), indent=2, allow_nan=False) + "\n"


def check_output_path(path: str | Path) -> Path:
    """Fail early (before a long run) if the report could not be written there."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise EvalError(
            f"report path {p} is a folder; give a file name such as {p / 'report.json'}"
        )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():  # as maskaq-export: a typo in a folder name is not silently created
        raise EvalError(f"cannot write the report: folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise EvalError(f"cannot write the report: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise EvalError(f"cannot write the report: folder {parent} is not writable")
    return p


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report atomically: a temp file in the same folder, then ``os.replace``."""
    p = check_output_path(path)
    text = to_json(report)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the report the usual permissions
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def numeric_deltas(quant: Any, fp32: Any, prefix: str = "") -> dict[str, float]:
    """``quant - fp32`` for every shared numeric metric (percentage points), flattened with
    dots (``bbox.AP``); counts and per-class lists are skipped."""
    out: dict[str, float] = {}
    if not isinstance(quant, dict) or not isinstance(fp32, dict):
        return out
    for k, v in quant.items():
        if k in ("images", "detections") or k.startswith("per_class") or k not in fp32:
            continue
        w = fp32[k]
        if isinstance(v, dict):
            out.update(numeric_deltas(v, w, f"{prefix}{k}."))
        elif (
            isinstance(v, (int, float)) and isinstance(w, (int, float)) and not isinstance(v, bool)
        ):
            if math.isfinite(v) and math.isfinite(w):
                out[f"{prefix}{k}"] = float(v) - float(w)
    return out


def _fmt_metrics(m: dict[str, Any]) -> str:
    parts = []
    for k, v in m.items():
        if k in ("images", "detections") or k.startswith("per_class"):
            continue
        if isinstance(v, dict):
            inner = " ".join(
                f"{ik} {iv:.2f}"
                for ik, iv in v.items()
                if isinstance(iv, float) and ik != "detections"
            )
            parts.append(f"{k}[{inner}]")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.2f}")
    return "  ".join(parts)


def summary(report: dict[str, Any], path: str | Path | None = None) -> str:
    """A one-screen human summary of a report."""
    m, d, rt = report["model"], report["dataset"], report["runtime"]
    lines = []
    used = ", ".join(rt["providers_used"])
    lines.append(f"maskaq-eval  task {report['task']}  mode {rt['mode']}  on {used}")
    q = m["qdq"]
    dt = ", ".join(f"{k} {sum(v.values())}" for k, v in q["by_dtype"].items()) or "none"
    lines.append(
        f"model     {Path(m['file']).name}  sha256 {m['sha256'][:12]}  opset {m['opset']}  "
        f"Q/DQ {q['total']} ({dt})"
    )
    if m.get("tag") or m.get("quant"):
        qd = m.get("quant") or {}
        qs = (
            f"w{qd.get('w_bits')}a{qd.get('a_bits')} {qd.get('profile', '')} {qd.get('method', '')}".strip()
            if qd and qd.get("profile") != "fp32"
            else "fp32"
        )
        lines.append(f"source    {m.get('tag') or '?'} ({m.get('weights') or '?'})  quant {qs}")
    for part in m.get("float_parts") or []:
        lines.append(f"float     {part}")
    sub = d.get("subset")
    lines.append(
        f"dataset   {d['name']} ({d['layout']})  {d['images']} images"
        + (f" of {d['total_images']} (--limit {sub['limit']})" if sub else "")
        + f"  {d['root']}"
    )
    lines.append(f"metrics   {_fmt_metrics(report['metrics'])}")
    if report.get("fp32"):
        lines.append(f"fp32      {_fmt_metrics(report['fp32']['metrics'])}")
        deltas = report.get("deltas") or {}
        lines.append("delta     " + "  ".join(f"{k} {v:+.2f} pp" for k, v in deltas.items()))
    lat = report.get("latency")
    if lat:
        cells = [
            f"bs{bs}: p50 {r['p50_ms']:.2f} p90 {r['p90_ms']:.2f} p99 {r['p99_ms']:.2f} ms, "
            f"{r['throughput_img_s']:.1f} img/s"
            for bs, r in lat["batch_sizes"].items()
        ]
        lines.append(
            "latency   " + " | ".join(cells) + ("  [simulated]" if lat.get("simulated") else "")
        )
    if rt.get("runtime") == "openvino":
        lines.append(
            f"runtime   openvino {rt['runtime_version']} (CPU plugin)  precision {rt['precision']}  "
            f"batch {rt['batch_size']}  wall {report['wall_time_s']:.1f} s"
        )
        from .openvino_backend import summary_line

        kern = summary_line(rt.get("kernels"))
        if kern:
            lines.append(f"kernels   {kern}")
    else:
        lines.append(
            f"runtime   onnxruntime {rt['onnxruntime']}  graph-opt {rt['graph_optimization_level']}  "
            f"batch {rt['batch_size']}  wall {report['wall_time_s']:.1f} s"
        )
    for w in report.get("warnings", []):
        lines.append(f"warning   {w}")
    if path is not None:
        lines.append(f"report    {path}")
    return "\n".join(lines)
