"""One calibration through the Python API, scored on the validation slice (issue 11; never test).

64 real training images (seeded), ``CalibConfig`` of the ``cpu`` preset's shape (16 epochs at batch
16, MSE ranges, weight clipping, 12.5 % hold-out, keep-best, no refresh) with ``KEY=VALUE``
overrides, then PyTorch fake-quant top-1 on the first N validation images. ``--start-only`` scores
the state after the range initialisation (and GPTQ, with ``weight_init=gptq``) without training.
One JSON line per run on stdout (append it to a records file to keep it).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/calib_probe.py fmnist_dinov2 4w8a --val 300 \\
        stage=blockwise+distill patience=3
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/calib_probe.py fmnist_dinov2 4w4a --val 300 stage=blockwise
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/calib_probe.py fmnist_vit 3w3a --val 2000 --start-only weight_init=gptq
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/calib_probe.py fmnist_vit 4w4a --val 2000 --start-only --softmax-quant log2
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

from benchmarks.fmnist import load_split, model_input  # noqa: E402


def _value(v: str) -> object:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("bits")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="CalibConfig fields")
    ap.add_argument("--val", type=int, default=300, help="first N validation-slice images")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-only", action="store_true")
    ap.add_argument("--softmax-quant", choices=("linear", "log2"), default="linear",
                    help="quantizer of the attention probabilities (quant.softmax_quant)")
    args = ap.parse_args(argv)
    from maskaq.calibration import CalibConfig, _initial_ranges, calibrate
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model

    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.overrides)}
    lm = load_model(args.model)
    P, dc = lm.model.eval(), lm.data_config
    xs, _ = load_split("train")
    idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(10_000 + args.seed))[:args.images]
    real = model_input(xs[idx], dc)
    xv, yv = load_split("val")
    xv, yv = model_input(xv[:args.val], dc), yv[:args.val]

    @torch.no_grad()
    def top1(M: torch.nn.Module) -> float:
        return 100 * float(sum(int((M(xv[i:i + 100]).argmax(1) == yv[i:i + 100]).sum())
                               for i in range(0, len(yv), 100))) / len(yv)

    torch.manual_seed(args.seed)
    Q = quantize_model(P, QuantConfig.parse(args.bits, softmax_quant=args.softmax_quant))
    base = dict(epochs=16, batch_size=16, warmup_gate_epochs=0, refresh_every=0, holdout=0.125, keep_best=True,
                init="mse", weight_clip="mse")
    cfg = CalibConfig(**{**base, **extra})
    t0 = time.time()
    rec: dict[str, object] = {"model": args.model, "bits": args.bits, "overrides": extra, "val_images": len(yv),
                              "softmax_quant": args.softmax_quant,
                              "start_only": args.start_only}
    if args.start_only:
        r = _initial_ranges(Q, real, cfg, args.seed, torch.device("cpu"))
        rec["gptq_err_ratio"] = (r or {}).get("gptq", {}).get("mean_err_ratio")
    else:
        res = calibrate(P, Q, real, cfg, seed=args.seed, progress=False, data_config=dc)
        g = res.guard or {}
        rec["kept"] = [g.get("kept_phase"), g.get("kept_epoch")]
        rec["holdout"] = [(h.get("phase"), h["epoch"], round(h["score"], 4)) for h in g.get("history", [])]
    rec["val_top1"] = round(top1(Q), 2)
    rec["fp32_val_top1"] = round(top1(P), 2)
    rec["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
