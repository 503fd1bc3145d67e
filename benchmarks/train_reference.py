"""Train (or evaluate) the project's reference model: a DeiT-style timm ViT on Fashion-MNIST.

The model is timm's ``VisionTransformer`` built as ``vit_tiny_patch16_224`` with small
constructor arguments (28x28 grey input, 4x4 patches -> 7x7 grid + CLS token, 3 heads), saved
as a self-describing maskaq checkpoint that ``maskaq.models.load_model("fmnist_vit")`` loads.

Split (issue 6): training images 0..54,999 train; the last 5,000 training images are the
validation slice (quantization hyper-parameters are tuned there, never on the test set); the
10,000 t10k images are evaluated once, at the end.

Train (GPU machine). The committed checkpoint came from (one H100, 401 s of training)::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/train_reference.py --device cuda \\
        --data .fmnist --epochs 150 --time-limit 400 --out $OUT/fmnist_vit.maskaq.pt

which the time limit stopped after epoch 134 of the 150-epoch cosine schedule; without the clock,
``--epochs 150 --stop-epoch 134`` asks for the same schedule and stopping point.

Evaluate the committed checkpoint (CPU, all 10,000 test images and the 5,000 val images)::

    PYTHONPATH=. python benchmarks/train_reference.py --eval-only

``--config NAME`` picks the shape (``CONFIGS``; explicit ``--embed-dim/--depth/--heads/
--patch-size/--mlp-ratio`` override it) and the default output ``maskaq/assets/NAME.maskaq.pt``.
The second reference model ``fmnist_vit_p7`` (issue 11: width 128, depth 8, 4 heads, 7x7 patches
-> 4x4 grid + CLS, 1,596,426 parameters, 6.4 MB) was trained on the development machine's 2
shared CPU cores (no GPU lent; 2,250 s of training while 4-6 other jobs shared the cores, an
uncontended epoch takes ~100 s) with::

    OMP_NUM_THREADS=2 nice -n 10 env PYTHONPATH=. python benchmarks/train_reference.py \
        --config fmnist_vit_p7 --device cpu --threads 2 --epochs 2 --batch-size 128 --lr 2e-3 \
        --warmup-epochs 0.2 --val-every 1 --resume

val top-1 80.74 % (5,000 images; 74.24 after epoch 1), test top-1 80.00 % (10,000). Evaluate it
with ``--eval-only --config fmnist_vit_p7``. ``--resume`` saves the training state after every
epoch (``<out>.train-state.pt``) and continues from it when rerun with the same options.
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.fmnist import CLASSES, VAL_SIZE, load_split, normalize  # noqa: E402

ARCH = "vit_tiny_patch16_224"
ASSETS = _ROOT / "maskaq" / "assets"

#: --config NAME: the shapes of the project's from-scratch reference models (alias -> shape).
#: Each option given explicitly (--embed-dim, --patch-size, ...) overrides the config's value.
CONFIGS: dict[str, dict] = {
    "fmnist_vit": dict(embed_dim=96, depth=6, heads=3, patch_size=4, mlp_ratio=4.0),
    "fmnist_vit_p7": dict(embed_dim=128, depth=8, heads=4, patch_size=7, mlp_ratio=4.0),
}


def model_args(embed_dim: int, depth: int, heads: int, mlp_ratio: float, patch_size: int = 4) -> dict:
    return dict(
        img_size=28, patch_size=patch_size, in_chans=1, num_classes=10,
        embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
        global_pool="token", class_token=True,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and horizontal flip, batched on x's device.

    x: float (B, 1, H, W) in raw 0-1 pixel scale (so the padding is black background).
    """
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (oy[:, None] + ar_h[None, :])[:, :, None]  # B,H,1
    cols = (ox[:, None] + ar_w[None, :])[:, None, :]  # B,1,W
    flip = torch.rand(b, device=x.device, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], ox[:, None, None] + (w - 1 - ar_w)[None, None, :], cols)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return xp[bi, 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x_u8: torch.Tensor, y: torch.Tensor, mean, std,
             device: torch.device, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x_u8), batch):
        xb = normalize(x_u8[i:i + batch].to(device), mean, std)
        correct += (model(xb).argmax(-1).cpu() == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x_u8)


def lr_at(step: int, total: int, warmup: int, base: float, min_lr: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))


