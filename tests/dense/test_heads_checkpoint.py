"""Explicit pyramid-pooling bins, head shapes, and strict mmdet/mmseg checkpoint loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from maskaq.dense.checkpoint import CheckpointError, load_dense_checkpoint
from maskaq.dense.heads import ExplicitAdaptiveAvgPool2d
from maskaq.dense.models import DetConfig, MaskRCNN, SegConfig, UperNet, tiny_swin_config

torch.manual_seed(0)


def tiny_det():
    return MaskRCNN(DetConfig(swin=tiny_swin_config(), fpn_channels=32, fc_dim=64, mask_conv_dim=32,
                              num_classes=5)).eval()


def tiny_seg():
    return UperNet(SegConfig(swin=tiny_swin_config(), channels=32, aux_channels=16, num_classes=7)).eval()


def _randomise(model):
    with torch.no_grad():
        for n, b in model.named_buffers():
            if "running_mean" in n:
                b.normal_()
            elif "running_var" in n:
                b.uniform_(0.5, 2.0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize("hw", [(16, 16), (13, 19), (5, 7)])
@pytest.mark.parametrize("scale", [1, 2, 3, 6])
def test_explicit_bins_equal_adaptive_avg_pool(hw, scale):
    x = torch.randn(2, 4, *hw)
    torch.testing.assert_close(ExplicitAdaptiveAvgPool2d(scale)(x), nn.AdaptiveAvgPool2d(scale)(x))


def _official_checkpoint(model):
    """What an mmdet 2.11 / Swin-Transformer-Object-Detection checkpoint holds: our keys plus the
    persistent relative_position_index buffers, under 'state_dict' with 'meta'."""
    sd = dict(model.state_dict())
    for n, b in model.named_buffers():
        if n.endswith("relative_position_index"):
            sd[n] = b.clone()
    return {"meta": {"mmdet_version": "2.11.0"}, "state_dict": sd}


def _to_mmdet_native(sd):
    """mmdet's tools/model_converters/swin2mmdet.py, written from its description."""
    def red(x):
        o, i = x.shape
        x = x.reshape(o, 4, i // 4)
        return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)

    def nrm(x):
        i = x.shape[0]
        x = x.reshape(4, i // 4)
        return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(i)

    out = {}
    for k, v in sd.items():
        if not k.startswith("backbone."):
            out[k] = v
            continue
        nk = k.replace("backbone.layers.", "backbone.stages.").replace("patch_embed.proj.", "patch_embed.projection.")
        nk = nk.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        if "downsample.reduction" in k:
            v = red(v)
        elif "downsample.norm" in k:
            v = nrm(v)
        out[nk] = v
    return out


@torch.no_grad()
def test_mmdet_checkpoint_roundtrip(tmp_path):
    src = _randomise(tiny_det())
    ck = _official_checkpoint(src)
    keys = ck["state_dict"].keys()
    for k in ["neck.lateral_convs.0.conv.weight", "neck.fpn_convs.3.conv.bias", "rpn_head.rpn_conv.weight",
              "rpn_head.rpn_cls.weight", "rpn_head.rpn_reg.bias", "roi_head.bbox_head.shared_fcs.1.weight",
              "roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_reg.weight",
              "roi_head.mask_head.convs.3.conv.weight", "roi_head.mask_head.upsample.weight",
              "roi_head.mask_head.conv_logits.bias", "backbone.layers.1.blocks.1.attn.relative_position_index",
              "backbone.layers.2.downsample.reduction.weight", "backbone.norm3.weight"]:
        assert k in keys, k
    path = tmp_path / "mask_rcnn.pth"
    torch.save(ck, path)
    dst = load_dense_checkpoint(tiny_det(), path)
    x = torch.randn(1, 3, 64, 96)
    for a, b in zip(src.features(x), dst.features(x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@torch.no_grad()
def test_mmseg_checkpoint_roundtrip_and_native_layout():
    src = _randomise(tiny_seg())
    ck = _official_checkpoint(src)
    keys = ck["state_dict"].keys()
    for k in ["decode_head.psp_modules.3.1.conv.weight", "decode_head.psp_modules.0.1.bn.running_mean",
              "decode_head.bottleneck.bn.weight", "decode_head.lateral_convs.2.conv.weight",
              "decode_head.fpn_convs.0.bn.num_batches_tracked", "decode_head.fpn_bottleneck.conv.weight",
              "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias"]:
        assert k in keys, k
    x = torch.randn(1, 3, 64, 64)
    dst = load_dense_checkpoint(tiny_seg(), ck)
    torch.testing.assert_close(src(x), dst(x), atol=0, rtol=0)
    native = {"state_dict": _to_mmdet_native(ck["state_dict"])}
    assert any(".attn.w_msa.qkv" in k for k in native["state_dict"])
    dst2 = load_dense_checkpoint(tiny_seg(), native)
    torch.testing.assert_close(src(x), dst2(x), atol=0, rtol=0)


def test_strict_errors_name_keys():
    ck = _official_checkpoint(tiny_det())
    sd = ck["state_dict"]
    bad = dict(sd, **{"roi_head.bbox_head.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="roi_head.bbox_head.extra.weight"):
        load_dense_checkpoint(tiny_det(), {"state_dict": bad})
    missing = {k: v for k, v in sd.items() if k != "rpn_head.rpn_cls.bias"}
    with pytest.raises(CheckpointError, match="rpn_head.rpn_cls.bias"):
        load_dense_checkpoint(tiny_det(), {"state_dict": missing})
    wrong = dict(sd, **{"roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 64)})
    with pytest.raises(CheckpointError, match="fc_cls.weight"):
        load_dense_checkpoint(tiny_det(), {"state_dict": wrong})
    idx = dict(sd)
    k = "backbone.layers.0.blocks.0.attn.relative_position_index"
    idx[k] = idx[k].flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index"):
        load_dense_checkpoint(tiny_det(), {"state_dict": idx})
    with pytest.raises(CheckpointError, match="neck"):  # detector weights into a segmenter
        load_dense_checkpoint(tiny_seg(), ck)


def test_full_size_shapes():
    """Default configs build Swin-T Mask R-CNN / UperNet with the public checkpoints' shapes."""
    with torch.device("meta"):  # shapes only, no init cost
        det, seg = MaskRCNN().state_dict(), UperNet().state_dict()
    assert det["roi_head.bbox_head.shared_fcs.0.weight"].shape == (1024, 12544)
    assert det["roi_head.bbox_head.fc_cls.weight"].shape == (81, 1024)
    assert det["roi_head.bbox_head.fc_reg.weight"].shape == (320, 1024)
    assert det["roi_head.mask_head.conv_logits.weight"].shape == (80, 256, 1, 1)
    assert det["neck.lateral_convs.3.conv.weight"].shape == (256, 768, 1, 1)
    assert det["backbone.layers.2.blocks.5.attn.relative_position_bias_table"].shape == (169, 12)
    assert seg["decode_head.bottleneck.conv.weight"].shape == (512, 768 + 4 * 512, 3, 3)
    assert seg["decode_head.fpn_bottleneck.conv.weight"].shape == (512, 2048, 3, 3)
    assert seg["auxiliary_head.convs.0.conv.weight"].shape == (256, 384, 3, 3)
    assert seg["decode_head.conv_seg.weight"].shape == (150, 512, 1, 1)
