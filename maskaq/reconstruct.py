"""Block-wise output reconstruction: each transformer block of Q trained, alone, to reproduce
the output of P's block (``calib.stage=blockwise``).

SPDFQ's quantized-network stage (method.md §7: "block-wise reconstruction (each block's output
matched to P's, only that block updated), Adam lr 4e-5 cosine, 100 iterations"), also the common
tool of the real-data PTQ methods of method.md §8 (BRECQ, QDrop). [I] Our reading where the paper
is silent: blocks are handled in forward order; block ``k`` of Q sees the output of Q's blocks
``0..k-1`` as already reconstructed (the input the deployed model will give it), its target is P's
block ``k`` on P's own input; the loss is the mean squared error over all output values; a
minibatch of ``calib.batch_size`` samples is drawn (seeded) for each iteration; every parameter of
the block trains (latent weights, biases, norms, LayerScale, activation quantizers' steps and
zero-points) with one Adam (betas (0.9, 0.999)) whose learning rate follows a cosine from
``recon_lr`` to ``recon_lr * lr_min / lr`` over ``recon_iters`` iterations. What lies outside
the blocks (patch embedding, final norm, head) keeps its range-initialised state.

Why it helps a pretrained model: the end-to-end KD gradient on a pretrained ViT is far out of scale
with its weights (benchmarks/results/pretrained_diagnosis.md: 10-300x the from-scratch model's),
and one SGD step moves every block at once; here each block only has to match a target one block
away, with a scale-free optimiser.

Blocks are the modules whose ``attn`` child is a :class:`maskaq.qmodel.MaskAQAttention` (timm
ViT/DeiT ``blocks.k``, Swin ``layers.i.blocks.j``), so any ViT the quantizer accepts works.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .qmodel import MaskAQAttention

log = logging.getLogger(__name__)

__all__ = ["transformer_blocks", "reconstruct_blocks"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks of ``model``, in forward order."""
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "attn", None), MaskAQAttention) and hasattr(m, "mlp")]


@torch.no_grad()
def _block_io(model: nn.Module, name: str, batches: list[torch.Tensor], want_output: bool) -> list[torch.Tensor]:
    """Per batch: the input (or the output) of block ``name`` when ``model`` runs the batch."""
    mod = dict(model.named_modules())[name]
    got: list[torch.Tensor] = []

    def pre(m: nn.Module, args: tuple) -> None:
        if not want_output:
            got.append(args[0].detach())
            raise _Stop

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        got.append(out.detach())
        raise _Stop

    h = mod.register_forward_pre_hook(pre) if not want_output else mod.register_forward_hook(post)
    try:
        for b in batches:
            try:
                model(b)
            except _Stop:
                pass
    finally:
        h.remove()
    if len(got) != len(batches):
        raise RuntimeError(f"block {name!r} was not reached by the forward pass")
    return got


def _trainable_block_params(block: nn.Module) -> list[nn.Parameter]:
    from .quant import ActQuantizer

    fixed = {id(m.zero_point) for m in block.modules() if isinstance(m, ActQuantizer) and m.symmetric}
    out = []
    for p in block.parameters():
        if id(p) in fixed:
            continue
        out.append(p)
    return out


def reconstruct_blocks(
    P: nn.Module,
    Q: nn.Module,
    images: torch.Tensor,
    *,
    iters: int = 100,
    lr: float = 4e-5,
    lr_min_ratio: float = 0.01,
    batch_size: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    start_block: int = 0,
    on_block_end: Callable[[int, dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct Q's blocks one after another on ``images`` (see the module docstring).

    ``start_block`` resumes after blocks already done (Q holds them); ``on_block_end(k, record)``
    is called after each block (the caller checkpoints there). Returns one record per block done
    here: the block, its MSE to P's output before and after, iterations and seconds.
    """
    device = torch.device(device)
    names = transformer_blocks(Q)
    if not names or names != transformer_blocks(P):
        raise RuntimeError("P and Q have no matching transformer blocks to reconstruct")
    chunk = max(1, int(batch_size))
    batches = [images[i:i + chunk].to(device=device, dtype=torch.float32) for i in range(0, images.shape[0], chunk)]
    q_mods = dict(Q.named_modules())
    records: list[dict[str, Any]] = []
    for k in range(start_block, len(names)):
        g = torch.Generator().manual_seed(int(seed) + 7919 * k)  # per block: a resumed run draws the same
        t0 = time.perf_counter()
        name = names[k]
        block = q_mods[name]
        with torch.no_grad():
            x_q = torch.cat(_block_io(Q, name, batches, want_output=False))
            y_p = torch.cat(_block_io(P, name, batches, want_output=True))
        params = _trainable_block_params(block)
        flags = {id(p): p.requires_grad for p in Q.parameters()}
        for p in Q.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

        def mse() -> float:
            with torch.no_grad():
                return float(sum(float((block(x_q[i:i + chunk]) - y_p[i:i + chunk]).pow(2).sum())
                                 for i in range(0, x_q.shape[0], chunk)) / y_p.numel())

        before = mse()
        opt = torch.optim.Adam(params, lr=lr)
        n = x_q.shape[0]
        for it in range(int(iters)):
            lr_t = lr * (lr_min_ratio + (1 - lr_min_ratio) * (1 + math.cos(math.pi * it / max(iters, 1))) / 2)
            for grp in opt.param_groups:
                grp["lr"] = lr_t
            idx = torch.randperm(n, generator=g)[:chunk]
            loss = (block(x_q[idx]) - y_p[idx]).pow(2).mean()
            if not torch.isfinite(loss):
                log.warning("block %s iteration %d: non-finite loss, step skipped", name, it)
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        for p in Q.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        after = mse()
        rec = {"block": name, "index": k, "mse_before": before, "mse_after": after, "iters": int(iters),
               "time_s": round(time.perf_counter() - t0, 3)}
        records.append(rec)
        log.info("block %d/%d %s: output MSE %.3g -> %.3g", k + 1, len(names), name, before, after)
        if on_block_end is not None:
            on_block_end(k, rec)
        if progress is not None:
            progress(1)
    return records
