"""Range initialisation from calibration data, before any training (issue 11).

The reference initialises every activation quantizer from the first batch it sees with the LSQ+
heuristic ``s = 2*mean|x|/sqrt(qmax)`` (method.md §1). On models it was not tuned for that start
is far from a good range (on a Fashion-MNIST ViT of another shape it started ~8 points below
plain min/max), and the short calibration budgets a CPU allows cannot win that back. Here the
ranges are *searched*, as real-data PTQ tools do (method.md §8: "range search by reconstruction
error, not one-batch heuristics"):

* **activations** (per tensor, asymmetric unless the quantizer is symmetric): the calibration
  samples run through Q with every quantizer off (the float activations flow) for a few
  batches; each quantizer's input is summarised by its exact min/max and a seeded random
  subsample of its values. ``method="mse"`` then picks the clipping range ``[lo, hi]`` that
  minimises the mean squared quantization error of that tensor over a grid of candidate ranges
  (a joint shrink of both ends, then each end on its own: coordinate descent on the grid);
  ``"percentile"`` takes the ``percentile`` / ``100 - percentile`` quantiles, ``"minmax"`` the
  observed range (PSAQ-ViT's PTQ), ``"lsq"`` leaves the quantizers to the paper's one-batch
  LSQ+ initialisation inside :func:`maskaq.calibration.calibrate`.
* **weights** at ``b <= weight_clip_bits`` (4): a per-output-channel clipping ratio ``c_r`` of
  ``max|w_r|`` searched on the same grid to minimise the channel's quantization MSE; it is kept
  as a ratio (``WeightQuantizer.clip``) while the latent weights train, so the scale still
  follows the weights.

Everything is vectorised over candidates (one tensor op per grid, per quantizer); on the
reference model the whole search takes well under a second of compute per batch.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from .qmodel import quantizers, quantizers_disabled
from .quant import ACTIVATION_QUANTIZERS, Log2Quantizer, QuantError, WeightQuantizer, log2_fake_quant, log2_tables

log = logging.getLogger(__name__)

__all__ = ["RANGE_INITS", "WEIGHT_CLIPS", "init_ranges", "search_range", "search_weight_clip", "quant_mse",
           "log2_mse", "search_log2_scale"]

RANGE_INITS = ("mse", "percentile", "minmax", "lsq")
WEIGHT_CLIPS = ("mse", "none")

#: Candidate shrink factors of a range end: fine steps near 1 (most tensors), geometric steps
#: down to 1e-3 for tensors whose extremes are rare outliers (LayerNorm outputs of pretrained
#: ViTs carry a few channels 100x larger than the rest).
_GRID = torch.unique(torch.cat([torch.linspace(0.30, 1.0, 71), torch.logspace(-3, math.log10(0.3), 30)]))


def quant_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
              symmetric: bool = False) -> torch.Tensor:
    """Mean squared error of quantizing the values ``x`` ``[M]`` with each candidate range
    ``(lo[k], hi[k])`` (asymmetric: ``s = (hi - lo)/(qmax - qmin)``, ``z = qmin - round(lo/s)``;
    symmetric: ``z = 0``, ``s = max(|lo|, hi) / qmax`` on signed grids, ``hi / qmax`` on unsigned
    ones), exactly as the quantizer rounds. Returns ``[K]``."""
    s, z = range_to_qparams(lo, hi, qmin, qmax, symmetric)
    q = torch.clamp(torch.round(x[None, :] / s[:, None]) + z[:, None], qmin, qmax)
    return ((q - z[:, None]) * s[:, None] - x[None, :]).pow(2).mean(1)


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                     symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point of the ranges ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi) if qmin < 0 else hi
        s = (amax / qmax).clamp_min(1e-8)
        return s, torch.zeros_like(s)
    s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)
    return s, z


def search_range(x: torch.Tensor, lo0: float, hi0: float, qmin: int, qmax: int, *,
                 symmetric: bool = False, grid: torch.Tensor | None = None) -> tuple[float, float, float]:
    """MSE-optimal clipping range for the values ``x`` whose observed range is ``[lo0, hi0]``.

    Coordinate descent on the candidate grid: both ends shrunk by one factor, then the upper end
    alone, then the lower end alone. Returns ``(lo, hi, mse)``; never worse than the observed
    range (factor 1 is on the grid).
    """
    g = (_GRID if grid is None else grid).to(x.dtype)
    lo0, hi0 = min(float(lo0), 0.0), max(float(hi0), 0.0)
    if hi0 - lo0 <= 0:
        return lo0, hi0, 0.0
    x = x.reshape(-1)

    def err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return quant_mse(x, lo, hi, qmin, qmax, symmetric)

    lo_t, hi_t = torch.full_like(g, lo0), torch.full_like(g, hi0)
    e = err(lo_t * g, hi_t * g)  # 1. joint shrink
    k = int(torch.argmin(e))
    a_lo = a_hi = float(g[k])
    best = float(e[k])
    if not symmetric or qmin >= 0:
        if hi0 > 0:  # 2. upper end
            e = err(torch.full_like(g, lo0 * a_lo), hi0 * g)
            k = int(torch.argmin(e))
            if float(e[k]) < best:
                best, a_hi = float(e[k]), float(g[k])
        if lo0 < 0 and not symmetric:  # 3. lower end
            e = err(lo0 * g, torch.full_like(g, hi0 * a_hi))
            k = int(torch.argmin(e))
            if float(e[k]) < best:
                best, a_lo = float(e[k]), float(g[k])
    return lo0 * a_lo, hi0 * a_hi, best


def log2_mse(x: torch.Tensor, scale: float, bits: int) -> float:
    """Mean squared error of the log2 quantizer (:class:`maskaq.quant.Log2Quantizer`) with scale
    ``scale`` on the values ``x``, through the same tables the quantizer uses."""
    t, v = log2_tables(scale, bits)
    x = x.reshape(-1).float()
    return float((log2_fake_quant(x, t, v) - x).pow(2).mean())


#: Candidate scales of the log2 quantizer, as fractions of the observed max: one octave
#: (halving s shifts every level by one code, so [0.5, 1] holds every distinct level set but the
#: clipping of the top), in 64 geometric steps.
_LOG2_GRID = torch.pow(2.0, -torch.arange(0, 65, dtype=torch.float64) / 64)


def search_log2_scale(x: torch.Tensor, hi0: float, bits: int) -> tuple[float, float]:
    """MSE-optimal scale of a log2 quantizer for the values ``x`` (observed max ``hi0``):
    ``s = hi0 * 2^-(k/64)``, ``k = 0..64``. Returns ``(s, mse)``; ``s = hi0`` is a candidate."""
    if not (math.isfinite(hi0) and hi0 > 0):
        return 1.0, log2_mse(x, 1.0, bits)
    best = (float(hi0), math.inf)
    for g in _LOG2_GRID.tolist():
        s = float(hi0) * g
        e = log2_mse(x, s, bits)
        if e < best[1]:
            best = (s, e)
    return best


def search_weight_clip(w: torch.Tensor, bits: int, narrow: bool = False, axis: int = 0,
                       grid: torch.Tensor | None = None, chunk: int = 1 << 24, block: int = 0,
                       importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel clipping ratio ``c_r`` in (0, 1] minimising the channel's quantization
    MSE under the weight quantizer's rule ``s_r = 2 c_r max|w_r| / (2^b - 1)`` (grid
    ``[-2^(b-1), 2^(b-1)-1]``, narrow drops the lowest level). Returns ``[C]``.

    ``block=B`` (2-D weights, axis 0): one ratio per block of ``B`` input elements of each
    output channel (the blocked quantizer's scales), returned ``[C, ceil(K / B)]``. Needs no
    data: it minimises each block's own weight reconstruction error.

    ``importance``: non-negative weights of the squared errors, shaped like ``w`` or ``[K]``
    (one per input feature, e.g. ``E[x_k^2]`` of the layer's input: the error then approximates
    the output error ``E||(W - W_q) x||^2`` without cross terms)."""
    g = (_GRID if grid is None else grid).to(torch.float32)
    g = g[g >= 0.2]  # weight channels: an 80 % clip is already extreme
    if block:
        C, K = w.shape
        nb = -(-K // block)
        Wb = w.detach().float()
        if nb * block != K:  # zero padding: adds no error and does not change a block's max
            Wb = torch.nn.functional.pad(Wb, (0, nb * block - K))
        imp = None
        if importance is not None:
            imp = importance.detach().float().to(Wb.device)
            imp = imp.expand(C, K) if imp.dim() == 1 else imp
            if nb * block != K:
                imp = torch.nn.functional.pad(imp, (0, nb * block - K))
            imp = imp.reshape(C * nb, block)
        r = search_weight_clip(Wb.reshape(C * nb, block), bits, narrow, 0, grid, chunk, importance=imp)
        return r.reshape(C, nb)
    W = w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1)
    imp_all = None
    if importance is not None:
        imp_all = importance.detach().float().to(W.device)
        imp_all = imp_all.expand_as(W) if imp_all.dim() == 1 else imp_all.reshape(W.shape)
    C, K = W.shape
    lo = -(2 ** (bits - 1)) + (1 if narrow else 0)
    hi = 2 ** (bits - 1) - 1
    amax = W.abs().amax(1)
    out = torch.ones(C)
    step = max(1, chunk // max(K * g.numel(), 1))
    for i in range(0, C, step):
        Wc, ac = W[i:i + step], amax[i:i + step]
        s = (2 * ac[None, :] * g[:, None] / (2**bits - 1))  # [G, c]
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(Wc[None] / s[..., None]), lo, hi) * s[..., None]
        d2 = (q - Wc[None]).pow(2)
        if imp_all is not None:
            d2 = d2 * imp_all[i:i + step][None]
        e = d2.mean(2)  # [G, c]
        out[i:i + step] = g[e.argmin(0)]
    return out


