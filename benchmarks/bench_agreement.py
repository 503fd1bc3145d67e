"""Cross-runtime agreement (issue 14 item 2): ORT exact vs ORT deploy vs OpenVINO f32 (and bf16).

For each calibrated state (``--state 4w4a=RUN/calibrated.pt``) and each profile (ort, tensorrt)
the state is re-exported with ``maskaq-export --from-state`` (no synthesis, no calibration), then
the 10,000 Fashion-MNIST test images go through

* ORT exact mode (``session.disable_quant_qdq=1``: the fake-quant reference, bit-identical to
  PyTorch), ORT deploy mode (its fused integer kernels),
* OpenVINO's CPU plugin at ``INFERENCE_PRECISION_HINT=f32`` and, for information, ``bf16``,

and the table gives top-1 per runtime, top-1 agreement (same arg-max) and max |logit difference|
between each pair, and OpenVINO's int8 layer count. Writes ``OUT.md`` and ``OUT.json``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_agreement.py \\
        --state 4w4a=runs/w4/calibrated.pt --state 8w8a=runs/w8/calibrated.pt \\
        --fp32 fp32.onnx --threads 1
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpuinfo import isa_summary
from benchmarks.fmnist import load_split, model_input
from maskaq.io import atomic_write_bytes
from runtime_eval.model import load_model_info
from runtime_eval.openvino_backend import create_openvino_session, openvino_version
from runtime_eval.session import create_session, run_session

RUNTIMES = ("ort_exact", "ort_deploy", "ov_f32", "ov_bf16")
PAIRS = (("ort_deploy", "ort_exact"), ("ov_f32", "ort_exact"), ("ov_f32", "ort_deploy"), ("ov_bf16", "ort_exact"))
TARGET = 99.9


def export_from_state(state: Path, profile: str, out: Path, model: str) -> None:
    cmd = [sys.executable, "-m", "export.cli", model, "--from-state", str(state), "--profile", profile, "-q",
           "-o", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"bench_agreement: export failed: {' '.join(cmd)}\n{r.stderr.strip()}")


def images_for(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    info, _ = load_model_info(path)
    pre = info.preprocessing or {}
    dcfg = SimpleNamespace(input_size=pre["input_size"], mean=pre["mean"], std=pre["std"],
                           crop_pct=pre.get("crop_pct", 1.0), crop_mode=pre.get("crop_mode", "center"),
                           interpolation=pre.get("interpolation", "bilinear"))
    x, y = load_split("test")
    if limit:
        x, y = x[:limit], y[:limit]
    return model_input(x, dcfg).numpy(), y.numpy()


def logits_of(sess: Any, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run_session(sess, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def compare(path: Path, x: np.ndarray, y: np.ndarray, threads: int, batch: int) -> dict[str, Any]:
    """Logits of every runtime on ``x``; top-1, pairwise agreement and max |logit diff|."""
    sessions = {
        "ort_exact": lambda: create_session(path, providers=["cpu"], mode="reference", threads=threads),
        "ort_deploy": lambda: create_session(path, providers=["cpu"], mode="deploy", threads=threads),
        "ov_f32": lambda: create_openvino_session(path, precision="f32", threads=threads),
        "ov_bf16": lambda: create_openvino_session(path, precision="bf16", threads=threads),
    }
    logits, kernels, precision = {}, {}, {}
    for name, make in sessions.items():
        s = make()
        logits[name] = logits_of(s, x, batch)
        if name.startswith("ov"):
            rep = s.report()
            kernels[name] = {k: rep["kernels"][k] for k in ("compute", "primitives", "int8_layers", "float_layers")}
            precision[name] = rep["precision"]
    top1 = {k: float(100.0 * np.mean(v.argmax(1) == y)) for k, v in logits.items()}
    pairs = {}
    for a, b in PAIRS:
        same = logits[a].argmax(1) == logits[b].argmax(1)
        pairs[f"{a} vs {b}"] = {"agreement": float(100.0 * same.mean()), "disagree": int((~same).sum()),
                                "max_abs_logit_diff": float(np.abs(logits[a] - logits[b]).max())}
    return {"top1": top1, "pairs": pairs, "openvino_kernels": kernels, "openvino_precision": precision,
            "images": len(x)}


def _calibration(state: Path) -> str:
    run = state.parent / "run.json"
    try:
        meta = json.loads(run.read_text())
    except (OSError, json.JSONDecodeError):
        return "?"
    cfg = meta.get("config") or {}
    over = cfg.get("overrides") or {}
    parts = [f"{cfg.get('model')} w{cfg.get('w_bits')}a{cfg.get('a_bits')}", f"method {cfg.get('method')}",
             f"--preset {cfg.get('preset')}" + (f" {over}" if over else "")]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", action="append", default=[], metavar="LABEL=calibrated.pt",
                    help="a finished run's calibrated state, re-exported per profile (repeatable)")
    ap.add_argument("--onnx", action="append", default=[], metavar="LABEL=FILE.onnx",
                    help="an already exported file, compared as is (repeatable)")
    ap.add_argument("--fp32", default=None, metavar="FP32.onnx", help="float graph: the float-only floor")
    ap.add_argument("--profiles", default="ort,tensorrt")
    ap.add_argument("--model", default="fmnist_vit", help="model alias for --from-state (default fmnist_vit)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--threads", type=int, default=1, help="threads of both runtimes (0 = their default)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--calibration-note", default=None, help="how the states were calibrated (table header)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agreement"),
                    help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/bench_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.state and not args.onnx:
        ap.error("give at least one --state or --onnx")
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"folder {out.parent} does not exist")
    import onnxruntime as ort

    rows: list[dict[str, Any]] = []
    notes = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files: list[tuple[str, str, Path]] = []
        for spec in args.state:
            label, _, p = spec.partition("=")
            state = Path(p)
            notes[label] = _calibration(state)
            for prof in args.profiles.split(","):
                f = Path(tmp) / f"{label}_{prof}.onnx"
                export_from_state(state, prof, f, args.model)
                files.append((label, prof, f))
        for spec in args.onnx:
            label, _, p = spec.partition("=")
            info, _ = load_model_info(p)
            files.append((label, (info.quant or {}).get("profile", "?"), Path(p)))
        if args.fp32:
            files.append(("fp32", "-", Path(args.fp32)))
        x = y = None
        for label, prof, f in files:
            if x is None:
                x, y = images_for(f, args.limit)
            print(f"bench_agreement: {label} {prof} ...", file=sys.stderr, flush=True)
            r = compare(f, x, y, args.threads, args.batch)
            rows.append({"setting": label, "profile": prof, **r})
    result = {
        "command": cmd, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": isa_summary(), "onnxruntime": ort.__version__, "openvino": openvino_version(),
        "images": rows[0]["images"] if rows else 0, "calibration": notes,
        "calibration_note": args.calibration_note, "target_agreement": TARGET, "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), render(result).encode())
    print(render(result))
    return 0


def render(res: dict[str, Any]) -> str:
    cal = "; ".join(f"{k}: {v}" for k, v in res["calibration"].items()) or "given ONNX files"
    lines = [
        "# Cross-runtime agreement: ORT exact vs ORT deploy vs OpenVINO", "",
        f"Command: `{res['command']}`  ",
        (f"CPU: {res['cpu']}; onnxruntime {res['onnxruntime']} (CPU provider), openvino {res['openvino']} "
         f"(CPU plugin); {res['images']} Fashion-MNIST test images; {res['created']}.  "),
        f"Calibration: {cal}" + (f" ({res['calibration_note']})" if res.get("calibration_note") else "") + ".  ",
        ("Agreement: same top-1 class as the reference run; max |dlogit| over all images and classes. "
         f"Target: OpenVINO f32 vs ORT exact >= {res['target_agreement']}%. bf16 is for information "
         "(OpenVINO's own default on CPUs with AVX512-BF16/AMX)."), "",
        ("| setting | profile | top-1 exact | deploy | OV f32 | OV bf16 | deploy vs exact | OV f32 vs exact "
         "| OV f32 vs deploy | OV bf16 vs exact | OV int8 layers |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        t, p = r["top1"], r["pairs"]

        def cell(key: str, p: dict[str, Any] = p) -> str:
            c = p[key]
            return f"{c['agreement']:.2f}% ({c['disagree']}), {c['max_abs_logit_diff']:.3f}"

        k = r["openvino_kernels"].get("ov_f32", {})
        mark = "" if r["profile"] == "-" else (" ok" if p["ov_f32 vs ort_exact"]["agreement"] >= res["target_agreement"]
                                                 else " **below target**")
        lines.append(
            f"| {r['setting']} | {r['profile']} | {t['ort_exact']:.2f} | {t['ort_deploy']:.2f} | {t['ov_f32']:.2f} | "
            f"{t['ov_bf16']:.2f} | {cell('ort_deploy vs ort_exact')} | {cell('ov_f32 vs ort_exact')}{mark} | "
            f"{cell('ov_f32 vs ort_deploy')} | {cell('ov_bf16 vs ort_exact')} | "
            f"{k.get('int8_layers', '?')} / {k.get('int8_layers', 0) + k.get('float_layers', 0)} |")
    lines += ["", ("Cells: agreement (images that disagree), max |dlogit|. Mechanism and encoding: "
                   "docs/export-notes.md, \"OpenVINO agreement\"."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
