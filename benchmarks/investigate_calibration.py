"""Calibration on the validation slice only: which start, which budget, which guard (issue 11).

Runs pipeline arms (``minmax`` = PSAQ-style synthesis + plain min/max PTQ, ``noise``, ``real``
(64 training images), ``maskaq``, ``mimiq``...) on one reference model with a preset and dotted
overrides, scores the calibrated fake-quant model in PyTorch on the validation slice (training
images 55,000-59,999; never the test set), and appends one JSON record per run to
``--out/records.jsonl`` (finished runs are skipped, so the script resumes). ``--tag`` names a
configuration so several can sit side by side; ``--report`` writes a Markdown table of all
records grouped by tag.

    python benchmarks/investigate_calibration.py --model fmnist_vit --arms noise real maskaq \\
        --settings 4w4a 3w3a --tag cpu-new
    python benchmarks/investigate_calibration.py --model fmnist_vit --arms noise --settings 4w4a \\
        --tag lsq-init --set calib.init=lsq --set calib.weight_clip=none
    python benchmarks/investigate_calibration.py --report benchmarks/results/calibration.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fmnist import load_split, model_input  # noqa: E402

DEFAULT_OUT = ROOT / "runs" / "investigate_calibration"
ARM_METHOD = {"minmax": "psaq", "psaq": "psaq", "noise": "noise", "real": "real", "maskaq": "maskaq",
              "mimiq": "mimiq"}


def _key(r: dict[str, Any]) -> tuple:
    return (r["tag"], r["model"], r["arm"], r["setting"], r["seed"])


def _records(out: Path) -> list[dict[str, Any]]:
    p = out / "records.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def val_images(model_name: str, dcfg: Any, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation slice, preprocessed for the model (grey 28x28 -> its input size/channels)."""
    x, y = load_split("val")
    x, y = x[:limit], y[:limit]
    return prepare(x, dcfg), y


def prepare(x_uint8: torch.Tensor, dcfg: Any) -> torch.Tensor:
    """uint8 [N, 28, 28] -> the model's input exactly as ``maskaq-eval`` feeds it."""
    return model_input(x_uint8, dcfg)


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def run_one(model: str, arm: str, setting: str, seed: int, preset: str, overrides: dict[str, str],
            out: Path, val_limit: int) -> dict[str, Any]:
    from maskaq.models import load_model
    from maskaq.pipeline import RunConfig, run_pipeline
    from maskaq.presets import apply_overrides, get_preset

    w, a = int(setting.split("w")[0]), int(setting.split("w")[1].rstrip("a"))
    lm = load_model(model)
    dcfg = lm.data_config
    real = None
    if arm == "real":  # real training images: never the validation slice or the test set
        n = apply_overrides(get_preset(preset), overrides).num_images
        xs, _ = load_split("train")
        idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(10_000 + seed))[:n]
        real = prepare(xs[idx], dcfg)
    cfg = RunConfig(model=model, method=ARM_METHOD[arm], w_bits=w, a_bits=a, preset=preset, seed=seed,
                    overrides=overrides)
    run_dir = out / "runs" / f"{abs(hash((model, arm, setting, seed, preset, tuple(sorted(overrides.items()))))):x}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0, c0 = time.time(), time.process_time()
    res = run_pipeline(cfg, run_dir, device="cpu", progress=False, real_data=real)
    wall, cpu = time.time() - t0, time.process_time() - c0
    x, y = val_images(model, dcfg, val_limit)
    rec = {"model": model, "arm": arm, "setting": setting, "seed": seed, "preset": preset, "overrides": overrides,
           "val_top1": round(top1(res.Q, x, y), 2), "val_images": len(y), "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1),
           "threads": torch.get_num_threads()}
    calib = res.calib
    if calib is not None:
        rec["guard"] = None if calib.guard is None else {
            "kept": calib.guard.get("kept"), "kept_epoch": calib.guard.get("kept_epoch"),
            "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                        for h in calib.guard["history"]]}
        rec["init_s"] = None if calib.init is None else calib.init["time_s"]
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return rec


def write_report(out: Path, md: Path) -> None:
    from maskaq.io import atomic_write_bytes

    recs = _records(out)
    lines = ["# Calibration investigation (validation slice only)", "",
             "Produced by `python benchmarks/investigate_calibration.py` (commands in the docstring and in",
             "docs/RESULTS.md); PyTorch fake-quant top-1 on the first N validation images (training images",
             f"55,000+), never the test set. CPU: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores.", ""]
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in recs:
        by.setdefault((r["model"], r["tag"]), []).append(r)
    lines += ["| model | tag | overrides | arm | setting | seeds | val top-1 | wall s | kept |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, tag), rs in sorted(by.items()):
        cells: dict[tuple, list[dict[str, Any]]] = {}
        for r in rs:
            cells.setdefault((r["arm"], r["setting"]), []).append(r)
        for (arm, setting), cr in sorted(cells.items()):
            v = [c["val_top1"] for c in cr]
            mean = sum(v) / len(v)
            kept = ",".join(str((c.get("guard") or {}).get("kept_epoch", "-")) for c in cr)
            ov = " ".join(f"{k}={val}" for k, val in sorted(cr[0]["overrides"].items())) or "-"
            lines.append(f"| {model} | {tag} | {ov} | {arm} | {setting} | {len(v)} | {mean:.2f} "
                         f"({', '.join(f'{x:.2f}' for x in v)}) | {sum(c['wall_s'] for c in cr) / len(cr):.0f} | {kept} |")
    lines.append("")
    lines.append("`kept`: the epoch whose state the guard kept (-1 = the range initialisation; '-' = no guard).")
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--arms", nargs="+", default=["minmax", "noise", "real", "maskaq"], choices=sorted(ARM_METHOD))
    ap.add_argument("--settings", nargs="+", default=["4w4a", "3w3a"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--val-limit", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--report", type=Path, default=None, help="write the Markdown table of all records and exit")
    args = ap.parse_args(argv)
    if args.report is not None:
        write_report(args.out, args.report)
        return 0
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in _records(args.out)}
    for setting in args.settings:
        for arm in args.arms:
            for seed in args.seeds:
                key = (args.tag, args.model, arm, setting, seed)
                if key in done:
                    continue
                rec = run_one(args.model, arm, setting, seed, args.preset, overrides, args.out, args.val_limit)
                rec["tag"] = args.tag
                with open(args.out / "records.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: rec[k] for k in ("tag", "model", "arm", "setting", "seed", "val_top1", "wall_s")}
                                 | {"kept": (rec.get("guard") or {}).get("kept_epoch")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
