"""The committed reference model (issue 6): maskaq/assets/fmnist_vit.maskaq.pt.

A DeiT-style timm ViT trained on Fashion-MNIST by benchmarks/train_reference.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from maskaq.models import ASSETS, LOCAL_ALIASES, load_model

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fmnist  # noqa: E402

CKPT = ASSETS / LOCAL_ALIASES["fmnist_vit"]
MAX_BYTES = 12 * 1024 * 1024


@pytest.fixture(scope="module")
def lm():
    return load_model("fmnist_vit")  # strict: missing/unexpected/mis-shaped keys raise


def test_checkpoint_file_small():
    assert CKPT.is_file(), f"{CKPT} is missing"
    assert CKPT.stat().st_size <= MAX_BYTES, f"{CKPT.stat().st_size} bytes > 12 MB"


def test_checkpoint_self_describing():
    obj = torch.load(str(CKPT), map_location="cpu", weights_only=True)
    assert obj["format"] == "maskaq-checkpoint/1"
    assert obj["architecture"] == "vit_tiny_patch16_224"
    assert all(v.dtype == torch.float32 for v in obj["state_dict"].values())
    extra = obj["extra"]
    for key in ("epochs", "lr", "seed", "split", "test_top1", "val_top1", "command"):
        assert key in extra, key
    assert "55000..59999" in extra["split"]["val"]


def test_architecture(lm):
    m = lm.model
    assert lm.name == "vit_tiny_patch16_224"
    assert m.cls_token is not None and m.num_prefix_tokens == 1 and m.global_pool == "token"
    gh, gw = m.patch_embed.grid_size
    assert gh >= 7 and gw >= 7
    assert all(blk.attn.num_heads >= 3 for blk in m.blocks)
    assert m.patch_embed.proj.in_channels == 1
    assert m.num_classes == 10 and m.head.out_features == 10
    assert not m.training


def test_metadata(lm):
    dc = lm.data_config
    assert dc.input_size == (1, 28, 28)
    assert len(dc.mean) == 1 and len(dc.std) == 1
    assert 0.2 < dc.mean[0] < 0.4 and 0.25 < dc.std[0] < 0.45
    assert dc.crop_pct == 1.0
    assert lm.labels == fmnist.CLASSES


def test_accuracy_first_500_test_images(lm):
    if not fmnist.available():
        pytest.skip("Fashion-MNIST files absent (Debian package 'fashion-mnist' not installed, "
                    "no $MASKAQ_FMNIST): cannot measure accuracy")
    x, y = fmnist.load_split("test")
    x, y = x[:500], y[:500]
    with torch.no_grad():
        pred = lm.model(fmnist.normalize(x, lm.data_config.mean, lm.data_config.std)).argmax(-1)
    acc = (pred == y).float().mean().item()
    assert acc > 0.80, f"top-1 on the first 500 test images {acc:.3f} <= 0.80"


def test_fmnist_split_sizes():
    if not fmnist.available():
        pytest.skip("Fashion-MNIST files absent (Debian package 'fashion-mnist' not installed)")
    xt, yt = fmnist.load_split("train")
    xv, yv = fmnist.load_split("val")
    assert xt.shape == (55000, 28, 28) and xv.shape == (5000, 28, 28)
    assert xt.dtype == torch.uint8 and yv.dtype == torch.int64
    assert int(yv.min()) == 0 and int(yv.max()) == 9


# ------------------------------------------------------------ fmnist_vit_p7 (issue 11, item 5)
# A second from-scratch reference model of another shape: width 128, depth 8, 4 heads, 7x7
# patches (4x4 grid), trained by `train_reference.py --config fmnist_vit_p7`.

P7 = ASSETS / LOCAL_ALIASES["fmnist_vit_p7"]


@pytest.fixture(scope="module")
def lm_p7():
    return load_model("fmnist_vit_p7")


def test_p7_checkpoint_small_and_self_describing():
    assert P7.is_file() and P7.stat().st_size <= MAX_BYTES
    obj = torch.load(str(P7), map_location="cpu", weights_only=True)
    assert obj["format"] == "maskaq-checkpoint/1" and obj["architecture"] == "vit_tiny_patch16_224"
    extra = obj["extra"]
    assert extra["config"] == "fmnist_vit_p7" and "--config fmnist_vit_p7" in extra["command"]
    assert "55000..59999" in extra["split"]["val"]


def test_p7_shape_differs_from_fmnist_vit(lm_p7, lm):
    m = lm_p7.model
    assert tuple(m.patch_embed.grid_size) == (4, 4) and m.patch_embed.proj.kernel_size == (7, 7)
    assert len(m.blocks) == 8 and m.embed_dim == 128 and all(b.attn.num_heads == 4 for b in m.blocks)
    assert m.patch_embed.proj.in_channels == 1 and m.num_classes == 10 and m.global_pool == "token"
    assert 1_500_000 < sum(p.numel() for p in m.parameters()) < 1_700_000
    assert lm_p7.data_config.input_size == (1, 28, 28) and lm_p7.labels == fmnist.CLASSES
    assert (len(m.blocks), m.embed_dim) != (len(lm.model.blocks), lm.model.embed_dim)


def test_p7_accuracy_on_validation_images(lm_p7):
    if not fmnist.available():
        pytest.skip("Fashion-MNIST files absent (Debian package 'fashion-mnist' not installed, "
                    "no $MASKAQ_FMNIST): cannot measure accuracy")
    x, y = fmnist.load_split("val")
    x, y = x[:400], y[:400]
    with torch.no_grad():
        pred = lm_p7.model(fmnist.model_input(x, lm_p7.data_config)).argmax(-1)
    acc = (pred == y).float().mean().item()
    assert acc > 0.75, f"top-1 on 400 validation images {acc:.3f} <= 0.75"


def test_train_reference_config_sets_the_shape():
    from benchmarks import train_reference as tr

    assert tr.CONFIGS["fmnist_vit_p7"] == dict(embed_dim=128, depth=8, heads=4, patch_size=7, mlp_ratio=4.0)
    with pytest.raises(SystemExit) as e:  # 28 px does not divide into 5 px patches
        tr.main(["--config", "fmnist_vit_p7", "--patch-size", "5"])
    assert e.value.code == 2
