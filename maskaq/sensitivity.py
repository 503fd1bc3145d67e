"""Per-quantizer sensitivity of a calibrated Q (what ORT's ``qdq_loss_debug`` and AIMET's
QuantAnalyzer report): which tensors lose the accuracy.

For every quantizer (named as in the ONNX graph, the params file and the encodings sidecar:
``blocks.3.attn.qkv.input_quantizer`` -> initializers ``<name>.scale`` / ``<name>.zero_point``):

* ``sqnr_db``: SQNR of the tensor the quantizer emits in Q (every quantizer on) against the
  float tensor at the same place in P, ``10 log10(sum p^2 / sum (p - q)^2)`` over the images
  (ORT's ``xmodel_err``: it includes the error of every quantizer upstream);
* ``qdq_sqnr_db``: the quantizer's own rounding/clipping error, its output against its own input
  in Q (ORT's ``qdq_err``);
* ``kl`` and ``top1_agreement``: the output KL(P || Q_only) (nats, mean over images) and the
  fraction of images whose top-1 class matches P's, with ONLY this quantizer enabled (AIMET's
  per-layer analysis). The ranking sorts by ``kl``, most harmful first.

Both SQNRs come from one float pass and one quantized pass per batch, with forward hooks on
every quantizer; the KL / agreement from one batched pass over the images per quantizer.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write, atomic_write_bytes, atomic_write_json
from .qmodel import quantizers

__all__ = ["analyse_quantizers", "calibration_images", "format_text", "save_chart", "write_report",
           "SENSITIVITY_SCHEMA"]

SENSITIVITY_SCHEMA = "maskaq-sensitivity/1"


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _kl_top1(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: KL(P || Q) in nats and top-1 agreement (1/0)."""
    lp = F.log_softmax(p_logits.double(), dim=-1)
    lq = F.log_softmax(q_logits.double(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    return kl, (p_logits.argmax(-1) == q_logits.argmax(-1)).double()


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):  # distilled DeiT in train mode returns (cls, dist)
        out = (out[0] + out[1]) / 2
    return out.float()


@torch.no_grad()
def analyse_quantizers(Q: nn.Module, images: torch.Tensor, *, batch_size: int = 32, sqnr_batch_size: int = 8,
                       progress: bool = True) -> dict[str, Any]:
    """Measure every quantizer of ``Q`` on ``images`` (``[N, C, H, W]``, normalised, on Q's device).

    Returns:
        ``{"schema", "num_quantizers", "whole_model": {kl, top1_agreement}, "rows": [...]}`` with
        rows sorted most harmful first (see the module docstring for the columns). Q's
        quantizer states are restored afterwards.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be [N, C, H, W] with N > 0, got {tuple(images.shape)}")
    mods = dict(quantizers(Q))
    if not mods:
        raise ValueError("the model has no quantizers")
    names = list(mods)
    prev = {n: m.enabled for n, m in mods.items()}
    was_training = Q.training
    Q.eval()
    n_img = images.shape[0]
    batches = [images[i:i + batch_size] for i in range(0, n_img, batch_size)]
    sbatches = [images[i:i + sqnr_batch_size] for i in range(0, n_img, sqnr_batch_size)]
    total = len(sbatches) + len(names) * len(batches)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sensitivity", unit="pass", file=sys.stderr, dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    cap: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            cap[name].append((inp[0].detach(), out.detach()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    sig: dict[str, float] = defaultdict(float)
    err: dict[str, float] = defaultdict(float)
    own_sig: dict[str, float] = defaultdict(float)
    own_err: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    try:
        # 1) SQNR of every quantized tensor: one float pass + one quantized pass per batch
        p_parts = []
        q_parts = []
        for x in sbatches:
            for m in mods.values():
                m.enabled = False
            cap.clear()
            p_parts.append(_logits(Q(x)))
            ref = {n: [a for a, _ in v] for n, v in cap.items()}
            for m in mods.values():
                m.enabled = True
            cap.clear()
            q_parts.append(_logits(Q(x)))
            for n, calls in cap.items():
                for (inp, out), f in zip(calls, ref.get(n, [])):
                    f64, o64, i64 = f.double(), out.double(), inp.double()
                    sig[n] += float(f64.pow(2).sum())
                    err[n] += float((f64 - o64).pow(2).sum())
                    own_sig[n] += float(i64.pow(2).sum())
                    own_err[n] += float((i64 - o64).pow(2).sum())
            cap.clear()
            bar.update(1)
        for h in handles:
            h.remove()
        handles = []
        p_logits = torch.cat(p_parts)
        kl_all, agree_all = _kl_top1(p_logits, torch.cat(q_parts))
        # 2) only one quantizer enabled at a time, every image, batched
        rows = []
        for m in mods.values():
            m.enabled = False
        for n in names:
            m = mods[n]
            m.enabled = True
            kls, agr = [], []
            for i, x in enumerate(batches):
                kl, ag = _kl_top1(p_logits[i * batch_size:i * batch_size + x.shape[0]], _logits(Q(x)))
                kls.append(kl)
                agr.append(ag)
                bar.update(1)
            m.enabled = False
            owner = n.rpartition(".")[0]
            log2 = getattr(m, "encoding", "linear") == "log2"
            rows.append({
                "quantizer": n,
                "layer": owner,
                "kind": m.kind,
                "bits": int(m.bits),
                "sqnr_db": _db(sig[n], err[n]),
                "qdq_sqnr_db": _db(own_sig[n], own_err[n]),
                "kl": float(torch.cat(kls).mean()),
                "top1_agreement": float(torch.cat(agr).mean()),
                "onnx": ({"thresholds": f"{n}.thresholds", "values": f"{n}.values"}  # log2: float ops on tables
                         if log2 else
                         {"scale": f"{n}.scale", "zero_point": f"{n}.zero_point"}
                         | ({"qweight": f"{n}.qweight", "weight": f"{owner}.weight"} if m.kind == "weight" else {})),
            })
            if log2:
                rows[-1]["encoding"] = "log2"
    finally:
        for h in handles:
            h.remove()
        for n, m in mods.items():
            m.enabled = prev[n]
        Q.train(was_training)
        bar.close()
    rows.sort(key=lambda r: (-r["kl"], r["top1_agreement"], r["sqnr_db"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    cfg = getattr(Q, "maskaq_quant_config", None)
    return {
        "schema": SENSITIVITY_SCHEMA,
        "quant": cfg.to_json() if cfg is not None else None,
        "num_quantizers": len(rows),
        "num_images": int(n_img),
        "whole_model": {"kl": float(kl_all.mean()), "top1_agreement": float(agree_all.mean())},
        "seconds": round(time.perf_counter() - t0, 3),
        "columns": {
            "sqnr_db": "SQNR (dB) of the quantized tensor in Q (all quantizers on) vs the float tensor in P",
            "qdq_sqnr_db": "SQNR (dB) of the quantizer's output vs its own input in Q (its own rounding/clipping)",
            "kl": "KL(P || Q) of the output distribution (nats, mean over images), only this quantizer on",
            "top1_agreement": "fraction of images whose top-1 class matches P's, only this quantizer on",
        },
        "rows": rows,
    }


def calibration_images(run_dir: str | os.PathLike, run_cfg: Any, data_config: Any, n: int,
                       data: str | os.PathLike | None = None) -> tuple[torch.Tensor, str]:
    """``n`` images for the analysis: a folder ``data`` if given, else the run's own calibration
    samples (the last synthesis round in ``run_dir/ckpt``, the seeded noise of ``--method
    noise``, the folder of ``--method real``).

    Raises:
        PipelineError: no images found (the message says how to supply some).
    """
    from .calibration import derive_seed
    from .pipeline import ImageFolderBatches, PipelineError

    if n <= 0:
        raise PipelineError(f"number of images must be positive, got {n}")
    folder = data if data is not None else (run_cfg.calib_data if run_cfg.method == "real" else None)
    if folder is not None:
        src = ImageFolderBatches(folder, data_config, n, limit=n, seed=derive_seed(run_cfg.seed, "real"),
                                 shuffle=False)
        return next(iter(src)), f"images from {folder}"
    ck = Path(run_dir) / "ckpt"
    rounds = sorted(ck.glob("synth_r*.pt")) if ck.is_dir() else []
    if rounds:
        obj = torch.load(str(rounds[-1]), map_location="cpu", weights_only=True)
        imgs = obj["images"][:n].float()
        return imgs, f"calibration samples {rounds[-1]} ({run_cfg.method})"
    if run_cfg.method == "noise":
        g = torch.Generator().manual_seed(derive_seed(run_cfg.seed, "noise"))
        return torch.randn((n, *data_config.input_size), generator=g), "the run's N(0,1) calibration images"
    raise PipelineError(f"no calibration samples in {str(ck)!r} (method {run_cfg.method}); pass a folder of "
                        "images with --data DIR")


def _fmt(v: float, spec: str = ".1f") -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def format_text(res: dict[str, Any], top: int = 20, command: str | None = None) -> str:
    """One screen: the whole-model numbers, the ``top`` worst quantizers, the fix."""
    wm = res["whole_model"]
    q = res.get("quant") or {}
    lines = [
        f"sensitivity of {res.get('model', {}).get('name', 'Q')} "
        f"{q.get('w_bits', '?')}w{q.get('a_bits', '?')}a on {res['num_images']} images"
        + (f" ({res['images']['source']})" if res.get("images") else ""),
        f"whole model: KL(P||Q) {wm['kl']:.4f} nats, top-1 agreement {100 * wm['top1_agreement']:.1f}%  "
        f"({res['num_quantizers']} quantizers; below: only that quantizer on)",
        "",
        f"{'rank':>4}  {'quantizer':<44} {'bits':>4} {'SQNR dB':>8} {'own dB':>7} {'KL':>9} {'top-1':>6}",
    ]
    for r in res["rows"][:top]:
        name = r["quantizer"] if len(r["quantizer"]) <= 44 else "..." + r["quantizer"][-41:]
        lines.append(f"{r['rank']:>4}  {name:<44} {r['bits']:>4} {_fmt(r['sqnr_db']):>8} "
                     f"{_fmt(r['qdq_sqnr_db']):>7} {r['kl']:>9.2e} {100 * r['top1_agreement']:>5.1f}%")
    if len(res["rows"]) > top:
        lines.append(f"      ... {len(res['rows']) - top} more in the JSON")
    worst = [r["quantizer"] for r in res["rows"][:3] if r["bits"] < 8]
    if worst:
        lines += ["", "keep the worst at 8 bit in one re-run (same command plus):",
                  "  --keep-8bit " + " ".join(worst)]
    return "\n".join(lines) + "\n"


def save_chart(res: dict[str, Any], path: str | os.PathLike, top: int = 30) -> None:
    """Horizontal bars: KL (log scale) and SQNR of the ``top`` worst quantizers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = res["rows"][:top]
    h = max(3.0, 0.28 * len(rows) + 1.4)
    fig = Figure(figsize=(12, h), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(len(rows)))[::-1]
    names = [f"{r['quantizer']} ({r['bits']}b)" for r in rows]
    kls = [max(r["kl"], 1e-12) for r in rows]
    colors = ["tab:orange" if r["kind"] == "weight" else "tab:blue" for r in rows]
    ax1.barh(ys, kls, color=colors)
    ax1.set_xscale("log")
    ax1.set_yticks(ys)
    ax1.set_yticklabels(names, fontsize=7)
    ax1.set_xlabel("KL(P || Q), only this quantizer on (nats)")
    ax1.set_title("most harmful first (blue: activation, orange: weight)", fontsize=9)
    sq = [r["sqnr_db"] if math.isfinite(r["sqnr_db"]) else 0.0 for r in rows]
    ax2.barh(ys, sq, color=colors)
    ax2.set_xlabel("SQNR vs P's float tensor (dB)")
    wm = res["whole_model"]
    fig.suptitle(f"sensitivity on {res['num_images']} images; whole model: KL {wm['kl']:.3g}, "
                 f"top-1 agreement {100 * wm['top1_agreement']:.1f}%", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _json_safe(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else (1e9 if o > 0 else -1e9)
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def write_report(res: dict[str, Any], stem: str | os.PathLike) -> dict[str, str]:
    """``<stem>.json`` (sorted table), ``<stem>.txt`` (one screen), ``<stem>.png`` (bar chart),
    each written atomically. Infinite SQNRs (an exact tensor) are written as 1e9 in the JSON."""
    stem = str(stem)
    paths = {"json": f"{stem}.json", "text": f"{stem}.txt", "png": f"{stem}.png"}
    atomic_write_json(paths["json"], json.loads(json.dumps(_json_safe(res), default=str)))
    atomic_write_bytes(paths["text"], format_text(res).encode())
    save_chart(res, paths["png"])
    return paths
