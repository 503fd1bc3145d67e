"""Why calibration destroyed the pretrained reference model (fmnist_dinov2), measured on the
validation slice only (issue 11, item 0).

One calibration at a time through the Python API, 64 real training images, scoring P-vs-Q on
the first ``--val`` validation images after the range initialisation and after every epoch, for
a set of variants (which parameters train, learning rate, the step-gradient scale, the range
start). Each variant is one JSON line in ``--out``; the Markdown summary goes to
benchmarks/results/pretrained_diagnosis.md.

    OMP_NUM_THREADS=2 python benchmarks/diagnose_pretrained.py --variants old new quantizers_only
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

#: name -> (CalibConfig overrides, quantizer step-gradient rule)
VARIANTS = {
    # the code before issue 11: LSQ+ start on one batch, step gradient scaled by numel/batch, all params
    "old": dict(init="lsq", weight_clip="none", lsq_grad="per_image"),
    # the old start, the fixed step gradient
    "lsq_fixed_grad": dict(init="lsq", weight_clip="none"),
    # min/max start (the diagnosis), old gradient / fixed gradient
    "minmax_old_grad": dict(init="minmax", weight_clip="none", lsq_grad="per_image"),
    "minmax": dict(init="minmax", weight_clip="none"),
    # the searched start
    "mse": dict(init="mse", weight_clip="mse"),
    "mse_quantizers_only": dict(init="mse", weight_clip="mse", train="quantizers"),
    "mse_lr1e-4": dict(init="mse", weight_clip="mse", lr=1e-4, lr_min=1e-6),
    # the fix: each parameter's step bounded relative to its norm
    "mse_max_update": dict(init="mse", weight_clip="mse", max_update=1e-3),
    # scale-free steps: Adam, the quantizers at lr, the model's own parameters at weight_lr
    "adam_q1e-3_w1e-5": dict(init="mse", weight_clip="mse", optimizer="adam", lr=1e-3, lr_min=1e-5, weight_lr=1e-5),
    "adam_q1e-3_w1e-4": dict(init="mse", weight_clip="mse", optimizer="adam", lr=1e-3, lr_min=1e-5, weight_lr=1e-4),
    "adam_q1e-3_w1e-6": dict(init="mse", weight_clip="mse", optimizer="adam", lr=1e-3, lr_min=1e-5, weight_lr=1e-6),
    "adam_quantizers_only": dict(init="mse", weight_clip="mse", optimizer="adam", lr=1e-3, lr_min=1e-5,
                                 train="quantizers"),
    # GPTQ rounding of the weights (maskaq.gptq) as the start, then each way of training
    "gptq_quantizers_only": dict(init="mse", weight_clip="mse", weight_init="gptq", train="quantizers"),
    "gptq_sgd": dict(init="mse", weight_clip="mse", weight_init="gptq"),
    "gptq_adam_w1e-6": dict(init="mse", weight_clip="mse", weight_init="gptq", optimizer="adam", lr=1e-3,
                            lr_min=1e-5, weight_lr=1e-6),
}


_P_CACHE: dict = {}


def top1_agree(P, Q, x, y, batch=100):
    c_q = c_p = agree = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            key = (id(P), id(x), i)
            if key not in _P_CACHE:
                _P_CACHE[key] = P(x[i:i + batch])
            zp = _P_CACHE[key]
            zq = zp if Q is P else Q(x[i:i + batch])
            c_p += int((zp.argmax(1) == y[i:i + batch]).sum())
            c_q += int((zq.argmax(1) == y[i:i + batch]).sum())
            agree += int((zp.argmax(1) == zq.argmax(1)).sum())
    n = len(x)
    return 100 * c_q / n, 100 * c_p / n, 100 * agree / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_dinov2")
    ap.add_argument("--bits", default="4w8a")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretrained_diagnosis.jsonl")
    args = ap.parse_args(argv)
    import maskaq.quant as mq
    from maskaq.calibration import CalibConfig, calibrate
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model

    lm = load_model(args.model)
    P = lm.model.eval()
    dc = lm.data_config
    xs, _ = load_split("train")
    idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(10_000))[:args.images]
    real = model_input(xs[idx], dc)
    xv, yv = load_split("val")
    xv, yv = model_input(xv[:args.val], dc), yv[:args.val]
    done = set()
    if args.out.is_file():
        done = {(json.loads(l)["variant"], json.loads(l)["bits"]) for l in args.out.read_text().splitlines() if l.strip()}
    import maskaq.calibration as mc

    orig_init = mc._initial_ranges
    for name in args.variants:
        if (name, args.bits) in done:
            continue
        v = dict(VARIANTS[name])
        grad = v.pop("lsq_grad", "batch")
        torch.manual_seed(0)
        Q = quantize_model(P, QuantConfig.parse(args.bits))
        hooks = []
        if grad == "per_image":
            # the old scale: g_old = 1/sqrt(numel/B * qmax) = sqrt(B) * g_new -> multiply the step's gradient by sqrt(B)
            from maskaq.qmodel import quantizers as qs
            for _, m in qs(Q):
                if isinstance(m, mq.ActQuantizer):
                    hooks.append(m.scale.register_hook(lambda g: g * (16 ** 0.5)))
        cfg = CalibConfig(epochs=args.epochs, batch_size=16, warmup_gate_epochs=0, refresh_every=0,
                          holdout=0.125, keep_best=False, **v)
        hist = []
        t0 = time.time()

        def on_epoch(e, rec):
            q, p, a = top1_agree(P, Q, xv, yv)
            hist.append({"epoch": e, "val_top1": round(q, 2), "agree": round(a, 2), "loss": round(rec["loss"], 5)})
            print(name, hist[-1], flush=True)

        def init_and_score(*a, **k):  # score the start (after the range initialisation)
            r = orig_init(*a, **k)
            if not any(isinstance(m, mq.ActQuantizer) and not bool(m.initialized) for m in Q.modules()):
                q, p, ag = top1_agree(P, Q, xv, yv)
                hist.append({"epoch": -1, "val_top1": round(q, 2), "agree": round(ag, 2)})
                print(name, hist[-1], flush=True)
            return r

        mc._initial_ranges = init_and_score
        res = calibrate(P, Q, real, cfg, seed=0, progress=False, data_config=dc, on_epoch_end=on_epoch)
        mc._initial_ranges = orig_init
        for h in hooks:
            h.remove()
        guard = res.guard or {}
        rec = {"variant": name, "bits": args.bits, "config": {k: val for k, val in v.items()}, "lsq_grad": grad,
               "history": hist, "holdout": [{k: round(val, 5) if isinstance(val, float) else val for k, val in h.items()}
                                            for h in guard.get("history", [])],
               "fp32_val": round(top1_agree(P, P, xv, yv)[1], 2), "wall_s": round(time.time() - t0, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
