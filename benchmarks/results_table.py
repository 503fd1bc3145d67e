"""The results table of docs/RESULTS.md (issue 6): every arm on the Fashion-MNIST reference ViT.

Each arm = (method, bit setting, seed): run the pipeline (synthesise / calibrate), export the
QDQ ONNX (profile ``ort``), score it with ``runtime_eval`` (exact mode, all 10k test images) and
score the same Q in PyTorch fake-quant on the same images. One JSON record per arm under
``--out/records``; a finished arm is never recomputed, an interrupted one resumes from its
checkpoints. ``--report`` (default on) rewrites docs/results.json, the table in docs/RESULTS.md
and the PNGs from whatever records exist.

    python benchmarks/results_table.py                       # everything (resumable)
    python benchmarks/results_table.py --only maskaq --settings 3w3a --seeds 0
    python benchmarks/results_table.py --split val           # tuning runs: score the validation slice
    python benchmarks/results_table.py --model fmnist_vit --only spdfq psaq --settings 4w4a

Methods come from the recipe registry (``maskaq.recipes``); every record names its ``model``
(``--model``: any reference model with Fashion-MNIST labels; runs of a model other than the
default live under ``runs/<model>__...`` and its records are ``<model>__...json``).

Tune only with ``--split val`` (training images 55,000-59,999); the test split is for the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist import load_split, model_input  # noqa: E402

from maskaq.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from maskaq.recipes import RECIPES  # noqa: E402

MODEL = "fmnist_vit"  # the default reference model; --model picks another
MAIN_METHODS = ["real", "noise", "psaq", "psaq_maskaq_settings", "mimiq", "spdfq", "maskaq"]
MAIN_SETTINGS = ["4w4a", "3w3a", "4w8a"]
ABLATIONS = ["no_de", "no_maa", "no_calib_mask", "no_refresh"]
ABLATION_SETTING = "3w3a"
#: Other recipes' variants (arm name, method, ablations): every main setting. ``spdfq-own_stage``
#: is SPDFQ through its own learning stage (block-wise reconstruction + log2 softmax quantizer).
VARIANTS = [("spdfq-own_stage", "spdfq", ("own_stage",))]
VARIANT_ARMS = [v[0] for v in VARIANTS]
LABELS = {**{n: r.title for n, r in RECIPES.items()}, "real": "Real data (upper bound)",
          "maskaq-no_de": "MaskAQ w/o L_DE", "maskaq-no_maa": "MaskAQ w/o L_MAA",
          "maskaq-no_calib_mask": "MaskAQ w/o calibration mask", "maskaq-no_refresh": "MaskAQ w/o refresh",
          "spdfq-own_stage": "SPDFQ, its own stage (block-wise + log2)"}
assert all(m in RECIPES for m in MAIN_METHODS), "MAIN_METHODS names a method maskaq.recipes does not have"


def _prefix(model: str) -> str:
    """Run-directory / record-name prefix of a model (none for the default, so older runs resume)."""
    return "" if model == MODEL else f"{model}__"

log = logging.getLogger("results_table")


def arms(only: list[str] | None, settings: list[str] | None) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(arm name, method, ablations, setting) in the order they run."""
    out = []
    for s in MAIN_SETTINGS:
        for m in MAIN_METHODS:
            out.append((m, m, (), s))
        for name, m, abl in VARIANTS:
            out.append((name, m, abl, s))
    for a in ABLATIONS:
        out.append((f"maskaq-{a}", "maskaq", (a,), ABLATION_SETTING))
    if only:
        out = [a for a in out if a[0] in only]
    if settings:
        out = [a for a in out if a[3] in settings]
    return out


