"""Weight-only INT4 on the reference model: maskaq's blocked flow vs ORT's round-to-nearest
``MatMulNBits`` quantizer (issue 14, item 3), top-1 on the 10k Fashion-MNIST test images with a
McNemar test, plus what ``session.qdq_matmulnbits_accuracy_level`` (0 vs 4) costs.

Arms (all 4-bit weights, blocks of ``--block`` input elements per output channel, float
activations):

* ``ort-rtn-sym`` / ``ort-rtn-asym``: ``onnxruntime.quantization.matmul_nbits_quantizer.
  MatMulNBitsQuantizer`` (round to nearest, symmetric / asymmetric) on the FP32 export; it
  quantizes the MatMul nodes (the 36 Linear layers; the head Gemm and the patch conv stay float).
* ``maskaq-rtn``: maskaq's blocked weight quantizer with no clipping (``s = 2 max|w| / 15``),
  every Linear including the head, patch conv per output channel.
* ``maskaq-clip``: the same plus the block-wise MSE clip search (``maskaq.ranges.
  search_weight_clip(block=B)``): no data at all, no training.
* ``maskaq-df``: the data-free weight-only flow, ``maskaq-export fmnist_vit --bits 4
  --weight-only --block-size B`` (MaskAQ synthetic data, ``cpu`` preset: block-wise clip search,
  then weights trained by distillation on the synthetic images, float activations).

Every maskaq file is also checked against PyTorch (ORT exact mode, ``session.disable_quant_qdq``:
the same top-1 on all 10k images). Latency: ORT CPU, 1 intra-op thread, medians of interleaved
runs.

    python benchmarks/bench_weight_only.py --work /tmp/wo -o benchmarks/results/weight_only.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fmnist import load_split, model_input


def mcnemar(a_ok: np.ndarray, b_ok: np.ndarray) -> dict[str, float]:
    """McNemar's test with continuity correction on paired correctness vectors."""
    b = int((a_ok & ~b_ok).sum())  # a right, b wrong
    c = int((~a_ok & b_ok).sum())
    if b + c == 0:
        return {"a_only": b, "b_only": c, "chi2": 0.0, "p": 1.0}
    chi2 = (abs(b - c) - 1) ** 2 / (b + c)
    return {"a_only": b, "b_only": c, "chi2": chi2, "p": math.erfc(math.sqrt(chi2 / 2))}


def session(path: Path, level: int | None = None, exact: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def predict(sess, x: np.ndarray, batch: int = 500) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def with_level(src: Path, dst: Path, level: int) -> Path:
    """Copy of an ORT-quantized file with every MatMulNBits node's accuracy_level set."""
    m = onnx.load(str(src))
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in list(n.attribute):
                if a.name == "accuracy_level":
                    n.attribute.remove(a)
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    onnx.save(m, str(dst))
    return dst


def ort_rtn(fp32: Path, dst: Path, block: int, symmetric: bool) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=block, is_symmetric=symmetric, accuracy_level=0)
    q.process()
    q.model.save_model_to_file(str(dst), False)
    return dst


def maskaq_static(lm, block: int, clip: bool, path: Path) -> tuple[Path, torch.nn.Module]:
    """Blocked 4-bit weight-only Q from the weights alone (no data): RTN or block-wise MSE clip."""
    from export import export_onnx
    from maskaq.qmodel import QuantConfig, quantize_model
    from maskaq.quant import WeightQuantizer
    from maskaq.ranges import search_weight_clip

    Q = quantize_model(lm.model, QuantConfig(4, 16, weight_block=block)).eval()
    if clip:
        mods = dict(Q.named_modules())
        for name, m in Q.named_modules():
            if isinstance(m, WeightQuantizer):
                owner = mods[name.rpartition(".")[0]]
                m.set_clip(search_weight_clip(owner.weight, m.bits, m.narrow, m.axis, block=m.block))
    export_onnx(Q, path, data_config=lm.data_config, metadata={"method": "clip" if clip else "rtn"})
    return path, Q


