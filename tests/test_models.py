"""Alias table, strict loading, self-describing checkpoints, offline errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import TINY, tiny_model
from maskaq.models import ALIASES, DataConfig, ModelError, load_model, resolve_name, save_checkpoint


def test_aliases_resolve():
    assert resolve_name("deit_t") == "deit_tiny_patch16_224.fb_in1k"
    assert resolve_name("swin_t").startswith("swin_tiny_patch4_window7_224")
    assert resolve_name("vit_base_patch16_224.augreg_in21k_ft_in1k") == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    for a in ("deit_t", "deit_s", "deit_b", "vit_t", "vit_s", "vit_b", "swin_t", "swin_s"):
        assert a in ALIASES


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as e:
        resolve_name("deit_tinyy")
    msg = str(e.value)
    assert "deit_tinyy" in msg and "deit_t" in msg and "swin_t" in msg


def test_preprocessing_from_model_config():
    lm = tiny_model("vit")
    d = lm.data_config
    assert d.input_size == (3, 32, 32)
    assert d.mean == (0.5, 0.5, 0.5) and d.interpolation == "bicubic" and d.crop_pct == 0.9
    lm2 = tiny_model("deit_distilled")
    assert lm2.data_config.mean == pytest.approx((0.485, 0.456, 0.406))


def _state(kind="vit"):
    return tiny_model(kind).model.state_dict()


def test_local_pth_and_safetensors(tmp_path):
    arch, kw = TINY["vit"]
    sd = _state()
    torch.save({"model": sd}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        lm = load_model(arch, checkpoint=tmp_path / f, **kw)
        assert lm.source["weights"] == "checkpoint"
        for k, v in lm.model.state_dict().items():
            assert torch.equal(v, sd[k])


def test_strict_loading_names_keys(tmp_path):
    arch, kw = TINY["vit"]
    sd = _state()
    bad = dict(sd)
    del bad["blocks.0.attn.qkv.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["head.bias"] = torch.zeros(12)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelError) as e:
        load_model(arch, checkpoint=tmp_path / "bad.pth", **kw)
    msg = str(e.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "head.bias (checkpoint (12,) vs model (10,))" in msg
    # a head whose size contradicts the given num_classes is named before loading (issue 13)
    bad["head.weight"] = torch.zeros(5, 48)
    torch.save(bad, tmp_path / "bad5.pth")
    with pytest.raises(ModelError, match=r"num_classes=10 \(the checkpoint says 5\)"):
        load_model(arch, checkpoint=tmp_path / "bad5.pth", **kw)


def test_unreadable_checkpoint(tmp_path):
    arch, kw = TINY["vit"]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_model(arch, checkpoint=tmp_path / "junk.pth", **kw)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(arch, checkpoint=tmp_path / "missing.pth", **kw)


def test_self_describing_checkpoint_any_geometry(tmp_path):
    import timm

    args = dict(img_size=40, patch_size=5, in_chans=2, num_classes=7, embed_dim=36, depth=2, num_heads=3)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    dcfg = DataConfig((2, 40, 40), (0.3, 0.4), (0.2, 0.25), crop_pct=1.0, interpolation="bilinear")
    path = tmp_path / "mine.maskaq.pt"
    save_checkpoint(path, m, "vit_tiny_patch16_224", args, dcfg, labels=[f"c{i}" for i in range(7)])
    lm = load_model(str(path))
    assert lm.data_config == dcfg and lm.labels == [f"c{i}" for i in range(7)]
    assert lm.model.patch_embed.grid_size == (8, 8) and lm.model.num_classes == 7
    x = torch.randn(2, 2, 40, 40)
    with torch.no_grad():
        for mm in m.modules():
            if hasattr(mm, "fused_attn"):
                mm.fused_attn = False
        assert torch.allclose(lm.model(x), m(x), atol=1e-5)
    # also accepted through --checkpoint with the matching architecture, refused with another
    assert load_model("vit_tiny_patch16_224", checkpoint=path).labels is not None
    with pytest.raises(ModelError, match="not 'deit_tiny_patch16_224'"):
        load_model("deit_tiny_patch16_224", checkpoint=path)


def test_offline_without_weights_is_clear(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import time: set the live value too
    arch, kw = TINY["vit"]
    with pytest.raises(ModelError, match="--checkpoint"):
        load_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, **kw)
