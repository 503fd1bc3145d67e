"""Original-semantics Swin: against a slow per-window reference, and through quantize_model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from maskaq.dense.models import tiny_swin_config
from maskaq.dense.swin import SwinBackbone

torch.manual_seed(0)


def _ln(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _ref_window_attention(tokens, attn, ws, labels):
    """tokens [ws*ws, C] of one window, row-major; labels [ws*ws] region ids (None: no mask)."""
    n, C = tokens.shape
    H = attn.num_heads
    d = C // H
    qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    table = attn.relative_position_bias_table
    rel = torch.zeros(n, n, dtype=torch.long)  # relative-position index, written out
    for i in range(n):
        yi, xi = divmod(i, ws)
        for j in range(n):
            yj, xj = divmod(j, ws)
            rel[i, j] = (yi - yj + ws - 1) * (2 * ws - 1) + (xi - xj + ws - 1)
    penalty = torch.zeros(n, n)
    if labels is not None:
        for i in range(n):
            for j in range(n):
                if labels[i] != labels[j]:
                    penalty[i, j] = -100.0
    out = torch.zeros(n, C)
    for h in range(H):
        qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
        logits = (qh @ kh.T) / math.sqrt(d) + table[:, h][rel] + penalty
        out[:, h * d:(h + 1) * d] = torch.softmax(logits, -1) @ vh
    return out @ attn.proj.weight.T + attn.proj.bias


def _region(p, size, ws, s):
    """Region id along one axis of the padded, shifted map (official slices 0:-ws, -ws:-s, -s:)."""
    if p < size - ws:
        return 0
    return 1 if p < size - s else 2


def _ref_block(x, H, W, blk):
    """x [H, W, C] (one image): pad, THEN shift, explicit loop over windows."""
    ws, s = blk.window_size, blk.shift_size
    C = x.shape[-1]
    shortcut = x
    y = _ln(x, blk.norm1)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    padded = torch.zeros(Hp, Wp, C)
    padded[:H, :W] = y
    shifted = torch.zeros_like(padded)
    for i in range(Hp):
        for j in range(Wp):
            shifted[i, j] = padded[(i + s) % Hp, (j + s) % Wp]
    res = torch.zeros_like(shifted)
    for wi in range(Hp // ws):
        for wj in range(Wp // ws):
            toks, labels = [], []
            for a in range(ws):
                for b in range(ws):
                    i, j = wi * ws + a, wj * ws + b
                    toks.append(shifted[i, j])
                    labels.append((_region(i, Hp, ws, s), _region(j, Wp, ws, s)))
            o = _ref_window_attention(torch.stack(toks), blk.attn, ws, labels if s > 0 else None)
            for t in range(ws * ws):
                a, b = divmod(t, ws)
                res[wi * ws + a, wj * ws + b] = o[t]
    unshifted = torch.zeros_like(res)
    for i in range(Hp):
        for j in range(Wp):
            unshifted[(i + s) % Hp, (j + s) % Wp] = res[i, j]
    x = shortcut + unshifted[:H, :W]
    m = blk.mlp
    h = F.gelu(_ln(x, blk.norm2) @ m.fc1.weight.T + m.fc1.bias)
    return x + h @ m.fc2.weight.T + m.fc2.bias


def _ref_backbone(img, model: SwinBackbone):
    cfg = model.cfg
    p = cfg.patch_size
    Hi, Wi = img.shape[-2:]
    img = F.pad(img, (0, (-Wi) % p, 0, (-Hi) % p))
    x = F.conv2d(img[None], model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)[0]
    x = _ln(x.permute(1, 2, 0), model.patch_embed.norm)  # [H, W, C]
    outs = []
    for li, layer in enumerate(model.layers):
        H, W = x.shape[:2]
        for blk in layer.blocks:
            x = _ref_block(x, H, W, blk)
        if li in cfg.out_indices:
            outs.append(_ln(x, getattr(model, f"norm{li}")).permute(2, 0, 1))
        if layer.downsample is not None:
            C = x.shape[-1]
            Hp, Wp = H + H % 2, W + W % 2
            pad = torch.zeros(Hp, Wp, C)
            pad[:H, :W] = x
            merged = torch.zeros(Hp // 2, Wp // 2, 4 * C)
            for i in range(Hp // 2):
                for j in range(Wp // 2):
                    merged[i, j] = torch.cat([pad[2 * i, 2 * j], pad[2 * i + 1, 2 * j],
                                              pad[2 * i, 2 * j + 1], pad[2 * i + 1, 2 * j + 1]])
            ds = layer.downsample
            x = _ln(merged, ds.norm) @ ds.reduction.weight.T
    return outs


def _tiny(**kw):
    m = SwinBackbone(tiny_swin_config(**kw)).eval()
    with torch.no_grad():  # non-trivial relative-position bias and LayerNorm affine
        for n, p in m.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 1.0)
            elif "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@torch.no_grad()
def test_swin_matches_per_window_reference_on_non_multiple_input():
    model = _tiny(depths=(2, 2, 2, 2))
    img = torch.randn(1, 3, 60, 92)  # 15x23 -> 8x12 -> 4x6 -> 2x3 tokens, window 7: all padded
    outs = model(img)
    ref = _ref_backbone(img[0], model)
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 15, 23), (32, 8, 12), (64, 4, 6), (128, 2, 3)]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o[0], r, atol=2e-4, rtol=1e-4)


def test_quantize_model_replaces_window_attention():
    from maskaq.dense.models import SegConfig, UperNet, quantize_backbone
    from maskaq.qmodel import MaskAQAttention, QuantConfig, QuantLinear, quantizers_disabled, record_attention

    P = UperNet(SegConfig(swin=tiny_swin_config(), channels=16, aux_channels=8, num_classes=5)).eval()
    x = torch.randn(2, 3, 60, 92)
    with torch.no_grad():
        ref = P(x)
    Q = quantize_backbone(P, QuantConfig.parse("4w4a"))
    attn = [m for m in Q.backbone.modules() if isinstance(m, MaskAQAttention)]
    assert len(attn) == 8 and all(a.geometry.windowed and a.geometry.grid == (7, 7) for a in attn)
    assert isinstance(Q.backbone.layers[0].downsample.reduction, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in P.modules())
    with torch.no_grad():
        torch.testing.assert_close(P(x), ref, atol=1e-5, rtol=1e-5)  # prepared P: same maths
        with quantizers_disabled(Q):
            torch.testing.assert_close(Q(x), ref, atol=1e-5, rtol=1e-5)
        yq = Q(x)
    assert torch.isfinite(yq).all() and not torch.allclose(yq, ref)
    with record_attention(Q.backbone, what=("logits",)) as recs:
        Q.backbone(x)
    assert len(recs) == 8 and recs[0].logits.shape[1:] == (1, 49, 49)
    assert recs[0].logits.shape[0] == 2 * 3 * 4  # batch x windows (15x23 padded to 21x28)


@torch.no_grad()
def test_swin_single_row_of_windows_matches_reference():
    # 48x64 -> 12x16 tokens: one row of windows and several columns in stage 1 (and 1x1 / 1x2
    # later); window_partition's result is then not viewable with .view (regression)
    model = _tiny(depths=(2, 2, 2, 2))
    img = torch.randn(1, 3, 48, 64)
    outs = model(img)
    ref = _ref_backbone(img[0], model)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o[0], r, atol=2e-4, rtol=1e-4)
