"""Tiny timm models built in the tests (no downloads), shared by the test files."""
from __future__ import annotations

import torch

from maskaq.models import load_model

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224",
                       dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 6), window_size=7, num_classes=10)),
}


def tiny_model(kind: str = "vit", seed: int = 0):
    """A LoadedModel with random weights (seeded) for one of the TINY architectures."""
    arch, kw = TINY[kind]
    torch.manual_seed(seed)
    return load_model(arch, pretrained=False, **kw)


def tiny_input(lm, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *lm.data_config.input_size, generator=g)