def evaluate_only(args: argparse.Namespace) -> int:
    from maskaq.models import load_model

    device = torch.device(args.device)
    t0 = time.time()
    lm = load_model(args.checkpoint, device=device) if args.checkpoint else load_model(args.config, device=device)
    dc = lm.data_config
    n_params = sum(p.numel() for p in lm.model.parameters())
    print(f"model: {lm.name} {lm.model_args} params={n_params} source={lm.source}")
    print(f"data_config: {dc}")
    xv, yv = load_split("val", args.data)
    xt, yt = load_split("test", args.data)
    val = accuracy(lm.model, xv, yv, dc.mean, dc.std, device)
    test = accuracy(lm.model, xt, yt, dc.mean, dc.std, device)
    print(f"val top-1 ({len(xv)} images, training images 55000..59999): {val:.2f}%")
    print(f"test top-1 ({len(xt)} t10k images): {test:.2f}%")
    print(f"torch {torch.__version__} on {device} ({platform.machine()}), {time.time() - t0:.1f}s")
    return 0


def train(args: argparse.Namespace) -> int:
    import timm
    from tqdm import tqdm

    from maskaq.models import DataConfig, save_checkpoint

    device = torch.device(args.device)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 training, portable numbers
        torch.backends.cudnn.allow_tf32 = False

    xtr, ytr = load_split("train", args.data)
    xv, yv = load_split("val", args.data)
    xf = xtr.float() / 255.0
    mean, std = (round(xf.mean().item(), 4),), (round(xf.std().item(), 4),)
    del xf
    print(f"train {len(xtr)} / val {len(xv)} (last {VAL_SIZE} training images); mean={mean} std={std}")

    margs = model_args(args.embed_dim, args.depth, args.heads, args.mlp_ratio, args.patch_size)
    model = timm.create_model(ARCH, pretrained=False, **margs).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ARCH} {margs}: {n_params} parameters; grid {model.patch_embed.grid_size}")

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in ("cls_token", "pos_embed") else decay).append(p)
    opt_kw = dict(lr=args.lr, betas=(0.9, 0.999))
    if device.type == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kw)

    x_dev = xtr.to(device).float().div_(255.0).unsqueeze(1)  # the whole train split on the device
    y_dev = ytr.to(device)
    m_t = torch.tensor(mean, device=device).view(1, 1, 1, 1)
    s_t = torch.tensor(std, device=device).view(1, 1, 1, 1)
    g_shuffle = torch.Generator().manual_seed(args.seed)
    g_aug = torch.Generator(device=device).manual_seed(args.seed + 1)

    n = len(xtr)
    steps_per_epoch = n // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    warmup = int(round(steps_per_epoch * args.warmup_epochs))
    print(f"{args.epochs} epochs x {steps_per_epoch} steps (batch {args.batch_size}), warm-up {args.warmup_epochs} epochs")

    out = Path(args.out)
    state_path = Path(f"{out}.train-state.pt")  # written after every epoch; --resume continues from it
    step, start_epoch, history, spent = 0, 0, [], 0.0
    if args.resume and state_path.is_file():
        st = torch.load(str(state_path), map_location="cpu", weights_only=False)
        if st["argv"] != _schedule_args(args):
            print(f"error: {state_path} was written by another schedule ({st['argv']}); delete it or "
                  "rerun with the same options", file=sys.stderr)
            return 2
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        g_shuffle.set_state(st["g_shuffle"])
        g_aug.set_state(st["g_aug"])
        step, start_epoch, history, spent = st["step"], st["epoch"], st["history"], st["seconds"]
        print(f"resumed from {state_path}: epoch {start_epoch}, step {step}, {spent:.0f}s trained")
    t0 = time.time() - spent
    stopped_early = False
    bar = tqdm(range(start_epoch, args.epochs), desc="train", mininterval=5.0, file=sys.stdout)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=g_shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(x_dev[idx], g_aug)
            xb = (xb - m_t) / s_t
            lr = lr_at(step, total, warmup, args.lr, args.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(xb), y_dev[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            loss_sum += loss.detach()
            step += 1
        train_loss = (loss_sum / steps_per_epoch).item()
        rec = {"epoch": epoch + 1, "train_loss": round(train_loss, 4)}
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            rec["val_top1"] = round(accuracy(model, xv, yv, mean, std, device), 2)
        history.append(rec)
        bar.set_postfix(loss=f"{train_loss:.4f}", val=rec.get("val_top1", "-"), lr=f"{lr:.2e}")
        if "val_top1" in rec:
            print(f"epoch {epoch + 1}: loss {train_loss:.4f} val {rec['val_top1']:.2f}% "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if args.resume:
            from maskaq.io import atomic_torch_save

            atomic_torch_save({"argv": _schedule_args(args), "model": model.state_dict(), "opt": opt.state_dict(),
                               "g_shuffle": g_shuffle.get_state(), "g_aug": g_aug.get_state(), "step": step,
                               "epoch": epoch + 1, "history": history, "seconds": time.time() - t0}, state_path)
        if args.stop_epoch and epoch + 1 == args.stop_epoch < args.epochs:
            print(f"--stop-epoch {args.stop_epoch}: stopping after epoch {epoch + 1} of {args.epochs}")
            stopped_early = True
            break
        if args.time_limit and time.time() - t0 > args.time_limit and epoch + 1 < args.epochs:
            print(f"time limit {args.time_limit}s reached after epoch {epoch + 1}; stopping early")
            stopped_early = True
            break
    bar.close()
    train_s = time.time() - t0

    model.eval()
    val_top1 = accuracy(model, xv, yv, mean, std, device)
    xt, yt = load_split("test", args.data)
    test_top1 = accuracy(model, xt, yt, mean, std, device)  # once, at the end
    print(f"final: val top-1 {val_top1:.2f}%  test top-1 {test_top1:.2f}%  ({train_s:.0f}s training)")

    model = model.cpu().float()
    dcfg = DataConfig(input_size=(1, 28, 28), mean=mean, std=std, crop_pct=1.0, interpolation="bilinear")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    extra = {
        "dataset": "Fashion-MNIST (Debian package fashion-mnist)",
        "split": {
            "train": "training images 0..54999 (55000)",
            "val": f"training images 55000..59999 (last {VAL_SIZE}); tune quantization here",
            "test": "t10k, 10000 images; evaluated once at the end of training",
        },
        "normalization": "mean/std of the 55000 training-split pixels on the 0-1 scale",
        "epochs": len(history), "epochs_planned": args.epochs, "stopped_early": stopped_early,
        "batch_size": args.batch_size, "optimizer": "AdamW", "lr": args.lr, "min_lr": args.min_lr,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs, "schedule": "cosine (per step)",
        "label_smoothing": args.label_smoothing, "clip_grad": args.clip_grad,
        "augmentation": "random crop 28 with zero padding 2, horizontal flip p=0.5",
        "seed": args.seed, "params": n_params, "config": args.config,
        "val_top1": round(val_top1, 2), "test_top1": round(test_top1, 2),
        "train_seconds": round(train_s, 1), "device": dev_name, "torch": torch.__version__,
        "timm": timm.__version__,
        "command": "PYTHONPATH=. python3 benchmarks/train_reference.py " + " ".join(sys.argv[1:]),
        "history": history,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, ARCH, margs, dcfg, labels=CLASSES, extra=extra)  # atomic
    state_path.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


def _schedule_args(args: argparse.Namespace) -> dict:
    """The options a resumed run must share with the one that wrote the state."""
    keys = ("config", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
            "clip_grad", "embed_dim", "depth", "heads", "mlp_ratio", "patch_size", "seed")
    return {k: getattr(args, k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="folder with the four Fashion-MNIST files "
                   "(default: $MASKAQ_FMNIST, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="fmnist_vit", choices=sorted(CONFIGS),
                   help="which reference model: its shape (" + "; ".join(
                       f"{k}: width {v['embed_dim']}, depth {v['depth']}, {v['heads']} heads, patch {v['patch_size']}"
                       for k, v in CONFIGS.items()) + ") and default --out maskaq/assets/<config>.maskaq.pt")
    p.add_argument("--out", default=None, help="checkpoint to write (atomically; default "
                   "maskaq/assets/<config>.maskaq.pt)")
    p.add_argument("--eval-only", action="store_true",
                   help="do not train: load the checkpoint and report val and test top-1")
    p.add_argument("--checkpoint", default=None,
                   help="with --eval-only: a checkpoint file (default: the --config alias)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5, help="may be fractional")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0, help="0 = off")
    p.add_argument("--embed-dim", type=int, default=None, help="default: the config's")
    p.add_argument("--depth", type=int, default=None, help="default: the config's")
    p.add_argument("--heads", type=int, default=None, help="default: the config's")
    p.add_argument("--patch-size", type=int, default=None, help="default: the config's (28 must divide by it)")
    p.add_argument("--mlp-ratio", type=float, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--resume", action="store_true",
                   help="save the training state after every epoch (<out>.train-state.pt) and continue "
                   "from it if it is there")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop after the epoch that passes this many seconds of training (0 = off)")
    p.add_argument("--stop-epoch", type=int, default=0,
                   help="stop after this epoch while the lr schedule stays laid out over --epochs "
                   "(0 = off); the committed checkpoint = --epochs 150 --stop-epoch 134")
    args = p.parse_args(argv)
    for k, v in CONFIGS[args.config].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if 28 % args.patch_size:
        p.error(f"--patch-size {args.patch_size} does not divide the 28 px image; valid: 1, 2, 4, 7, 14, 28")
    if args.embed_dim % args.heads:
        p.error(f"--embed-dim {args.embed_dim} is not a multiple of --heads {args.heads}")
    if args.out is None:
        args.out = str(ASSETS / f"{args.config}.maskaq.pt")
    return evaluate_only(args) if args.eval_only else train(args)


if __name__ == "__main__":
    sys.exit(main())