def _subsample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    if flat.numel() <= n:
        return flat.cpu()
    idx = torch.randint(0, flat.numel(), (n,), generator=gen).to(flat.device)
    return flat[idx].cpu()


@torch.no_grad()
def init_ranges(
    Q: nn.Module,
    forward_loop: Callable[[nn.Module], Any],
    *,
    method: str = "mse",
    weight_clip: str = "mse",
    weight_clip_bits: int = 4,
    percentile: float = 99.99,
    samples_per_batch: int = 1 << 14,
    seed: int = 0,
) -> dict[str, Any]:
    """Initialise Q's quantizer ranges from calibration data (see the module docstring).

    Args:
        Q: the quantized model (:func:`maskaq.qmodel.quantize_model`).
        forward_loop: ``f(model)`` running the calibration batches through ``model`` (the
            batches the arm calibrates on: synthetic samples, noise or real images). It should
            run a few batches (several, not one: the pipeline passes ``calib.init_batches``).
        method: ``mse`` | ``percentile`` | ``minmax`` | ``lsq`` (activations).
        weight_clip: ``mse`` | ``none``: per-channel weight clipping at ``b <= weight_clip_bits``.
        percentile: for ``method="percentile"`` (e.g. 99.99).
        samples_per_batch: values kept per quantizer and batch for the search (seeded subsample;
            min and max are always exact).
        seed: the subsample's seed.

    Returns:
        A report: per quantizer the observed and chosen range and MSE (activations) or the
        mean clipping ratio (weights), and the time taken.

    Raises:
        QuantError: unknown method, non-finite activations, or a quantizer that saw no data.
    """
    if method not in RANGE_INITS:
        raise QuantError(f"range init {method!r} is not known; valid: {', '.join(RANGE_INITS)}")
    if weight_clip not in WEIGHT_CLIPS:
        raise QuantError(f"weight clip {weight_clip!r} is not known; valid: {', '.join(WEIGHT_CLIPS)}")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"method": method, "weight_clip": weight_clip, "activations": {}, "weights": {}}
    mods = dict(Q.named_modules())
    qs = list(quantizers(Q))
    blocked: list[tuple[str, WeightQuantizer, nn.Module]] = []
    for name, m in qs:
        if isinstance(m, WeightQuantizer):
            owner = mods[name.rpartition(".")[0]]
            if weight_clip == "mse" and m.enabled and m.bits <= weight_clip_bits and getattr(m, "block", 0):
                blocked.append((name, m, owner))  # searched below, weighted by the input's energy
                m.set_clip(None)
            elif weight_clip == "mse" and m.enabled and m.bits <= weight_clip_bits:
                r = search_weight_clip(owner.weight, m.bits, m.narrow, m.axis, block=m.block)
                m.set_clip(r)
                report["weights"][name] = {"bits": m.bits, "mean_clip": round(float(r.mean()), 4),
                                           "min_clip": round(float(r.min()), 4)}
            else:
                m.set_clip(None)
    acts = [(n, m) for n, m in qs if isinstance(m, ACTIVATION_QUANTIZERS) and m.enabled]
    if method == "lsq":  # the paper's one-batch LSQ+ init happens in calibrate(), on the first batch
        acts = []
    if not acts and not blocked:
        report["time_s"] = round(time.perf_counter() - t0, 3)
        return report
    gen = torch.Generator().manual_seed(int(seed))
    stats: dict[str, dict[str, Any]] = {}
    energy: dict[str, list[torch.Tensor]] = {}

    def energy_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            e = energy.setdefault(name, [torch.zeros(x.shape[-1], device=x.device), torch.zeros(())])
            e[0] += (x * x).sum(0)
            e[1] += x.shape[0]
        return hook

    def hook_for(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            st = stats.setdefault(name, {"min": math.inf, "max": -math.inf, "values": [], "n": 0})
            st["min"] = min(st["min"], float(x.min()))
            st["max"] = max(st["max"], float(x.max()))
            st["values"].append(_subsample(x, samples_per_batch, gen))
            st["n"] += 1
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in acts]
    handles += [owner.register_forward_pre_hook(energy_hook(n)) for n, _, owner in blocked]
    training = Q.training
    try:
        Q.eval()
        with quantizers_disabled(Q):
            forward_loop(Q)
    finally:
        for h in handles:
            h.remove()
        Q.train(training)
    for name, m, owner in blocked:
        # [ours, issue 14] blocked weights (weight-only flow): each block's clipping ratio minimises
        # sum_k E[x_k^2] (w_k - q(w_k))^2, x the layer's input on the calibration batches (the
        # arm's own data: synthetic images for MaskAQ): input features that carry more energy
        # weigh more, which plain weight MSE ignores. Without calibration data: plain MSE.
        e = energy.get(name)
        imp = (e[0] / e[1].clamp_min(1)).cpu() if e is not None else None
        if imp is not None and not bool(torch.isfinite(imp).all()):
            raise QuantError(f"range init: layer input of {name} observed non-finite values")
        r = search_weight_clip(owner.weight, m.bits, m.narrow, m.axis, block=m.block, importance=imp)
        m.set_clip(r)
        report["weights"][name] = {"bits": m.bits, "block": m.block, "mean_clip": round(float(r.mean()), 4),
                                   "min_clip": round(float(r.min()), 4), "weighted": imp is not None}
    for name, m in acts:
        st = stats.get(name)
        if st is None:
            raise QuantError(f"range init: quantizer {name} saw no calibration data")
        lo0, hi0 = st["min"], st["max"]
        if not (math.isfinite(lo0) and math.isfinite(hi0)):
            raise QuantError(f"range init: quantizer {name} observed non-finite values")
        x = torch.cat(st["values"] + [torch.tensor([lo0, hi0])])
        if isinstance(m, Log2Quantizer):  # attention probabilities: one scale, s = max or searched
            if method == "mse":
                s_log, mse = search_log2_scale(x, hi0, m.bits)
            elif method == "minmax":
                s_log = hi0 if hi0 > 0 else 1.0
                mse = log2_mse(x, s_log, m.bits)
            else:  # percentile of the values
                s_log = float(torch.quantile(x.double(), float(percentile) / 100.0))
                s_log = s_log if s_log > 0 else (hi0 if hi0 > 0 else 1.0)
                mse = log2_mse(x, s_log, m.bits)
            m.set_scale(s_log)
            report["activations"][name] = {"observed": [lo0, hi0], "encoding": "log2", "scale": float(m.scale[0]),
                                           "mse": mse, "mse_minmax": log2_mse(x, hi0 if hi0 > 0 else 1.0, m.bits),
                                           "batches": st["n"]}
            continue
        signed = lo0 < 0
        m.is_signed.fill_(signed)
        m.sync_flags()
        qmin, qmax = m.grid()
        if method == "mse":
            lo, hi, mse = search_range(x, lo0, hi0, qmin, qmax, symmetric=m.symmetric)
        else:
            if method == "minmax":
                lo, hi = min(lo0, 0.0), max(hi0, 0.0)
            else:  # percentile
                p = float(percentile) / 100.0
                xs = x.double()
                lo = min(float(torch.quantile(xs, 1 - p)), 0.0)
                hi = max(float(torch.quantile(xs, p)), 0.0)
            mse = float(quant_mse(x, torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, m.symmetric)[0])
        s, z = range_to_qparams(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, m.symmetric)
        mse0 = float(quant_mse(x, torch.tensor([min(lo0, 0.0)]), torch.tensor([max(hi0, 0.0)]), qmin, qmax,
                               m.symmetric)[0])
        m.scale.fill_(float(s[0]))
        m.zero_point.fill_(0.0 if m.symmetric else float(z[0]))
        m.initialized.fill_(True)
        m.sync_flags()
        report["activations"][name] = {"observed": [lo0, hi0], "range": [lo, hi], "scale": float(s[0]),
                                       "zero_point": 0 if m.symmetric else int(z[0]), "mse": mse,
                                       "mse_minmax": mse0, "batches": st["n"]}
    report["time_s"] = round(time.perf_counter() - t0, 3)
    log.info("range init (%s, weight clip %s): %d activation and %d weight quantizers in %.2f s", method,
             weight_clip, len(report["activations"]), len(report["weights"]), report["time_s"])
    return report
