"""Does SPDFQ's TV term flatten its images? (issue 12 finding; validation slice only.)

SPDFQ's objective is ``alpha1 L_APA + L_SL + 0.05 L_TV`` (method.md §7). L_TV is read as PSAQ-ViT's
whole-batch L2-norm TV with no target ([I]). Under Adam that term can drive the images to near
constants when alpha1 is small.

For each TV weight, this script runs the SPDFQ arm (one setting, one seed, the validation slice),
then records the top-1 and the statistics of the synthetic images next to those of real
validation images: their std, their range, and their mean absolute neighbour difference.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/spdfq_tv_probe.py --model fmnist_vit --setting 3w3a --w-tv 0.05 0

Records are appended to benchmarks/results/spdfq_tv_probe.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_table as rt  # noqa: E402
from fmnist import load_split, model_input  # noqa: E402


def image_stats(t: torch.Tensor) -> dict[str, float]:
    t = t.float()
    tv = (t[..., 1:, :] - t[..., :-1, :]).abs().mean() + (t[..., :, 1:] - t[..., :, :-1]).abs().mean()
    return {"n": int(t.shape[0]), "std": round(float(t.std()), 4), "min": round(float(t.min()), 3),
            "max": round(float(t.max()), 3), "mean_abs_diff": round(float(tv), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=rt.MODEL)
    ap.add_argument("--setting", default="3w3a")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--w-tv", type=float, nargs="+", default=[0.05, 0.0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "spdfq_tv_probe"))
    args = ap.parse_args(argv)
    from maskaq.models import load_model

    out = Path(args.out)
    real = image_stats(model_input(load_split("val")[0][:512], load_model(args.model).data_config))
    for w in args.w_tv:
        t0 = time.time()
        tag = f"__tv{w:g}__n{args.num_images}"
        rec = rt.run_arm(("spdfq", "spdfq", (), args.setting), args.seed, out, "cpu", "cpu", "val",
                         {"synth.w_tv": w, "num_images": args.num_images}, model=args.model, tag=tag)
        run = out / "runs" / f"{rt._prefix(args.model)}spdfq__{args.setting}__s{args.seed}{tag}"
        synth = sorted((run / "ckpt").glob("synth_r*.pt"))
        imgs = torch.load(synth[-1], map_location="cpu", weights_only=True)["images"] if synth else None
        row = {"model": args.model, "setting": args.setting, "seed": args.seed, "num_images": args.num_images,
               "w_tv": w, "w_apa": rec["synth"]["w_apa"], "val_top1": rec["torch_top1"],
               "images": None if imgs is None else image_stats(imgs), "real_images": real,
               "wall_s": round(time.time() - t0, 1)}
        with open(ROOT / "benchmarks" / "results" / "spdfq_tv_probe.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
