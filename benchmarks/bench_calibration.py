"""Cost of one calibration epoch (KD + masked head-wise SSIM, method.md §3) against the bare
forward+backward of P and Q over the same batches.

"epoch": what :func:`maskaq.calibration.calibrate` does per epoch: shuffle, SimCLR-style
augmentation, P forward (no grad) with the head-output records, Q forward with the records,
L_KD, masked L_HD, backward into every trainable parameter of Q, SGD Nesterov step; the time is
``calibrate``'s own per-epoch ``time_s`` (the per-epoch checkpoint write is outside it and is
timed separately, as "ckpt ms").
"bare": for the same batches, ``P(x)`` under ``no_grad`` and ``Q(x).sum().backward()`` into Q's
parameters, then the same SGD step.
The two are interleaved (one bare epoch runs in ``calibrate``'s ``on_epoch_end`` after each
calibration epoch), so load from other processes hits both alike; the table reports medians.
Peak memory on CPU is the process's max RSS (it only grows: bare epochs run first, once, before
the calibration), on CUDA ``torch.cuda.max_memory_allocated``.

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_calibration.py --reps 5 --threads 1

writes ``benchmarks/results/calibration.md`` (with the command line) and prints the table.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import timm  # noqa: E402

from maskaq.calibration import CalibConfig, calibrate  # noqa: E402
from maskaq.io import atomic_write_bytes  # noqa: E402
from maskaq.models import DataConfig  # noqa: E402
from maskaq.qmodel import QuantConfig, prepare_model, quantize_model  # noqa: E402

# smallest first: the max RSS only grows within the process, so each row's peak is its own
MODELS = {
    "fmnist_vit (1x28x28, p4, 96w, 6L, 3H)": ("vit_tiny_patch16_224", dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)),
    "deit_tiny (random)": ("deit_tiny_patch16_224", {}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if platform.system() != "Darwin" else r / 2**20


def bench(label: str, arch: str, kwargs: dict, images: int, batch: int, reps: int, device: torch.device,
          bits: str) -> dict:
    torch.manual_seed(0)
    P = prepare_model(timm.create_model(arch, pretrained=False, **kwargs).eval()).to(device)
    Q = quantize_model(P, QuantConfig.parse(bits)).to(device)
    dc = DataConfig.from_model(P)
    x_all = torch.randn(images, *dc.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        Q(x_all[:batch].to(device))  # initialise Q's activation quantizers outside the timing
    for p in P.parameters():
        p.requires_grad_(False)
    params = [p for p in Q.parameters() if p.requires_grad]
    bare_opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, nesterov=True)  # lr 0: Q unchanged by bare
    bare_times: list[float] = []

    def bare_epoch() -> None:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, images, batch):
            x = x_all[i:i + batch].to(device)
            with torch.no_grad():
                P(x)
            Q(x).sum().backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        _sync(device)
        bare_times.append(time.perf_counter() - t0)

    bare_epoch()  # warm-up, and the bare phase's peak memory
    mem_bare = _peak_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ckpt_times: list[float] = []
    cfg = CalibConfig(epochs=reps + 1, batch_size=batch, warmup_gate_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "calib.pt"
        last = [time.perf_counter()]

        def on_epoch_end(epoch: int, rec: dict) -> None:
            ckpt_times.append(time.perf_counter() - last[0] - rec["time_s"])  # after time_s: the checkpoint
            bare_epoch()
            last[0] = time.perf_counter()

        res = calibrate(P, Q, x_all, cfg, seed=0, device=device, progress=False, checkpoint_path=ck,
                        on_epoch_end=on_epoch_end, data_config=dc)
    mem_epoch = _peak_mb(device)
    ep = [e["time_s"] for e in res.epochs][1:]  # epoch 0 warms up
    ms_ep = 1000 * statistics.median(ep)
    ms_bare = 1000 * statistics.median(bare_times[2:])  # skip the warm-up and the first interleaved one
    return dict(model=label, images=images, batch=batch, epoch_ms=ms_ep, bare_ms=ms_bare, ratio=ms_ep / ms_bare,
                ips=images / (ms_ep / 1000), ckpt_ms=1000 * statistics.median(ckpt_times[1:] or ckpt_times),
                mem_bare=mem_bare, mem_epoch=mem_epoch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5, help="timed epochs (one more warms up)")
    p.add_argument("--images", type=int, nargs=2, default=[64, 32], help="images per epoch: reference shape, DeiT-T shape")
    p.add_argument("--batch", type=int, nargs=2, default=[16, 8], help="batch: reference shape, DeiT-T shape")
    p.add_argument("--bits", default="4w4a")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "calibration.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for i, (label, (arch, kw)) in enumerate(MODELS.items()):
        if label in args.models:
            rows.append(bench(label, arch, kw, args.images[i], args.batch[i], args.reps, device, args.bits))
    mem = "peak MiB (CUDA alloc) bare / epoch" if device.type == "cuda" else "max RSS MiB after bare / epoch"
    lines = [f"| model | images | batch | epoch ms | bare ms | ratio | images/s (epoch) | ckpt ms | {mem} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['images']} | {r['batch']} | {r['epoch_ms']:.1f} | {r['bare_ms']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['ips']:.1f} | {r['ckpt_ms']:.1f} | {r['mem_bare']:.0f} / {r['mem_epoch']:.0f} |")
    table = "\n".join(lines)
    cmd = "PYTHONPATH=. python " + " ".join(["benchmarks/bench_calibration.py", *(argv if argv is not None else sys.argv[1:])])
    env = (f"torch {torch.__version__}, timm {timm.__version__}, device {device}"
           f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
           f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
           f"median of {args.reps} epochs, {args.bits}")
    doc = (f"# Calibration epoch vs bare forward+backward of P and Q\n\n`{cmd}`\n\n{env}\n\n{table}\n\n"
           "epoch = one calibration epoch of `calibrate` (shuffle, SimCLR augmentation, P fwd no-grad + head-output "
           "records, Q fwd + records, L_KD, masked L_HD, backward into all of Q's parameters, SGD); bare = P(x) "
           "no-grad + Q(x).sum() backward + SGD over the same batches; ckpt = the per-epoch checkpoint write.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, doc.encode())
    print(table)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
