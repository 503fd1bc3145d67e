"""GPTQ rounding of the latent weights onto their quantization grid, from calibration data.

[ours; Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023] Round-to-nearest puts each weight on its nearest grid point
independently. GPTQ rounds the columns of a layer's weight one at a time and moves the columns
not yet rounded to compensate the error just made, weighted by the inverse of the layer's input
second moment ``H = X^T X / n`` (the Optimal Brain Surgeon update). It needs no gradient and no
labels: only the inputs the layer sees on the calibration samples (synthetic, noise or real: the
arm's own data, as for the range search), so it is a drop-in replacement for the rounding part of
the range initialisation (``calib.weight_init=gptq``).

The grid stays the weight quantizer's own (per output channel, ``s_r = 2 c_r max|w_r| / (2^b-1)``
with the clipping ratio ``c_r`` the range search chose). The latent weights become the
error-compensated values GPTQ rounded (each column as it was just before its own rounding, so the
quantizer's round-to-nearest of them *is* the GPTQ result), and ``c_r`` is re-set so that the
scale recomputed from them is exactly the grid they were rounded to; calibration then trains from
there like from any other start. (Writing the rounded values themselves as the latent weights,
``latent="grid"``, gives the same start but puts every weight half a step from its rounding
boundary: on fmnist_vit at 3w3a the distillation that followed ended 5 points lower.)

Each ``QuantLinear`` is handled on the input it receives *after* its input quantizer (what the
deployed integer layer multiplies); a patch-embedding ``QuantConv2d`` whose stride equals its
kernel (a linear map on non-overlapping patches) on its unfolded patches. One pass over the
batches collects every layer's ``H`` (the inputs of later layers come from the model with its
weights still in full precision: "GPTQ with full-precision inputs"); the layers are then rounded
independently.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qmodel import QuantConv2d, QuantLinear
from .quant import ActQuantizer, expand_blocks, qrange

log = logging.getLogger(__name__)

__all__ = ["gptq_round", "gptq_layer"]


def _patch_linear(conv: nn.Conv2d) -> bool:
    """A conv that is a linear map on non-overlapping patches (ViT patch embedding)."""
    if isinstance(conv.padding, str) or any(p != 0 for p in conv.padding):
        return False
    return (tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1
            and tuple(conv.dilation) == (1, 1))


@torch.no_grad()
def gptq_layer(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, *,
               damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, dict[str, float]]:
    """Round ``W`` ``[out, in]`` to the grid ``scale * [qmin, qmax]`` (``scale`` per row ``[out]``
    or per element ``[out, in]``, e.g. expanded blocks) by GPTQ with the
    input second moment ``H`` ``[in, in]``. Returns the rounded weights and a dict: the layer's
    output error ``tr((W - Wq) H (W - Wq)^T)`` relative to ``tr(W H W^T)`` for round-to-nearest
    (``rtn``) and GPTQ (``gptq``), and ``latent``: every column as it was just before its own
    rounding (the original column plus the compensation it received), kept inside the rounding
    cell of its GPTQ value with a 1 % margin, so rounding it to nearest gives the GPTQ result."""
    W0 = W.detach().double()
    Wk = W0.clone()
    Hd = H.detach().double().clone()
    n_in = Wk.shape[1]
    s = scale.detach().double()
    s = (s.reshape(-1, 1) if s.dim() == 1 else s).expand(Wk.shape[0], n_in)  # [out, in]: per row or per block
    dead = torch.diag(Hd) <= 0
    Hd[dead, dead] = 1.0
    Wk[:, dead] = 0.0
    d = float(damp) * float(torch.diag(Hd).mean())
    Hd += d * torch.eye(n_in, dtype=Hd.dtype)
    # the upper Cholesky factor of H^-1 (GPTQ's numerically stable form)
    L = torch.linalg.cholesky(Hd)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)

    def q(x: torch.Tensor, i: int) -> torch.Tensor:
        return torch.clamp(torch.round(x / s[:, i]), qmin, qmax) * s[:, i]

    Wq = torch.zeros_like(Wk)
    Wl = torch.zeros_like(Wk)  # each column as it was just before its rounding (error-compensated)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = Wk[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            qi = q(w, i1 + i)
            Wq[:, i1 + i] = qi
            Wl[:, i1 + i] = w
            e = (w - qi) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        Wk[:, i2:] -= E1 @ U[i1:i2, i2:]
    H0 = H.detach().double()

    def err(Wx: torch.Tensor) -> float:
        D = W0 - Wx
        return float(torch.einsum("oi,ij,oj->", D, H0, D))

    ref = max(float(torch.einsum("oi,ij,oj->", W0, H0, W0)), 1e-30)
    Wr = torch.clamp(torch.round(W0 / s), qmin, qmax) * s
    # inside its own rounding cell with a 1 % margin, so float32 and a recomputed scale round it the same way
    Wl = Wq + torch.clamp(Wl - Wq, -0.49 * s, 0.49 * s)
    return Wq.to(W.dtype), {"rtn": err(Wr) / ref, "gptq": err(Wq) / ref, "latent": Wl.to(W.dtype)}


def _inputs_of(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``[n, in]`` (after its input quantizer; patches for a conv)."""
    if isinstance(mod, QuantLinear):
        iq = mod.input_quantizer
        if not isinstance(iq, ActQuantizer):  # weight-only models: a float input (nn.Identity)
            pass
        elif not iq.enabled or bool(iq.initialized):  # never trigger an LSQ+ initialisation here
            x = iq(x)
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, kernel_size=mod.kernel_size, stride=mod.stride)  # [B, C*k*k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def gptq_round(Q: nn.Module, forward_loop: Callable[[nn.Module], Any], *, damp: float = 0.01,
               block: int = 128, max_bits: int = 8, latent: str = "compensated") -> dict[str, Any]:
    """Round every enabled weight quantizer of ``Q`` (``bits <= max_bits``) by GPTQ on the inputs
    ``forward_loop(Q)`` produces, in place (see the module docstring). ``latent``: what the
    latent weights become: ``"compensated"`` (each weight as GPTQ had it just before rounding it:
    the quantized model is the GPTQ one, and training can still move a weight across its rounding
    boundary as it could from the original weights) or ``"grid"`` (the rounded values themselves).

    Returns a report: per layer the relative output error of round-to-nearest and of GPTQ, and the
    time taken. Layers that saw no input are left as they are (and named in the report).
    """
    t0 = time.perf_counter()
    layers: dict[str, nn.Module] = {}
    for name, m in Q.named_modules():
        if isinstance(m, QuantLinear) or (isinstance(m, QuantConv2d) and _patch_linear(m)):
            wq = m.weight_quantizer
            if wq.enabled and wq.bits <= max_bits:
                layers[name] = m
    H: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []

    def hook_for(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            rows = _inputs_of(mod, args[0].detach()).double()
            if name not in H:
                H[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
                count[name] = 0
            H[name] += rows.T @ rows
            count[name] += rows.shape[0]
        return hook

    saved = {name: m.weight_quantizer.enabled for name, m in layers.items()}
    for name, m in layers.items():
        m.weight_quantizer.enabled = False  # the inputs come from full-precision weights
        hooks.append(m.register_forward_pre_hook(hook_for(name)))
    try:
        forward_loop(Q)
    finally:
        for h in hooks:
            h.remove()
        for name, m in layers.items():
            m.weight_quantizer.enabled = saved[name]
    report: dict[str, Any] = {"layers": {}, "skipped": []}
    for name, m in layers.items():
        if name not in H or count[name] == 0:
            report["skipped"].append(name)
            continue
        wq = m.weight_quantizer
        W = m.weight.detach()
        W2 = W.reshape(W.shape[0], -1)
        s = wq.scale_for(W)
        lo, hi = qrange(wq.bits, True, wq.narrow)
        s_rows = expand_blocks(s, wq.block, W2.shape[1]) if wq.block else s
        Wq, errs = gptq_layer(W2.cpu(), (H[name] / count[name]).cpu(), s_rows.cpu(), lo, hi, damp=damp, block=block)
        Wq = Wq.reshape(W.shape).to(W.device, W.dtype)
        # the latent weights: on the grid, or (default) the compensated values that round to it,
        # which keep how far each weight is from its rounding boundary for the training that follows
        Wn = Wq if latent == "grid" else errs.pop("latent").reshape(W.shape).to(W.device, W.dtype)
        errs.pop("latent", None)
        # re-set the clipping ratio so that the scale recomputed from the new latent weights is the
        # grid they were rounded to (ratios above 1 when a channel's largest value shrank)
        amax = (wq.block_amax(Wn) if wq.block else Wn.abs().reshape(W.shape[0], -1).amax(1)).double()
        levels = (2**wq.bits - 1) / 2
        ratio = torch.where(amax > 0, s.double().to(amax.device) * levels / amax.clamp_min(1e-30),
                            torch.ones_like(amax))
        m.weight.data.copy_(Wn)
        wq.set_clip(ratio.float())
        report["layers"][name] = {"rtn_err": round(errs["rtn"], 6), "gptq_err": round(errs["gptq"], 6)}
    report["time_s"] = round(time.perf_counter() - t0, 3)
    if report["layers"]:
        r = [v["gptq_err"] / max(v["rtn_err"], 1e-30) for v in report["layers"].values()]
        report["mean_err_ratio"] = round(sum(r) / len(r), 4)
    log.info("GPTQ: %d layers in %.2f s (output error vs round-to-nearest: %.3fx on average)",
             len(report["layers"]), report["time_s"], report.get("mean_err_ratio", float("nan")))
    return report
