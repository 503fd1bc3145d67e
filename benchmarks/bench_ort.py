"""ORT latency/throughput and export cost: FP32 vs 8w8a vs 4w4a, exact and deploy modes (issue 6).

For the Fashion-MNIST reference ViT and a DeiT-tiny-shaped model (random weights: speed only),
in one run, side by side: export time, ONNX file size, and ORT p50 latency / throughput at
batch 1 and 32 (median of ``--repeats`` measurements of ``--iters`` runs each) on the CPU
provider. The quantized models are initialised on one random batch (speed does not depend on
calibration). Writes ``benchmarks/results/ort.md``.

    python benchmarks/bench_ort.py                 # both models
    python benchmarks/bench_ort.py --models fmnist_vit --iters 20
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export import export_onnx  # noqa: E402
from maskaq.io import atomic_write_bytes  # noqa: E402
from maskaq.models import load_model  # noqa: E402
from maskaq.qmodel import QuantConfig, quantize_model  # noqa: E402
from runtime_eval.latency import measure_latency  # noqa: E402
from runtime_eval.session import cpu_model, cpu_vnni, create_session  # noqa: E402

MODELS = {
    "fmnist_vit": ("fmnist_vit", {}),
    "deit_tiny_shape": ("deit_tiny_patch16_224", {"pretrained": False}),
}
SETTINGS = ["fp32", "8w8a", "4w4a"]


def build(name: str, setting: str):
    alias, kw = MODELS[name]
    torch.manual_seed(0)
    lm = load_model(alias, **kw)
    if setting == "fp32":
        return lm, lm.model
    Q = quantize_model(lm.model, QuantConfig.parse(setting))
    with torch.no_grad():
        Q(torch.randn(8, *lm.data_config.input_size))  # initialise activation quantizers
    return lm, Q


def op_profile(path: Path, mode: str, chw: tuple, batch: int, iters: int, threads: int, tmp: str) -> dict[str, float]:
    """Share of ORT's kernel time per op type (percent) over ``iters`` runs at ``batch``, from ORT's
    own profiler, with the session options of ``create_session`` for ``mode``."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tmp) / f"prof_{path.stem}_{mode}")
    if mode == "reference":
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, *chw), dtype=np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(iters):
        sess.run(None, {name: x})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    agg: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"]
    total = sum(agg.values()) or 1
    return {k: 100.0 * v / total for k, v in agg.most_common()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    ap.add_argument("--profile-batch", type=int, default=32, help="batch of the op-type profile (0: no profile)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ort.md"))
    args = ap.parse_args(argv)
    cmd = "python benchmarks/bench_ort.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    profiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            files = {}
            for setting in SETTINGS:
                lm, M = build(name, setting)
                path = Path(tmp) / f"{name}.{setting}.onnx"
                t0 = time.perf_counter()
                export_onnx(M, path, data_config=lm.data_config, labels=lm.labels, source=lm.source,
                            metadata={"method": "speed-test", "seed": 0})
                files[setting] = (path, time.perf_counter() - t0, path.stat().st_size)
            chw = tuple(lm.data_config.input_size)
            fp32_size = files["fp32"][2]
            for setting in SETTINGS:
                path, t_exp, size = files[setting]
                for mode in (["reference"] if setting == "fp32" else ["reference", "deploy"]):
                    sess = create_session(path, providers=["cpu"], mode=mode, threads=args.threads)
                    for b in args.batches:
                        p50, thr = [], []
                        for _ in range(args.repeats):
                            r = measure_latency(sess, "input", chw, [b], warmup=3, iters=args.iters)["batch_sizes"][str(b)]
                            p50.append(r["p50_ms"])
                            thr.append(r["throughput_img_s"])
                        rows.append(dict(model=name, setting=setting, mode=mode if setting != "fp32" else "-", batch=b,
                                         p50=statistics.median(p50), thr=statistics.median(thr), export_s=t_exp,
                                         size=size, size_ratio=size / fp32_size))
                    if args.profile_batch:
                        profiles.append((name, setting, mode if setting != "fp32" else "-",
                                         op_profile(path, mode, chw, args.profile_batch, 3, args.threads, tmp)))
    fp = {(r["model"], r["batch"]): r["p50"] for r in rows if r["setting"] == "fp32"}
    lines = ["# ORT latency, throughput and export cost\n", f"Command: `{cmd}`  ",
             f"CPU: {cpu_model()} (VNNI: {cpu_vnni()}), torch {torch.__version__}, CPU provider. "
             f"Medians of {args.repeats} measurements of {args.iters} timed runs each after warm-up.\n",
             "| model | setting | ORT mode | batch | p50 ms | images/s | p50 vs FP32 | export s | ONNX MB | size vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['mode']} | {r['batch']} | {r['p50']:.2f} | {r['thr']:.0f} | "
                     f"{r['p50'] / fp[(r['model'], r['batch'])]:.2f}x | {r['export_s']:.1f} | {r['size'] / 1e6:.2f} | "
                     f"{r['size_ratio']:.2f}x |")
    if profiles:
        ops = ["MatMul", "FusedMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "Gemm", "QGemm", "Clip",
               "QuantizeLinear", "DequantizeLinear", "Add", "BiasGelu", "LayerNormalization", "Softmax", "Transpose"]
        lines += ["", f"## Where the time goes at batch {args.profile_batch} (ORT profiler: % of kernel time by op type)", "",
                  "| model | setting | ORT mode | " + " | ".join(ops) + " | other |",
                  "|---|---|---|" + "---|" * (len(ops) + 1)]
        for name, setting, mode, prof in profiles:
            other = 100.0 - sum(prof.get(o, 0.0) for o in ops)
            lines.append(f"| {name} | {setting} | {mode} | " + " | ".join(f"{prof.get(o, 0.0):.1f}" for o in ops)
                         + f" | {other:.1f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(args.out, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
