"""Structure of Q: module census, bit-identity with quantizers off, the attention adapter, params."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from tiny_models import tiny_input, tiny_model
from maskaq.params import QuantParams, load_params, read_params
from maskaq.qmodel import (
    MaskAQAttention,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    quantize_model,
    quantizers,
    quantizers_disabled,
    record_attention,
)
from maskaq.quant import ActQuantizer, QuantError, WeightQuantizer

ATTN_Q = ("q_quantizer", "k_quantizer", "softmax_quantizer", "v_quantizer")


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_census(any_tiny):
    lm = tiny_model(any_tiny)
    P = lm.model
    Q = quantize_model(P, QuantConfig.parse("4w4a"))
    # every Linear of P is a QuantLinear in Q, with the same name
    lin = _linears(P)
    assert lin and all(isinstance(Q.get_submodule(n), QuantLinear) for n in lin)
    assert not any(type(m) is nn.Linear for m in Q.modules())
    assert isinstance(Q.patch_embed.proj, QuantConv2d)
    assert not hasattr(Q.patch_embed.proj, "input_quantizer")  # the input image stays FP
    attn = [n for n, m in Q.named_modules() if isinstance(m, MaskAQAttention)]
    assert attn
    names = dict(quantizers(Q))
    for a in attn:
        for q in ATTN_Q:
            assert isinstance(names[f"{a}.{q}"], ActQuantizer)
    for n in lin:
        assert isinstance(names[f"{n}.input_quantizer"], ActQuantizer)
        assert isinstance(names[f"{n}.weight_quantizer"], WeightQuantizer)
    assert len(names) == 2 * len(lin) + 4 * len(attn) + 1
    # P untouched, state-dict keys of P preserved in Q
    assert not any(isinstance(m, (QuantLinear, ActQuantizer)) for m in P.modules())
    assert set(P.state_dict()) <= set(Q.state_dict())
    if any_tiny == "deit_distilled":
        assert isinstance(Q.head, QuantLinear) and isinstance(Q.head_dist, QuantLinear)
    if any_tiny == "swin":
        assert isinstance(Q.layers[1].downsample.reduction, QuantLinear)


def test_timm_classes_untouched():
    fwd = timm.layers.Attention.forward
    lm = tiny_model("vit")
    quantize_model(lm.model, QuantConfig(4, 4))
    assert timm.layers.Attention.forward is fwd
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=1, num_heads=3)
    assert type(fresh.blocks[0].attn) is timm.layers.Attention
    assert type(fresh.blocks[0].attn.qkv) is nn.Linear


def test_bit_identical_with_quantizers_off(any_tiny):
    lm = tiny_model(any_tiny)
    x = tiny_input(lm, 3)
    Q = quantize_model(lm.model, QuantConfig.parse("3w3a"))
    y_q = Q(x)  # initialises the activation quantizers
    with torch.no_grad(), quantizers_disabled(Q):
        assert torch.equal(Q(x), lm.model(x))
    assert not torch.equal(y_q, lm.model(x))


def test_prepared_model_matches_timm(any_tiny):
    """P with the explicit attention equals timm's own (non-fused) maths up to float rounding."""
    from tiny_models import TINY

    arch, kw = TINY[any_tiny]
    torch.manual_seed(0)
    raw = timm.create_model(arch, pretrained=False, **kw).eval()
    lm = tiny_model(any_tiny)
    lm.model.load_state_dict(raw.state_dict())
    x = tiny_input(lm)
    with torch.no_grad():
        assert torch.allclose(raw(x), lm.model(x), atol=1e-5, rtol=1e-5)


def test_keep_first_last_8bit():
    lm = tiny_model("deit_distilled")
    Q = quantize_model(lm.model, QuantConfig(3, 3, keep_first_last_8bit=True))
    q = dict(quantizers(Q))
    assert q["patch_embed.proj.weight_quantizer"].bits == 8
    assert q["head.weight_quantizer"].bits == 8 and q["head_dist.input_quantizer"].bits == 8
    assert q["blocks.0.attn.qkv.weight_quantizer"].bits == 3


def test_config_parse():
    c = QuantConfig.parse("4w8a")
    assert (c.w_bits, c.a_bits, c.tag) == (4, 8, "4w8a")
    for bad in ["4", "w4a4", "9w4a", "4w1a"]:
        with pytest.raises(QuantError):
            QuantConfig.parse(bad)


def test_adapter_shapes_and_softmax(any_tiny):
    lm = tiny_model(any_tiny)
    x = tiny_input(lm, 2)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    for model in (lm.model, Q):
        with record_attention(model) as recs:
            model(x)
        n_attn = sum(isinstance(m, MaskAQAttention) for m in model.modules())
        assert len(recs) == n_attn
        for r in recs:
            geo = r.geometry
            B_, H, N, N2 = r.logits.shape
            assert N == N2 == geo.num_tokens
            assert r.probs.shape == r.logits.shape
            assert r.head_out.shape[:3] == (B_, H, N)
            assert torch.allclose(r.probs.sum(-1), torch.ones(B_, H, N), atol=1e-5)
            if geo.windowed:
                assert B_ % 2 == 0 and geo.prefix == 0
            else:
                assert B_ == 2
                assert geo.prefix == lm.model.num_prefix_tokens
                assert geo.grid == tuple(lm.model.patch_embed.grid_size)
    # the adapter detaches itself afterwards
    assert all(m._recorder is None for m in Q.modules() if isinstance(m, MaskAQAttention))


def test_adapter_keeps_graph():
    lm = tiny_model("vit")
    x = tiny_input(lm).requires_grad_(True)
    with record_attention(lm.model, what=("logits",)) as recs:
        lm.model(x)
    assert recs[0].probs is None and recs[0].head_out is None
    recs[-1].logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_params_round_trip(tmp_path, any_tiny):
    lm = tiny_model(any_tiny)
    x = tiny_input(lm)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    Q(x)
    with torch.no_grad():  # move learnable params off their init
        for _, m in quantizers(Q):
            if isinstance(m, ActQuantizer):
                m.scale.mul_(1.37)
                m.zero_point.add_(1.2)
    p = read_params(Q)
    p.save(tmp_path / "p.json")
    p2 = QuantParams.load(tmp_path / "p.json")
    assert p2.entries == p.entries
    Q2 = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    load_params(Q2, p2)
    assert read_params(Q2).entries == p.entries
    with torch.no_grad():
        assert torch.equal(Q2(x), Q(x))
    # a params file for another model is refused, naming the mismatch
    other = quantize_model(tiny_model("vit").model, QuantConfig(4, 4)) if any_tiny != "vit" else \
        quantize_model(tiny_model("swin").model, QuantConfig(4, 4))
    with pytest.raises(QuantError, match="do not match"):
        load_params(other, p2)
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "nope"}))
    with pytest.raises(QuantError):
        QuantParams.load(tmp_path / "bad.json")
