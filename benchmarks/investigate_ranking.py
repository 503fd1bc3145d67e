"""Why (or whether) the data-free methods rank as the paper says on the Fashion-MNIST reference ViT.

Only the validation slice (training images 55,000-59,999) is used here; the test set is for the
table in docs/RESULTS.md alone. Two measurements, both resumable:

1. ``rescore``: every calibrated model the results table produced (``calibrated.pt`` in each run
   folder of ``--table``) scored on the validation slice in PyTorch fake-quant (seconds each, no
   recalibration), so the ranking on validation can be set beside the ranking on test.
2. ``budget``: the synthesis methods re-run with a larger synthesis budget (``--steps``, the
   table's preset uses 50 of the paper's 2,000 steps) and, separately, a larger calibration
   budget (``--epochs``), scored on the validation slice, to see whether the gap to Gaussian noise
   depends on the budget the 2-hour table forces.

    python benchmarks/investigate_ranking.py                       # both; writes benchmarks/results/ranking.md
    python benchmarks/investigate_ranking.py --what rescore
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_table as rt  # noqa: E402

from maskaq.io import atomic_write_bytes, atomic_write_json  # noqa: E402

log = logging.getLogger("investigate_ranking")


def rescore(table_out: Path, cache: Path, settings: list[str]) -> list[dict[str, Any]]:
    """Validation top-1 of every calibrated model of the results table (cached per run folder)."""
    from maskaq.pipeline import load_calibrated

    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    data = None
    for run in sorted((table_out / "runs").glob("*__*__s*")):
        state = run / "calibrated.pt"
        rec_path = table_out / "records" / f"{run.name}.json"
        if run.name.split("__")[1] not in settings:
            continue
        if not state.is_file() or not rec_path.is_file():
            continue  # unfinished arm
        hit = cache / f"{run.name}.json"
        if hit.is_file():
            rows.append(json.loads(hit.read_text()))
            continue
        Q, loaded, _ = load_calibrated(state)
        if data is None:
            data = rt.eval_split("val", loaded.data_config)
        rec = json.loads(rec_path.read_text())
        row = {"arm": rec["arm"], "setting": rec["setting"], "seed": rec["seed"],
               "val_top1": rt.torch_top1(Q, *data), "test_top1": rec["onnx_top1"]}
        atomic_write_json(hit, row)
        rows.append(row)
        log.info("%s: val %.2f (test %.2f)", run.name, row["val_top1"], row["test_top1"])
    return rows


def budget(out: Path, steps: int, epochs: int, settings: list[str], seeds: list[int]) -> None:
    """Larger synthesis / calibration budgets, validation split, via the results table's own runner.
    The table's own budget is the ``rescore`` of its models (same seeds, same runs)."""
    common = ["--split", "val", "--no-report", "--settings", *settings, "--seeds", *map(str, seeds)]
    rt.main(["--out", str(out / f"steps{steps}"), "--only", "mimiq", "maskaq",
             "--set", f"synth.steps={steps}", *common])
    rt.main(["--out", str(out / f"epochs{epochs}"), "--only", "noise", "maskaq",
             "--set", f"calib.epochs={epochs}", "--set", f"calib.refresh_every={epochs // 2}", *common])


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "records").glob("*__val.json"))]


def _cell(v: list[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")


def write(rows: list[dict[str, Any]], out: Path, steps: int, epochs: int, md: Path, command: str) -> None:
    lines = ["# Method ranking on the validation slice\n", f"Command: `{command}`\n",
             "Validation slice = training images 55,000-59,999 (never trained on, never the test set). "
             "PyTorch fake-quant top-1 (the ONNX graphs agree within 0.1 points, docs/RESULTS.md).\n"]
    if rows:
        lines += ["## 1. The results table's calibrated models, rescored on validation\n",
                  "| arm | setting | seeds | validation top-1 | test top-1 (ONNX) |", "|---|---|---|---|---|"]
        order = [(m, s) for s in rt.MAIN_SETTINGS for m in rt.MAIN_METHODS] + \
                [(f"maskaq-{a}", rt.ABLATION_SETTING) for a in rt.ABLATIONS]
        for arm, s in order:
            rs = [r for r in rows if r["arm"] == arm and r["setting"] == s]
            if rs:
                lines.append(f"| {rt.LABELS.get(arm, arm)} | {s} | {len(rs)} | {_cell([r['val_top1'] for r in rs])} | "
                             f"{_cell([r['test_top1'] for r in rs])} |")
        lines.append("")
    budgets = [(f"steps{steps}", f"{steps} synthesis steps"),
               (f"epochs{epochs}", f"{epochs} calibration epochs, refresh every {epochs // 2}")]
    recs = {k: _records(out / k) for k, _ in budgets}
    if any(recs.values()):
        seeds = sorted({r["seed"] for v in recs.values() for r in v})
        settings = sorted({r["setting"] for v in recs.values() for r in v}, key=rt.MAIN_SETTINGS.index)
        lines += ["## 2. Budget: validation top-1 at larger synthesis / calibration budgets\n",
                  f"Seeds {seeds}. The first column is the table's own budget (preset `cpu`: 64 images, 50 synthesis "
                  "steps, 16 calibration epochs, refresh every 8), i.e. section 1's models of the same seeds; each other "
                  "column changes one setting of it.\n",
                  "| method | setting | table budget | " + " | ".join(lbl for _, lbl in budgets) + " |",
                  "|---|---|---|" + "---|" * len(budgets)]
        for s in settings:
            for m in ["noise", "psaq", "mimiq", "maskaq"]:
                base = _cell([r["val_top1"] for r in rows if r["arm"] == m and r["setting"] == s and r["seed"] in seeds])
                cells = [_cell([r["torch_top1"] for r in recs[k] if r["arm"] == m and r["setting"] == s]) for k, _ in budgets]
                if any(c != "-" for c in cells):
                    lines.append(f"| {rt.LABELS[m]} | {s} | {base} | " + " | ".join(cells) + " |")
        walls = {k: _cell([r["wall_s"] for r in v]) for k, v in recs.items()}
        lines.append("\nMean wall s per arm (export and scoring included): "
                     + ", ".join(f"{k} {w}" for k, w in walls.items()) + "\n")
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="+", choices=["rescore", "budget"], default=["rescore", "budget"])
    ap.add_argument("--table", default=str(ROOT / "runs" / "results"), help="the results table's --out")
    ap.add_argument("--out", default=str(ROOT / "runs" / "ranking"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=48)
    ap.add_argument("--settings", nargs="+", default=["3w3a"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rescore-settings", nargs="+", default=["3w3a", "4w4a"])
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "results" / "ranking.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python benchmarks/investigate_ranking.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    rows = rescore(Path(args.table), out / "rescore", args.rescore_settings) if "rescore" in args.what else []
    if "budget" in args.what:
        budget(out, args.steps, args.epochs, args.settings, args.seeds)
    write(rows, out, args.steps, args.epochs, Path(args.md), command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
