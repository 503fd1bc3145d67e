"""Sample-synthesis losses (method.md §2, Eq. 1-15), PSAQ-ViT's patch-similarity entropy and
image prior (§4, §6) and SPDFQ's attention priors, crops and soft labels (§7).

Every loss is a pure tensor function: attention maps come in as lists of per-layer tensors (as
:func:`maskaq.qmodel.record_attention` yields them), randomness as a ``torch.Generator``. Nothing
here loops over images; loops over layers remain (layers differ in shape for Swin).

Conventions:

* ``S`` is the pre-softmax, *unscaled* logit map ``q @ k^T`` of one layer, ``[B', H, N, N]``;
  ``prefix`` is the number of leading non-patch tokens (CLS, distillation token; 0 for Swin).
  For Swin, windows are batch entries (``B' = B * num_windows``) and all tokens are patches.
* Randomness is drawn on the generator's device (normally the CPU) and then moved to the data, so
  the same seed gives the same draws on every device.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ce_loss",
    "tv_loss",
    "iha_loss",
    "iha_ssim",
    "patch_block",
    "de_loss",
    "cls_scores",
    "received_scores",
    "windows_to_grid",
    "mask_keep_ratio",
    "adaptive_mask",
    "maa_loss",
    "psaq_entropy_loss",
    "tv_l2",
    "size_factor",
    "scaled_offset",
    "gmm_priors",
    "cls_attention",
    "window_mean_attention",
    "apa_loss",
    "msr_boxes",
    "msr_crops",
    "soft_targets",
    "soft_ce",
]

_LOG_2PIE = math.log(2.0 * math.pi * math.e)
_CONCAT_LAYERS_ON_CPU = False  # see _layer_groups (tests switch it on to check the grouped path)


def _prefixes(prefix: int | Sequence[int], n: int) -> list[int]:
    if isinstance(prefix, int):
        return [prefix] * n
    p = [int(v) for v in prefix]
    if len(p) != n:
        raise ValueError(f"got {len(p)} prefix counts for {n} layers; pass one int or one per layer")
    return p


def _layer_groups(blocks: Sequence[torch.Tensor]) -> list[tuple[list[torch.Tensor], int]]:
    """Group layers of identical shape, so a loss runs its small per-row statistics once per group
    instead of once per layer. On an accelerator, where the losses are bound by kernel launches,
    each group is also concatenated along the batch axis into one tensor; on the CPU, where they
    are memory-bound, that extra copy costs more than it saves, so the layers stay separate
    tensors. Same values either way (up to float rounding). Returns ``(tensors, layers)`` pairs."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in blocks:
        groups.setdefault((tuple(b.shape), b.dtype, b.device), []).append(b)
    concat = bool(blocks) and (blocks[0].device.type != "cpu" or _CONCAT_LAYERS_ON_CPU)
    return [([torch.cat(g)] if concat and len(g) > 1 else g, len(g)) for g in groups.values()]


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0,1) numbers drawn on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


# --- Eq. 1 -----------------------------------------------------------------------------------

