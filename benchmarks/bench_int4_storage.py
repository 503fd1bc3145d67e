"""INT4 weight storage (issue 14, item 4) and the integer head (item 5) on the reference model.

One calibrated fmnist_vit 4w4a state exported twice, ``--weight-storage int8`` (default, opset 20)
and ``--weight-storage int4`` (opset-21 INT4 initializers, the same integers); each file scored
on the 10k Fashion-MNIST test images in ONNX Runtime exact mode (``session.disable_quant_qdq``,
checked against PyTorch fake-quant), ORT deploy mode (its fused kernels; census of the
optimised graph: how many MatMuls run integer, whether a float Gemm is left) and OpenVINO
(CPU plugin, f32 precision), with file size and latency at batch 1 and 32 (1 thread, medians
of interleaved runs).

    python benchmarks/bench_int4_storage.py --state RUN/calibrated.pt --work /tmp/s4 \\
        -o benchmarks/results/int4_storage.md
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_weight_only import cpu_isa
from benchmarks.fmnist import load_split, model_input

INTEGER = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QGemm")


def ort_session(path: Path, exact: bool, opt_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if opt_path:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OV:
    def __init__(self, path: Path) -> None:
        import openvino as ov

        self.cm = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "INFERENCE_NUM_THREADS": 1})
        self.req = self.cm.create_infer_request()

    def run(self, _names, feed):  # the ORT session signature, so one timing loop serves both
        return [self.req.infer([feed["input"]])[0].copy()]


def predict(s, x: np.ndarray, batch: int = 500) -> np.ndarray:
    return np.concatenate([s.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", required=True, help="a finished 4w4a run's calibrated.pt (fmnist_vit)")
    ap.add_argument("--work", required=True)
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks/results/int4_storage.md"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table from a saved int4_storage.json")
    args = ap.parse_args(argv)
    if args.render:
        write_md(json.loads(Path(args.render).read_text()), Path(args.out))
        return 0
    torch.set_num_threads(1)
    from export import export_onnx
    from maskaq.pipeline import load_calibrated

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    Q, loaded, rc = load_calibrated(args.state, "cpu")
    Q = Q.eval()
    files = {}
    for st in ("int8", "int4"):
        r = export_onnx(Q, work / f"w4a4_{st}.onnx", data_config=loaded.data_config, weight_storage=st,
                        metadata={"method": rc.method})
        files[st] = r
    x_u8, y = load_split("test")
    x = model_input(x_u8, loaded.data_config).numpy()
    y = y.numpy()
    with torch.no_grad():
        ref = torch.cat([Q(torch.from_numpy(x[i:i + 500])) for i in range(0, len(x), 500)]).numpy()
    rows = {}
    sessions = {}
    for st, r in files.items():
        ex = predict(ort_session(r.path, True), x)
        with tempfile.TemporaryDirectory() as td:
            dep_s = ort_session(r.path, False, f"{td}/opt.onnx")
            cen: dict[str, int] = {}
            for n in onnx.load(f"{td}/opt.onnx").graph.node:
                cen[n.op_type] = cen.get(n.op_type, 0) + 1
        dep = predict(dep_s, x)
        ov = OV(r.path)
        ovp = predict(ov, x)
        rows[st] = {
            "bytes": r.size_bytes, "opset": r.opset,
            "torch_top1": float((ref.argmax(1) == y).mean() * 100),
            "exact_top1": float((ex.argmax(1) == y).mean() * 100),
            "exact_vs_torch_agree": float((ex.argmax(1) == ref.argmax(1)).mean() * 100),
            "exact_vs_torch_max_diff": float(np.abs(ex - ref).max()),
            "deploy_top1": float((dep.argmax(1) == y).mean() * 100),
            "deploy_vs_exact_agree": float((dep.argmax(1) == ex.argmax(1)).mean() * 100),
            "deploy_vs_exact_max_diff": float(np.abs(dep - ex).max()),
            "ov_top1": float((ovp.argmax(1) == y).mean() * 100),
            "ov_vs_exact_agree": float((ovp.argmax(1) == ex.argmax(1)).mean() * 100),
            "deploy_census": {k: cen[k] for k in sorted(cen) if k in INTEGER + ("MatMul", "Gemm", "Conv", "Sub")},
        }
        sessions[f"ORT deploy, {st}"] = dep_s
        sessions[f"OpenVINO f32, {st}"] = ov
    lat: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in sessions}
    rng = np.random.default_rng(0)
    for b in (1, 32):
        xb = rng.standard_normal((b, *x.shape[1:]), dtype=np.float32)
        for s in sessions.values():
            for _ in range(5):
                s.run(None, {"input": xb})
        for _ in range(args.rounds):
            for k, s in sessions.items():
                n = 40 if b == 1 else 8
                t0 = time.perf_counter()
                for _ in range(n):
                    s.run(None, {"input": xb})
                lat[k][b].append((time.perf_counter() - t0) / n * 1e3)
    med = {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in lat.items()}
    import onnxruntime
    import openvino

    res = {"state": str(args.state), "rows": rows, "latency_ms": med, "cpu": cpu_isa(),
           "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}}
    (work / "int4_storage.json").write_text(json.dumps(res, indent=1))
    write_md(res, Path(args.out))
    return 0


def write_md(res: dict, out: Path) -> None:
    from maskaq.io import atomic_write_bytes

    rows = res["rows"]
    med = {k: {int(b): v for b, v in d.items()} for k, d in res["latency_ms"].items()}  # JSON keys are strings
    L = ["# INT4 weight storage vs int8 storage: fmnist_vit 4w4a (ORT profile)", "",
         ("`python benchmarks/bench_int4_storage.py --state RUN/calibrated.pt --work DIR` on a MaskAQ "
         "`cpu`-preset 4w4a state (seed 0). Same calibrated integers in both files; 10,000 Fashion-MNIST "
         f"test images. ONNX Runtime {res['versions']['onnxruntime']} CPU, OpenVINO {res['versions']['openvino']} "
         f"CPU plugin (f32 precision), 1 thread each; CPU: {res['cpu']}."), "",
         ("| storage | opset | file bytes | PyTorch top-1 | ORT exact top-1 | exact = PyTorch (images; max logit diff) "
          "| ORT deploy top-1 | deploy = exact | OpenVINO top-1 | OpenVINO = exact |"),
         "|---|---|---|---|---|---|---|---|---|---|"]
    for st, r in rows.items():
        L.append(f"| {st} | {r['opset']} | {r['bytes']:,} | {r['torch_top1']:.2f} | {r['exact_top1']:.2f} | "
                 f"{r['exact_vs_torch_agree']:.2f}%; {r['exact_vs_torch_max_diff']:.1e} | {r['deploy_top1']:.2f} | "
                 f"{r['deploy_vs_exact_agree']:.2f}% | {r['ov_top1']:.2f} | {r['ov_vs_exact_agree']:.2f}% |")
    L += ["", "ORT deploy mode, kernels in the optimised graph:", ""]
    for st, r in rows.items():
        L.append(f"- {st}: " + ", ".join(f"{k} {v}" for k, v in r["deploy_census"].items()))
    L += ["", "Latency, ms per call (median of interleaved runs):", "", "| runtime, storage | batch 1 | batch 32 |",
          "|---|---|---|"]
    for k, d in med.items():
        L.append(f"| {k} | {d[1]:.3f} | {d[32]:.3f} |")
    atomic_write_bytes(out, ("\n".join(L) + "\n").encode())
    print("\n".join(L))


if __name__ == "__main__":
    raise SystemExit(main())