@torch.no_grad()
def torch_top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def eval_split(split: str, data_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split(split)
    return model_input(x, data_config), y


def onnx_top1(path: Path) -> float:
    """Top-1 of the exported graph on all 10k test images, ``maskaq-eval``'s exact (reference) mode."""
    from runtime_eval import evaluate

    rep = evaluate(path, "fashion-mnist", None, mode="reference", batch_size=250, progress=False)
    return float(rep["metrics"]["top1"])


def run_arm(arm: tuple[str, str, tuple[str, ...], str], seed: int, out: Path, preset: str, device: str,
            split: str, overrides: dict[str, Any], model: str = MODEL, tag: str = "") -> dict[str, Any]:
    from export import export_onnx
    from maskaq.pipeline import RunConfig, run_pipeline

    name, method, abl, setting = arm
    w, a = int(setting.split("w")[0]), int(setting.split("w")[1].rstrip("a"))
    run_dir = out / "runs" / f"{_prefix(model)}{name}__{setting}__s{seed}{tag}"
    resume = (run_dir / "ckpt").is_dir() and any((run_dir / "ckpt").iterdir())
    t0 = time.time()
    real = None
    if method == "real":  # real training images (never the validation slice or the test set)
        from maskaq.models import load_model

        dcfg = load_model(model).data_config
        xs, _ = load_split("train")
        g = torch.Generator().manual_seed(10_000 + seed)
        from maskaq.presets import apply_overrides, get_preset

        n = apply_overrides(get_preset(preset), overrides).num_images
        idx = torch.randperm(len(xs), generator=g)[:n]
        real = model_input(xs[idx], dcfg)
    cfg = RunConfig(model=model, method=method, w_bits=w, a_bits=a, preset=preset, seed=seed, ablations=abl,
                    overrides=overrides)
    res = run_pipeline(cfg, run_dir, resume=resume, device=device, progress=sys.stderr.isatty(), real_data=real)
    t_calib = time.time() - t0
    onnx_path = run_dir / "model.onnx"
    export_onnx(res.Q.cpu(), onnx_path, data_config=res.loaded.data_config, labels=res.loaded.labels,
                source=res.loaded.source, metadata={"method": method, "config": cfg.to_json(), "seed": seed})
    x, y = eval_split(split, res.loaded.data_config)
    t_top1 = torch_top1(res.Q.cpu(), x, y)
    o_top1 = None
    if split == "test":
        o_top1 = onnx_top1(onnx_path)
    return {"model": model, "arm": name, "method": method, "ablations": list(abl), "setting": setting, "w_bits": w, "a_bits": a,
            "seed": seed, "preset": preset, "overrides": overrides, "split": split, "onnx_top1": o_top1,
            "torch_top1": t_top1, "wall_s": round(time.time() - t0, 1), "calib_wall_s": round(t_calib, 1),
            "num_images": res.report.get("plan", {}).get("num_images"),
            "synth": res.report.get("plan", {}).get("synth")}


def run_fp32(out: Path, split: str, model: str = MODEL) -> dict[str, Any]:
    from export import export_onnx
    from maskaq.models import load_model

    t0 = time.time()
    lm = load_model(model)
    path = out / "runs" / f"{_prefix(model)}fp32.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(lm.model, path, data_config=lm.data_config, labels=lm.labels, source=lm.source)  # float graph
    x, y = eval_split(split, lm.data_config)
    t = torch_top1(lm.model, x, y)
    o = onnx_top1(path) if split == "test" else None
    return {"model": model, "arm": "fp32", "method": "fp32", "ablations": [], "setting": "32w32a", "w_bits": 32, "a_bits": 32,
            "seed": 0, "split": split, "onnx_top1": o, "torch_top1": t, "wall_s": round(time.time() - t0, 1)}


def _ms(v: list[float]) -> str:
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"  # one seed: no spread to report
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def _table(recs: list[dict[str, Any]]) -> tuple[list[str], float]:
    fp = [r for r in recs if r["arm"] == "fp32"]
    lines = ["| arm | setting | seeds | ONNX top-1 (exact) | PyTorch fake-quant top-1 | max abs(ONNX - torch) | mean wall s |",
             "|---|---|---|---|---|---|---|"]
    if fp:
        r = fp[0]
        lines.append(f"| FP32 | fp32 | 1 | {r['onnx_top1']:.2f} | {r['torch_top1']:.2f} | "
                     f"{abs(r['onnx_top1'] - r['torch_top1']):.2f} | {r['wall_s']} |")
    worst = 0.0
    order = [(m, s) for s in MAIN_SETTINGS for m in MAIN_METHODS + VARIANT_ARMS] + \
        [(f"maskaq-{a}", ABLATION_SETTING) for a in ABLATIONS]
    for arm, s in order:
        rs = [r for r in recs if r["arm"] == arm and r["setting"] == s]
        if not rs:
            continue
        on = [r["onnx_top1"] for r in rs]
        tv = [r["torch_top1"] for r in rs]
        gap = max(abs(a - b) for a, b in zip(on, tv))
        worst = max(worst, gap)
        lines.append(f"| {LABELS.get(arm, arm)} | {s} | {len(rs)} | {_ms(on)} | {_ms(tv)} | {gap:.2f} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return lines, worst


def write_report(out: Path, docs: Path, command: str) -> None:
    recs = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    recs = [r for r in recs if r.get("split", "test") == "test"]
    if not recs:
        return
    for r in recs:  # records written before records named their model are of the default model
        r.setdefault("model", MODEL)
    models = sorted({r["model"] for r in recs}, key=lambda m: (m != MODEL, m))
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_json(docs / "results.json", {"models": models, "command": command, "records": recs})
    parts, worst = [], 0.0
    for model in models:
        lines, w = _table([r for r in recs if r["model"] == model])
        worst = max(worst, w)
        parts.append((f"### {model}\n\n" if len(models) > 1 else "") + "\n".join(lines))
    table = "\n\n".join(parts) + f"\n\nLargest ONNX-vs-PyTorch disagreement over all records: {worst:.2f} points.\n"
    md = docs / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Results\n"
    start, end = "<!-- results-table:start -->", "<!-- results-table:end -->"
    try:
        where = out.resolve().relative_to(ROOT)
    except ValueError:
        where = out
    block = (f"{start}\nRecords in `{where}/records` ({len(recs)}), from one or more runs of "
             f"`benchmarks/results_table.py`; the last: `{command}`\n\n{table}{end}")
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Accuracy (Fashion-MNIST reference ViT, 10k test images)\n\n" + block + "\n"
    atomic_write_bytes(md, text.encode())
    for model in models:
        mrecs = [r for r in recs if r["model"] == model]
        fp = [r for r in mrecs if r["arm"] == "fp32"]
        sfx = "" if model == MODEL else f"_{model}"
        _plot(mrecs, docs / f"results_top1_vs_bits{sfx}.png", fp[0]["onnx_top1"] if fp else None, model)
        write_sample_grids(out, docs, model)


def write_sample_grids(out: Path, docs: Path, model: str = MODEL, setting: str = "4w4a", seed: int = 0) -> None:
    """Per method: its run's own samples.png copied to ``samples_<method>[_<model>].png``, and one
    figure with a row of calibration images per method (``samples_by_method[_<model>].png``,
    :func:`maskaq.viz.save_method_grid`) from the runs' saved synthesis / first batch."""
    from maskaq.models import load_model
    from maskaq.viz import save_method_grid

    sfx = "" if model == MODEL else f"_{model}"
    rows: dict[str, torch.Tensor] = {}
    for m in MAIN_METHODS:
        run = out / "runs" / f"{_prefix(model)}{m}__{setting}__s{seed}"
        if (run / "samples.png").exists():
            shutil.copyfile(run / "samples.png", docs / f"samples_{m}{sfx}.png")
        synth = sorted((run / "ckpt").glob("synth_r*.pt"))
        if synth:
            rows[LABELS.get(m, m)] = torch.load(synth[-1], map_location="cpu", weights_only=True)["images"][:8]
    if rows:
        dcfg = load_model(model).data_config
        save_method_grid(rows, docs / f"samples_by_method{sfx}.png", mean=dcfg.mean, std=dcfg.std,
                         title=f"{model}: synthetic calibration images per method ({setting}, seed {seed})")


def _plot(recs: list[dict[str, Any]], path: Path, fp32: float | None, model: str = MODEL) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["3w3a", "4w4a", "4w8a"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in MAIN_METHODS + VARIANT_ARMS:
        xs, ys, es = [], [], []
        for i, s in enumerate(order):
            v = [r["onnx_top1"] for r in recs if r["arm"] == m and r["setting"] == s and r["onnx_top1"] is not None]
            if v:
                xs.append(i)
                ys.append(statistics.mean(v))
                es.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS.get(m, m))
    if fp32 is not None:
        ax.axhline(fp32, color="k", ls="--", lw=1, label=f"FP32 {fp32:.2f}")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("bit setting (weights w, activations a)")
    ax.set_ylabel("top-1 (%) ONNX Runtime, exact mode")
    ax.set_title(f"{model} (Fashion-MNIST): top-1 vs bit width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default=MODEL, help="reference model (alias or checkpoint) [default: %(default)s]")
    ap.add_argument("--only", nargs="+", help="arm names: fp32, " + ", ".join(MAIN_METHODS + VARIANT_ARMS) + ", maskaq-no_de, ...")
    ap.add_argument("--settings", nargs="+")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE preset override")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the arms in N worker processes (one torch thread each), then report")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/N": this process's share
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs} is invalid; valid: an integer >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from maskaq.presets import parse_overrides

    overrides = parse_overrides(args.overrides)
    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/results_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    todo: list[tuple[str, Any]] = []
    if not args.only or "fp32" in args.only:
        todo.append((f"{_prefix(args.model)}fp32__fp32__s0", None))
    for arm in arms(args.only, args.settings):
        for s in args.seeds:
            todo.append((f"{_prefix(args.model)}{arm[0]}__{arm[3]}__s{s}", (arm, s)))
    t_all = time.time()
    if args.jobs > 1 and args.worker is None:
        return _run_workers(argv if argv is not None else sys.argv[1:], args, out, command, t_all)
    if args.worker is not None:
        k, n = (int(v) for v in args.worker.split("/"))
        todo = todo[k::n]  # round robin: heavy and light arms spread over the workers
    for i, (key, job) in enumerate(todo):
        rec_path = out / "records" / (key + ("" if args.split == "test" else "__val") + ".json")
        if rec_path.exists():
            log.info("[%d/%d] %s: done already", i + 1, len(todo), key)
            continue
        log.info("[%d/%d] %s ...", i + 1, len(todo), key)
        rec = run_fp32(out, args.split, args.model) if job is None else run_arm(
            job[0], job[1], out, args.preset, args.device, args.split, overrides, args.model)
        atomic_write_json(rec_path, rec)
        log.info("[%d/%d] %s: onnx %s torch %.2f (%.0f s; %.0f s so far)", i + 1, len(todo), key,
                 "-" if rec["onnx_top1"] is None else f"{rec['onnx_top1']:.2f}", rec["torch_top1"], rec["wall_s"],
                 time.time() - t_all)
    if not args.no_report and args.split == "test":
        write_report(out, Path(args.docs), command)
    return 0


def _run_workers(argv: list[str], args: argparse.Namespace, out: Path, command: str, t_all: float) -> int:
    """``--jobs N``: the same command in N processes, each taking every N-th arm; then the report."""
    import os
    import subprocess

    rest, skip = [], False
    for a in argv:  # drop --jobs N / --jobs=N
        if skip:
            skip = False
            continue
        if a == "--jobs":
            skip = True
            continue
        if a.startswith("--jobs="):
            continue
        rest.append(a)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *rest, "--no-report",
                               "--worker", f"{k}/{args.jobs}"], env=env) for k in range(args.jobs)]
    codes = [p.wait() for p in procs]
    log.info("%d workers finished in %.0f s (exit codes %s)", args.jobs, time.time() - t_all, codes)
    if any(codes):
        return next(c for c in codes if c)
    if not args.no_report and args.split == "test":
        write_report(out, Path(args.docs), command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
