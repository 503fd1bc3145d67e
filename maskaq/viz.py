"""PNG figures of a run: a grid of calibration samples (with the informative-region masks of
synthesis overlaid) and the loss curves. Matplotlib's Agg canvas is used directly, so importing
this module never changes the user's pyplot backend. Files are written atomically.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .io import atomic_write

__all__ = ["save_sample_grid", "save_method_grid", "save_loss_curves", "mask_grid_shape"]


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def mask_grid_shape(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """Grid ``(gh, gw)`` with ``gh * gw == num_tokens`` closest to the image's aspect ratio."""
    best = (1, num_tokens)
    for gh in range(1, num_tokens + 1):
        if num_tokens % gh:
            continue
        gw = num_tokens // gh
        if abs(math.log(gh / gw) - math.log(height / width)) < abs(math.log(best[0] / best[1]) - math.log(height / width)):
            best = (gh, gw)
    return best


def save_sample_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    masks: torch.Tensor | None = None,
    max_images: int = 32,
    ncols: int = 8,
    title: str | None = None,
) -> None:
    """Write a grid of samples (normalised ``[N, C, H, W]``) as PNG; one-channel images in grey.

    Args:
        images: samples in the model's normalised space. mean, std: its preprocessing.
        masks: ``[N, gh*gw]`` bool informative-region masks (synthesis) or None; masked patches
            are outlined and tinted red, the rest is dimmed.
        max_images, ncols: how many samples and columns.
    """
    x = images[:max_images].detach().float().cpu()
    n, c, h, w = x.shape
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    pix = (x * s + m).clamp(0, 1).numpy()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(1.4 * ncols, 1.4 * nrows + (0.4 if title else 0.1))
    mk = None
    if masks is not None:
        mk = masks[:max_images].detach().bool().cpu().numpy()
        gh, gw = mask_grid_shape(mk.shape[1], h, w)
        rows = (np.arange(h) * gh) // h
        cols = (np.arange(w) * gw) // w
    for i in range(n):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_axis_off()
        img = pix[i]
        if c == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            rgb = img[:3].transpose(1, 2, 0) if c >= 3 else np.repeat(img[:1], 3, 0).transpose(1, 2, 0)
            ax.imshow(rgb, vmin=0, vmax=1, interpolation="nearest")
        if mk is not None:
            grid = mk[i].reshape(gh, gw)[rows][:, cols]  # [h, w] bool
            overlay = np.zeros((h, w, 4), dtype=np.float32)
            overlay[grid] = (1.0, 0.1, 0.1, 0.30)
            overlay[~grid] = (0.0, 0.0, 0.0, 0.45)
            ax.imshow(overlay, interpolation="nearest")
            from matplotlib.patches import Rectangle

            ph, pw = h / gh, w / gw  # outline every masked patch (visible on noisy samples too)
            for t in np.flatnonzero(mk[i]):
                r_, c_ = divmod(int(t), gw)
                ax.add_patch(Rectangle((c_ * pw - 0.5, r_ * ph - 0.5), pw, ph, fill=False, edgecolor=(1.0, 0.15, 0.1),
                                       linewidth=1.0))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92 if title else 0.99, wspace=0.05, hspace=0.05)
    _save(fig, path)


def save_method_grid(
    samples: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    per_method: int = 8,
    title: str | None = None,
) -> None:
    """One PNG comparing methods: a row of ``per_method`` samples per method (normalised
    ``[N, C, H, W]`` each, labelled with the dict key), one-channel images in grey."""
    if not samples:
        raise ValueError("save_method_grid needs at least one method's samples")
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    rows = list(samples.items())
    ncols = max(1, min(per_method, max(int(v.shape[0]) for _, v in rows)))
    fig = _figure(1.2 * ncols + 1.6, 1.2 * len(rows) + (0.4 if title else 0.1))
    for r, (name, imgs) in enumerate(rows):
        pix = (imgs[:ncols].detach().float().cpu() * s + m).clamp(0, 1).numpy()
        for j in range(ncols):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
            if j >= pix.shape[0]:
                continue
            img = pix[j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                rgb = img[:3].transpose(1, 2, 0) if img.shape[0] >= 3 else np.repeat(img[:1], 3, 0).transpose(1, 2, 0)
                ax.imshow(rgb, vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=1.5 / (1.2 * ncols + 1.6), right=0.99, bottom=0.01, top=0.92 if title else 0.99,
                        wspace=0.05, hspace=0.08)
    _save(fig, path)


def save_loss_curves(
    path: str | os.PathLike,
    *,
    calib_steps: Sequence[Mapping[str, Any]] | None = None,
    calib_epochs: Sequence[Mapping[str, Any]] | None = None,
    synth_rounds: Mapping[int, Sequence[Mapping[str, float]]] | None = None,
    title: str | None = None,
) -> None:
    """Write the loss curves as PNG: synthesis (total per step, one line per round) and
    calibration (total, L_KD, gamma-free L_HD per step, and the per-epoch mean).

    Args:
        calib_steps: ``[{"step", "epoch", "loss", "kd", "hd"}, ...]`` (:class:`CalibResult.steps`).
        calib_epochs: ``[{"epoch", "loss", ...}, ...]``.
        synth_rounds: ``{round: [{"total": ..., ...}, ...]}`` (``SynthResult.losses``).
    """
    panels = []
    if synth_rounds:
        panels.append("synth")
    if calib_steps or calib_epochs:
        panels.append("calib")
    if not panels:
        panels.append("empty")
    fig = _figure(6.0 * len(panels), 3.6)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        if panel == "synth":
            for r, losses in sorted(synth_rounds.items()):  # type: ignore[union-attr]
                tot = [float(d.get("total", float("nan"))) for d in losses]
                if tot:
                    ax.plot(np.arange(1, len(tot) + 1), tot, lw=1, label=f"round {r}")
            ax.set_xlabel("synthesis step")
            ax.set_ylabel("loss (mean over batches)")
            ax.set_title("synthesis", fontsize=9)
            if len(synth_rounds) <= 10:  # type: ignore[arg-type]
                ax.legend(fontsize=7)
        elif panel == "calib":
            if calib_steps:
                xs = np.arange(1, len(calib_steps) + 1)
                for key, lab in (("loss", "total"), ("kd", "L_KD"), ("hd", "L_HD")):
                    ax.plot(xs, [float(d[key]) for d in calib_steps], lw=0.8, label=lab)
                if calib_epochs:
                    per = max(1, len(calib_steps) // max(1, len(calib_epochs)))
                    ax.plot([per * (i + 1) for i in range(len(calib_epochs))], [float(e["loss"]) for e in calib_epochs],
                            "ko-", ms=3, lw=1, label="epoch mean")
                ax.set_xlabel("calibration step")
            elif calib_epochs:
                ax.plot([int(e["epoch"]) + 1 for e in calib_epochs], [float(e["loss"]) for e in calib_epochs], "o-")
                ax.set_xlabel("epoch")
            vals = [float(d["loss"]) for d in (calib_steps or calib_epochs or [])]
            if vals and min(vals) > 0 and all(np.isfinite(vals)):
                ax.set_yscale("log")
            ax.set_ylabel("loss")
            ax.set_title("calibration", fontsize=9)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no losses recorded (min/max PTQ)", ha="center", va="center")
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.09 / len(panels) + 0.02, right=0.98, bottom=0.15, top=0.84 if title else 0.9, wspace=0.28)
    _save(fig, path)
