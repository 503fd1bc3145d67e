"""Swin Transformer backbone with the *original* (Swin-Transformer-Object-Detection / mmdet /
mmseg) semantics, in plain PyTorch.

Differences from timm's ``SwinTransformer`` that matter for dense checkpoints (docs/dense.md):

* each block pads its feature map on the right/bottom to a multiple of the window, THEN applies
  the cyclic shift (timm shifts, then pads); the shifted-window attention mask is built for the
  padded map ``(Hp, Wp)``;
* the patch embedding pads the image to a multiple of the patch size; patch merging pads odd
  feature maps;
* ``out_indices`` stages are returned as NCHW maps, each through its own LayerNorm ``norm{i}``.

Window attention is a ``timm.models.swin_transformer.WindowAttention`` instance (same parameter
names as the official code), so :func:`maskaq.qmodel.prepare_model` / ``quantize_model`` replace
it with :class:`maskaq.qmodel.MaskAQAttention` and quantize it like a classification Swin.
Parameter names match the official checkpoints' ``backbone.*`` keys (see
:mod:`maskaq.dense.checkpoint`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.swin_transformer import WindowAttention

__all__ = ["SwinConfig", "SwinBackbone", "WindowGeometry", "window_partition", "window_reverse", "shifted_window_mask"]


@dataclass(frozen=True)
class SwinConfig:
    """Swin backbone hyper-parameters. Defaults: Swin-T as used by Mask R-CNN / UperNet."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def num_features(self) -> list[int]:
        return [int(self.embed_dim * 2**i) for i in range(len(self.depths))]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of ws) -> [B*nW, ws, ws, C], windows row-major per image."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B*nW, ws, ws, C] -> [B, H, W, C]."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def shifted_window_mask(Hp: int, Wp: int, ws: int, shift: int) -> torch.Tensor:
    """The official SW-MSA mask for a padded map ``(Hp, Wp)``: [nW, ws*ws, ws*ws], 0 or -100."""
    img_mask = torch.zeros((1, Hp, Wp, 1))
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mw = window_partition(img_mask, ws).reshape(-1, ws * ws)
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


@dataclass(frozen=True)
class WindowGeometry:
    """How one block lays its token grid out in windows (what the synthesis losses need to put
    per-window values back on the grid, ``maskaq.losses.windows_to_grid``).

    ``resolution``: the block's (unpadded) token grid ``(H, W)``; ``window``/``shift``: as used
    by the forward; ``order``: ``"pad_shift"`` (this module, the original Swin: pad on the
    right/bottom to a multiple of the window, then roll by ``-shift`` on the padded map) -
    timm's blocks roll first and pad afterwards (``"shift_pad"``).
    """

    resolution: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    order: str = "pad_shift"

    @property
    def padded(self) -> tuple[int, int]:
        (H, W), (wh, ww) = self.resolution, self.window
        return -(-H // wh) * wh, -(-W // ww) * ww

    @property
    def num_windows(self) -> int:
        (Hp, Wp), (wh, ww) = self.padded, self.window
        return (Hp // wh) * (Wp // ww)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One (shifted) window attention block; pads to a multiple of the window, then shifts."""

    def __init__(self, dim: int, num_heads: int, ws: int, shift: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.window_size, self.shift_size = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=ws, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def window_geometry(self, H: int, W: int) -> WindowGeometry:
        """The window layout :meth:`forward` uses on an ``H x W`` token grid."""
        ws, s = self.window_size, self.shift_size
        return WindowGeometry((int(H), int(W)), (ws, ws), (s, s), "pad_shift")

    def forward(self, x: torch.Tensor, H: int, W: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        win = window_partition(x, ws).reshape(-1, ws * ws, C)
        win = self.attn(win, mask=mask if s > 0 else None)
        x = window_reverse(win.view(-1, ws, ws, C), ws, Hp, Wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if pad_r or pad_b:
            x = x[:, :H, :W, :].contiguous()
        x = shortcut + x.view(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Official patch merging: pad odd maps, concat [x(0,0), x(1,0), x(0,1), x(1,1)], LN, Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, ws: int, mlp_ratio: float, qkv_bias: bool,
                 downsample: bool) -> None:
        super().__init__()
        self.window_size, self.shift_size = ws, ws // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio, qkv_bias) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int):
        ws = self.window_size
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        mask = shifted_window_mask(Hp, Wp, ws, self.shift_size).to(x.dtype) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        if self.downsample is None:
            return x, H, W, x, H, W
        return x, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        H, W = x.shape[-2:]
        if W % p or H % p:
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x)
        if self.norm is not None:
            h, w = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return x


class SwinBackbone(nn.Module):
    """Original-semantics Swin backbone: ``forward(x [B,3,H,W]) -> list of NCHW maps``
    (strides 4, 8, 16, 32 for ``out_indices`` 0..3), each through its ``norm{i}``."""

    def __init__(self, cfg: SwinConfig = SwinConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        nf = cfg.num_features
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm)
        n = len(cfg.depths)
        self.layers = nn.ModuleList(
            BasicLayer(nf[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, cfg.qkv_bias,
                       downsample=i < n - 1)
            for i in range(n)
        )
        for i in cfg.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(nf[i]))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def stage_resolutions(self, input_hw: Sequence[int]) -> list[tuple[int, int]]:
        """Token grid of every stage for an ``input_hw`` image (patch embedding pads to a
        multiple of the patch size; patch merging rounds odd maps up)."""
        p = self.cfg.patch_size
        h, w = -(-int(input_hw[0]) // p), -(-int(input_hw[1]) // p)
        out = []
        for _ in self.layers:
            out.append((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    def window_geometries(self, input_hw: Sequence[int]) -> list[tuple[nn.Module, WindowGeometry]]:
        """``(block, geometry)`` of every block, in execution order, for an ``input_hw`` image:
        where each block's windows sit on its token grid (pad-then-shift). Read by
        ``maskaq.synthesis.attention_layout``."""
        out = []
        for layer, (h, w) in zip(self.layers, self.stage_resolutions(input_hw)):
            for blk in layer.blocks:
                out.append((blk, blk.window_geometry(h, w)))
        return out

    @property
    def out_channels(self) -> list[int]:
        return [self.cfg.num_features[i] for i in self.cfg.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        Wh, Ww = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, H, W, x, Wh, Ww = layer(x, Wh, Ww)
            if i in self.cfg.out_indices:
                o = getattr(self, f"norm{i}")(x_out)
                outs.append(o.view(-1, H, W, o.shape[-1]).permute(0, 3, 1, 2).contiguous())
        return outs