def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_CE (Eq. 1): mean cross-entropy of P's class logits against the random targets.

    Args:
        logits: ``[B, num_classes]``.
        targets: ``[B]`` class indices.

    Example:
        >>> ce_loss(torch.zeros(2, 4), torch.tensor([0, 3]))  # = log 4
        tensor(1.3863)
    """
    return F.cross_entropy(logits, targets)


# --- Eq. 2 -----------------------------------------------------------------------------------

def tv_loss(x: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """L_TV (Eq. 2): sum of the unsquared L2 norms of the horizontal, vertical and both diagonal
    pixel differences of ``x`` (``[B, C, H, W]``), the two diagonal norms divided by sqrt(2)::

        ||x[..., :, :-1] - x[..., :, 1:]|| + ||x[..., :-1, :] - x[..., 1:, :]||
        + (||x[..., 1:, :-1] - x[..., :-1, 1:]|| + ||x[..., :-1, :-1] - x[..., 1:, 1:]||) / sqrt(2)

    Norm axis: by default ONE Euclidean norm over the whole difference tensor of the batch
    (batch, channel and pixel axes together), which is what the reference code computes with
    ``torch.norm(diff)`` and what produced the paper's numbers with weight 2.5e-5. With
    ``per_image=True`` each image gets its own norm (over channels and pixels) and a ``[B]``
    vector is returned (not used by synthesis; for analysis).

    Example (3x3, one channel, ``x = [[0,1,2],[3,4,5],[6,7,8]]``): horizontal differences are
    six times -1 (norm sqrt 6), vertical six times -3 (norm sqrt 54), anti-diagonal four times +2
    and diagonal four times -4 (norms 4 and 8), so ``tv = sqrt6 + sqrt54 + 12/sqrt2``.
    """
    d_h = x[..., :, :-1] - x[..., :, 1:]
    d_v = x[..., :-1, :] - x[..., 1:, :]
    d_a = x[..., 1:, :-1] - x[..., :-1, 1:]
    d_d = x[..., :-1, :-1] - x[..., 1:, 1:]
    if per_image:
        n = lambda d: torch.linalg.vector_norm(d.flatten(1), dim=1)  # noqa: E731
    else:
        n = torch.linalg.vector_norm
    return n(d_h) + n(d_v) + (n(d_a) + n(d_d)) / math.sqrt(2.0)


# --- Eq. 3 -----------------------------------------------------------------------------------

def iha_ssim(S: torch.Tensor, prefix: int = 1, c1: float = 0.01**2, c2: float = 0.03**2,
             eps: float = 1e-8) -> torch.Tensor:
    """SSIM between every pair of heads (h, g), h = g included, for every query row of one layer.

    The prefix rows and columns of ``S`` are dropped; each remaining query row (``G*G`` values,
    the attention map of that query over the patch grid) is min-max normalised to [0, 1] as
    ``(s - min) / (max - min + eps)``; SSIM uses ONE global window, i.e. means, variances and
    the covariance are taken over the whole G x G map. With one window the G x G reshape does not
    change anything, so the flat row is used. Variances are population variances
    (``E[x^2] - mu^2``, as the reference code). This is the direct formula, kept as the readable
    reference; :func:`iha_loss` computes the same values with a fused, faster autograd function.

    Why not pytorch-msssim: it slides an (odd-sized) Gaussian window over each image and compares
    one image with one other; here the window is the whole map and all H x H head pairs are needed
    at once, which is a batched matrix product of the rows (``X @ X^T``).

    Args:
        S: ``[B', H, N, N]`` pre-softmax logits.
        prefix: leading non-patch tokens to drop (0 for Swin).

    Returns:
        ``[B', N - prefix, H, H]`` SSIM values.
    """
    X = S[:, :, prefix:, prefix:]
    lo = X.amin(dim=-1, keepdim=True)
    hi = X.amax(dim=-1, keepdim=True)
    Xn = (X - lo) / (hi - lo + eps)  # [B', H, P, D]
    D = Xn.shape[-1]
    mu = Xn.mean(dim=-1).transpose(1, 2)  # [B', P, H]
    # E[x_h x_g] over the map for every pair: one batched matmul per query row.
    Y = Xn.transpose(1, 2)  # [B', P, H, D]
    exy = torch.matmul(Y, Y.transpose(-1, -2)) / D  # [B', P, H, H]
    mu_h, mu_g = mu.unsqueeze(-1), mu.unsqueeze(-2)
    mu_hg = mu_h * mu_g
    var = torch.diagonal(exy, dim1=-2, dim2=-1) - mu * mu  # [B', P, H]
    cov = exy - mu_hg
    num = (2 * mu_hg + c1) * (2 * cov + c2)
    den = (mu_h * mu_h + mu_g * mu_g + c1) * (var.unsqueeze(-1) + var.unsqueeze(-2) + c2)
    return num / den


def patch_block(S: torch.Tensor, prefix: int) -> torch.Tensor:
    """``S`` without prefix rows/columns (no slicing op at all when there is no prefix, which
    spares autograd a full-size zero-fill in the backward)."""
    return S if prefix == 0 else S[:, :, prefix:, prefix:]


def _ssim_from_stats(lo: torch.Tensor, hi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor,
                     c1: float, c2: float, eps: float) -> torch.Tensor:
    """SSIM of all head pairs of min-max normalised rows from raw-row statistics.

    ``lo, hi, mu``: ``[B', H, P]`` row min, max, mean; ``cov``: ``[B', H, H, P]`` population
    covariances of the raw rows. Normalising ``x -> (x - lo) * c`` with ``c = 1/(hi - lo + eps)``
    maps the mean to ``(mu - lo) * c`` and the covariance to ``cov_hg * c_h * c_g``.
    Returns ``[B', H, H, P]``."""
    c = 1.0 / (hi - lo + eps)
    mun = (mu - lo) * c
    covn = cov * c.unsqueeze(2) * c.unsqueeze(1)
    var = torch.diagonal(covn, dim1=1, dim2=2).permute(0, 2, 1)  # [B', H, P]
    mh, mg = mun.unsqueeze(2), mun.unsqueeze(1)
    num = (2 * mh * mg + c1) * (2 * covn + c2)
    den = (mh * mh + mg * mg + c1) * (var.unsqueeze(2) + var.unsqueeze(1) + c2)
    return num / den


class _IHAFunction(torch.autograd.Function):
    """``mean(1 - SSIM^2)`` over same-shaped patch blocks ``X_i`` ``[B', H, P, D]`` (one or more
    layers) with a hand-written backward: the loss depends on per-row statistics only, so no
    normalised copy of the maps, no H x H micro-matmuls and no autograd graph over full-size
    tensors are needed.

    Forward, per block: row min/max (with indices), mean, centred rows ``Xc``, covariances of
    every head pair (H(H+1)/2 row dot products); then one small SSIM graph over the stacked
    statistics of all blocks, differentiated with autograd w.r.t. them. Backward, per block:
    ``dX_h = g_mu_h / D + sum_g (g_cov_hg + g_cov_gh) Xc_g / D`` plus the min/max gradients at
    their arg-indices (a subgradient, as autograd's ``amin`` backward). Value and gradient equal
    the direct formula (:func:`iha_ssim`) up to float rounding (tests check this); the centred
    covariance is the numerically safer of the two.
    """

    @staticmethod
    def forward(ctx: Any, c1: float, c2: float, eps: float, *Xs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stats = [_row_stats(X) for X in Xs]
        with torch.enable_grad():
            small = [torch.stack([st[i] for st in stats]).detach().requires_grad_(True) for i in range(4)]
            lo, hi, mu, cov = (t.flatten(0, 1) for t in small)  # layers folded into the batch axis
            loss = (1 - _ssim_from_stats(lo, hi, mu, cov, c1, c2, eps).square()).mean()
            grads = torch.autograd.grad(loss, small)
        ctx.save_for_backward(*grads, *(t for st in stats for t in st[4:]))
        ctx.n = len(Xs)
        return loss.detach()

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        g_lo, g_hi, g_mu, g_cov, *rest = ctx.saved_tensors
        dXs = []
        for i in range(ctx.n):
            Xc, arg_lo, arg_hi = rest[3 * i: 3 * i + 3]
            B, H, P, D = Xc.shape
            G = (g_cov[i] + g_cov[i].transpose(1, 2)) * (go / D)  # [B', H, H, P]
            if H <= 4:
                dX = (g_mu[i] * (go / D)).unsqueeze(-1).expand(B, H, P, D).contiguous()
                for h in range(H):
                    for g in range(H):
                        dX[:, h].addcmul_(G[:, h, g].unsqueeze(-1), Xc[:, g])
            else:
                dX = torch.einsum("bhgp,bgpd->bhpd", G, Xc) + (g_mu[i] * (go / D)).unsqueeze(-1)
            dX.scatter_add_(-1, arg_lo.unsqueeze(-1), (g_lo[i] * go).unsqueeze(-1))
            dX.scatter_add_(-1, arg_hi.unsqueeze(-1), (g_hi[i] * go).unsqueeze(-1))
            dXs.append(dX)
        return (None, None, None, *dXs)


def _row_stats(X: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row min, max, mean ``[B', H, P]``, head-pair covariances ``[B', H, H, P]``, and for the
    backward the centred rows and the arg-min/max indices."""
    B, H, P, D = X.shape
    lo, arg_lo = X.min(dim=-1)
    hi, arg_hi = X.max(dim=-1)
    mu = X.mean(dim=-1)
    Xc = X - mu.unsqueeze(-1)
    if H <= 4:  # few heads: row dot products beat tiny batched matmuls on CPU
        cov = X.new_empty(B, H, H, P)
        for h in range(H):
            for g in range(h, H):
                v = torch.linalg.vecdot(Xc[:, h], Xc[:, g]) / D
                cov[:, h, g] = v
                if g != h:
                    cov[:, g, h] = v
    else:
        Y = Xc.transpose(1, 2)  # [B', P, H, D]
        cov = (Y @ Y.transpose(-1, -2)).permute(0, 2, 3, 1) / D
    return lo, hi, mu, cov, Xc, arg_lo, arg_hi


def iha_loss(logits: Sequence[torch.Tensor], prefix: int | Sequence[int] = 1, c1: float = 0.01**2,
             c2: float = 0.03**2, eps: float = 1e-8) -> torch.Tensor:
    """L_IHA (Eq. 3, MimiQ's inter-head attention similarity): ``mean(1 - SSIM^2)``.

    SSIM as in :func:`iha_ssim` (global window, all head pairs incl. h = g, C1 = 0.01^2,
    C2 = 0.03^2), computed by a fused autograd function from row statistics (same value and
    gradient, several times faster on CPU). The mean is taken per layer over (entries, query rows,
    head pairs) and then over layers; for ViT/DeiT all layers have the same shape, so this equals
    the reference code's one global mean; for Swin it is the reference code's mean of per-layer
    means.

    Args:
        logits: per layer ``S`` ``[B', H, N, N]``.
        prefix: one int, or one per layer.

    Example:
        >>> S = torch.randn(1, 1, 5, 5).expand(1, 3, 5, 5)  # three identical heads
        >>> float(iha_loss([S], prefix=1))  # SSIM = 1 for every pair
        0.0
    """
    pre = _prefixes(prefix, len(logits))
    blocks = [patch_block(S, p) for S, p in zip(logits, pre)]
    total = 0.0
    for tensors, layers in _layer_groups(blocks):
        # a group of same-shaped layers: its mean is the mean of its per-layer means
        total = total + _IHAFunction.apply(c1, c2, eps, *tensors) * layers
    return total / len(logits)


# --- Eq. 5-10 --------------------------------------------------------------------------------

def de_loss(logits: Sequence[torch.Tensor], prefix: int | Sequence[int], generator: torch.Generator,
            num_rows: int = 64, offdiag_only: bool = False, eps: float = 1e-8,
            norm_eps: float = 1e-6) -> torch.Tensor:
    """L_DE (Eq. 5-10): Gaussian differential-entropy surrogate of the patch-similarity spread.

    Per layer and batch entry: ``A`` = head mean of ``S`` without prefix rows/columns
    (``[G^2, G^2]``; for Swin a window's ``[ws^2, ws^2]``); if it has more than ``num_rows``
    rows, ``num_rows`` distinct rows are drawn uniformly (independently per entry and layer, from
    ``generator``); rows are L2-normalised (``F.normalize``, eps 1e-6) to ``U`` and
    ``C = U U^T`` (cosine similarities); ``sigma^2`` = population variance of the entries of ``C``
    (diagonal included, as the reference code; ``offdiag_only=True``: off-diagonal entries only,
    as the paper) ``+ eps``; ``h = 0.5 * (log(2 pi e) + log sigma^2)``.

    Returns ``-mean(h)`` over all (layer, entry) pairs (the reference code's pooled mean; for
    ViT/DeiT the same as the mean over layers of per-layer means).

    Example:
        rows ``[1,0], [0,1]`` (one entry, ``num_rows >= 2``): ``C = I``, entries ``1,0,0,1``,
        ``sigma^2 = 0.25``, ``loss = -0.5 * (log(2 pi e) + log 0.25)``.
    """
    pre = _prefixes(prefix, len(logits))
    hs = []
    for tensors, _ in _layer_groups([patch_block(S, p) for S, p in zip(logits, pre)]):
        Bp, H, n, D = tensors[0].shape
        k = min(n, num_rows)
        if n > num_rows:
            # distinct rows per entry: the first num_rows of a uniform random permutation
            # (one draw for the whole group, split per layer)
            idx = _rand((len(tensors) * Bp, n), generator, tensors[0].device).argsort(dim=1)[:, :k]
            idx = idx.view(len(tensors), Bp, 1, k, 1).expand(-1, -1, H, -1, D)
            rows = [X.gather(2, i) for X, i in zip(tensors, idx)]
        else:
            rows = list(tensors)
        # head mean of the chosen rows only (cheaper than of the whole map, same values);
        # the rest runs once for the group
        A = torch.cat([r.mean(dim=1) for r in rows]) if len(rows) > 1 else rows[0].mean(dim=1)
        U = F.normalize(A, p=2, dim=-1, eps=norm_eps)
        C = U @ U.transpose(-1, -2)  # [B', k, k]
        if offdiag_only and k > 1:
            off = ~torch.eye(k, dtype=torch.bool, device=C.device)
            vals = C[:, off]
        else:
            vals = C.flatten(1)
        var = vals.var(dim=1, unbiased=False) + eps
        hs.append(0.5 * (_LOG_2PIE + torch.log(var)))
    return -torch.cat(hs).mean()


# --- Eq. 11-13: importance scores and the adaptive mask --------------------------------------

def cls_scores(S: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Head-averaged CLS-to-patch row of one ViT/DeiT layer: ``S[:, :, 0, prefix:].mean(heads)``,
    ``[B, G^2]`` (row 0 is the CLS query; prefix columns, e.g. CLS and distillation token, are
    dropped)."""
    if prefix < 1:
        raise ValueError("cls_scores needs a CLS token (prefix >= 1); for Swin use received_scores")
    return S[:, :, 0, prefix:].mean(dim=1)


def received_scores(S: torch.Tensor) -> torch.Tensor:
    """Swin's stand-in for the CLS row [ours]: the mean logit each token *receives* within its
    window, averaged over heads and queries, ``S.mean(heads).mean(queries)`` -> ``[B', ws^2]``.
    (For ViT the CLS row says how much the global summary token attends to each patch; Swin has
    no such token, so every query of the window votes.)"""
    return S.mean(dim=(1, 2))


def windows_to_grid(scores: torch.Tensor, batch: int, resolution: tuple[int, int],
                    window: tuple[int, int], shift: tuple[int, int] = (0, 0),
                    order: str = "shift_pad") -> torch.Tensor:
    """Put per-window token scores of one Swin block back on the block's token grid.

    ``order`` says how the block made its windows, and this function inverts it:

    * ``"shift_pad"`` (timm's ``SwinTransformerBlock._attn``: roll by ``-shift``, then pad):
      windows ``[B*nW, wh*ww]`` -> window reverse on the padded grid -> crop to ``resolution``
      -> undo the cyclic shift (roll by ``+shift``);
    * ``"pad_shift"`` (the original Swin of the dense checkpoints, ``maskaq.dense.swin``: pad,
      then roll by ``-shift`` on the padded map): window reverse on the padded grid -> roll by
      ``+shift`` on the padded grid -> crop. Token ``(i, j)`` then comes from padded position
      ``((i - s_h) mod Hp, (j - s_w) mod Wp)``.

    The two agree when the resolution is a multiple of the window (no padding) or there is no
    shift.

    Returns:
        ``[B, H, W]`` where ``(H, W) = resolution``.
    """
    if order not in ("shift_pad", "pad_shift"):
        raise ValueError(f"order {order!r} is not valid; valid: shift_pad, pad_shift")
    H, W = resolution
    wh, ww = window
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    nW = (Hp // wh) * (Wp // ww)
    if scores.shape[0] != batch * nW or scores.shape[1] != wh * ww:
        raise ValueError(
            f"window scores of shape {tuple(scores.shape)} do not fit batch {batch}, resolution "
            f"{resolution}, window {window} (expected [{batch * nW}, {wh * ww}])")
    g = scores.view(batch, Hp // wh, Wp // ww, wh, ww).permute(0, 1, 3, 2, 4).reshape(batch, Hp, Wp)
    if order == "pad_shift":
        if any(shift):
            g = torch.roll(g, shifts=tuple(shift), dims=(1, 2))
        return g[:, :H, :W]
    g = g[:, :H, :W]
    if any(shift):
        g = torch.roll(g, shifts=tuple(shift), dims=(1, 2))
    return g


def mask_keep_ratio(step: int, total_steps: int, start: float = 0.5, end: float = 0.1) -> float:
    """Eq. 12: keep ratio ``r_t = start*(1 - t/T) + end*t/T`` (the reference code's
    ``update_mask_ratio``), so ``r_0 = start`` and ``r_T = end``; over the steps ``t = 0..T-1``
    of one run the last ratio is ``end + (start-end)/T``. Clamped to ``[min, max]`` of the two."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    p = step / total_steps
    r = start * (1 - p) + end * p
    return float(min(max(r, min(start, end)), max(start, end)))


def adaptive_mask(importance: torch.Tensor, step: int, total_steps: int, generator: torch.Generator,
                  *, start_ratio: float = 0.5, end_ratio: float = 0.1,
                  drop_prob: float = 0.3, min_keep: int = 1) -> torch.Tensor:
    """The adaptive mask (Eq. 11-13), for a whole batch at once.

    ``importance`` ``c`` is ``[B, G^2]`` (for ViT/DeiT: the CLS-to-patch row of S^P averaged over
    all layers and heads, see :func:`cls_scores`). With ``r_t`` = :func:`mask_keep_ratio`:
    ``k = max(1, int(G^2 * r_t))``; the top-k patches of ``c`` are selected; of those, a uniformly
    random subset of ``max(min_keep, round(k * (1 - drop_prob)))`` is kept (Python's round, half to
    even, as the reference code; drop probability 0.3 -> keep 0.7k). Independent draws per image.

    Returns:
        bool ``[B, G^2]`` mask (True = patch used by L_MAA). No gradient.
    """
    c = importance.detach()
    B, P = c.shape
    r = mask_keep_ratio(step, total_steps, start_ratio, end_ratio)
    k = min(P, max(1, int(P * r)))
    keep = min(k, max(min_keep, int(round(k * (1.0 - drop_prob)))))
    top = c.topk(k, dim=1).indices  # [B, k]
    if keep < k:
        order = _rand((B, k), generator, c.device).argsort(dim=1)[:, :keep]
        top = top.gather(1, order)
    return torch.zeros(B, P, dtype=torch.bool, device=c.device).scatter_(1, top, True)


# --- Eq. 14 ----------------------------------------------------------------------------------

def maa_loss(a_p: Sequence[torch.Tensor], a_q: Sequence[torch.Tensor], mask: torch.Tensor | None,
             eps: float = 1e-8) -> torch.Tensor:
    """L_MAA (Eq. 14, masked attention alignment).

    Per layer: ``sum(|a^P - a^Q| * m) / (sum(m) + eps)`` over the batch and the masked patches
    (the reference code pools the batch in one masked mean); then the mean over layers. One mask
    for all layers. Gradients flow into both ``a_p`` and ``a_q``.

    Args:
        a_p, a_q: per layer ``[B, G^2]`` head-averaged CLS-to-patch rows of S for P and Q
            (:func:`cls_scores`; Swin: :func:`received_scores` mapped to the grid).
        mask: bool ``[B, G^2]``; ``None`` = all patches.

    Example:
        >>> maa_loss([torch.tensor([[1., 2.]])], [torch.tensor([[0., 0.]])], torch.tensor([[True, False]]))
        tensor(1.0000)
    """
    if len(a_p) != len(a_q) or not a_p:
        raise ValueError(f"need the same non-zero number of layers for P and Q, got {len(a_p)} and {len(a_q)}")
    P = torch.stack(list(a_p))  # [L, B, G^2]
    Q = torch.stack(list(a_q))
    diff = (P - Q).abs()
    if mask is None:
        return diff.mean(dim=(1, 2)).mean()
    m = mask.to(diff.dtype)
    return ((diff * m).sum(dim=(1, 2)) / (m.sum() + eps)).mean()


# --- PSAQ-ViT (§4) ---------------------------------------------------------------------------

def psaq_entropy_loss(head_outs: Sequence[torch.Tensor], prefix: int | Sequence[int] = 1,
                      bandwidth: float = 0.01, num_points: int = 10, pdf_eps: float = 1e-4) -> torch.Tensor:
    """PSAQ-ViT's patch-similarity entropy loss (negated, to be minimised), vectorised.

    What PSAQ-ViT (ECCV 2022, github.com/zkkli/PSAQ-ViT, ``generate_data.py`` + ``utils/kde.py``)
    does, per attention layer: take the attention-block output ``softmax(qk^T) @ v`` per head
    (``[B, H, N, d]``, its ``matmul2`` hook), average over heads, drop the CLS row -> patch
    features ``[B, N-1, d]``; cosine similarity of every pair of patches (``[B, N-1, N-1]``,
    diagonal included); a Gaussian kernel density estimate (bandwidth 0.01) of each image's
    similarities, evaluated at 10 points ``linspace(min, max)`` where min/max are over the whole
    batch (taken as plain numbers, no gradient); ``pdf += 1e-4``; differential entropy
    ``trapz(-p log p)`` per image, mean over the batch; the loss is minus the *sum* over layers.

    What we chose: the same, with the patch features read from the attention adapter's
    ``head_out`` records; all ``prefix`` tokens dropped (PSAQ drops only one, which on a distilled
    DeiT keeps the distillation token); for Swin windows are batch entries and all tokens are kept
    (PSAQ's code drops each window's first token, an artefact of the ViT slicing).

    Args:
        head_outs: per layer ``[B', H, N, d]``.
        prefix: one int, or one per layer.

    Returns:
        scalar ``-sum_layers mean_images H_kde``.
    """
    pre = _prefixes(prefix, len(head_outs))
    coef = 1.0 / math.sqrt(2 * math.pi * bandwidth**2)
    total = head_outs[0].new_zeros(())
    for O, p in zip(head_outs, pre):
        feats = O.mean(dim=1)[:, p:, :]  # [B', P, d]
        Fn = F.normalize(feats, p=2, dim=-1, eps=1e-8)
        sims = (Fn @ Fn.transpose(-1, -2)).flatten(1)  # [B', P*P]
        lo, hi = sims.detach().min(), sims.detach().max()  # constants, as PSAQ's .item() (no sync)
        xs = lo + (hi - lo) * torch.linspace(0, 1, num_points, device=sims.device, dtype=sims.dtype)
        d = xs.view(1, -1, 1) - sims.unsqueeze(1)  # [B', T, P*P]
        pdf = coef * torch.exp(-d.square() / (2 * bandwidth**2)).mean(dim=-1) + pdf_eps
        ent = torch.trapezoid(-pdf * torch.log(pdf), xs, dim=-1)  # [B']
        total = total - ent.mean()
    return total


# --- PSAQ-ViT's total variation (method.md §6) -----------------------------------------------

def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's (DeepInversion's) image prior: the sum of the four whole-batch L2 norms of the
    horizontal, vertical and both diagonal pixel differences, *without* the 1/sqrt(2) of Eq. 2.

    Example (the 3x3 ramp of :func:`tv_loss`): ``sqrt6 + sqrt54 + 4 + 8``.
    """
    d_h = x[..., :, :-1] - x[..., :, 1:]
    d_v = x[..., :-1, :] - x[..., 1:, :]
    d_a = x[..., 1:, :-1] - x[..., :-1, 1:]
    d_d = x[..., :-1, :-1] - x[..., 1:, 1:]
    n = torch.linalg.vector_norm
    return n(d_h) + n(d_v) + n(d_a) + n(d_d)


def size_factor(height: int, width: int, ref: int) -> float:
    """``ref / sqrt(H * W)``: multiplying a whole-batch TV norm by it gives the value the same
    roughness would have at ``ref x ref`` px (a norm grows with the square root of the pixel
    count). Exactly 1.0 at ``H = W = ref``; 1.0 when ``ref`` is 0 (scaling off)."""
    if ref <= 0 or (height == ref and width == ref):
        return 1.0
    return ref / math.sqrt(height * width)


def scaled_offset(limit: int, size: int, ref: int) -> int:
    """A roll limit given in px at ``ref`` px, for an image side of ``size`` px:
    ``floor(limit * size / ref + 0.5)``, at least 1 when ``limit > 0``. Exactly ``limit`` at
    ``size = ref`` (and when ``ref`` is 0: scaling off). 28 px: 8 -> 1, 16 -> 2, 15 -> 2, 30 -> 4."""
    if limit <= 0:
        return 0
    if ref <= 0 or size == ref:
        return int(limit)
    return max(1, int(math.floor(limit * size / ref + 0.5)))


# --- SPDFQ (method.md §7) --------------------------------------------------------------------

def gmm_priors(generator: torch.Generator, shape: tuple[int, ...], grid: tuple[int, int], *,
               cls_mass: bool = True, max_components: int = 5, mean_range: float = 5.0,
               cov_scale: float = 10.0, eig_max: float = 5.0, eig_min: float = 1e-3,
               max_redraws: int = 100) -> torch.Tensor:
    """SPDFQ's random attention priors (Attention Priors Alignment).

    For every prior (one per entry of ``shape``, e.g. ``(images, heads)``): ``k ~ U{1..max}``
    Gaussian components on the ``grid`` (``gh x gw`` points ``linspace(-5, 5)`` per axis);
    each mean ``~ U(-5, 5)^2``; covariance ``A A^T`` with ``A = 10 * U(0,1)^{2x2}``, its
    eigenvalues clipped to ``[0, 5]``; a covariance whose smallest clipped eigenvalue is below
    ``eig_min`` (singular: no density) is redrawn. The prior is the maximum over the
    components of their densities on the grid, normalised to sum ``1 - u`` with
    ``u ~ U(0, 1)`` (the CLS keeps ``u``), or to 1 with ``cls_mass=False`` (Swin: ``u = 0``).

    Drawn on ``generator`` (CPU for device-independent draws). Returns ``[*shape, gh*gw]``.
    """
    n = int(math.prod(shape))
    gh, gw = int(grid[0]), int(grid[1])
    K = int(max_components)
    g = generator
    k = torch.randint(1, K + 1, (n,), generator=g, device=g.device)
    mu = (torch.rand((n, K, 2), generator=g, device=g.device) * 2 - 1) * mean_range
    A = cov_scale * torch.rand((n, K, 2, 2), generator=g, device=g.device)
    for _ in range(max_redraws + 1):
        evals, evecs = torch.linalg.eigh(A @ A.transpose(-1, -2))
        evals = evals.clamp(0.0, eig_max)
        bad = evals.min(dim=-1).values < eig_min
        if not bool(bad.any()):
            break
        A = torch.where(bad[..., None, None], cov_scale * torch.rand((n, K, 2, 2), generator=g, device=g.device), A)
    else:
        raise ValueError(f"could not draw non-singular prior covariances in {max_redraws} redraws")
    cov = evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)
    ys = torch.linspace(-mean_range, mean_range, gh, device=g.device)
    xs = torch.linspace(-mean_range, mean_range, gw, device=g.device)
    pts = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # [P, 2]
    d = pts.view(1, 1, -1, 2) - mu.unsqueeze(2)  # [n, K, P, 2]
    inv = torch.linalg.inv(cov)
    m = torch.einsum("nkpi,nkij,nkpj->nkp", d, inv, d)
    dens = torch.exp(-0.5 * m) / (2 * math.pi * torch.sqrt(torch.linalg.det(cov))).unsqueeze(-1)
    used = torch.arange(K, device=g.device).view(1, K) < k.view(n, 1)
    dens = torch.where(used.unsqueeze(-1), dens, torch.zeros_like(dens))
    prior = dens.max(dim=1).values  # [n, P]
    prior = prior / prior.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    if cls_mass:
        u = torch.rand((n, 1), generator=g, device=g.device)
        prior = prior * (1 - u)
    return prior.view(*shape, gh * gw)


def cls_attention(probs: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Post-softmax CLS -> patch attention of one ViT/DeiT layer, per head: ``probs[:, :, 0,
    prefix:]`` (``[B, H, G*G]``; prefix columns such as a distillation token dropped)."""
    if prefix < 1:
        raise ValueError("cls_attention needs a CLS token (prefix >= 1); for Swin use window_mean_attention")
    return probs[:, :, 0, prefix:]


def window_mean_attention(probs: torch.Tensor, batch: int) -> torch.Tensor:
    """Swin's stand-in for the CLS row (SPDFQ: "the attention averaged over all tokens"): the
    post-softmax attention averaged over all queries of all windows of each image, per head,
    ``[B*nW, H, N, N] -> [B, H, N]`` (each row sums to 1)."""
    bw, h, n, _ = probs.shape
    if bw % batch:
        raise ValueError(f"{bw} attention entries do not split into {batch} images")
    return probs.view(batch, bw // batch, h, n, n).mean(dim=(1, 3))


def apa_loss(rows: Sequence[torch.Tensor], priors: Sequence[torch.Tensor], depth: Sequence[int],
             num_layers: int) -> torch.Tensor:
    """SPDFQ's Attention Priors Alignment:
    ``sum_l (l / L) * sum_h MSE(A_{l,h}, prior_{l,h})`` over the given layers.

    Args:
        rows: per layer ``[B, H, P]`` attention rows (:func:`cls_attention` /
            :func:`window_mean_attention`).
        priors: per layer ``[B, H, P]`` (:func:`gmm_priors`), same shapes.
        depth: the 1-based depth ``l`` of each layer; num_layers: ``L``.

    MSE is the mean over images and patches, summed over heads.
    """
    if len(rows) != len(priors) or len(rows) != len(depth):
        raise ValueError(f"got {len(rows)} attention rows, {len(priors)} priors, {len(depth)} depths")
    total = rows[0].new_zeros(()) if rows else torch.zeros(())
    for a, p, l in zip(rows, priors, depth):
        if a.shape != p.shape:
            raise ValueError(f"attention rows {tuple(a.shape)} and priors {tuple(p.shape)} differ in shape")
        total = total + (l / num_layers) * (a - p.to(a)).square().mean(dim=(0, 2)).sum()
    return total


def msr_boxes(generator: torch.Generator, height: int, width: int, max_crops: int = 4,
              min_frac: float = 0.25, max_frac: float = 0.5, tries: int = 50) -> list[tuple[int, int, int, int]]:
    """SPDFQ's Multi-Semantic Reinforcement regions of one image: ``m ~ U{1..max_crops}``
    non-overlapping boxes ``(top, left, height, width)`` in px, sides uniform in
    ``[ceil(min_frac*side), floor(max_frac*side)]`` and positions uniform [I]; a box that
    overlaps an earlier one is redrawn (up to ``tries`` times, then that box is dropped, so
    at least one box is always returned)."""
    g = generator

    def ri(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g, device=g.device))

    m = ri(1, max(1, int(max_crops)))
    hmin, hmax = max(1, math.ceil(min_frac * height)), max(1, int(max_frac * height))
    wmin, wmax = max(1, math.ceil(min_frac * width)), max(1, int(max_frac * width))
    hmin, wmin = min(hmin, hmax), min(wmin, wmax)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(m):
        for _ in range(tries):
            bh, bw = ri(hmin, hmax), ri(wmin, wmax)
            t, l = ri(0, height - bh), ri(0, width - bw)
            if all(t + bh <= t2 or t2 + h2 <= t or l + bw <= l2 or l2 + w2 <= l for t2, l2, h2, w2 in boxes):
                boxes.append((t, l, bh, bw))
                break
    return boxes


def msr_crops(x: torch.Tensor, boxes: Sequence[Sequence[tuple[int, int, int, int]]]) -> torch.Tensor:
    """Crop every box of every image and resize it to the image size (bilinear, the crop alone:
    a crop's gradient reaches only the pixels of its own box). ``boxes[b]``: the boxes of image
    ``b`` (:func:`msr_boxes`). Returns ``[total boxes, C, H, W]`` in image-then-box order."""
    H, W = x.shape[-2:]
    out = []
    for b, bx in enumerate(boxes):
        for t, l, h, w in bx:
            c = x[b:b + 1, :, t:t + h, l:l + w]
            out.append(F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False))
    if not out:
        return x.new_zeros((0, *x.shape[1:]))
    return torch.cat(out)


def soft_targets(generator: torch.Generator, classes: Sequence[Sequence[int]], num_classes: int,
                 low: float = 5.0, high: float = 10.0) -> torch.Tensor:
    """SPDFQ's soft labels: per row ``Z ~ U(0, 1)^C``, then ``Z[c] ~ U(low, high)`` for every
    class ``c`` of that row (one for a crop, all its crops' classes for a whole image);
    target ``softmax(Z)``. Returns ``[rows, C]``."""
    g = generator
    Z = torch.rand((len(classes), num_classes), generator=g, device=g.device)
    for i, cs in enumerate(classes):
        for c in cs:
            Z[i, int(c)] = low + (high - low) * float(torch.rand((1,), generator=g, device=g.device))
    return Z.softmax(dim=-1)


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy ``mean_rows -sum_c t_c log softmax(z)_c``."""
    return -(targets.to(logits) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
