"""Sample synthesis (method.md §2): optimise images so that P (and, for MaskAQ, the current Q)
see "informative" inputs, without any real data.

One loop serves every objective; an objective is a list of loss terms registered in
:mod:`maskaq.recipes` (the differences are data, not copies):

* ``"maskaq"`` (Eq. 15): ``L = L_IHA + L_CE + 2.5e-5 L_TV + alpha L_DE + beta L_MAA``, needs Q;
* ``"mimiq"``: ``L_IHA + L_CE + 2.5e-5 L_TV`` with P only;
* ``"psaq"``: PSAQ-ViT's patch-similarity entropy ``+ L_CE + w_tv L_TV`` with P only (method.md §6);
* ``"spdfq"``: ``alpha1 L_APA + L_SL + 0.05 L_TV`` with P only (method.md §7).

Images ``x ~ N(0, 1)`` live in the model's normalised input space and are optimised directly
(default: AdamW lr 0.1, cosine to 1e-3 over the T steps; ``optimizer``, ``lr_schedule``,
``restarts`` select PSAQ-ViT's Adam with warm-up + cosine rounds) and clamped to the valid pixel
range after every step. Roll offsets and TV values are stated for 224 px and scaled with the
image size (``size_ref``), so that 224 px reproduces the original values exactly. Batch ``b`` draws from two ``torch.Generator`` s seeded from ``(seed, round, b, attempt)``:
a CPU one (initial images, CE targets, roll offsets) and one on the compute device (the per-step
random tensors: noise, colour jitter, L_DE rows, mask subsets; drawn where they are used, since a
host-to-device copy would synchronise a GPU every step). Results therefore do not depend on the
order of the batches or on the number of ranks; they do depend on the device type (CPU and CUDA
have different random streams and float rounding). Under ``torch.distributed`` batch ``b`` is
done by rank ``b % world_size`` and the results are gathered on every rank.

P and Q are not trained here: while synthesising both are in eval mode with
``requires_grad=False`` on every parameter (gradients reach the images through Q's straight-through
rounding all the same); modes, flags and any activation quantizer of Q that was not initialised
yet are restored afterwards (an uninitialised one is re-initialised by each batch's first step, so
batches stay independent of each other).

Swin [ours]: Swin has no CLS token. The importance of a token (Eq. 11) and the rows compared by
L_MAA (Eq. 14) are the mean logit the token *receives* inside its window (averaged over heads and
queries), put back on the block's token grid (window reverse, undo the cyclic shift) and
upsampled (nearest) to the token grid of the first stage; the mask lives on that grid. The
reference code crashes (stacks layers of different shapes) or adds nothing for Swin there.

Dense Swin [ours] (``maskaq.dense``: Mask R-CNN / UperNet backbones): the same, at the dense
model's input size (``data_config.input_size``, any size: the blocks pad to a multiple of the
window); these blocks pad *then* shift, and the window-to-grid mapping follows that order
(``attention_layout`` asks the backbone's ``window_geometries``). Padding tokens take part in
the model's attention (the original Swin does not mask them), so L_IHA and L_DE see them too;
the token scores of L_MAA and the mask are cropped to the real grid. The backbone returns
feature maps, not logits, so L_CE must be off (``use_ce=False``, the dense default).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .io import atomic_torch_save
from .recipes import OBJECTIVES, TERMS
from .qmodel import MaskAQAttention, attention_modules, record_attention
from .quant import ACTIVATION_QUANTIZERS, ActQuantizer

log = logging.getLogger(__name__)

__all__ = ["SynthConfig", "SynthResult", "SynthesisError", "synthesize", "derive_seed", "synthesis_step",
           "augment_code", "augment_simclr", "augment_roll_flip", "attention_layout", "lr_at", "StepContext",
           "BATCH_FORMAT"]

AUGMENTS = ("code", "simclr", "roll_flip")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "warmup_cosine")
TV_FORMS = ("eq2", "psaq", "l2")
BATCH_FORMAT = "maskaq-synth-batch/1"
_DEVICE_SALT = 0x5DEECE66D  # the device generator's seed differs from the host generator's
_CHECK_EVERY = 16


class SynthesisError(RuntimeError):
    """Synthesis cannot go on: images stayed non-finite, a checkpoint does not match, bad inputs."""


@dataclass(frozen=True)
class SynthConfig:
    """Every hyper-parameter of method.md §2; defaults are the reference code's.

    Objective and switches:
        objective: a registered objective (:data:`maskaq.recipes.OBJECTIVES`: ``"maskaq"``,
            ``"mimiq"``, ``"psaq"``, ``"spdfq"``); it says which terms exist.
        use_iha, use_ce, use_tv, use_de, use_maa: include the term (ablations, paper Table 2).
            ``use_de``/``use_maa`` only act for ``"maskaq"``; ``"mimiq"``/``"psaq"`` never use them.
        use_mask: L_MAA over the adaptive mask (Eq. 11-13); False = over all patches.
        de_offdiag_only: L_DE over off-diagonal similarities (paper) instead of all (code).
        augment: ``"code"`` (roll + noise + colour jitter, the reference code) or ``"simclr"``
            (the paper's wording: differentiable random resized crop, flip, colour jitter,
            grayscale, blur).

    Budget and optimiser: steps (T), batch_size, lr, lr_min (cosine floor), betas, adam_eps,
    weight_decay. Augmentation: jitter / jitter_late (max roll in px before / after T/2),
    noise_std (0.5 -> offset std 0.5*(T-1-t)/T), jitter_mean (m ~ U(-a, a)),
    jitter_log_std (s = exp(U(-a, a))). Weights: w_iha, w_ce, w_tv, alpha (L_DE), beta (L_MAA),
    w_psaq. L_DE: de_rows, de_eps. Mask: mask_start, mask_end, mask_drop. SSIM: ssim_c1, ssim_c2.
    PSAQ: psaq_bandwidth, psaq_points. max_redraws: retries of a batch whose images become
    non-finite.

    Optimiser and schedule: optimizer ``"adamw"`` | ``"adam"`` (no weight decay); lr_schedule
    ``"cosine"`` (to lr_min over each round) | ``"warmup_cosine"`` (PSAQ-ViT's
    ``lr_cosine_policy``: linear warm-up over ``warmup_frac`` of the round, then cosine to 0);
    restarts: the T steps are split into this many rounds, each with a fresh optimiser and its
    own schedule (PSAQ-ViT: 2); lr_windowed: lr for windowed (Swin) models, 0 = lr.
    Sizes: size_ref: the image size (px) that jitter offsets and TV values are stated for;
    offsets are scaled to the input, TV values to ``size_ref`` px (0 = no scaling). Augment
    ``"roll_flip"``: roll by U{-j..j} px on each axis, then horizontal flip with p 0.5.
    TV: tv_form ``"eq2"`` (Eq. 2 over x), ``"psaq"`` (``|TV_l2(x_jittered) - v|``,
    ``v ~ U(tv_target)`` stated for ``tv_target_batch`` RGB images at 224 px), ``"l2"``.
    SPDFQ: w_apa (alpha1), use_apa, use_msr, msr_max_crops, soft_labels.
    """

    objective: str = "maskaq"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 0.1
    lr_min: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-6
    augment: str = "code"
    jitter: int = 8
    jitter_late: int = 16
    noise_std: float = 0.5
    jitter_mean: float = 1.0
    jitter_log_std: float = 1.0
    use_iha: bool = True
    use_ce: bool = True
    use_tv: bool = True
    use_de: bool = True
    use_maa: bool = True
    use_mask: bool = True
    w_iha: float = 1.0
    w_ce: float = 1.0
    w_tv: float = 2.5e-5
    alpha: float = 1.0
    beta: float = 0.1
    w_psaq: float = 1.0
    de_rows: int = 64
    de_offdiag_only: bool = False
    de_eps: float = 1e-8
    mask_start: float = 0.5
    mask_end: float = 0.1
    mask_drop: float = 0.3
    ssim_c1: float = 0.01**2
    ssim_c2: float = 0.03**2
    psaq_bandwidth: float = 0.01
    psaq_points: int = 10
    max_redraws: int = 3
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    warmup_frac: float = 0.0
    restarts: int = 1
    lr_windowed: float = 0.0
    size_ref: int = 224
    tv_form: str = "eq2"
    tv_target: tuple[float, float] = (2500.0, 3000.0)
    tv_target_batch: int = 32
    w_apa: float = 1.0
    use_apa: bool = True
    use_msr: bool = True
    msr_max_crops: int = 4
    soft_labels: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not valid; valid: {', '.join(OBJECTIVES)}")
        for name, valid in (("augment", AUGMENTS), ("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                            ("tv_form", TV_FORMS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; valid: {', '.join(valid)}")
        for name in ("steps", "restarts", "tv_target_batch", "msr_max_crops"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.restarts > self.steps:
            raise ValueError(f"restarts ({self.restarts}) cannot exceed steps ({self.steps})")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not isinstance(self.size_ref, int) or isinstance(self.size_ref, bool) or self.size_ref < 0:
            raise ValueError(f"size_ref must be an integer >= 0 (0: no scaling), got {self.size_ref!r}")
        object.__setattr__(self, "tv_target", tuple(float(v) for v in self.tv_target))
        if len(self.tv_target) != 2 or self.tv_target[0] > self.tv_target[1]:
            raise ValueError(f"tv_target must be two numbers lo <= hi, got {self.tv_target!r}")
        for name in ("steps", "batch_size", "de_rows", "psaq_points"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.psaq_points < 2:
            raise ValueError(f"psaq_points must be >= 2, got {self.psaq_points}")
        if not isinstance(self.max_redraws, int) or self.max_redraws < 0:
            raise ValueError(f"max_redraws must be an integer >= 0, got {self.max_redraws!r}")
        if not 0.0 <= self.mask_drop < 1.0:
            raise ValueError(f"mask_drop must be in [0, 1), got {self.mask_drop}")
        for name in ("mask_start", "mask_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Every number in its valid range (as :class:`~maskaq.calibration.CalibConfig` does), so a
        bad setting is one line at parse time, not a traceback or a NaN after minutes of work."""
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"synth.{name}={v!r} is invalid; valid: a finite number")
            return float(v)

        def need(name: str, ok: bool, valid: str) -> None:
            if not ok:
                raise ValueError(f"synth.{name}={getattr(self, name)!r} is invalid; valid: {valid}")

        for name in ("lr", "adam_eps", "de_eps", "ssim_c1", "ssim_c2", "psaq_bandwidth"):
            need(name, num(name) > 0, "a number > 0")
        need("lr_min", num("lr_min") >= 0, "a number >= 0 (the cosine floor)")
        for name in ("weight_decay", "noise_std", "jitter_mean", "jitter_log_std", "w_iha", "w_ce", "w_tv",
                     "alpha", "beta", "w_psaq"):
            need(name, num(name) >= 0, "a number >= 0")
        for name in ("jitter", "jitter_late"):
            v = getattr(self, name)
            need(name, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0 (pixels)")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"synth.betas={','.join(f'{b:g}' for b in self.betas)} is invalid; "
                             "valid: two numbers in [0, 1), e.g. 0.9,0.999")

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the recorded loss values: ``"total"`` then every active term."""
        return ("total",) + tuple(t for t in OBJECTIVES[self.objective].terms if self.active(t))

    def active(self, term: str) -> bool:
        """Whether ``term`` contributes to the objective under this config (it is one of the
        objective's terms, :data:`maskaq.recipes.OBJECTIVES`, and its switch is on)."""
        if term not in TERMS:
            raise KeyError(f"unknown synthesis term {term!r}; valid: {', '.join(TERMS)}")
        if term not in OBJECTIVES[self.objective].terms:
            return False
        sw = TERMS[term].switch
        return True if sw is None else bool(getattr(self, sw))

    @property
    def uses_q(self) -> bool:
        """Whether an active term runs the current Q (MaskAQ's L_MAA)."""
        return any("q" in TERMS[t].needs for t in self.terms[1:])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["tv_target"] = list(self.tv_target)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SynthConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown SynthConfig fields {bad}; valid: {', '.join(sorted(names))}")
        d = dict(d)
        for k in ("betas", "tv_target"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SynthConfig":
        """Named presets: ``"code"`` (reference code, the default), ``"paper"`` (batch 32,
        off-diagonal L_DE, SimCLR augmentation as the paper text says), ``"fast"`` (200 steps, for
        smoke runs)."""
        presets: dict[str, dict[str, Any]] = {
            "code": {},
            "paper": dict(batch_size=32, de_offdiag_only=True, augment="simclr"),
            "fast": dict(steps=200),
        }
        if name not in presets:
            raise ValueError(f"unknown SynthConfig preset {name!r}; valid: {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})


@dataclass
class SynthResult:
    """Synthetic images and what happened while making them.

    ``images`` ``[N, C, H, W]`` float32 CPU in normalised space; ``labels`` ``[N]`` the random CE
    targets; ``masks`` ``[N, G*G]`` bool (the adaptive mask of each image's last step; Swin: on
    the first stage's token grid) or None; ``losses`` one dict per step: every recorded term
    (unweighted, ``"total"`` weighted) averaged over the batches; ``timings`` seconds and counts.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    losses: list[dict[str, float]]
    timings: dict[str, Any]
    config: SynthConfig
    seed: int
    round: int


def derive_seed(seed: int, round: int, batch: int, attempt: int = 0) -> int:
    """63-bit seed of one batch attempt, a hash of ``(seed, round, batch, attempt)``."""
    h = hashlib.sha256(f"maskaq-synth:{int(seed)}:{int(round)}:{int(batch)}:{int(attempt)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --- augmentation ----------------------------------------------------------------------------

def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device)


def augment_code(x: torch.Tensor, step: int, steps: int, gen: torch.Generator, cfg: SynthConfig,
                 host_gen: torch.Generator | None = None) -> torch.Tensor:
    """The reference code's augmentation, differentiable, same roll for the whole batch.

    Tensors are drawn from ``gen`` (best on x's device: no host-device copies); the roll offsets,
    which Python needs as numbers, from ``host_gen`` (a CPU generator; default ``gen``).

    1. roll by ``(dy, dx)`` ~ U{-j..j}, ``j = cfg.jitter`` for ``t < T/2`` else ``cfg.jitter_late``
       (px at ``cfg.size_ref`` px, scaled to the image: :func:`maskaq.losses.scaled_offset`);
    2. "Gaussian noise": add ``n * noise_std * (T-1-t)/T`` with ``n ~ N(0,1)`` of shape
       ``[B, C, 1, 1]`` - the reference's ``GaussianNoise`` draws ONE value per image and channel
       (a brightness offset), not per pixel;
    3. colour jitter ``(x - m) / s``, ``m ~ U(-1, 1)``, ``s = exp(U(-1, 1))`` per image and channel.
    """
    B, C = x.shape[:2]
    hg = host_gen if host_gen is not None else gen
    dy, dx = _roll_offsets(x, step, steps, cfg, hg)
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    noise = torch.randn((B, C, 1, 1), generator=gen, device=gen.device)
    m = (_rand(gen, B, C, 1, 1) - 0.5) * 2 * cfg.jitter_mean
    s = ((_rand(gen, B, C, 1, 1) - 0.5) * 2 * cfg.jitter_log_std).exp()
    std = cfg.noise_std * (steps - 1 - step) / steps
    noise, m, s = (t.to(device=x.device, dtype=x.dtype) for t in (noise, m, s))
    x = x + noise * std
    return (x - m) / s


def _roll_offsets(x: torch.Tensor, step: int, steps: int, cfg: SynthConfig, hg: torch.Generator) -> list[int]:
    j = cfg.jitter if step < steps / 2 else cfg.jitter_late
    jy = L.scaled_offset(j, x.shape[-2], cfg.size_ref)
    jx = L.scaled_offset(j, x.shape[-1], cfg.size_ref)
    if jy == jx:
        return torch.randint(-jy, jy + 1, (2,), generator=hg, device=hg.device).tolist()
    return [int(torch.randint(-jy, jy + 1, (1,), generator=hg, device=hg.device)),
            int(torch.randint(-jx, jx + 1, (1,), generator=hg, device=hg.device))]


def augment_roll_flip(x: torch.Tensor, step: int, steps: int, cfg: SynthConfig, host_gen: torch.Generator) -> torch.Tensor:
    """PSAQ-ViT's jitter (method.md §6): roll both axes by one offset each, ``U{-j..j}``
    (``cfg.jitter`` px in the first half of the steps, ``cfg.jitter_late`` after; stated at
    ``cfg.size_ref`` px and scaled to the image), then a horizontal flip with p 0.5; the same
    for the whole batch, drawn from the host generator."""
    dy, dx = _roll_offsets(x, step, steps, cfg, host_gen)
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if float(torch.rand((), generator=host_gen, device=host_gen.device)) < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


def _gray(px: torch.Tensor) -> torch.Tensor:
    if px.shape[1] == 3:
        w = px.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (px * w).sum(dim=1, keepdim=True)
    return px.mean(dim=1, keepdim=True)


def augment_simclr(x: torch.Tensor, gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor,
                   strength: float = 1.0) -> torch.Tensor:
    """The paper's "SimCLR augmentations", differentiable and drawn per image [ours].

    Random resized crop (scale U(0.08, 1), aspect ratio log-U(3/4, 4/3), bilinear, via
    ``affine_grid``/``grid_sample``), horizontal flip p=0.5, colour jitter p=0.8 (brightness,
    contrast, saturation 0.8*strength in pixel space, fixed order, no hue), grayscale p=0.2,
    Gaussian blur p=0.5 (kernel ``int(0.1*size)`` made odd, sigma U(0.1, 2)).
    ``mean``/``std``: ``[1, C, 1, 1]`` normalisation of the model.
    """
    B, C, H, W = x.shape
    dev, dt = x.device, x.dtype
    r = lambda *s: _rand(gen, *s).to(device=dev, dtype=dt)  # noqa: E731
    # random resized crop + flip as one affine warp per image
    area = 0.08 + 0.92 * r(B)
    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r(B)
    ar = logr.exp()
    sw = (area * ar).sqrt().clamp(max=1.0)
    sh = (area / ar).sqrt().clamp(max=1.0)
    cx = (2 * r(B) - 1) * (1 - sw)
    cy = (2 * r(B) - 1) * (1 - sh)
    flip = torch.where(r(B) < 0.5, -1.0, 1.0).to(dt)
    theta = torch.zeros(B, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * flip, cx, sh, cy
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    px = x * std + mean
    # colour jitter
    k = 0.8 * strength
    bright, contrast, sat = (1 + k * (2 * r(B, 1, 1, 1) - 1) for _ in range(3))
    j = (px * bright).clamp(0, 1)
    g = _gray(j).mean(dim=(2, 3), keepdim=True)
    j = ((j - g) * contrast + g).clamp(0, 1)
    g = _gray(j)
    j = ((j - g) * sat + g).clamp(0, 1)
    px = torch.where(r(B, 1, 1, 1) < 0.8, j, px)
    px = torch.where(r(B, 1, 1, 1) < 0.2, _gray(px).expand_as(px), px)
    # Gaussian blur, per-image sigma, separable depthwise conv
    ks = max(3, int(0.1 * min(H, W)) | 1)
    sigma = 0.1 + 1.9 * r(B)
    t = torch.arange(ks, device=dev, dtype=dt) - ks // 2
    ker = torch.exp(-t.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    ker = (ker / ker.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # [B*C, ks]
    y = px.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (ks // 2, ks // 2, 0, 0), mode="reflect"), ker.view(B * C, 1, 1, ks), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, ks // 2, ks // 2), mode="reflect"), ker.view(B * C, 1, ks, 1), groups=B * C)
    px = torch.where(r(B, 1, 1, 1) < 0.5, y.view(B, C, H, W), px)
    return (px - mean) / std


# --- model geometry --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    name: str
    prefix: int
    windowed: bool
    resolution: tuple[int, int] = (0, 0)  # Swin: the block's token grid
    window: tuple[int, int] = (0, 0)
    shift: tuple[int, int] = (0, 0)
    order: str = "shift_pad"  # how the block makes windows (losses.windows_to_grid)
    heads: int = 0
    grid: tuple[int, int] = (0, 0)  # ViT: the patch grid


@dataclass(frozen=True)
class _Layout:
    layers: dict[str, _Layer]
    grid: tuple[int, int]  # the mask grid
    windowed: bool


def _dense_geometries(model: nn.Module, input_size: tuple[int, int] | None) -> dict[int, Any]:
    """``id(block) -> WindowGeometry`` from every submodule that can say where its blocks'
    windows sit for an input size (``maskaq.dense.swin.SwinBackbone.window_geometries``: blocks
    whose geometry depends on the input, computed per forward)."""
    out: dict[int, Any] = {}
    for m in model.modules():
        fn = getattr(m, "window_geometries", None)
        if callable(fn):
            if input_size is None:
                raise SynthesisError(f"{type(m).__name__} computes its window layout per input; "
                                     "attention_layout needs input_size=(H, W)")
            for blk, geo in fn(tuple(int(v) for v in input_size)):
                out[id(blk)] = geo
    return out


def attention_layout(model: nn.Module, input_size: tuple[int, int] | None = None) -> _Layout:
    """Token geometry of every attention layer of ``model`` (prefix tokens, Swin resolution, window and
    shift, the mask grid), read from the model, never from constants; pass it to :func:`synthesis_step`.

    Windowed attention: a timm Swin block carries static ``input_resolution``, ``window_size`` and
    ``shift_size`` (shift, then pad); a block of the original-semantics Swin
    (:mod:`maskaq.dense.swin`) computes them per forward, so its backbone's
    ``window_geometries(input_size)`` is asked for them (pad, then shift) - ``input_size`` ``(H, W)``
    is the image size the model will see. The mask grid is the largest block grid (Swin: the
    first stage's token grid)."""
    mods = attention_modules(model)
    if not mods:
        raise SynthesisError("model has no MaskAQAttention; load it with load_model() or call prepare_model()")
    parents = {id(m.attn): m for m in model.modules() if isinstance(getattr(m, "attn", None), MaskAQAttention)}
    dense = _dense_geometries(model, input_size) if any(a.geometry.windowed for a in mods) else {}
    layers: dict[str, _Layer] = {}
    for a in mods:
        g = a.geometry
        if not g.windowed:
            layers[a.layer_name] = _Layer(a.layer_name, g.prefix, False, heads=a.num_heads, grid=tuple(g.grid))
            continue
        blk = parents.get(id(a))
        if blk is not None and id(blk) in dense:
            geo = dense[id(blk)]
            layers[a.layer_name] = _Layer(a.layer_name, 0, True, tuple(geo.resolution), tuple(geo.window),
                                          tuple(geo.shift), geo.order, a.num_heads)
            continue
        if blk is None or not all(hasattr(blk, n) for n in ("input_resolution", "window_size", "shift_size")):
            raise SynthesisError(f"windowed attention {a.layer_name!r} has no Swin block around it "
                                 "(need input_resolution, window_size, shift_size, or a backbone with "
                                 "window_geometries(input_size))")
        layers[a.layer_name] = _Layer(a.layer_name, 0, True, tuple(int(v) for v in blk.input_resolution),
                                      tuple(int(v) for v in blk.window_size), tuple(int(v) for v in blk.shift_size),
                                      heads=a.num_heads)
    first = next(iter(layers.values()))
    windowed = first.windowed
    if windowed:
        grid = max((l.resolution for l in layers.values()), key=lambda r: r[0] * r[1])
    else:
        grid = mods[0].geometry.grid
    return _Layout(layers, tuple(grid), windowed)  # type: ignore[arg-type]


def _token_scores(S: torch.Tensor, layer: _Layer, layout: _Layout, batch: int) -> torch.Tensor:
    """Per-layer ``[B, G*G]`` rows that the mask (Eq. 11) and L_MAA (Eq. 14) use."""
    if not layer.windowed:
        return L.cls_scores(S, layer.prefix)
    g = L.windows_to_grid(L.received_scores(S), batch, layer.resolution, layer.window, layer.shift, layer.order)
    if tuple(g.shape[1:]) != layout.grid:
        g = F.interpolate(g.unsqueeze(1), size=layout.grid, mode="nearest").squeeze(1)
    return g.flatten(1)


def _run(model: nn.Module, x: torch.Tensor, what: tuple[str, ...]) -> tuple[Any, list]:
    with record_attention(model, what=what) as recs:
        out = model(x)
    return out, list(recs)


def _class_logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):  # distilled DeiT in train mode: (cls, dist)
        return sum(out) / len(out)
    return out


# --- one step --------------------------------------------------------------------------------

class StepContext:
    """What the loss terms of one synthesis step see (:mod:`maskaq.recipes`): the config, the
    models, the images ``x`` and their augmented view ``xa``, P's class ``logits`` and attention
    records ``recs`` for ``xa``, the batch's ``labels`` and per-batch ``state`` (drawn once per
    batch by the objective), the step, the generators, the token geometry; helpers that
    compute shared pieces once (``patch_blocks``) or run the other model (``run_q``).
    A term may set ``mask`` (the adaptive mask of this step)."""

    def __init__(self, P: nn.Module, Q: nn.Module | None, cfg: SynthConfig, x: torch.Tensor, xa: torch.Tensor,
                 out: Any, recs: list, layout: _Layout, labels: torch.Tensor, state: dict[str, Any],
                 step: int, gen: torch.Generator, host_gen: torch.Generator | None) -> None:
        self.P, self.Q, self.cfg, self.x, self.xa = P, Q, cfg, x, xa
        self.out = out  # P's raw output (a dense backbone returns feature maps, not logits)
        self.recs = recs
        self.layout = layout
        self.layers = [layout.layers[r.name] for r in recs]
        self.prefixes = [l.prefix for l in self.layers]
        self.labels, self.state = labels, state
        self.step, self.steps = step, cfg.steps
        self.gen, self.host_gen = gen, host_gen
        self.batch = x.shape[0]
        self.mask: torch.Tensor | None = None
        self._blocks: list[torch.Tensor] | None = None

    @property
    def logits(self) -> torch.Tensor:
        """P's class logits for ``xa``; only terms that need them read them (lazily)."""
        return _class_logits(self.out)

    @staticmethod
    def class_logits(out: Any) -> torch.Tensor:
        return _class_logits(out)

    def patch_blocks(self) -> list[torch.Tensor]:
        """Logit maps without prefix rows/columns, sliced once for every term that needs them."""
        if self._blocks is None:
            self._blocks = [L.patch_block(r.logits, p) for r, p in zip(self.recs, self.prefixes)]
        return self._blocks

    def token_scores(self, recs: list) -> list[torch.Tensor]:
        """Per-layer ``[B, G*G]`` rows (Eq. 11, Eq. 14) of the logits in ``recs``."""
        return [_token_scores(r.logits, l, self.layout, self.batch) for r, l in zip(recs, self.layers)]

    def run_q(self, what: tuple[str, ...]) -> list:
        """Run the current Q on ``xa``; its attention records (same layers as P's)."""
        if self.Q is None:
            raise SynthesisError(f"objective {self.cfg.objective!r} with use_maa needs Q; pass Q or set use_maa=False")
        _, qrecs = _run(self.Q, self.xa, what)
        if [r.name for r in qrecs] != [r.name for r in self.recs]:
            raise SynthesisError("P and Q have different attention layers: "
                                 f"{[r.name for r in self.recs][:4]}... vs {[r.name for r in qrecs][:4]}...")
        return qrecs


def synthesis_step(P: nn.Module, Q: nn.Module | None, x: torch.Tensor, labels: torch.Tensor, step: int,
                   cfg: SynthConfig, gen: torch.Generator, layout: _Layout,
                   norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                   host_gen: torch.Generator | None = None, state: dict[str, Any] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Loss of one synthesis step (the objective's terms, :mod:`maskaq.recipes`), not yet
    backpropagated.

    ``gen`` draws the step's random tensors (noise, jitter, L_DE rows, mask subsets) and should
    live on x's device; ``host_gen`` (CPU) draws the roll offsets and flips. ``layout``:
    :func:`attention_layout` of P; ``norm``: the model's ``(mean, std)`` as ``[1, C, 1, 1]``
    (needed by the SimCLR augmentation); ``state``: the batch's state from the objective's
    ``init`` (labels, PSAQ's TV target, SPDFQ's priors, crops and soft targets).

    Returns ``(total, terms, mask)``: ``terms`` maps every active term name to its unweighted
    value; ``mask`` is the adaptive mask of this step or None.
    """
    T = cfg.steps
    if cfg.augment == "code":
        xa = augment_code(x, step, T, gen, cfg, host_gen)
    elif cfg.augment == "roll_flip":
        xa = augment_roll_flip(x, step, T, cfg, host_gen if host_gen is not None else gen)
    else:
        assert norm is not None
        xa = augment_simclr(x, gen, *norm)
    active = [TERMS[t] for t in cfg.terms[1:]]
    if not active:
        raise SynthesisError("no loss term is active; enable at least one of use_iha/use_ce/use_tv/...")
    what = tuple(k for k in ("logits", "probs", "head_out") if any(k in t.needs for t in active))
    out, recs = _run(P, xa, what or ("logits",))
    ctx = StepContext(P, Q, cfg, x, xa, out, recs, layout, labels, {"labels": labels, **(state or {})},
                      step, gen, host_gen)
    terms = {t.name: t.fn(ctx) for t in active}
    total = sum(getattr(cfg, t.weight) * terms[t.name] for t in active)
    return total, terms, ctx.mask  # type: ignore[return-value]


# --- model state -----------------------------------------------------------------------------

@contextmanager
def _synthesis_mode(models: list[nn.Module]) -> Iterator[None]:
    """Eval mode and no parameter gradients for P and Q while synthesising (x is the only thing
    optimised; Q's STE still passes gradients to x); everything restored afterwards."""
    saved = []
    for m in models:
        saved.append((m, m.training, [(p, p.requires_grad) for p in m.parameters()]))
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, f in flags:
                p.requires_grad_(f)


def _quantizer_snapshot(Q: nn.Module | None) -> list[tuple[ActQuantizer, dict[str, torch.Tensor]]] | None:
    """If some activation quantizer of Q is not initialised yet, each batch would initialise it
    from its own first step; snapshot them so every batch (and the caller) starts from the same
    state. None when all are initialised (nothing to restore)."""
    if Q is None:
        return None
    qs = [m for m in Q.modules() if isinstance(m, ACTIVATION_QUANTIZERS)]
    if all(bool(m.initialized) for m in qs):
        return None
    return [(m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m in qs]


def _restore(snap: list[tuple[ActQuantizer, dict[str, torch.Tensor]]] | None) -> None:
    if snap:
        with torch.no_grad():
            for m, sd in snap:
                m.load_state_dict(sd)


# --- the loop --------------------------------------------------------------------------------

def _num_classes(P: nn.Module, needed: bool = True) -> int:
    """Range of the random CE targets. Without L_CE (e.g. a dense backbone, which has no
    classifier) a model without ``num_classes`` draws targets from one class (unused)."""
    n = getattr(P, "num_classes", None)
    if not needed and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        return 1
    if not isinstance(n, int) or n < 1:
        raise SynthesisError(f"{type(P).__name__} has no positive integer 'num_classes' (got {n!r}); "
                             "random CE targets are drawn from it")
    return n


def _fingerprint(cfg: SynthConfig, seed: int, round: int, num_images: int, batch: int, shape: list[int]) -> dict:
    return {"config": cfg.to_json(), "seed": int(seed), "round": int(round), "num_images": int(num_images),
            "batch": int(batch), "shape": list(shape)}


def _round_starts(steps: int, restarts: int) -> list[int]:
    """First step of each of ``restarts`` near-equal rounds of ``steps``."""
    return sorted({(i * steps) // restarts for i in range(restarts)})


def lr_at(cfg: SynthConfig, i: int, n: int, base_lr: float | None = None) -> float:
    """Learning rate at step ``i`` of a round of ``n`` steps under ``cfg.lr_schedule``
    ``"warmup_cosine"`` (PSAQ-ViT's ``lr_cosine_policy(base, warm, n)``, ``warm =
    round(warmup_frac * n)``): ``base * (i+1)/warm`` for ``i < warm``, then
    ``lr_min + (base - lr_min) * 0.5 * (1 + cos(pi * (i - warm) / (n - warm)))``; set before the
    optimiser step of iteration ``i``. (``"cosine"`` uses torch's CosineAnnealingLR.)"""
    base = cfg.lr if base_lr is None else base_lr
    warm = int(round(cfg.warmup_frac * n))
    if i < warm:
        return base * (i + 1) / warm
    return cfg.lr_min + (base - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, n - warm)))


def _optimizer(x: torch.Tensor, cfg: SynthConfig, lr: float, n: int) -> tuple[torch.optim.Optimizer, Any]:
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([x], lr=lr, betas=cfg.betas, eps=cfg.adam_eps,
                                                      weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW([x], lr=lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, n, eta_min=cfg.lr_min)
    return opt, None


def _synth_batch(P: nn.Module, Q: nn.Module | None, b: int, n: int, cfg: SynthConfig, chw: tuple[int, int, int],
                 mean: torch.Tensor, std: torch.Tensor, num_classes: int, seed: int, round: int,
                 device: torch.device, layout: _Layout, snap: Any, bar: Any) -> dict[str, Any]:
    T = cfg.steps
    C, H, W = chw
    lo, hi = (-mean / std), ((1 - mean) / std)  # valid pixel range [0, 1] in normalised space
    t0 = time.perf_counter()
    for attempt in range(cfg.max_redraws + 1):
        # host generator: initial images, targets, roll offsets; device generator: the per-step
        # random tensors, drawn where they are used (no host-device copies, which would sync)
        host = torch.Generator(device="cpu").manual_seed(derive_seed(seed, round, b, attempt))
        dgen = torch.Generator(device=device).manual_seed(derive_seed(seed, round, b, attempt) ^ _DEVICE_SALT)
        _restore(snap)
        x = torch.randn((n, C, H, W), generator=host).to(device).requires_grad_(True)
        state = OBJECTIVES[cfg.objective].init(host, n, num_classes, cfg, layout, chw)
        labels = state.pop("labels").to(device)
        base_lr = cfg.lr_windowed if (layout.windowed and cfg.lr_windowed > 0) else cfg.lr
        starts = _round_starts(T, cfg.restarts)
        rec: list[torch.Tensor] = []
        mask = None
        finite = True
        for t in range(T):
            if t in starts:  # a new round: fresh optimiser and schedule (PSAQ-ViT: 2 rounds)
                r0 = t
                r_len = starts[starts.index(t) + 1] - t if starts.index(t) + 1 < len(starts) else T - t
                opt, sched = _optimizer(x, cfg, base_lr, r_len)
            if sched is None:
                for grp in opt.param_groups:
                    grp["lr"] = lr_at(cfg, t - r0, r_len, base_lr)
            opt.zero_grad(set_to_none=True)
            total, terms, mask = synthesis_step(P, Q, x, labels, t, cfg, dgen, layout, (mean, std), host, state)
            total.backward()
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)
            rec.append(torch.stack([total.detach()] + [terms[k].detach() for k in cfg.terms[1:]]))
            bar.update(1)
            # NaN is absorbing (clamp and AdamW keep it), so off the CPU the check (a device
            # sync) runs every _CHECK_EVERY steps and at the end: same outcome, fewer syncs
            if (device.type == "cpu" or (t + 1) % _CHECK_EVERY == 0 or t == T - 1) and \
                    not bool(torch.isfinite(x).all()):
                finite = False
                break
        if finite:
            return {
                "images": x.detach().float().cpu(),
                "labels": labels.cpu(),
                "mask": None if mask is None else mask.cpu(),
                "losses": torch.stack(rec).float().cpu(),
                "seconds": time.perf_counter() - t0,
                "attempts": attempt + 1,
            }
        log.warning("synthesis batch %d (round %d, attempt %d): images became non-finite at step %d; "
                    "discarding the batch and redrawing it with a fresh seed", b, round, attempt, t)
        bar.total = (bar.total or 0) + t + 1
        bar.refresh()
    raise SynthesisError(f"synthesis batch {b} (round {round}) stayed non-finite after {cfg.max_redraws + 1} "
                         "attempts; lower lr, check the model for NaNs, or raise max_redraws")


def synthesize(
    P: nn.Module,
    Q: nn.Module | None,
    num_images: int,
    cfg: SynthConfig,
    data_config: Any,
    *,
    seed: int,
    round: int = 0,
    device: str | torch.device,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> SynthResult:
    """Synthesise ``num_images`` calibration images (method.md §2).

    Args:
        P: full-precision model with the attention adapter (``load_model``/``prepare_model``),
            already on ``device``; it must have ``num_classes`` when L_CE is on. A dense
            backbone (:class:`maskaq.dense.swin.SwinBackbone`, prepared) works as well, with
            ``use_ce=False`` (no classifier): its window layout is computed for the image size
            of ``data_config`` (pad-then-shift), see :func:`attention_layout`.
        Q: the current fake-quantized model (MaskAQ's L_MAA), or None for P-only objectives.
            Q's parameters are not updated (gradients flow through its STE to the images only);
            train/eval modes, ``requires_grad`` flags and un-initialised quantizers are restored.
        num_images: N; batches of ``cfg.batch_size`` (the last one may be smaller).
        cfg: :class:`SynthConfig`.
        data_config: the model's ``DataConfig`` (input_size (C,H,W), mean, std): image shape
            and the clamp range ``[(0-mean)/std, (1-mean)/std]`` per channel.
        seed, round: batch ``b``, attempt ``a`` draws from generators seeded with
            :func:`derive_seed` ``(seed, round, b, a)`` (a CPU one and one on ``device``).
        device: where the images and the computation live (the models must already be there).
        progress: a tqdm bar with ETA over steps x batches on stderr.
        checkpoint_dir: if given, each finished batch is saved atomically there
            (``batch_00000.pt``...) and a re-run loads finished batches instead of recomputing.

    Returns:
        :class:`SynthResult` (on every rank when torch.distributed is initialised).

    Raises:
        SynthesisError: a batch stayed non-finite, a checkpoint belongs to another run, or the
        models lack what the objective needs.

    Example:
        >>> res = synthesize(P, Q, 64, SynthConfig(steps=500), loaded.data_config, seed=0, device="cpu")
        >>> res.images.shape
        torch.Size([64, 3, 224, 224])
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if not cfg.uses_q and Q is not None:
        log.info("objective %r synthesises with P only; Q is ignored", cfg.objective)
        Q = None
    if cfg.uses_q and Q is None:
        raise SynthesisError("objective 'maskaq' with use_maa=True needs Q (the model being calibrated); "
                             "pass Q, set use_maa=False, or use objective 'mimiq'")
    device = torch.device(device)
    chw = tuple(int(v) for v in data_config.input_size)
    mean = torch.tensor(data_config.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data_config.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    if mean.shape[1] != chw[0] or std.shape[1] != chw[0]:
        raise ValueError(f"data_config has {mean.shape[1]} means / {std.shape[1]} stds for {chw[0]} channels")
    num_classes = _num_classes(P, cfg.active("ce"))
    layout = attention_layout(P, chw[1:])
    nb = -(-num_images // cfg.batch_size)
    sizes = [min(cfg.batch_size, num_images - b * cfg.batch_size) for b in range(nb)]

    dist = torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    mine = [b for b in range(nb) if b % world == rank]

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for b in mine:
        fp = _fingerprint(cfg, seed, round, num_images, b, [sizes[b], *chw])
        path = ckpt / f"batch_{b:05d}.pt" if ckpt else None
        if path is not None and path.is_file():
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("format") != BATCH_FORMAT or obj.get("fingerprint") != fp:
                raise SynthesisError(f"checkpoint {str(path)!r} belongs to another synthesis run "
                                     "(config, seed, round, num_images or image shape differ); "
                                     "use another checkpoint_dir or delete it")
            obj["computed"] = False
            done[b] = obj
        else:
            todo.append((b, fp, path))

    from .progress import progress_bar

    snap = _quantizer_snapshot(Q)
    models = [P] + ([Q] if Q is not None else [])
    with _synthesis_mode(models), progress_bar(cfg.steps * len(todo), f"synthesis round {round}", "step",
                                               progress and bool(todo)) as bar:
        try:
            for b, fp, path in todo:
                res = _synth_batch(P, Q, b, sizes[b], cfg, chw, mean, std, num_classes, seed, round,
                                   device, layout, snap, bar)
                res.update(format=BATCH_FORMAT, fingerprint=fp, terms=list(cfg.terms))
                if path is not None:
                    atomic_torch_save(res, path)
                res["computed"] = True
                done[b] = res
        finally:
            _restore(snap)
    wall = time.perf_counter() - t_start

    if dist is not None:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, done)
        done = {b: r for part in gathered for b, r in part.items()}
    missing = [b for b in range(nb) if b not in done]
    if missing:
        raise SynthesisError(f"batches {missing} were not produced (ranks disagree on the run?)")
    batches = [done[b] for b in range(nb)]
    images = torch.cat([r["images"] for r in batches])
    labels = torch.cat([r["labels"] for r in batches])
    masks = None
    if all(r["mask"] is not None for r in batches):
        masks = torch.cat([r["mask"] for r in batches])
    per_step = torch.stack([r["losses"] for r in batches]).mean(dim=0)  # [T, n_terms]
    names = list(cfg.terms)
    losses = [dict(zip(names, row)) for row in per_step.tolist()]
    computed = [b for b in range(nb) if done[b]["computed"]]
    secs = [float(done[b]["seconds"]) for b in computed]
    timings = {
        "wall_s": wall,
        "batch_s": {b: float(done[b]["seconds"]) for b in range(nb)},
        "step_ms": 1000 * sum(secs) / max(1, len(secs) * cfg.steps) if secs else None,
        "computed_batches": computed,
        "resumed_batches": [b for b in range(nb) if not done[b]["computed"]],
        "redraws": sum(int(done[b]["attempts"]) - 1 for b in range(nb)),
        "world_size": world,
    }
    return SynthResult(images, labels, masks, losses, timings, cfg, int(seed), int(round))
