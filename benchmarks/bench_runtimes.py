"""One latency / size / accuracy table across runtimes (issue 14 item 6).

For every ONNX file given (``LABEL=FILE.onnx``, e.g. FP32, 8w8a, 4w4a, 4w8a, INT4 weight-only) and
every runtime - ORT FP32/deploy (ORT's default session: fused integer kernels for a QDQ graph,
plain float for a float one), OpenVINO CPU f32 and bf16 - the table gives the file size, p50
latency and images/s at each batch size (medians over ``--rounds`` rounds that visit every
file x runtime x batch in turn, so background load hits all cells alike) and, for Fashion-MNIST
models, top-1 on the first ``--accuracy-images`` test images. With ``--fp32 LABEL`` the script
also builds ORT's own ``onnxruntime.quantization.quantize_static`` model of that float file
(QDQ, U8S8 = uint8 activations / int8 weights, per channel, calibrated on ``--calib-images`` real
training images) and measures it in the same rounds. ``--deit-tiny`` adds a DeiT-tiny-shaped ViT
(timm ``vit_tiny_patch16_224``: width 192, depth 12, 3 heads, random weights: latency only)
exported as FP32, 8w8a and 4w4a. The CPU's ISA is stated in the header.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_runtimes.py \\
        fp32=fp32.onnx 8w8a=w8.onnx 4w4a=w4.onnx 4w8a=w4a8.onnx int4=w4_int4.onnx \\
        --fp32 fp32 --deit-tiny --threads 1 --out benchmarks/results/runtimes

Numbers measured on a loaded machine are not a result: run it on a quiet one.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
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
from runtime_eval.errors import EvalError
from runtime_eval.model import load_model_info
from runtime_eval.openvino_backend import create_openvino_session, openvino_version
from runtime_eval.session import create_session, run_session

RUNTIMES = ("ort", "ov_f32", "ov_bf16")


def _dcfg(info: Any) -> SimpleNamespace:
    pre = info.preprocessing or {}
    return SimpleNamespace(input_size=pre.get("input_size", info.input_shape[1:]), mean=pre.get("mean", (0.0,)),
                           std=pre.get("std", (1.0,)), crop_pct=pre.get("crop_pct", 1.0),
                           crop_mode=pre.get("crop_mode", "center"), interpolation=pre.get("interpolation", "bilinear"))


def quantize_static_u8s8(fp32: Path, out: Path, calib_images: int) -> Path:
    """ORT's own static quantizer (after its ``quant_pre_process``): QDQ, uint8 activations, int8
    per-channel weights, calibrated (MinMax) on the first ``calib_images`` Fashion-MNIST training
    images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    info, _ = load_model_info(fp32)
    x, _ = load_split("train")
    data = model_input(x[:calib_images], _dcfg(info)).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(data[i:i + 1] for i in range(len(data)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            nxt = next(self.it, None)
            return None if nxt is None else {info.input_name: nxt}

    src = out.with_name(out.stem + ".pre.onnx")
    try:  # ORT's recommended pre-processing (shape inference + graph optimisation)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32), str(src))
    except Exception as e:  # noqa: BLE001 - best effort: quantize the file as it is
        print(f"bench_runtimes: quant_pre_process failed ({e}); quantizing {fp32} as is", file=sys.stderr)
        src = fp32
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def deit_tiny_files(tmp: Path) -> list[tuple[str, Path]]:
    """DeiT-tiny-shaped ViT (random weights) exported as FP32, 8w8a and 4w4a."""
    import torch

    from export import export_onnx
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model

    files = []
    for setting in ("fp32", "8w8a", "4w4a"):
        torch.manual_seed(0)
        lm = load_model("vit_tiny_patch16_224", pretrained=False)
        M = lm.model
        if setting != "fp32":
            M = quantize_model(lm.model, QuantConfig.parse(setting))
            with torch.no_grad():
                M(torch.randn(4, *lm.data_config.input_size))  # initialise the activation quantizers
        p = tmp / f"deit_tiny_shape.{setting}.onnx"
        export_onnx(M, p, data_config=lm.data_config, source=lm.source, metadata={"method": "speed-test"},
                    write_encodings=setting != "fp32")
        files.append((f"deit_tiny_shape {setting}", p))
    return files


def open_session(runtime: str, path: Path, threads: int) -> Any:
    if runtime == "ort":
        return create_session(path, providers=["cpu"], mode="deploy", threads=threads)
    return create_openvino_session(path, precision=runtime.split("_")[1], threads=threads)


def time_once(sess: Any, x: np.ndarray, iters: int) -> float:
    run_session(sess, {"input": x})  # warm (the shape may be new to the session)
    t = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        run_session(sess, {"input": x})
        t[i] = time.perf_counter() - t0
    return float(np.median(t) * 1e3)


def top1(sess: Any, x: np.ndarray, y: np.ndarray, batch: int = 250) -> float:
    logits = np.concatenate([run_session(sess, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float(100.0 * np.mean(logits.argmax(1) == y))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", metavar="LABEL=FILE.onnx")
    ap.add_argument("--fp32", default=None, metavar="LABEL", help="also quantize_static this float file (U8S8)")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--deit-tiny", action="store_true", help="add a DeiT-tiny-shaped model (latency only)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per measurement (median)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over rounds)")
    ap.add_argument("--threads", type=int, default=0, help="threads of both runtimes (0 = their default)")
    ap.add_argument("--accuracy-images", type=int, default=10000, help="Fashion-MNIST test images (0: none)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtimes"),
                    help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/bench_runtimes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"folder {out.parent} does not exist")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    runtimes = [r for r in args.runtimes.split(",") if r]
    if any(r not in RUNTIMES for r in runtimes):
        ap.error(f"--runtimes: valid are {', '.join(RUNTIMES)}")
    import onnxruntime as ort

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        files: list[tuple[str, Path]] = []
        for spec in args.files:
            label, sep, p = spec.partition("=")
            if not sep:
                label, p = Path(spec).stem, spec
            files.append((label, Path(p)))
        if args.fp32:
            src = dict(files).get(args.fp32)
            if src is None:
                ap.error(f"--fp32 {args.fp32}: no file with that label")
            files.append((f"ORT quantize_static U8S8 ({args.calib_images} images)",
                          quantize_static_u8s8(src, tmp / "quantize_static.onnx", args.calib_images)))
        if args.deit_tiny:
            files += deit_tiny_files(tmp)
        if not files:
            ap.error("give ONNX files (LABEL=FILE.onnx) and/or --deit-tiny")

        # sessions (a runtime that cannot load a file gets the reason in its cell)
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        sessions: dict[tuple[str, str], Any] = {}
        infos = {}
        for label, path in files:
            infos[label] = load_model_info(path)[0]
            for rt in runtimes:
                cell: dict[str, Any] = {"latency_ms": {}, "images_s": {}}
                try:
                    s = open_session(rt, path, args.threads)
                    sessions[(label, rt)] = s
                    if rt != "ort":
                        k = s.report()
                        cell["precision"] = k["precision"]
                except EvalError as e:
                    cell["error"] = str(e)
                cells[(label, rt)] = cell
        # accuracy (Fashion-MNIST-shaped models)
        if args.accuracy_images:
            for label, _ in files:
                info = infos[label]
                if info.num_classes != 10 or "deit_tiny_shape" in label:
                    continue
                x, y = load_split("test")
                xs = model_input(x[:args.accuracy_images], _dcfg(info)).numpy()
                for rt in runtimes:
                    if (label, rt) in sessions:
                        cells[(label, rt)]["top1"] = top1(sessions[(label, rt)], xs, y[:args.accuracy_images].numpy())
        # latency: interleaved rounds
        rng = np.random.default_rng(0)
        inputs = {(label, b): rng.standard_normal((b, *[int(v) for v in infos[label].input_shape[1:]]),
                                                  dtype=np.float32) for label, _ in files for b in batches}
        samples: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(args.rounds):
            for label, _ in files:
                for rt in runtimes:
                    if (label, rt) not in sessions:
                        continue
                    for b in batches:
                        samples.setdefault((label, rt, b), []).append(
                            time_once(sessions[(label, rt)], inputs[(label, b)], args.iters))
        for (label, rt, b), v in samples.items():
            ms = statistics.median(v)
            cells[(label, rt)]["latency_ms"][str(b)] = ms
            cells[(label, rt)]["images_s"][str(b)] = b * 1e3 / ms
        kernels = {}
        for (label, rt), s in sessions.items():
            if rt != "ort":
                kernels[f"{label} {rt}"] = {k: v for k, v in s.report()["kernels"].items() if k != "layers"}
        sizes = {label: infos[label].size_bytes for label, _ in files}
    rows = [{"file": label, "runtime": rt, "size_bytes": sizes[label], **cells[(label, rt)]}
            for label, _ in files for rt in runtimes]
    res = {"command": cmd, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "cpu": isa_summary(), "onnxruntime": ort.__version__, "openvino": openvino_version(),
           "threads": args.threads, "rounds": args.rounds, "iters": args.iters, "batches": batches,
           "accuracy_images": args.accuracy_images, "rows": rows, "openvino_kernels": kernels,
           "wall_s": time.perf_counter() - t_start}
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(res, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), render(res).encode())
    print(render(res))
    return 0


def render(res: dict[str, Any]) -> str:
    names = {"ort": "ORT (FP32 / deploy)", "ov_f32": "OpenVINO f32", "ov_bf16": "OpenVINO bf16"}
    head = " | ".join(f"bs{b} p50 ms | bs{b} img/s" for b in res["batches"])
    lines = [
        "# Latency, size and accuracy across runtimes", "",
        f"Command: `{res['command']}`  ",
        (f"CPU: {res['cpu']}; onnxruntime {res['onnxruntime']} (CPU provider, default session = fused "
         f"kernels for QDQ graphs), openvino {res['openvino']} (CPU plugin); threads "
         f"{res['threads'] or 'runtime default'}; medians over {res['rounds']} interleaved rounds of "
         f"{res['iters']} timed runs; top-1 on the first {res['accuracy_images']} Fashion-MNIST test "
         f"images; {res['created']}."), "",
        f"| file | MB | runtime | top-1 | {head} |",
        "|---|---|---|---|" + "---|---|" * len(res["batches"]),
    ]
    for r in res["rows"]:
        if "error" in r:
            lat = " | ".join("-" for _ in res["batches"] for _ in (0, 1))
            lines.append(f"| {r['file']} | {r['size_bytes'] / 1e6:.2f} | {names[r['runtime']]} | "
                         f"{r['error'].split(': ', 1)[-1][:160]} | {lat} |")
            continue
        lat = " | ".join(f"{r['latency_ms'].get(str(b), float('nan')):.2f} | {r['images_s'].get(str(b), 0):.0f}"
                         for b in res["batches"])
        t1 = f"{r['top1']:.2f}" if "top1" in r else "-"
        prec = f" ({r['precision']})" if r.get("precision") and r["precision"] not in r["runtime"] else ""
        lines.append(f"| {r['file']} | {r['size_bytes'] / 1e6:.2f} | {names[r['runtime']]}{prec} | {t1} | {lat} |")
    lines += ["", "OpenVINO int8 layers (FullyConnected etc. that ran with int8 kernels) per file:", ""]
    for k, v in res["openvino_kernels"].items():
        lines.append(f"- {k}: {v['int8_layers']} int8 / {v['int8_layers'] + v['float_layers']} ({v['compute']})")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
