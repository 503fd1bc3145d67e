"""Calibration of Q against P (method.md §3): KD + masked head-wise distillation, and PSAQ's
plain min/max PTQ (method.md §4).

Two entry points:

* :func:`calibrate` trains every parameter of Q (latent weights, biases, LayerNorm, embeddings,
  the activation quantizers' step and zero-point) with ``L = L_KD + gamma * L_HD`` (Eq. 16) on a
  tensor of samples or on any re-iterable batch source (real images, a synthetic set), with
  SimCLR-style augmentation, SGD Nesterov and a per-epoch cosine schedule; it checkpoints every
  epoch (exact resume), runs under ``torch.distributed`` (DDP, each global batch split across
  ranks so the averaged gradient is the full-batch gradient) and, given a ``refresh`` callback,
  swaps in a regenerated data set every ``refresh_every`` epochs (the pipeline supplies the
  callback; this module never synthesises).
* :func:`minmax_calibrate` sets each activation quantizer's range from the min/max it observes.

The losses are pure tensor functions (:func:`kd_loss`, :func:`head_distill_loss`) and the
augmentation is one batched function (:func:`simclr_augment`) whose per-image randomness comes
from a ``torch.Generator``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_torch_save
from .qmodel import quantizers, quantizers_disabled, record_attention
from .quant import ACTIVATION_QUANTIZERS, ActQuantizer, Log2Quantizer

log = logging.getLogger(__name__)

__all__ = [
    "CalibError",
    "CalibConfig",
    "CalibResult",
    "BatchSource",
    "TensorBatches",
    "derive_seed",
    "kd_loss",
    "pixel_kd_loss",
    "feature_distill_loss",
    "weighted_ssim_cs",
    "head_token_weights",
    "cls_attention_weights",
    "head_distill_loss",
    "simclr_augment",
    "cosine_lr",
    "calibrate",
    "minmax_calibrate",
    "peek_state",
    "CALIB_STATE_FORMAT",
]

CALIB_STATE_FORMAT = "maskaq-calib-state/1"
HEAD_MASKS = ("topk", "none", "cls_attention")
AUGMENTS = ("simclr", "none")
AUGMENT_PER = ("batch", "image")
TRAIN_SCOPES = ("all", "quantizers")
OPTIMIZERS = ("sgd", "adam")
WEIGHT_INITS = ("rtn", "gptq")
STAGES = ("distill", "blockwise", "blockwise+distill")
SSIM_C2 = 0.03**2


class CalibError(ValueError):
    """A bad calibration setting, an unusable data source, or a checkpoint from another run."""


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed derived from ``seed`` and a path of keys (stable across runs and platforms).

    Example: ``derive_seed(0, "calib", "shuffle", 3)``.
    """
    h = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _gen(seed: int, *keys: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# --- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings (method.md §3; defaults = the paper / reference code).

    Args:
        epochs: passes over the sample set (paper 200).
        batch_size: global batch (paper 16); under DDP split across ranks.
        lr, lr_min: SGD learning rate, cosine-annealed per epoch to ``lr_min`` (1e-3 -> 1e-5).
        momentum, nesterov, weight_decay: SGD settings (0.9, Nesterov, 0).
        kd_temperature: T of L_KD (5).
        gamma: weight of L_HD (10); 0 switches head distillation off.
        warmup_gate_epochs: epochs at the start without optimiser steps (reference: 2).
        head_mask: token weights of L_HD: ``"topk"`` (reference code: the top ``head_mask_ratio``
            tokens by mean |O^P| weigh ``head_mask_weight``, others 1), ``"none"`` (MimiQ,
            ablation), ``"cls_attention"`` (paper variant: top tokens by P's CLS-to-patch
            attention logits averaged over layers and heads, as in Eq. 11; needs a CLS token).
        augment: ``"simclr"`` (random resized crop, flip, colour jitter p=0.8, grayscale p=0.2,
            Gaussian blur) or ``"none"``.
        refresh_every: regenerate the sample set every R epochs (paper 30; 0 = never). Only acts
            when :func:`calibrate` gets a ``refresh`` callback.
        augment_per: ``"batch"`` (reference: one draw of the augmentation per batch) or
            ``"image"``.
        init: how activation ranges start (:mod:`maskaq.ranges`): ``"lsq"`` (paper: LSQ+ on the
            first batch), ``"mse"`` (searched on ``init_batches`` calibration batches to minimise
            each tensor's quantization error), ``"percentile"``, ``"minmax"``.
        init_batches: calibration batches the range search sees (several, not one).
        init_percentile: for ``init="percentile"``.
        weight_clip: ``"mse"`` (per-channel clipping ratio searched at ``b <= 4``, kept while the
            weights train) or ``"none"`` (paper).
        holdout: fraction of the calibration samples held back from training (0 = none). Each
            epoch, and before the first, the calibration objective (L_KD + gamma L_HD, no
            augmentation) and P-vs-Q top-1 agreement are measured on them; never real labels.
        keep_best: with a hold-out, end with the state that scored best on it (the initial one
            included), not necessarily the last one; the result says which was kept.
        train: which parameters of Q train: ``"all"`` (reference: latent weights, biases,
            LayerNorm, embeddings, LayerScale, quantizer steps/zero-points) or ``"quantizers"``
            (only the activation quantizers' steps and zero-points).
        max_update: [ours] trust bound on each model parameter's step: its gradient is scaled
            down so that ``lr * |g| <= max_update * |p|`` (quantizer parameters excepted; 0 =
            off, the reference). SGD at a fixed learning rate is not scale-free: on a pretrained
            DINOv2 ViT-S the KD gradient relative to the weight was 10-300x that of the
            from-scratch reference model (patch embedding 252x), so one epoch at lr 1e-3 (or
            1e-4) wrecked it (benchmarks/results/pretrained_diagnosis.md).
        optimizer: ``"sgd"`` (reference: SGD with ``momentum``/``nesterov``) or ``"adam"``
            ([ours]; Adam's step is ``~lr`` whatever the gradient's scale, so one learning rate
            serves models whose gradients differ by orders of magnitude; betas (0.9, 0.999)).
        weight_lr: [ours] learning rate of the model's own parameters (latent weights, biases,
            norms, embeddings) when it should differ from the quantizers' ``lr``; 0 = ``lr``
            (the reference: one learning rate for everything). Annealed by the same cosine.
        weight_init: how the latent weights start: ``"rtn"`` (reference: as they are, rounded to
            nearest by the quantizer) or ``"gptq"`` ([ours], :mod:`maskaq.gptq`: rounded onto the
            same grid by GPTQ on the inputs each layer sees on ``init_batches`` calibration batches).
        stage: what trains Q after the range initialisation: ``"distill"`` (MaskAQ: ``epochs`` of
            end-to-end L_KD + gamma L_HD) or ``"blockwise"`` (SPDFQ's stage, :mod:`maskaq.reconstruct`:
            each transformer block's output matched to P's, ``recon_iters`` Adam iterations at
            ``recon_lr`` per block; ``epochs``, ``lr`` and the refresh do not apply) or
            ``"blockwise+distill"`` ([ours]: the block-wise stage, then the distillation epochs
            from its result; with the guard, the run keeps whichever state scores best on the
            held-out samples: the start, the reconstructed model or an epoch).
        patience: [ours] with a hold-out, stop the distillation epochs after this many epochs in
            a row without a new best hold-out score (0 = never stop early).
        recon_iters, recon_lr: iterations per block and Adam learning rate of ``stage="blockwise"``
            (SPDFQ: 100, 4e-5, cosine).
    """

    epochs: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    lr_min: float = 1e-5
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    kd_temperature: float = 5.0
    gamma: float = 10.0
    warmup_gate_epochs: int = 2
    head_mask: str = "topk"
    head_mask_ratio: float = 0.1
    head_mask_weight: float = 2.0
    augment: str = "simclr"
    refresh_every: int = 30
    augment_per: str = "batch"
    init: str = "lsq"
    init_batches: int = 4
    init_percentile: float = 99.99
    weight_clip: str = "none"
    holdout: float = 0.0
    keep_best: bool = False
    train: str = "all"
    max_update: float = 0.0
    optimizer: str = "sgd"
    weight_lr: float = 0.0
    weight_init: str = "rtn"
    stage: str = "distill"
    recon_iters: int = 100
    recon_lr: float = 4e-5
    patience: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, valid: str) -> CalibError:
            return CalibError(f"calib.{name}={getattr(self, name)!r} is invalid; valid: {valid}")

        for name in ("warmup_gate_epochs", "refresh_every", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "an integer >= 0")
        # 0 epochs would leave Q uncalibrated (activation ranges never initialised): refused here,
        # at parse time, not at export after the synthesis has run
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise bad("epochs", "an integer >= 1")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise bad("batch_size", "an integer >= 1")
        for name in ("lr", "lr_min", "kd_temperature"):
            if not float(getattr(self, name)) > 0:
                raise bad(name, "a number > 0")
        for name in ("weight_decay", "gamma"):
            if not float(getattr(self, name)) >= 0:
                raise bad(name, "a number >= 0")
        if not 0 <= float(self.momentum) < 1:
            raise bad("momentum", "a number in [0, 1)")
        if self.nesterov and float(self.momentum) == 0:
            raise bad("nesterov", "false when momentum is 0 (Nesterov needs momentum)")
        if self.head_mask not in HEAD_MASKS:
            raise bad("head_mask", ", ".join(HEAD_MASKS))
        if not 0 < float(self.head_mask_ratio) <= 1:
            raise bad("head_mask_ratio", "a number in (0, 1]")
        if not float(self.head_mask_weight) > 0:
            raise bad("head_mask_weight", "a number > 0")
        if self.augment not in AUGMENTS:
            raise bad("augment", ", ".join(AUGMENTS))
        if self.epochs < 1:
            raise bad("epochs", "an integer >= 1 (calibration needs at least one epoch)")
        if self.augment_per not in AUGMENT_PER:
            raise bad("augment_per", ", ".join(AUGMENT_PER))
        from .ranges import RANGE_INITS, WEIGHT_CLIPS

        if self.init not in RANGE_INITS:
            raise bad("init", ", ".join(RANGE_INITS))
        if self.weight_clip not in WEIGHT_CLIPS:
            raise bad("weight_clip", ", ".join(WEIGHT_CLIPS))
        if not isinstance(self.init_batches, int) or isinstance(self.init_batches, bool) or self.init_batches < 1:
            raise bad("init_batches", "an integer >= 1")
        if not 50 < float(self.init_percentile) <= 100:
            raise bad("init_percentile", "a number in (50, 100]")
        if not 0 <= float(self.holdout) < 1:
            raise bad("holdout", "a fraction in [0, 1)")
        if not 0 <= float(self.max_update) < 1:
            raise bad("max_update", "a number in [0, 1) (0 = off)")
        if self.train not in TRAIN_SCOPES:
            raise bad("train", ", ".join(TRAIN_SCOPES))
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", ", ".join(OPTIMIZERS))
        if not float(self.weight_lr) >= 0:
            raise bad("weight_lr", "a number >= 0 (0 = the same as lr)")
        if self.weight_init not in WEIGHT_INITS:
            raise bad("weight_init", ", ".join(WEIGHT_INITS))
        if self.stage not in STAGES:
            raise bad("stage", ", ".join(STAGES))
        if not isinstance(self.recon_iters, int) or isinstance(self.recon_iters, bool) or self.recon_iters < 1:
            raise bad("recon_iters", "an integer >= 1")
        if not float(self.recon_lr) > 0:
            raise bad("recon_lr", "a number > 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CalibConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CalibError(f"unknown calibration settings {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class CalibResult:
    """What :func:`calibrate` did: one record per epoch and per step (global values), timings."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    #: range initialisation report (:func:`maskaq.ranges.init_ranges`), None for ``init="lsq"``
    init: dict[str, Any] | None = None
    #: the guard: hold-out scores per epoch (epoch -1 = the initial state) and which state was kept
    guard: dict[str, Any] | None = None
    #: block-wise reconstruction (``stage="blockwise..."``): one record per block
    blocks: list[dict[str, Any]] = field(default_factory=list)
    #: the epoch after which ``patience`` stopped the run (None: it ran all epochs)
    stopped_early: int | None = None

    @property
    def epoch_losses(self) -> list[float]:
        return [e["loss"] for e in self.epochs]

    def to_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps, "timings": self.timings,
                "resumed_from": self.resumed_from, "init": self.init, "guard": self.guard, "blocks": self.blocks,
                "stopped_early": self.stopped_early}


# --- data sources ---------------------------------------------------------------------------

class TensorBatches:
    """A re-iterable batch source over a tensor of samples ``[N, C, H, W]``, in order.

    Also usable as a ``forward_loop(model)`` (runs ``model`` over all batches without gradient),
    e.g. for :func:`minmax_calibrate`.
    """

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        if images.dim() != 4 or images.shape[0] == 0:
            raise CalibError(f"samples must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}")
        self.images, self.batch_size = images, int(batch_size)

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(0, self.images.shape[0], self.batch_size):
            yield self.images[i:i + self.batch_size]

    def __call__(self, model: nn.Module) -> None:
        dev = _module_device(model)
        with torch.no_grad():
            for b in self:
                model(b.to(dev))


#: A tensor of samples, a re-iterable of batches (tensors or ``(images, ...)`` tuples), or a
#: zero-argument callable returning an iterable of batches. Sources with ``set_epoch(e)`` are
#: told the epoch first (for their own seeded shuffling).
BatchSource = Union[torch.Tensor, Iterable[Any], Callable[[], Iterable[Any]]]


def _module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        raise CalibError(
            f"a batch must be an image tensor [B, C, H, W] (or a tuple starting with one), got "
            f"{type(batch).__name__}{tuple(batch.shape) if isinstance(batch, torch.Tensor) else ''}"
        )
    return batch


def _iterate(source: BatchSource) -> Iterator[torch.Tensor]:
    if hasattr(source, "__iter__"):
        it = iter(source)  # type: ignore[arg-type]
    elif callable(source):
        it = iter(source())
    else:
        raise CalibError(f"cannot iterate a {type(source).__name__}; pass a tensor, an iterable of "
                         "batches, or a callable returning one")
    for b in it:
        yield _images_of(b)


def _epoch_batches(data: BatchSource, epoch: int, batch_size: int, seed: int) -> tuple[Iterator[torch.Tensor], int | None]:
    """The global batches of one epoch, and their number when known."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4 or data.shape[0] == 0:
            raise CalibError(f"samples must be a non-empty [N, C, H, W] tensor, got shape {tuple(data.shape)}")
        n = data.shape[0]
        perm = torch.randperm(n, generator=_gen(seed, "calib", "shuffle", epoch))

        def it() -> Iterator[torch.Tensor]:
            for i in range(0, n, batch_size):
                yield data[perm[i:i + batch_size]]

        return it(), math.ceil(n / batch_size)
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)  # type: ignore[union-attr]
    try:
        count = len(data)  # type: ignore[arg-type]
    except TypeError:
        count = None
    return _iterate(data), count


# --- losses (pure) --------------------------------------------------------------------------

def kd_loss(logits_q: torch.Tensor, logits_p: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """L_KD (Eq. 16): ``T^2 * KL(softmax(z_P/T) || softmax(z_Q/T))``, mean over the batch.

    Example:
        >>> kd_loss(torch.zeros(2, 10), torch.zeros(2, 10))
        tensor(0.)
    """
    t = float(temperature)
    lq = F.log_softmax(logits_q.float() / t, dim=-1)
    lp = F.log_softmax(logits_p.float() / t, dim=-1)
    return F.kl_div(lq, lp, reduction="batchmean", log_target=True) * (t * t)


def pixel_kd_loss(logits_q: torch.Tensor, logits_p: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """Dense L_KD [ours]: :func:`kd_loss` at every pixel of segmentation logits ``[B, K, h, w]``
    (softmax over the K classes), averaged over images and pixels:
    ``T^2 * mean_{b,y,x} KL(softmax(z_P/T) || softmax(z_Q/T))``.

    Example:
        >>> pixel_kd_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
        tensor(0.)
    """
    if logits_q.dim() != 4 or logits_q.shape != logits_p.shape:
        raise CalibError(f"pixel_kd_loss needs two [B, K, h, w] logit maps of one shape, got "
                         f"{tuple(logits_q.shape)} and {tuple(logits_p.shape)}")
    K = logits_q.shape[1]
    return kd_loss(logits_q.movedim(1, -1).reshape(-1, K), logits_p.movedim(1, -1).reshape(-1, K), temperature)


def feature_distill_loss(feats_q: Sequence[torch.Tensor] | torch.Tensor,
                         feats_p: Sequence[torch.Tensor] | torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Normalised feature distillation [ours] for outputs that are feature maps (Mask R-CNN's
    FPN levels p2..p6): per level ``||F_Q - F_P||^2 / ||F_P||^2`` over the batch (a relative
    squared error, so levels of different magnitude and size weigh the same), averaged over
    levels. 0 when Q reproduces P; 1 for ``F_Q = 0``.

    Example:
        >>> f = [torch.ones(1, 2, 4, 4)]
        >>> feature_distill_loss([torch.zeros(1, 2, 4, 4)], f)
        tensor(1.)
    """
    fq = [feats_q] if isinstance(feats_q, torch.Tensor) else list(feats_q)
    fp = [feats_p] if isinstance(feats_p, torch.Tensor) else list(feats_p)
    if len(fq) != len(fp) or not fq or any(a.shape != b.shape for a, b in zip(fq, fp)):
        raise CalibError(f"feature_distill_loss needs the same feature maps for Q and P, got shapes "
                         f"{[tuple(a.shape) for a in fq]} and {[tuple(b.shape) for b in fp]}")
    per = [(a.float() - b.float()).square().sum() / (b.float().square().sum() + eps) for a, b in zip(fq, fp)]
    return torch.stack(per).mean()


def weighted_ssim_cs(t: torch.Tensor, q: torch.Tensor, w: torch.Tensor | None = None,
                     c2: float = SSIM_C2) -> torch.Tensor:
    """Weighted SSIM without the luminance term over the last dimension (method.md §3):
    ``(2 cov_w(t, q) + C2) / (var_w(t) + var_w(q) + C2)``, weighted (population) moments.

    Args:
        t, q: ``[..., N]`` profiles. w: non-negative weights broadcastable to ``[..., N]`` (None = 1).

    Returns:
        ``[...]``. Example: ``weighted_ssim_cs(x, x)`` is all ones.
    """
    if w is None:
        w = torch.ones(t.shape[-1], dtype=t.dtype, device=t.device)
    w = w.to(t.dtype)
    wsum = w.sum(-1, keepdim=True)
    dt = t - (w * t).sum(-1, keepdim=True) / wsum
    dq = q - (w * q).sum(-1, keepdim=True) / wsum
    wsum = wsum.squeeze(-1)
    var_t = (w * dt * dt).sum(-1) / wsum
    var_q = (w * dq * dq).sum(-1) / wsum
    cov = (w * dt * dq).sum(-1) / wsum
    return (2 * cov + c2) / (var_t + var_q + c2)


def head_token_weights(head_out_p: torch.Tensor, ratio: float = 0.1, high: float = 2.0) -> torch.Tensor:
    """Token weights of the masked L_HD [code]: importance = mean over heads and channels of
    ``|O^P|``; the top ``max(1, round(N * ratio))`` tokens per image weigh ``high``, others 1.

    Args:
        head_out_p: ``[B, H, N, d]`` per-head outputs of P, prefix tokens already dropped.

    Returns:
        ``[B, N]`` weights.
    """
    imp = head_out_p.detach().abs().mean(dim=(1, 3))
    n = imp.shape[-1]
    k = max(1, int(round(n * float(ratio))))
    w = torch.ones_like(imp)
    if k < n:
        w.scatter_(-1, imp.topk(k, dim=-1).indices, float(high))
    else:
        w.fill_(float(high))
    return w


def cls_attention_weights(logits_p: Sequence[torch.Tensor], prefix: int, ratio: float = 0.1,
                          high: float = 2.0) -> torch.Tensor:
    """Paper variant of the L_HD mask, analogous to Eq. 11: ``c`` = CLS-to-patch row of P's
    logits ``S`` averaged over layers and heads; the top ``max(1, round(G^2 * ratio))`` patches
    weigh ``high``, others 1. One mask for all layers.

    Args:
        logits_p: per layer ``[B, H, N, N]`` (prefix + patches). prefix: leading tokens (CLS first).

    Returns:
        ``[B, N - prefix]`` weights.
    """
    if prefix < 1:
        raise CalibError("calib.head_mask='cls_attention' needs a CLS token; this model has none "
                         "(e.g. Swin); use head_mask='topk' or 'none'")
    c = torch.stack([s.detach()[:, :, 0, prefix:].float().mean(1) for s in logits_p]).mean(0)
    n = c.shape[-1]
    k = max(1, int(round(n * float(ratio))))
    w = torch.ones_like(c)
    w.scatter_(-1, c.topk(min(k, n), dim=-1).indices, float(high))
    return w


def head_distill_loss(
    head_out_p: Sequence[torch.Tensor],
    head_out_q: Sequence[torch.Tensor],
    prefix: int | Sequence[int] = 1,
    *,
    mask: str = "topk",
    ratio: float = 0.1,
    high: float = 2.0,
    weights: Sequence[torch.Tensor] | torch.Tensor | None = None,
    c2: float = SSIM_C2,
) -> torch.Tensor:
    """L_HD (Eq. 16, masked head-wise distillation): ``1 - mean`` of the weighted SSIM (no
    luminance term) between the token profiles of ``O^P`` and ``O^Q`` for every layer, image,
    head and channel. Per-layer means are averaged over layers (equal to the global mean when
    all layers have the same shape, as in ViT/DeiT).

    Args:
        head_out_p, head_out_q: per layer ``[B', H, N, d]`` (``softmax @ v`` per head).
        prefix: leading non-patch tokens to drop (one int, or one per layer).
        mask: ``"topk"`` (weights from :func:`head_token_weights`), ``"none"`` (uniform), or
            ignored when ``weights`` is given.
        weights: explicit token weights: one ``[B', N - prefix]`` tensor for all layers, or one
            per layer.

    Returns:
        Scalar loss.

    Example:
        >>> o = [torch.randn(2, 3, 5, 4)]
        >>> head_distill_loss(o, o, prefix=1)  # identical outputs
        tensor(0.)
    """
    if len(head_out_p) != len(head_out_q) or not head_out_p:
        raise CalibError(f"head outputs of P and Q differ in layer count ({len(head_out_p)} vs {len(head_out_q)})")
    if mask not in HEAD_MASKS:
        raise CalibError(f"head mask {mask!r} is unknown; valid: {', '.join(HEAD_MASKS)}")
    prefixes = [int(prefix)] * len(head_out_p) if isinstance(prefix, int) else [int(p) for p in prefix]
    per_layer = []
    for i, (op, oq) in enumerate(zip(head_out_p, head_out_q)):
        pre = prefixes[i]
        tp, tq = op[:, :, pre:, :].float(), oq[:, :, pre:, :].float()
        if weights is not None:
            w = weights if isinstance(weights, torch.Tensor) else weights[i]
        elif mask == "topk":
            w = head_token_weights(tp, ratio, high)
        elif mask == "none":
            w = None
        else:
            raise CalibError("head mask 'cls_attention' needs explicit weights (cls_attention_weights)")
        # profiles over tokens: [B, H, d, N]; weights [B, N] -> [B, 1, 1, N]
        ssim = weighted_ssim_cs(tp.transpose(-1, -2), tq.transpose(-1, -2),
                                None if w is None else w[:, None, None, :], c2)
        per_layer.append(ssim.mean())
    return 1 - torch.stack(per_layer).mean()


# --- augmentation ---------------------------------------------------------------------------

def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([
        torch.stack([v, q, p, p, t, v], 1),
        torch.stack([t, v, v, q, p, p], 1),
        torch.stack([p, p, t, v, v, q], 1),
    ], 1)  # [B, 3, 6, H, W]
    idx = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return table.gather(2, idx).squeeze(2)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.mean(1, keepdim=True)


def simclr_augment(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    per_batch: bool = False,
) -> torch.Tensor:
    """SimCLR-style augmentation of a batch in normalised space, per-image parameters drawn from
    ``generator`` (on the CPU, so results do not depend on the device).

    Order as in the reference: random resized crop (scale 0.08-1, ratio 3/4-4/3, back to the
    input size, bilinear) -> horizontal flip p=0.5 -> colour jitter p=0.8 (brightness, contrast,
    saturation 0.8, hue 0.2, per-image random order; in pixel space, clamped to [0, 1] as
    torchvision does) -> grayscale p=0.2 -> Gaussian blur (kernel ``2*(int(0.1*size)//2)+1``,
    sigma ~ U(0.1, 2), reflect padding). Images without 3 channels skip saturation, hue and grayscale.

    Args:
        x: ``[B, C, H, W]`` normalised images. mean, std: the model's preprocessing (0-1 scale).
        per_batch: draw one set of parameters for the whole batch (the reference code applies
            torchvision transforms to a batch tensor, so every image of a batch gets the same
            crop, flip, jitter and blur); False draws them per image.

    Returns:
        Augmented ``[B, C, H, W]`` (same device and dtype).
    """
    B, C, H, W = x.shape
    dev, dt = x.device, x.dtype
    g = generator

    def U(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        if per_batch:  # one draw, shared by every image of the batch
            one = torch.rand(1, *shape[1:], generator=g, dtype=torch.float64) * (hi - lo) + lo
            return one.expand(*shape).clone()
        return torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo

    # random resized crop (torchvision's sampling: 10 tries, else the whole image) + flip
    tries = 10
    area = U(B, tries, lo=crop_scale[0], hi=crop_scale[1]) * (H * W)
    logr = U(B, tries, lo=math.log(3 / 4), hi=math.log(4 / 3))
    ar = torch.exp(logr)
    cw = torch.round(torch.sqrt(area * ar))
    ch = torch.round(torch.sqrt(area / ar))
    ok = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1, dtype=torch.long))
    u_i, u_j = U(B), U(B)
    flip = U(B) < 0.5
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    for b in range(B):  # B scalar picks; the image work below is batched
        if first[b] >= 0:
            w_, h_ = float(cw[b, first[b]]), float(ch[b, first[b]])
        else:
            w_, h_ = float(W), float(H)
        i0 = math.floor(float(u_i[b]) * (H - h_ + 1))
        j0 = math.floor(float(u_j[b]) * (W - w_ + 1))
        sx = w_ / W
        theta[b, 0, 0] = -sx if flip[b] else sx
        theta[b, 0, 2] = (2 * j0 + w_) / W - 1
        theta[b, 1, 1] = h_ / H
        theta[b, 1, 2] = (2 * i0 + h_) / H - 1
    grid = F.affine_grid(theta.to(dev, dt), [B, C, H, W], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    m = torch.tensor(list(mean), dtype=dt, device=dev).view(1, C, 1, 1)
    s = torch.tensor(list(std), dtype=dt, device=dev).view(1, C, 1, 1)
    pix = x * s + m

    # colour jitter, p_jitter, random order per image; each image goes through each op once
    bj, cj, sj, hj = jitter
    fb = U(B, lo=max(0.0, 1 - bj), hi=1 + bj).to(dev, dt).view(B, 1, 1, 1)
    fc = U(B, lo=max(0.0, 1 - cj), hi=1 + cj).to(dev, dt).view(B, 1, 1, 1)
    fs = U(B, lo=max(0.0, 1 - sj), hi=1 + sj).to(dev, dt).view(B, 1, 1, 1)
    fh = U(B, lo=-hj, hi=hj).to(dev, dt).view(B, 1, 1)
    order = torch.argsort(U(B, 4), dim=1)
    apply_j = U(B) < p_jitter
    ops = ("b", "c", "s", "h") if C == 3 else ("b", "c")
    pix = pix.clone()
    for pos in range(4):
        for k, op in enumerate(("b", "c", "s", "h")):
            if op not in ops:
                continue
            idx = torch.nonzero(apply_j & (order[:, pos] == k)).flatten().to(dev)
            if idx.numel() == 0:
                continue
            v = pix[idx]
            if op == "b":
                v = (v * fb[idx]).clamp(0, 1)
            elif op == "c":
                mu = _gray(v).mean(dim=(1, 2, 3), keepdim=True)
                v = (fc[idx] * v + (1 - fc[idx]) * mu).clamp(0, 1)
            elif op == "s":
                v = (fs[idx] * v + (1 - fs[idx]) * _gray(v)).clamp(0, 1)
            else:
                hsv = _rgb_to_hsv(v)
                hsv = torch.stack([(hsv[:, 0] + fh[idx]) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
                v = _hsv_to_rgb(hsv).clamp(0, 1)
            pix[idx] = v

    if C == 3:
        gray = (U(B) < p_gray).to(dev)
        pix = torch.where(gray.view(B, 1, 1, 1), _gray(pix).expand(-1, 3, -1, -1), pix)
    x = (pix - m) / s

    # Gaussian blur, per-image sigma, separable, reflect padding
    r = int(0.1 * min(H, W)) // 2
    if r > 0:
        sig = U(B, lo=blur_sigma[0], hi=blur_sigma[1])
        k = torch.arange(-r, r + 1, dtype=torch.float64)
        ker = torch.exp(-(k[None] ** 2) / (2 * sig[:, None] ** 2))
        ker = (ker / ker.sum(1, keepdim=True)).to(dev, dt)  # [B, K]
        ker = ker.repeat_interleave(C, 0)  # [B*C, K]
        y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, ker.view(B * C, 1, -1, 1), groups=B * C)
        y = F.conv2d(y, ker.view(B * C, 1, 1, -1), groups=B * C)
        x = y.view(B, C, H, W)
    return x


# --- schedule -------------------------------------------------------------------------------

def cosine_lr(cfg: CalibConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): per-epoch cosine from ``lr`` (epoch 0) towards
    ``lr_min`` (``CosineAnnealingLR(T_max=epochs)`` stepped after each epoch).

    [ours] The reference steps its scheduler *before* each epoch, so its first epoch already runs
    below ``lr`` and its last at ``lr_min``; over 200 epochs that is a one-epoch shift, but a short
    run (one epoch: all of it at ``lr_min``) would barely train.
    """
    E = max(cfg.epochs, 1)
    e = min(max(epoch, 0), E)
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * e / E)) / 2


# --- calibration loop -----------------------------------------------------------------------

def _dist() -> tuple[bool, int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return True, d.get_rank(), d.get_world_size()
    return False, 0, 1


def _trainable(Q: nn.Module, scope: str = "all") -> list[nn.Parameter]:
    """Every parameter of Q except the fixed zero-points of symmetric activation quantizers
    (``scope="quantizers"``: only the activation quantizers' steps and zero-points)."""
    fixed = {id(m.zero_point) for _, m in quantizers(Q) if isinstance(m, ActQuantizer) and m.symmetric}
    if scope == "quantizers":
        qp = {id(p) for _, m in quantizers(Q) if isinstance(m, ActQuantizer) for p in m.parameters()}
        fixed |= {id(p) for p in Q.parameters() if id(p) not in qp}
    out = []
    for p in Q.parameters():
        if id(p) in fixed:
            p.requires_grad_(False)
        else:
            p.requires_grad_(True)
            out.append(p)
    return out


def _needs_init(Q: nn.Module) -> bool:
    return any(isinstance(m, ACTIVATION_QUANTIZERS) and m.enabled and not bool(m.initialized) for _, m in quantizers(Q))


def _prefixes(records: list) -> list[int]:
    return [r.geometry.prefix for r in records]


def _read_state(path: Path) -> dict[str, Any]:
    try:
        st = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable checkpoint
        raise CalibError(f"cannot read calibration checkpoint {str(path)!r} ({type(e).__name__}: {e}); "
                         "delete it to start over") from None
    if not isinstance(st, dict) or st.get("format") != CALIB_STATE_FORMAT:
        raise CalibError(f"{str(path)!r} is not a maskaq calibration checkpoint")
    return st


def peek_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The saved calibration state at ``path`` (``epoch``, ``q_state``, ...) or None if absent."""
    p = Path(path)
    return _read_state(p) if p.is_file() else None


@torch.no_grad()
def _bound_updates(params: Sequence[nn.Parameter], lr: float, ratio: float) -> None:
    """Scale each gradient so that the SGD step ``lr * |g|`` is at most ``ratio * |p|``."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        pn, gn = float(p.detach().norm()), float(g.norm())
        if pn > 0 and gn > 0 and lr * gn > ratio * pn:
            g.mul_(ratio * pn / (lr * gn))


def _optimizer(cfg: CalibConfig, params: list[nn.Parameter], model_params: list[nn.Parameter],
               epoch: int) -> torch.optim.Optimizer:
    """The calibration optimiser: one parameter group for the activation quantizers (``lr``) and
    one for the model's own parameters (``weight_lr`` or ``lr``); each group's ``lr_ratio`` is
    its learning rate relative to ``lr``, so the per-epoch cosine scales both."""
    ratio = float(cfg.weight_lr) / float(cfg.lr) if cfg.weight_lr > 0 else 1.0
    own = {id(p) for p in model_params}
    groups = [{"params": [p for p in params if id(p) not in own], "lr_ratio": 1.0},
              {"params": [p for p in params if id(p) in own], "lr_ratio": ratio}]
    groups = [g for g in groups if g["params"]]
    lr = cosine_lr(cfg, epoch)
    for g in groups:
        g["lr"] = lr * g["lr_ratio"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


#: Below this many held-out samples the guard's choice of epoch is noise (docs/RESULTS.md "SPDFQ").
GUARD_MIN_HELD = 16


def _split_holdout(data: BatchSource, frac: float, seed: int) -> tuple[BatchSource, torch.Tensor | None, Any]:
    """``(train, held_out, keep)``: a seeded ``frac`` of a sample tensor held back (at least one
    image, at least one left to train on); ``keep`` indexes the training part (the same indices
    are taken from refreshed sample sets). Batch sources with ``split_holdout(n, seed)`` split
    themselves; other sources are not split (None)."""
    if frac <= 0:
        return data, None, None
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        k = min(max(1, int(round(n * frac))), n - 1)
        if k < 1:
            return data, None, None
        perm = torch.randperm(n, generator=_gen(seed, "calib", "holdout"))
        keep, hold = perm[k:].sort().values, perm[:k].sort().values
        return data[keep], data[hold], keep
    if hasattr(data, "split_holdout"):
        n = len(getattr(data, "files", [])) or 0
        k = max(1, int(round(n * frac))) if n > 1 else 0
        if k:
            train, held = data.split_holdout(k, seed)  # type: ignore[union-attr]
            return train, held, None
    log.warning("calibration guard off: this batch source cannot hold samples back (pass a tensor)")
    return data, None, None


def _first_batches(data: BatchSource, k: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    it, _ = _epoch_batches(data, 0, batch_size, seed)
    out = []
    for b in it:
        out.append(b)
        if len(out) >= k:
            break
    return out


def calibrate(
    P: nn.Module,
    Q: nn.Module,
    data: BatchSource,
    cfg: CalibConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
    refresh: Callable[[int], BatchSource] | None = None,
    data_round: int = 0,
    data_config: Any = None,
    distill: Callable[[Any, Any], torch.Tensor] | None = None,
) -> CalibResult:
    """Train Q to mimic P with ``L = L_KD + gamma * L_HD`` (method.md §3, Eq. 16).

    Args:
        P: full-precision model (frozen, eval; only run under ``no_grad``).
        Q: the fake-quantized copy (:func:`maskaq.qmodel.quantize_model`); trained in place, in
            eval mode (no dropout). Activation quantizers not yet initialised are initialised on
            the first (augmented) global batch.
        data: samples ``[N, C, H, W]`` (shuffled per epoch from ``seed``) or a batch source
            (see :data:`BatchSource`; its own order; ``set_epoch`` honoured).
        cfg: :class:`CalibConfig`.
        seed: every random choice (shuffle, augmentation) derives from it and the epoch.
        device: where P, Q and the batches go.
        progress: tqdm bar with ETA on stderr (rank 0; hidden when stderr is not a terminal).
        checkpoint_path: calibration state (Q, optimiser, epoch, RNG, history) is written here
            atomically after every epoch; if the file exists, training resumes from it (the
            result equals an uninterrupted run with the same seed).
        on_epoch_end: ``f(epoch, record)`` after each epoch (after the checkpoint is written).
        start_epoch: first epoch when not resuming (schedule, gate and refresh count from it).
        refresh: ``f(round) -> data``: called at the start of epoch ``e`` whenever
            ``cfg.refresh_every > 0`` and ``e // refresh_every`` differs from the round of the
            data in hand (the pipeline regenerates the synthetic set with the current Q).
        data_round: the round ``data`` belongs to.
        data_config: :class:`maskaq.models.DataConfig` for the augmentation (mean/std); read
            from P when None.
        distill: ``f(out_Q, out_P) -> scalar``, the output-distillation term that takes L_KD's
            place for models without class logits (dense models: per-pixel KD on segmentation
            logits, normalised feature distillation on FPN maps, :mod:`maskaq.dense.quantize`);
            recorded as ``"kd"``. None (default): L_KD on the logits with ``cfg.kd_temperature``.
            It is not part of the checkpoint fingerprint: a resumed run must pass the same one.

    Returns:
        :class:`CalibResult` (per-epoch and per-step losses, timings), over the whole run
        including epochs done before a resume.

    Under ``torch.distributed`` Q is wrapped in DistributedDataParallel and every global batch
    is split across ranks (losses scaled so the averaged gradient is the full-batch gradient).

    Example:
        >>> res = calibrate(P, Q, images, CalibConfig(epochs=4), seed=0, device="cpu")
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    ddp, rank, world = _dist()
    if cfg.augment == "simclr" and data_config is None:
        from .models import DataConfig

        data_config = DataConfig.from_model(P)
    P.to(device).eval()
    Q.to(device).eval()
    params = _trainable(Q, cfg.train)
    if not params:
        raise CalibError("Q has no trainable parameters")
    data, held, keep_idx = _split_holdout(data, float(cfg.holdout), seed)
    if held is not None and held.shape[0] < GUARD_MIN_HELD and cfg.epochs > 0 and cfg.stage != "blockwise" and rank == 0:
        log.warning("the guard judges the distillation epochs on %d held-out samples; with fewer than %d it can keep "
                    "a state that has collapsed on real images (seen with 32 synthetic images); use more images "
                    "(num_images) or calib.stage=blockwise", held.shape[0], GUARD_MIN_HELD)
    qparams = {id(p) for _, m in quantizers(Q) if isinstance(m, ActQuantizer) for p in m.parameters()}
    bounded = [p for p in params if id(p) not in qparams]
    opt = _optimizer(cfg, params, bounded, start_epoch)
    result = CalibResult()
    first_epoch = int(start_epoch)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.is_file():
        st = _read_state(ckpt)
        if st["cfg"] != cfg.to_json() or int(st["seed"]) != int(seed):
            raise CalibError(
                f"calibration checkpoint {str(ckpt)!r} was written by a run with another config or "
                "seed; delete it or use another directory"
            )
        Q.load_state_dict(st["q_state"], strict=True)
        opt.load_state_dict(st["optimizer"])
        first_epoch = int(st["epoch"])
        result.epochs = list(st["history"]["epochs"])
        result.steps = list(st["history"]["steps"])
        result.resumed_from = first_epoch
        if st.get("rng") is not None:
            torch.set_rng_state(st["rng"]["torch"])
        result.init = st.get("init")
        guard_state = st.get("guard")
        recon_done = int(st.get("recon_done", 0))
        result.blocks = list(st.get("blocks", []))
        log.info("resuming calibration at epoch %d of %d from %s", first_epoch, cfg.epochs, ckpt)

    else:
        guard_state = None
        recon_done = 0
        result.init = _initial_ranges(Q, data, cfg, seed, device)

    def save_state(epoch_done: int, **extra: Any) -> None:
        if ckpt is None:
            return
        if rank == 0:
            atomic_torch_save({
                "format": CALIB_STATE_FORMAT,
                "epoch": epoch_done,
                "cfg": cfg.to_json(),
                "seed": int(seed),
                "q_state": {k: v.detach().cpu().clone() for k, v in Q.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scheduler": {"kind": "cosine-per-epoch", "next_epoch": epoch_done, "lr": cosine_lr(cfg, epoch_done)},
                "rng": {"torch": torch.get_rng_state()},
                "history": {"epochs": result.epochs, "steps": result.steps},
                "init": result.init,
                "guard": guard,
                **extra,
            }, ckpt)
        if ddp:
            torch.distributed.barrier()

    R = cfg.refresh_every
    rounds_seen = data_round

    def data_for(epoch: int, current: BatchSource) -> BatchSource:
        nonlocal rounds_seen
        if refresh is None or R <= 0:
            return current
        r = epoch // R
        if r == rounds_seen:
            return current
        t0 = time.perf_counter()
        flags = [(p, p.requires_grad) for p in Q.parameters()]
        training = Q.training
        log.info("epoch %d: refreshing the sample set (round %d)", epoch, r)
        new = refresh(r)
        if keep_idx is not None and isinstance(new, torch.Tensor) and new.shape[0] > int(keep_idx.max()):
            new = new[keep_idx]  # the held-out images stay fixed; train on the same number as before
        for p, f in flags:  # the callback may have frozen Q or left gradients behind
            p.requires_grad_(f)
            p.grad = None
        Q.train(training)
        rounds_seen = r
        result.timings.setdefault("refresh_s", []).append(round(time.perf_counter() - t0, 3))
        return new

    model: nn.Module = Q
    mean = tuple(data_config.mean) if data_config is not None else None
    std = tuple(data_config.std) if data_config is not None else None

    def aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if cfg.augment == "none":
            return x
        return simclr_augment(x, mean, std, g, per_batch=cfg.augment_per == "batch")  # type: ignore[arg-type]

    # the guard (hold-out objective each epoch; keep the best state)
    guard: dict[str, Any] | None = None
    if held is not None:
        guard = guard_state or {"held_out": int(held.shape[0]), "measure": "kd + gamma * hd on held-out samples",
                                "history": [], "best": None}
        result.guard = guard

    def score_held() -> dict[str, float]:
        return _held_out_score(P, Q, held, cfg, device, distill)  # type: ignore[arg-type]

    def consider(epoch: int, phase: str = "distill") -> None:
        assert guard is not None
        sc = score_held()
        rec = {"epoch": epoch, "phase": phase, **sc}
        guard["history"].append(rec)
        b = guard["best"]
        if b is None or sc["score"] < b["score"]:
            guard["best"] = {**rec, "q_state": {k: v.detach().cpu().clone() for k, v in Q.state_dict().items()}}
        log.info("hold-out after epoch %d: objective %.5f, top-1 agreement %.1f%%", epoch + 1, sc["score"],
                 100 * sc["agreement"])

    if guard is not None and not guard["history"]:
        consider(-1, "init")  # the initial state (after the range search): calibration must beat it

    record_what = _p_records(cfg)

    total_epochs = cfg.epochs
    n_recon = 0
    if cfg.stage.startswith("blockwise"):
        from .reconstruct import transformer_blocks

        n_recon = len(transformer_blocks(Q))
        only = cfg.stage == "blockwise"
        if first_epoch < total_epochs and recon_done < n_recon:
            _blockwise_stage(P, Q, data, cfg, seed, device, progress and rank == 0, recon_done, result, save_state,
                             consider if guard is not None else None, final=only)
        if only:
            first_epoch = total_epochs  # the epoch loop below does not run
        recon_done = n_recon
    stale = 0  # distillation epochs since the best hold-out score (for calib.patience; also on resume)
    if guard is not None and guard.get("best") is not None:
        stale = sum(1 for h in guard["history"] if h.get("phase") == "distill" and h["epoch"] > guard["best"]["epoch"])
    bar = None
    if progress and rank == 0 and first_epoch < total_epochs:
        from .progress import progress_bar

        bar = progress_bar(total_epochs - first_epoch, "calibration", "epoch")
    epoch_times: list[float] = []
    init_checked = False
    try:
        for epoch in range(first_epoch, total_epochs):
            t_ep = time.perf_counter()
            data = data_for(epoch, data)
            lr = cosine_lr(cfg, epoch)
            for gparam in opt.param_groups:
                gparam["lr"] = lr * gparam["lr_ratio"]
            stepping = epoch >= cfg.warmup_gate_epochs
            g_aug = _gen(seed, "calib", "augment", epoch)
            batches, nb = _epoch_batches(data, epoch, cfg.batch_size, seed)
            sums = {"loss": 0.0, "kd": 0.0, "hd": 0.0, "images": 0, "skipped": 0}
            for step, xb in enumerate(batches):
                x = aug(xb.to(device=device, dtype=torch.float32), g_aug)
                if not init_checked:
                    init_checked = True
                    if _needs_init(Q):
                        with torch.no_grad():
                            Q(x)  # LSQ+ initialisation on the first global batch (identical on all ranks)
                    if ddp:
                        ids = [device.index] if device.type == "cuda" and device.index is not None else None
                        model = nn.parallel.DistributedDataParallel(Q, device_ids=ids)
                n_global = x.shape[0]
                if ddp:
                    chunks = torch.tensor_split(x, world)
                    x_loc = chunks[rank]
                    scale = x_loc.shape[0] * world / n_global
                    if x_loc.shape[0] == 0:  # keep the collective going: zero-weighted dummy image
                        x_loc, scale = x[:1], 0.0
                else:
                    x_loc, scale = x, 1.0
                n_loc = x_loc.shape[0] if scale > 0 else 0
                with torch.no_grad():
                    if record_what:
                        with record_attention(P, what=record_what) as rp:
                            zp = P(x_loc)
                    else:
                        rp, zp = [], P(x_loc)
                with torch.set_grad_enabled(stepping):
                    if record_what:
                        with record_attention(Q, what=("head_out",)) as rq:
                            zq = model(x_loc)
                    else:
                        rq, zq = [], model(x_loc)
                    l_kd = kd_loss(zq, zp, cfg.kd_temperature) if distill is None else distill(zq, zp)
                    if record_what:
                        l_hd = _hd_loss(rp, rq, cfg)
                    else:
                        l_hd = torch.zeros((), device=device)
                    loss = (l_kd + cfg.gamma * l_hd) * scale
                vals = torch.tensor([float(l_kd.detach()) * n_loc, float(l_hd.detach()) * n_loc, float(n_loc)], dtype=torch.float64,
                                    device=device if ddp else "cpu")
                if ddp:
                    torch.distributed.all_reduce(vals)
                kd_g, hd_g = float(vals[0] / vals[2]), float(vals[1] / vals[2])
                tot_g = kd_g + cfg.gamma * hd_g
                finite = math.isfinite(tot_g)
                if stepping:
                    if finite:
                        with warnings.catch_warnings():
                            # DDP: cls_token's gradient arrives as a strided view (harmless)
                            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                            loss.backward()
                        if cfg.max_update > 0:
                            _bound_updates(bounded, lr * opt.param_groups[-1]["lr_ratio"], cfg.max_update)
                        opt.step()
                    else:
                        sums["skipped"] += 1
                        log.warning("epoch %d step %d: non-finite loss, step skipped", epoch, step)
                    opt.zero_grad(set_to_none=True)
                result.steps.append({"epoch": epoch, "step": step, "loss": tot_g, "kd": kd_g, "hd": hd_g})
                if finite:
                    sums["loss"] += tot_g * n_global
                    sums["kd"] += kd_g * n_global
                    sums["hd"] += hd_g * n_global
                    sums["images"] += n_global
                if bar is not None:
                    bar.set_postfix(step=f"{step + 1}/{nb or '?'}", loss=f"{tot_g:.4f}", refresh=False)
            n_img = max(sums["images"], 1)
            rec = {"epoch": epoch, "loss": sums["loss"] / n_img, "kd": sums["kd"] / n_img, "hd": sums["hd"] / n_img,
                   "lr": lr, "stepped": stepping, "images": sums["images"], "skipped": sums["skipped"],
                   "round": rounds_seen, "time_s": round(time.perf_counter() - t_ep, 3)}
            result.epochs.append(rec)
            epoch_times.append(rec["time_s"])
            log.info("epoch %d/%d loss %.5f (kd %.5f, hd %.5f) lr %.2e%s", epoch + 1, total_epochs, rec["loss"],
                     rec["kd"], rec["hd"], lr, "" if stepping else " [warm-up gate: no step]")
            if guard is not None:
                consider(epoch)
            stop = False
            if guard is not None and cfg.patience > 0:
                stale = 0 if (guard["best"]["epoch"] == epoch and guard["best"].get("phase") == "distill") else stale + 1
                stop = stale >= cfg.patience and epoch + 1 < total_epochs
            save_state(total_epochs if stop else epoch + 1, **({"recon_done": recon_done, "blocks": result.blocks} if n_recon else {}))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch, rec)
            if stop:
                log.warning("calibration stopped early after epoch %d: no better hold-out score for %d epochs",
                            epoch + 1, cfg.patience)
                result.stopped_early = epoch + 1
                break
    finally:
        if bar is not None:
            bar.close()
    for p in params:
        p.grad = None
    if guard is not None and guard["best"] is not None:
        best = guard["best"]
        last = guard["history"][-1]
        kept = "best" if (cfg.keep_best and (best["epoch"], best.get("phase")) != (last["epoch"], last.get("phase"))) \
            else "final"
        if kept == "best":
            Q.load_state_dict(best["q_state"], strict=True)
            what = ("the block-wise reconstruction" if best.get("phase") == "blockwise" else
                    "the range initialisation" if best["epoch"] < 0 else f"epoch {best['epoch'] + 1}")
            log.warning("calibration kept the state after %s (hold-out objective %.5f) instead of the final one "
                        "(%.5f)", what, best["score"], last["score"])
        result.guard = {k: v for k, v in guard.items() if k != "best"}
        result.guard["best"] = {k: v for k, v in best.items() if k != "q_state"}
        result.guard["kept"] = kept
        result.guard["kept_epoch"] = best["epoch"] if kept == "best" else last["epoch"]
        result.guard["kept_phase"] = best.get("phase") if kept == "best" else last.get("phase")
    result.timings.update({
        "total_s": round(time.perf_counter() - t_start, 3),
        "epoch_s": epoch_times,
        "world_size": world,
    })
    return result


def _blockwise_stage(P: nn.Module, Q: nn.Module, data: BatchSource, cfg: CalibConfig, seed: int,
                     device: torch.device, progress: bool, done: int, result: CalibResult,
                     save_state: Callable[..., None], consider: Callable[[int], None] | None,
                     final: bool = True) -> None:
    """``stage="blockwise"``: :func:`maskaq.reconstruct.reconstruct_blocks` on the training samples,
    one epoch record per block, a checkpoint after each block (an interrupted run resumes at the
    next block); the guard scores the end state as epoch 0."""
    from .reconstruct import reconstruct_blocks, transformer_blocks

    if isinstance(data, torch.Tensor):
        images = data
    else:
        it, _ = _epoch_batches(data, 0, cfg.batch_size, seed)
        images = torch.cat([b.float() for b in it])
    n_blocks = len(transformer_blocks(Q))
    bar = None
    if progress and done < n_blocks:
        from .progress import progress_bar

        bar = progress_bar(n_blocks - done, "reconstruction", "block")

    def block_end(k: int, rec: dict[str, Any]) -> None:
        result.blocks.append({"index": k, "block": rec["block"], "mse_before": rec["mse_before"],
                              "mse_after": rec["mse_after"], "iters": rec["iters"], "time_s": rec["time_s"]})
        last = k + 1 == n_blocks
        if last and consider is not None:
            consider(-1 if not final else 0, "blockwise")
        save_state(cfg.epochs if (last and final) else 0, recon_done=k + 1, blocks=result.blocks)

    if _needs_init(Q):  # init="lsq": the LSQ+ initialisation on the first batch, as the distillation epochs do
        with torch.no_grad():  # (else the quantizers outside the blocks, e.g. the head's, would never be set)
            Q(images[:cfg.batch_size].to(device=device, dtype=torch.float32))
    try:
        reconstruct_blocks(P, Q, images, iters=cfg.recon_iters, lr=cfg.recon_lr,
                           lr_min_ratio=float(cfg.lr_min) / float(cfg.lr), batch_size=cfg.batch_size,
                           seed=derive_seed(seed, "calib", "recon"), device=device, start_block=done,
                           on_block_end=block_end, progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()


def _p_records(cfg: CalibConfig) -> tuple[str, ...]:
    """What L_HD reads from P's attention (nothing when gamma = 0)."""
    if cfg.gamma <= 0:
        return ()
    return ("head_out", "logits") if cfg.head_mask == "cls_attention" else ("head_out",)


def _hd_loss(rp: list, rq: list, cfg: CalibConfig) -> torch.Tensor:
    """L_HD from P's and Q's attention records, with the token weights ``cfg.head_mask`` asks for."""
    weights = None
    if cfg.head_mask == "cls_attention":
        weights = cls_attention_weights([r.logits for r in rp], rp[0].geometry.prefix,
                                        cfg.head_mask_ratio, cfg.head_mask_weight)
    return head_distill_loss([r.head_out for r in rp], [r.head_out for r in rq], _prefixes(rp),
                             mask=cfg.head_mask, ratio=cfg.head_mask_ratio, high=cfg.head_mask_weight,
                             weights=weights)


def _initial_ranges(Q: nn.Module, data: BatchSource, cfg: CalibConfig, seed: int,
                    device: torch.device) -> dict[str, Any] | None:
    """Range search before training (:mod:`maskaq.ranges`) on the first ``init_batches``
    un-augmented training batches; ``init="lsq"`` without weight clipping does nothing here."""
    if cfg.init == "lsq" and cfg.weight_clip == "none" and cfg.weight_init == "rtn":
        return None
    from .ranges import init_ranges

    batches = _first_batches(data, cfg.init_batches, cfg.batch_size, seed)
    if not batches:
        raise CalibError("no calibration batches to initialise the ranges on")

    def loop(model: nn.Module) -> None:
        for b in batches:
            model(b.to(device=device, dtype=torch.float32))

    rep = init_ranges(Q, loop, method=cfg.init, weight_clip=cfg.weight_clip, percentile=cfg.init_percentile,
                      seed=derive_seed(seed, "calib", "init"))
    out = {"method": rep["method"], "weight_clip": rep["weight_clip"], "batches": len(batches),
           "time_s": rep["time_s"], "activations": rep["activations"], "weights": rep["weights"]}
    if cfg.weight_init == "gptq":
        from .gptq import gptq_round

        g = gptq_round(Q, loop)
        out["gptq"] = g
        out["time_s"] = round(out["time_s"] + g["time_s"], 3)
    return out


@torch.no_grad()
def _held_out_score(P: nn.Module, Q: nn.Module, held: torch.Tensor, cfg: CalibConfig,
                    device: torch.device, distill: Callable[[Any, Any], torch.Tensor] | None = None) -> dict[str, float]:
    """The calibration objective (L_KD + gamma L_HD, no augmentation) and P-vs-Q top-1
    agreement on the held-out samples."""
    tot = {"kd": 0.0, "hd": 0.0, "agree": 0.0}
    n = 0
    what = _p_records(cfg)
    for i in range(0, held.shape[0], cfg.batch_size):
        x = held[i:i + cfg.batch_size].to(device=device, dtype=torch.float32)
        if what:
            with record_attention(P, what=what) as rp:
                zp = P(x)
            with record_attention(Q, what=("head_out",)) as rq:
                zq = Q(x)
            hd = float(_hd_loss(rp, rq, cfg))
        else:
            zp, zq, hd = P(x), Q(x), 0.0
        b = x.shape[0]
        tot["kd"] += float(kd_loss(zq, zp, cfg.kd_temperature) if distill is None else distill(zq, zp)) * b
        tot["hd"] += hd * b
        if distill is None and zp.dim() == 2:
            tot["agree"] += float((zp.argmax(1) == zq.argmax(1)).float().sum())
        n += b
    kd, hd = tot["kd"] / n, tot["hd"] / n
    return {"score": kd + cfg.gamma * hd, "kd": kd, "hd": hd, "agreement": tot["agree"] / n}


# --- PSAQ-ViT's plain min/max PTQ -------------------------------------------------------------

def minmax_calibrate(Q: nn.Module, forward_loop: Callable[[nn.Module], Any] | torch.Tensor,
                     batch_size: int = 32) -> dict[str, tuple[float, float]]:
    """Plain min/max post-training quantization (PSAQ-ViT's PTQ, method.md §4).

    Runs the samples through Q with every quantizer disabled (full-precision activations flow,
    as in PSAQ's calibration pass) while forward pre-hooks on the activation quantizers record
    the running min/max of their inputs; then sets each activation quantizer's range from it:
    the range is widened to include 0, unsigned grid if nothing negative was seen;
    asymmetric ``s = (max - min) / (2^b - 1)``, ``z = qmin - round(min / s)``; symmetric
    quantizers ``z = 0`` and ``s = max|x| / qmax``. Weights need nothing: their per-channel max
    scales follow the weights.

    Args:
        Q: the quantized model.
        forward_loop: ``f(model)`` that runs the calibration samples through ``model`` (a
            :class:`TensorBatches` is one), or a tensor of samples.

    Returns:
        ``{quantizer name: (min, max)}`` as observed.
    """
    if isinstance(forward_loop, torch.Tensor):
        forward_loop = TensorBatches(forward_loop, batch_size)
    acts = [(n, m) for n, m in quantizers(Q) if isinstance(m, ACTIVATION_QUANTIZERS)]
    seen: dict[str, list[float]] = {}

    def hook_for(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            if name in seen:
                seen[name][0] = min(seen[name][0], lo)
                seen[name][1] = max(seen[name][1], hi)
            else:
                seen[name] = [lo, hi]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in acts]
    was_training = Q.training
    try:
        Q.eval()
        with quantizers_disabled(Q), torch.no_grad():
            forward_loop(Q)
    finally:
        for h in handles:
            h.remove()
        Q.train(was_training)
    for name, m in acts:
        if name not in seen:
            log.warning("minmax: quantizer %s saw no data; left unchanged", name)
            continue
        lo, hi = seen[name]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CalibError(f"minmax: quantizer {name} observed non-finite values")
        if isinstance(m, Log2Quantizer):  # log2 (attention probabilities): s = the observed max
            m.set_scale(hi if hi > 0 else 1.0)
            continue
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        signed = lo < 0
        with torch.no_grad():
            m.is_signed.fill_(signed)
            m.initialized.fill_(True)
            m.sync_flags()  # the quantizer mirrors these buffers in Python
            qmin, qmax = m.grid()
            if m.symmetric:
                amax = max(-lo, hi)
                s = max(amax / qmax, 1e-8)
                z = 0.0
            else:
                s = max((hi - lo) / (qmax - qmin), 1e-8)
                z = float(min(max(qmin - round(lo / s), qmin), qmax))
            m.scale.fill_(s)
            m.zero_point.fill_(z)
    return {n: (v[0], v[1]) for n, v in seen.items()}
