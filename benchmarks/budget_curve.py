"""Budget curve (issue 11 item 4): validation top-1 against the seconds a run costs, per arm.

Each budget scales the ``cpu`` preset's images, synthesis steps and calibration epochs together
(every other field is the preset's; ``b2`` was the preset before the budget was chosen). Every (budget, arm, setting, seed) is one run of
``benchmarks/investigate_calibration.py`` (tag ``budget-<b>``; its records file, so the script
resumes and shares records with it), scored in PyTorch fake-quant on the validation slice only.
``--report`` writes the Markdown table and the PNG (top-1 against wall seconds, one panel per
setting, one line per arm).

    OMP_NUM_THREADS=1 python benchmarks/budget_curve.py --model fmnist_vit --budgets b1 b2 b3 b4 \\
        --arms noise minmax real maskaq --settings 4w4a 3w3a
    python benchmarks/budget_curve.py --report benchmarks/results/budget_curve.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import investigate_calibration as ic  # noqa: E402
from benchmarks.cpuinfo import isa_summary  # noqa: E402

#: budget -> preset fields, stated in full (not as overrides of whatever the ``cpu`` preset is today),
#: so a record's budget keeps its meaning when the preset changes. ``b2`` was the ``cpu`` preset
#: before issue 11's budget choice.
BUDGETS: dict[str, dict[str, str]] = {
    "b1": {"num_images": "32", "synth.steps": "25", "calib.epochs": "8", "calib.refresh_every": "4"},
    "b2": {"num_images": "64", "synth.steps": "50", "calib.epochs": "16", "calib.refresh_every": "8"},
    "b3": {"num_images": "128", "synth.steps": "100", "calib.epochs": "24", "calib.refresh_every": "12"},
    "b4": {"num_images": "256", "synth.steps": "150", "calib.epochs": "32", "calib.refresh_every": "16"},
}


def report(out: Path, md: Path, models: list[str] | None = None, tag: str = "budget") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskaq.io import atomic_write_bytes

    recs = [r for r in ic._records(out) if str(r.get("tag", "")).rpartition("-")[0] == tag
            and str(r["tag"]).rpartition("-")[2] in BUDGETS and (models is None or r["model"] in models)]
    if not recs:
        raise SystemExit(f"no budget records in {out}")
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in recs:
        cells.setdefault((r["model"], r["setting"], r["arm"], r["tag"].rpartition("-")[2]), []).append(r)
    lines = ["# Budget curve (validation slice only)", "", f"Configuration tag: `{tag}`.", "",
             "`python benchmarks/budget_curve.py` (command in its docstring); PyTorch fake-quant top-1 on the",
             "validation slice (training images 55,000+), never the test set. Wall and CPU seconds of the whole",
             "run (synthesis + range search + calibration), one process, `OMP_NUM_THREADS=1`; the machine was",
             f"shared with other jobs, so wall seconds are noisy (CPU seconds less so). CPU: {isa_summary()}.", "",
             "Budgets (fields set on the `cpu` preset; the rest is the preset's): " + "; ".join(
                 f"`{b}` " + " ".join(f"{k}={v}" for k, v in o.items()) for b, o in BUDGETS.items()),
             "", "| model | setting | arm | budget | seeds | val top-1 | wall s | CPU s |", "|---|---|---|---|---|---|---|---|"]
    for (model, setting, arm, b), rs in sorted(cells.items()):
        v = [r["val_top1"] for r in rs]
        cpu = [r["cpu_s"] for r in rs if "cpu_s" in r]
        lines.append(f"| {model} | {setting} | {arm} | {b} | {len(v)} | {sum(v) / len(v):.2f} | "
                     f"{sum(r['wall_s'] for r in rs) / len(rs):.0f} | {(sum(cpu) / len(cpu)) if cpu else float('nan'):.0f} |")
    atomic_write_bytes(md, ("\n".join(lines) + "\n").encode())
    panels = sorted({(m, s) for m, s, _, _ in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (model, setting) in zip(axes[0], panels):
        for arm in sorted({a for m, s, a, _ in cells if (m, s) == (model, setting)}):
            pts = sorted((sum(r["wall_s"] for r in rs) / len(rs), sum(r["val_top1"] for r in rs) / len(rs), b)
                         for (m, s, a, b), rs in cells.items() if (m, s, a) == (model, setting, arm))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arm)
            for x, y, b in pts:
                ax.annotate(b, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds per run (log)")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(f"{model} {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = md.with_suffix(".png")
    tmp = png.with_name("." + png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--arms", nargs="+", default=["noise", "minmax", "real", "maskaq"], choices=sorted(ic.ARM_METHOD))
    ap.add_argument("--settings", nargs="+", default=["4w4a", "3w3a"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides applied to every budget")
    ap.add_argument("--val-limit", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=ic.DEFAULT_OUT)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--report-models", nargs="+", default=None)
    ap.add_argument("--tag", default="budget", help="records are tagged TAG-<budget> (one tag per configuration)")
    args = ap.parse_args(argv)
    if args.report is not None:
        report(args.out, args.report, args.report_models, args.tag)
        return 0
    for b in args.budgets:
        sets = [f"{k}={v}" for k, v in BUDGETS[b].items()] + list(args.overrides)
        cmd = ["--model", args.model, "--arms", *args.arms, "--settings", *args.settings,
               "--seeds", *map(str, args.seeds), "--tag", f"{args.tag}-{b}", "--val-limit", str(args.val_limit),
               "--out", str(args.out)]
        for s in sets:
            cmd += ["--set", s]
        print(json.dumps({"budget": b, "overrides": sets}), flush=True)
        ic.main(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
