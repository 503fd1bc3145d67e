"""Cost of one synthesis step (MaskAQ objective, every term) against the bare forward+backward
of P and Q at the same batch.

"bare": ``x`` (requires grad) -> ``P(x)`` and ``Q(x)`` -> ``(P(x).sum() + Q(x).sum()).backward()``
with P's and Q's parameters frozen, as during synthesis (only the images get gradients).
"step": everything :func:`maskaq.synthesis.synthesize` does per step: augmentation, P forward
with the attention records, L_IHA, L_CE, L_TV, L_DE, the adaptive mask, Q forward, L_MAA,
backward, AdamW + cosine schedule, clamp, finiteness check. Both are timed interleaved
(bare, step, bare, step, ...) so that load from other processes hits both alike; the table reports
medians. Peak memory: on CPU the process's max RSS (``resource.getrusage``) after the bare
repetitions and after the step repetitions (the max RSS only grows, so bare is measured first);
on CUDA ``torch.cuda.max_memory_allocated`` per phase.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_synthesis.py --reps 7

writes ``benchmarks/results/synthesis.md`` (with the command line) and prints the table.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import timm  # noqa: E402

from maskaq.io import atomic_write_bytes  # noqa: E402
from maskaq.models import DataConfig  # noqa: E402
from maskaq.qmodel import QuantConfig, prepare_model, quantize_model  # noqa: E402
from maskaq.synthesis import SynthConfig, _synthesis_mode, attention_layout, synthesis_step  # noqa: E402

MODELS = {
    # DeiT-T shape (224x224, patch 16, 192 wide, 12 layers, 3 heads), random weights
    "deit_tiny (random)": ("deit_tiny_patch16_224", {}),
    # the project's reference model shape (benchmarks/train_reference.py defaults)
    "fmnist_vit (1x28x28, p4, 96w, 6L, 3H)": ("vit_tiny_patch16_224", dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if platform.system() != "Darwin" else r / 2**20


def bench(label: str, arch: str, kwargs: dict, batch: int, reps: int, device: torch.device, bits: str) -> dict:
    torch.manual_seed(0)
    P = prepare_model(timm.create_model(arch, pretrained=False, **kwargs).eval()).to(device)
    Q = quantize_model(P, QuantConfig.parse(bits)).to(device)
    dc = DataConfig.from_model(P)
    C, H, W = dc.input_size
    mean = torch.tensor(dc.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dc.std, device=device).view(1, -1, 1, 1)
    lo, hi = -mean / std, (1 - mean) / std
    steps = 2000  # schedule length used for the augmentation / mask annealing
    cfg = SynthConfig(steps=steps, batch_size=batch)
    layout = attention_layout(P)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, C, H, W, generator=gen).to(device)
    labels = torch.randint(0, P.num_classes, (batch,), generator=gen).to(device)
    with torch.no_grad():
        Q(x0)  # initialise Q's activation quantizers outside the timing

    with _synthesis_mode([P, Q]):
        xb = x0.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([x], lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=cfg.lr_min)

        def bare() -> None:
            xb.grad = None
            (P(xb).sum() + Q(xb).sum()).backward()

        t_counter = [0]

        def step() -> None:
            t = t_counter[0]
            t_counter[0] += 1
            opt.zero_grad(set_to_none=True)
            total, terms, mask = synthesis_step(P, Q, x, labels, t, cfg, gen, layout, (mean, std))
            total.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)
            torch.stack([total.detach()] + [v.detach() for v in terms.values()])
            assert bool(torch.isfinite(x).all())

        for f in (bare, step):  # warm-up
            f()
        tb, ts = [], []
        rss_bare = rss_step = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            bare()
            _sync(device)
            tb.append(time.perf_counter() - t0)
        if device.type == "cuda":
            rss_bare = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        else:
            rss_bare = _maxrss_mb()
        for i in range(reps):
            # interleave one more bare run per step so both see the same machine load
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            bare()
            _sync(device)
            tb.append(time.perf_counter() - t0)
        rss_step = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _maxrss_mb()
    ms_step, ms_bare = 1000 * statistics.median(ts), 1000 * statistics.median(tb)
    return dict(model=label, batch=batch, step_ms=ms_step, bare_ms=ms_bare, ratio=ms_step / ms_bare,
                ips=batch / (ms_step / 1000), mem_bare=rss_bare, mem_step=rss_step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batch", type=int, default=8, help="batch of the DeiT-T-shaped model")
    p.add_argument("--small-batch", type=int, default=32, help="batch of the reference-sized ViT")
    p.add_argument("--bits", default="4w4a")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "synthesis.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for (label, (arch, kw)), b in zip(MODELS.items(), (args.batch, args.small_batch)):
        rows.append(bench(label, arch, kw, b, args.reps, device, args.bits))
    mem = "peak MiB (CUDA alloc)" if device.type == "cuda" else "max RSS MiB after bare / step"
    lines = [
        f"| model | batch | step ms | bare ms | ratio | images/s (step) | {mem} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['step_ms']:.1f} | {r['bare_ms']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['ips']:.1f} | {r['mem_bare']:.0f} / {r['mem_step']:.0f} |")
    table = "\n".join(lines)
    cmd = "PYTHONPATH=. python " + " ".join(["benchmarks/bench_synthesis.py", *(argv if argv is not None else sys.argv[1:])])
    env = (f"torch {torch.__version__}, timm {timm.__version__}, device {device}"
           f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
           f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
           f"median of {args.reps} repetitions, {args.bits}")
    doc = (f"# Synthesis step vs bare forward+backward of P and Q\n\n`{cmd}`\n\n{env}\n\n{table}\n\n"
           "step = one full MaskAQ synthesis step (augment, P fwd + attention records, IHA, CE, TV, DE, "
           "mask, Q fwd, MAA, backward, AdamW, clamp); bare = P(x).sum() + Q(x).sum() backward to x "
           "with frozen weights. Target ratio <= 1.25x.\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, doc.encode())
    print(table)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