def latency(paths: dict[str, tuple[Path, int | None]], chw: tuple, batches=(1, 32), rounds: int = 7,
            iters: int = 30) -> dict[str, dict[int, float]]:
    """Median ms per call, interleaved over the files (each round runs every file once)."""
    out: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in paths}
    sess = {k: session(p, lvl) for k, (p, lvl) in paths.items()}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, *chw), dtype=np.float32)
        for s in sess.values():
            for _ in range(5):
                s.run(None, {"input": x})
        for _ in range(rounds):
            for k, s in sess.items():
                n = max(3, iters // max(1, b // 8))
                t0 = time.perf_counter()
                for _ in range(n):
                    s.run(None, {"input": x})
                out[k][b].append((time.perf_counter() - t0) / n * 1e3)
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in out.items()}


def census(path: Path, level: int | None) -> dict[str, int]:
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(td, "opt.onnx")
        if level is not None:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath)
    c: dict[str, int] = {}
    for n in m.graph.node:
        c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


def state_seconds(state: str | None) -> float | None:
    """The pipeline time a reused state's run recorded (``run.json`` beside it), if any."""
    if not state:
        return None
    try:
        return float(json.loads((Path(state).parent / "run.json").read_text())["timings"]["total_s"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def what_is_quantized(path: Path) -> str:
    m = onnx.load(str(path))
    nb = sum(n.op_type == "MatMulNBits" for n in m.graph.node)
    blk = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    pc = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n not in blk]
    if nb:
        return f"{nb} MatMul as MatMulNBits (head Gemm and patch conv float)"
    if blk or pc:
        head = any(n.name.startswith("head.") for n in blk)
        return f"{len(blk)} Linear{' incl. head' if head else ''} in blocks" + (f", {len(pc)} per channel (patch conv)" if pc else "")
    return "nothing"


def cpu_isa() -> str:
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in txt.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in txt.splitlines() if ln.startswith("Flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name}; {', '.join(isa)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the files (kept)")
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks/results/weight_only.md"))
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", default=None, help="reuse a finished weight-only run's calibrated.pt")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table from a saved weight_only.json")
    ap.add_argument("--seeds", nargs="+", default=None, metavar="SEED=FILE.onnx",
                    help="after a full run: score these weight-only files (other seeds of the same command) against "
                         "the ORT RTN files in --work and append a table to -o")
    args = ap.parse_args(argv)
    if args.render:
        write_md(json.loads(Path(args.render).read_text()), Path(args.out))
        return 0
    if args.seeds:
        return seeds_table(Path(args.work), args.seeds, Path(args.out))
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from export import export_onnx
    from maskaq.models import load_model
    from maskaq.pipeline import RunConfig, load_calibrated, run_pipeline

    t_all = time.perf_counter()
    lm = load_model("fmnist_vit")
    B = args.block
    fp32 = work / "fp32.onnx"
    export_onnx(lm.model, fp32, data_config=lm.data_config, metadata={"method": "fp32"}, write_encodings=False)
    files: dict[str, Path] = {"fp32": fp32}
    files["ort-rtn-sym"] = ort_rtn(fp32, work / "ort_rtn_sym.onnx", B, True)
    files["ort-rtn-asym"] = ort_rtn(fp32, work / "ort_rtn_asym.onnx", B, False)
    torch_models: dict[str, torch.nn.Module] = {}
    files["maskaq-rtn"], torch_models["maskaq-rtn"] = maskaq_static(lm, B, False, work / "maskaq_rtn.onnx")
    files["maskaq-clip"], torch_models["maskaq-clip"] = maskaq_static(lm, B, True, work / "maskaq_clip.onnx")
    t0 = time.perf_counter()
    if args.state:
        Q, loaded, _ = load_calibrated(args.state, "cpu")
    else:
        rc = RunConfig(model="fmnist_vit", w_bits=4, a_bits=16, weight_block=B, preset=args.preset, seed=args.seed)
        res = run_pipeline(rc, work / "maskaq_df.run", resume=(work / "maskaq_df.run").exists(), progress=False)
        Q, loaded = res.Q, res.loaded
    df_time = time.perf_counter() - t0
    Q = Q.cpu().eval()
    export_onnx(Q, work / "maskaq_df.onnx", data_config=loaded.data_config, metadata={"method": "maskaq"})
    files["maskaq-df"], torch_models["maskaq-df"] = work / "maskaq_df.onnx", Q

    x_u8, y = load_split("test")
    x = model_input(x_u8, lm.data_config).numpy()
    y = y.numpy()
    rows: dict[str, dict] = {}
    ok: dict[str, np.ndarray] = {}
    for k, p in files.items():
        row: dict = {"bytes": p.stat().st_size, "what": what_is_quantized(p)}
        for lvl in (0, 4):
            src = p
            if k.startswith("ort-rtn"):
                src = with_level(p, work / f"{p.stem}_l{lvl}.onnx", lvl)
            pred = predict(session(src, lvl), x).argmax(1)
            row[f"top1_l{lvl}"] = float((pred == y).mean() * 100)
            if lvl == 0:
                ok[k] = pred == y
        if k in torch_models:  # the file is what PyTorch computes: ORT exact mode vs torch fake-quant
            M = torch_models[k]
            with torch.no_grad():
                ref = torch.cat([M(torch.from_numpy(x[i:i + 500])) for i in range(0, len(x), 500)]).numpy()
            ex = predict(session(p, exact=True), x)
            row["exact_agree"] = float((ex.argmax(1) == ref.argmax(1)).mean() * 100)
            row["exact_max_diff"] = float(np.abs(ex - ref).max())
        rows[k] = row
    tests = {f"{a} vs {b}": mcnemar(ok[a], ok[b]) for a in ("maskaq-df", "maskaq-clip", "maskaq-rtn")
             for b in ("ort-rtn-sym", "ort-rtn-asym")}
    tests["maskaq-df vs maskaq-clip"] = mcnemar(ok["maskaq-df"], ok["maskaq-clip"])
    lat_files = {"fp32": (fp32, None)}
    for lvl in (0, 4):
        lat_files[f"maskaq-df L{lvl}"] = (files["maskaq-df"], lvl)
        lat_files[f"ort-rtn-sym L{lvl}"] = (with_level(files["ort-rtn-sym"], work / f"ort_rtn_sym_l{lvl}.onnx", lvl), None)
    lat = latency(lat_files, tuple(int(v) for v in lm.data_config.input_size))
    cen = {k: census(p, lvl) for k, (p, lvl) in lat_files.items() if k != "fp32"}
    result = {"block": B, "preset": args.preset, "seed": args.seed, "rows": rows, "mcnemar": tests, "latency_ms": lat,
              "census": cen, "cpu": cpu_isa(), "df_pipeline_s": None if args.state else round(df_time, 1),
              "state": args.state, "state_pipeline_s": state_seconds(args.state),
              "total_s": round(time.perf_counter() - t_all, 1)}
    import onnxruntime

    result["versions"] = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    (work / "weight_only.json").write_text(json.dumps(result, indent=1))
    write_md(result, Path(args.out))
    print(json.dumps({k: v for k, v in result.items() if k != "census"}, indent=1))
    return 0


def seeds_table(work: Path, seeds: list[str], out: Path) -> int:
    from maskaq.io import atomic_write_bytes
    from maskaq.models import load_model

    lm = load_model("fmnist_vit")
    x_u8, y = load_split("test")
    x, y = model_input(x_u8, lm.data_config).numpy(), y.numpy()
    ok = {k: predict(session(work / f"{k.replace('-', '_')}_l0.onnx", 0), x).argmax(1) == y
          for k in ("ort-rtn-sym", "ort-rtn-asym")}
    L = ["", ("Seeds of the data-free arm (`maskaq-export fmnist_vit --bits 4 --weight-only --block-size 32 --seed S`), "
         "top-1 at L0 and McNemar against ORT's round to nearest (`python benchmarks/bench_weight_only.py --work DIR "
         "--seeds 0=FILE ...`):"), "",
         "| seed | top-1 | vs rtn-sym: a_only / b_only, p | vs rtn-asym: a_only / b_only, p |", "|---|---|---|---|"]
    accs = []
    for item in seeds:
        seed, _, f = item.partition("=")
        o = predict(session(Path(f), 0), x).argmax(1) == y
        accs.append(o.mean() * 100)
        a, b = mcnemar(o, ok["ort-rtn-sym"]), mcnemar(o, ok["ort-rtn-asym"])
        L.append(f"| {seed} | {accs[-1]:.2f} | {a['a_only']} / {a['b_only']}, {a['p']:.2g} | "
                 f"{b['a_only']} / {b['b_only']}, {b['p']:.2g} |")
    L.append(f"| mean of these rows | {np.mean(accs):.2f} | rtn-sym {ok['ort-rtn-sym'].mean() * 100:.2f} | "
             f"rtn-asym {ok['ort-rtn-asym'].mean() * 100:.2f} |")
    old = out.read_text() if out.is_file() else ""
    old = old.split("\nSeeds of the data-free arm")[0].rstrip("\n") + "\n"
    atomic_write_bytes(out, (old + "\n".join(L) + "\n").encode())
    print("\n".join(L))
    return 0


def write_md(r: dict, out: Path) -> None:
    from maskaq.io import atomic_write_bytes

    B = r["block"]
    L = [f"# Weight-only INT4 (blocks of {B}) on fmnist_vit: maskaq vs ORT round-to-nearest MatMulNBits", "",
         ("`python benchmarks/bench_weight_only.py --work DIR` "
         f"(seed {r['seed']}, preset {r['preset']}; {r['total_s']:.0f} s in all, on 2 shared CPU cores; "
         + (f"the data-free run {r['df_pipeline_s']:.0f} s" if r.get("df_pipeline_s") is not None else
            f"the data-free arm from `--state` = `maskaq-export fmnist_vit --bits 4 --weight-only --block-size {r['block']}`"
            + (f", whose pipeline took {r['state_pipeline_s']:.0f} s" if r.get("state_pipeline_s") else ""))
         + "). Top-1 on the 10,000 Fashion-MNIST test images, "
         "ONNX Runtime "
         f"{r['versions']['onnxruntime']} CPU. `L0` / `L4`: `session.qdq_matmulnbits_accuracy_level` "
         "(maskaq's QDQ files, fused into MatMulNBits by ORT) or the MatMulNBits node's `accuracy_level` "
         "(ORT's quantizer output): 0 = float activations inside the kernel, 4 = activations quantized "
         "to int8 per block inside the kernel (ORT's default for QDQ files)."), "",
         "| arm | what is 4-bit | top-1 L0 | top-1 L4 | file bytes | exact mode = PyTorch |",
         "|---|---|---|---|---|---|"]
    for k, row in r["rows"].items():
        ex = "-" if "exact_agree" not in row else f"{row['exact_agree']:.2f}% top-1, max diff {row['exact_max_diff']:.1e}"
        L.append(f"| {k} | {row['what']} | {row['top1_l0']:.2f} | {row['top1_l4']:.2f} | {row['bytes']:,} | {ex} |")
    L += ["", "McNemar (continuity-corrected, at L0): `a_only` = images only the first arm gets right.", "",
          "| comparison | a_only | b_only | chi^2 | p |", "|---|---|---|---|---|"]
    for k, t in r["mcnemar"].items():
        L.append(f"| {k} | {t['a_only']} | {t['b_only']} | {t['chi2']:.2f} | {t['p']:.2g} |")
    L += ["", f"Latency (ms per call, median of interleaved runs, 1 intra-op thread; CPU: {r['cpu']}):", "",
          "| file | batch 1 | batch 32 | kernels (ORT's optimised graph) |", "|---|---|---|---|"]
    for k, d in r["latency_ms"].items():
        c = r["census"].get(k, {})
        kern = ", ".join(f"{n} {c[n]}" for n in ("MatMulNBits", "MatMul", "Gemm", "Conv", "FusedMatMul") if c.get(n))
        L.append(f"| {k} | {d['1']:.3f} | {d['32']:.3f} | {kern} |" if "1" in d else
                 f"| {k} | {d[1]:.3f} | {d[32]:.3f} | {kern} |")
    atomic_write_bytes(out, ("\n".join(L) + "\n").encode())


if __name__ == "__main__":
    raise SystemExit(main())
