"""Wrap a timm ViT / DeiT (incl. distilled) / Swin into the fake-quantized model Q (method.md §1),
and the attention adapter that exposes logits, softmax and per-head outputs without extra passes.

What is quantized ("XwYa"): every Linear (qkv, proj, fc1, fc2, head, head_dist, Swin's
patch-merging reduction): weight and input; the patch-embedding conv: weight only (its input image
stays FP); both attention matmuls: q and k (logits = q @ k^T) and the softmax output and v.
LayerNorm, softmax, GELU, residual adds, biases and the pre-softmax logits stay FP.

Nothing here changes timm's classes or patches any instance's ``forward``: attention modules are
*replaced* by :class:`MaskAQAttention`, which takes over the original's parameters, buffers and
children under the same names (so state dicts and checkpoints keep their keys), and Linear/Conv2d
modules are replaced by :class:`QuantLinear`/:class:`QuantConv2d` (subclasses that keep
``weight``/``bias``). Quantizers are named child modules (``blocks.3.attn.qkv.input_quantizer``);
those names key the params file, the ONNX tensor names and the encodings sidecar.
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .quant import ACTIVATION_QUANTIZERS, SOFTMAX_QUANTS, ActQuantizer, Log2Quantizer, QuantError, WeightQuantizer, check_bits

__all__ = [
    "QuantConfig",
    "FLOAT_BITS",
    "PATCH_EMBED_MODES",
    "QuantLinear",
    "QuantConv2d",
    "MaskAQAttention",
    "TokenGeometry",
    "AttnRecord",
    "prepare_model",
    "quantize_model",
    "quantizers",
    "set_quantizers_enabled",
    "match_keep_8bit",
    "quantizers_disabled",
    "record_attention",
    "attention_modules",
]


#: ``a_bits`` values meaning float activations (weight-only quantization).
FLOAT_BITS = (16, 32)
PATCH_EMBED_MODES = ("channel", "float")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        w_bits, a_bits: 2..8, set independently; ``a_bits`` 16 or 32 means float activations
            (weight-only quantization: no activation quantizers at all).
        symmetric_activations: activation zero-points fixed at 0 (TensorRT profile).
        narrow_weights: weight grid [-(2^(b-1)-1), 2^(b-1)-1] (TensorRT).
        keep_first_last_8bit: patch embedding and classifier head(s) at 8 bit.
        keep_8bit: fnmatch patterns over quantizer names (``blocks.3.attn.qkv.input_quantizer``)
            and layer names (``blocks.3.attn.qkv``: both its quantizers; ``blocks.3.attn``: its
            four attention quantizers); every match is kept at 8 bit. A pattern that matches
            nothing is an error.
        weight_block: weight-only only: Linear weights quantized in blocks of this many input
            elements per output channel (a power of two >= 16: the layout of the INT4 export,
            ORT ``MatMulNBits``); None: per output channel.
        patch_embed: ``"channel"``: the patch-embedding conv's weight per output channel (like
            every weight); ``"float"``: left in float (no quantizer).
        softmax_quant: quantizer of the attention probabilities (the softmax output):
            ``"linear"`` (default, the activation quantizer every other tensor has) or ``"log2"``
            (:class:`maskaq.quant.Log2Quantizer`, SPDFQ's learning stage, method.md §7). log2
            applies only when ``a_bits < 8``; at 8 bits (and a softmax quantizer kept at 8 bit by
            ``keep_8bit``) the linear quantizer stays.
    """

    w_bits: int = 4
    a_bits: int = 4
    symmetric_activations: bool = False
    narrow_weights: bool = False
    keep_first_last_8bit: bool = False
    keep_8bit: tuple[str, ...] = ()
    weight_block: int | None = None
    patch_embed: str = "channel"
    softmax_quant: str = "linear"

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        if self.softmax_quant not in SOFTMAX_QUANTS:
            raise QuantError(f"softmax quantizer {self.softmax_quant!r} is not known; valid: {', '.join(SOFTMAX_QUANTS)}")
        if self.a_bits not in FLOAT_BITS:
            check_bits(self.a_bits)
        if self.patch_embed not in PATCH_EMBED_MODES:
            raise QuantError(f"patch embedding mode {self.patch_embed!r} is not known; valid: {', '.join(PATCH_EMBED_MODES)}")
        if self.weight_block is not None:
            b = self.weight_block
            if not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1):
                raise QuantError(f"weight block size {b!r} is not supported; valid: a power of two >= 16 (32, 64, 128)")
            if not self.weight_only:
                raise QuantError("blocked weights are for weight-only quantization (float activations, a_bits 16)")
        pats = self.keep_8bit
        if isinstance(pats, str):
            pats = (pats,)
        pats = tuple(str(p).strip() for p in pats)
        if any(not p for p in pats):
            raise QuantError("--keep-8bit got an empty pattern; give quantizer or layer names / fnmatch patterns")
        object.__setattr__(self, "keep_8bit", pats)

    @classmethod
    def parse(cls, spec: str, **kw: Any) -> "QuantConfig":
        """``"4w4a"`` / ``"4w8a"`` / ``"3w3a"`` -> QuantConfig."""
        m = re.fullmatch(r"\s*(\d+)\s*w\s*(\d+)\s*a\s*", spec.lower())
        if not m:
            raise QuantError(f"bit setting {spec!r} is not of the form 'XwYa' (e.g. '4w4a', '4w8a', '3w3a')")
        return cls(int(m.group(1)), int(m.group(2)), **kw)

    @property
    def weight_only(self) -> bool:
        """Float activations: no activation quantizers."""
        return self.a_bits in FLOAT_BITS

    @property
    def log2_softmax(self) -> bool:
        """True when the attention probabilities get the log2 quantizer (log2 and a_bits < 8)."""
        return self.softmax_quant == "log2" and not self.weight_only and self.a_bits < 8

    @property
    def tag(self) -> str:
        return f"{self.w_bits}w{self.a_bits}a"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_8bit"] = list(self.keep_8bit)
        return d


class QuantLinear(nn.Linear):
    """``nn.Linear`` with ``input_quantizer`` and ``weight_quantizer`` children."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, w_bits: int, a_bits: int, cfg: QuantConfig) -> "QuantLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.bias = lin.bias
        # weight-only: the input stays float (no quantizer module at all)
        new.input_quantizer = (nn.Identity() if cfg.weight_only
                               else ActQuantizer(a_bits, symmetric=cfg.symmetric_activations))
        new.weight_quantizer = WeightQuantizer(w_bits, narrow=cfg.narrow_weights, axis=0,
                                               block=cfg.weight_block or 0)
        new.train(lin.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a ``weight_quantizer`` (the patch embedding: its input image stays FP)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int, cfg: QuantConfig) -> "QuantConv2d":
        new = copy.copy(conv)
        new.__class__ = cls  # a fresh instance of our subclass holding the same tensors
        new._modules = dict(conv._modules)
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new.weight_quantizer = WeightQuantizer(w_bits, narrow=cfg.narrow_weights, axis=0)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


@dataclass(frozen=True)
class TokenGeometry:
    """Token layout of one attention layer, read from the model.

    ``prefix``: leading non-patch tokens (CLS, distillation, registers); ``grid``: patch grid
    ``(gh, gw)`` of the attended tokens (Swin: the window); ``windowed``: batch entries are windows.
    """

    prefix: int
    grid: tuple[int, int]
    windowed: bool = False

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


@dataclass
class AttnRecord:
    """What one attention layer saw in one forward pass (tensors keep their graph)."""

    name: str
    geometry: TokenGeometry
    logits: torch.Tensor | None = None  # S = q @ k^T, pre-softmax, unscaled, [B', H, N, N]
    probs: torch.Tensor | None = None  # softmax output [B', H, N, N]
    head_out: torch.Tensor | None = None  # softmax @ v per head [B', H, N, d]


_ATTN_QUANTIZERS = ("q_quantizer", "k_quantizer", "softmax_quantizer", "v_quantizer")


class MaskAQAttention(nn.Module):
    """Explicit attention for timm ``Attention`` (ViT/DeiT) and ``WindowAttention`` (Swin).

    Takes over the replaced module's parameters, buffers and children under the same names.
    Logits are ``S = q @ k^T`` (unscaled; both operands quantized in Q), then
    ``softmax(S * scale + bias + mask)``. With quantizers absent or disabled the maths is plain
    float attention; it differs from timm's ``(q*scale) @ k^T`` order only by float rounding.
    """

    def __init__(self, orig: nn.Module, kind: str, geometry: TokenGeometry) -> None:
        super().__init__()
        self._parameters.update(orig._parameters)
        self._buffers.update(orig._buffers)
        self._non_persistent_buffers_set |= set(orig._non_persistent_buffers_set)
        self._modules.update(orig._modules)
        self.kind = kind  # "vit" | "swin"
        self.num_heads = int(orig.num_heads)
        self.scale = float(orig.scale)
        self.geometry = geometry
        self.window_area = int(getattr(orig, "window_area", 0))
        self.q_quantizer = self.k_quantizer = self.softmax_quantizer = self.v_quantizer = None
        self._recorder: list[AttnRecord] | None = None
        self._record_what: tuple[str, ...] = ()
        self.layer_name = ""
        self.train(orig.training)

    def add_quantizers(self, a_bits: int, symmetric: bool, log2_softmax: bool = False) -> None:
        for n in _ATTN_QUANTIZERS:
            if n == "softmax_quantizer" and log2_softmax:
                setattr(self, n, Log2Quantizer(a_bits))
            else:
                setattr(self, n, ActQuantizer(a_bits, symmetric=symmetric))

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        qz = getattr(self, name)
        return x if qz is None else qz(x)

    def _rel_pos_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = None
        if self.kind == "vit" and getattr(self, "gate", None) is not None:
            gate = self.gate(x).sigmoid()
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.kind == "vit":
            q, k = self.q_norm(q), self.k_norm(k)
        q = self._q("q_quantizer", q)
        k = self._q("k_quantizer", k)
        logits = q @ k.transpose(-2, -1)  # S (method.md: pre-softmax, unscaled)
        attn = logits * self.scale
        if self.kind == "swin":
            attn = attn + self._rel_pos_bias()
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(-1, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
        else:
            if is_causal:
                attn = attn + attn.new_full((N, N), float("-inf")).triu_(1)
            elif attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    attn = attn.masked_fill(~attn_mask, float("-inf"))
                else:
                    attn = attn + attn_mask
        probs = attn.softmax(dim=-1)
        probs = self.attn_drop(probs)
        pq = self._q("softmax_quantizer", probs)
        vq = self._q("v_quantizer", v)
        out = pq @ vq
        if self._recorder is not None:
            w = self._record_what
            self._recorder.append(AttnRecord(
                self.layer_name, self.geometry,
                logits if "logits" in w else None,
                probs if "probs" in w else None,
                out if "head_out" in w else None,
            ))
        out = out.transpose(1, 2).reshape(B, N, -1)
        if self.kind == "vit":
            out = self.norm(out)
            if gate is not None:
                out = out * gate
        out = self.proj(out)
        return self.proj_drop(out)


def _attention_kind(m: nn.Module) -> str | None:
    from timm.layers import Attention

    if type(m) is Attention:
        return "vit"
    try:
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # pragma: no cover
        WindowAttention = ()  # type: ignore[assignment]
    if WindowAttention and type(m) is WindowAttention:
        return "swin"
    return None


def _vit_geometry(model: nn.Module) -> TokenGeometry:
    pe = getattr(model, "patch_embed", None)
    grid = tuple(int(g) for g in getattr(pe, "grid_size", (0, 0)))
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return TokenGeometry(prefix, grid)  # type: ignore[arg-type]


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare_model(model: nn.Module) -> nn.Module:
    """In place: switch off fused attention and replace attention modules with
    :class:`MaskAQAttention` (no quantizers) so P exposes its attention to the adapter.
    Idempotent. Raises ``QuantError`` if the model has no supported attention."""
    vit_geo = None
    found = False
    for name, m in list(model.named_modules()):
        if isinstance(m, MaskAQAttention):
            found = True
            continue
        kind = _attention_kind(m)
        if kind is None:
            continue
        if kind == "vit":
            vit_geo = vit_geo or _vit_geometry(model)
            geo = vit_geo
        else:
            ws = tuple(int(v) for v in m.window_size)
            geo = TokenGeometry(0, ws, windowed=True)  # type: ignore[arg-type]
        new = MaskAQAttention(m, kind, geo)
        new.layer_name = name
        _set_child(model, name, new)
        found = True
    if not found:
        raise QuantError(
            f"{type(model).__name__} has no supported attention module; supported: timm ViT/DeiT "
            "(timm.layers.Attention) and Swin (WindowAttention)"
        )
    for name, m in model.named_modules():
        if isinstance(m, MaskAQAttention):
            m.layer_name = name
    return model.eval() if not model.training else model


def _head_names(model: nn.Module) -> set[str]:
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and (n in ("head", "head_dist") or n.startswith("head.") or n.endswith(".head")):
            names.add(n)
    return names


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Return Q: a deep copy of P with named quantizers (method.md §1). P is not modified.

    Args:
        model: a timm ViT/DeiT/Swin (prepared or not).
        config: bit widths and options.

    Returns:
        Q, in the same train/eval mode as P. Activation quantizers initialise on the first batch.

    Example:
        >>> Q = quantize_model(P, QuantConfig.parse("4w4a"))
    """
    q = prepare_model(copy.deepcopy(model))
    heads = _head_names(q)
    first_last_bits = 8 if config.keep_first_last_8bit else None
    for name, m in list(q.named_modules()):
        if isinstance(m, (QuantLinear, QuantConv2d)):
            raise QuantError("model is already quantized")
        if isinstance(m, MaskAQAttention):
            if not config.weight_only:
                m.add_quantizers(config.a_bits, config.symmetric_activations, config.log2_softmax)
        elif type(m) is nn.Linear:
            is_head = name in heads
            wb = first_last_bits if (is_head and first_last_bits) else config.w_bits
            ab = first_last_bits if (is_head and first_last_bits) else config.a_bits
            _set_child(q, name, QuantLinear.from_linear(m, wb, ab, config))
        elif type(m) is nn.Conv2d and name.endswith("patch_embed.proj") and config.patch_embed == "channel":
            wb = first_last_bits or config.w_bits
            _set_child(q, name, QuantConv2d.from_conv(m, wb, config))
    if config.keep_8bit:
        _keep_8bit(q, config)
    q.maskaq_quant_config = config  # type: ignore[attr-defined]
    return q


def match_keep_8bit(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """``pattern -> [quantizer names]`` it selects in ``model`` (see ``QuantConfig.keep_8bit``)."""
    from fnmatch import fnmatchcase

    names = [n for n, _ in quantizers(model)]
    out: dict[str, list[str]] = {}
    for pat in patterns:
        hit = []
        for n in names:
            layer = n.rpartition(".")[0]
            if fnmatchcase(n, pat) or fnmatchcase(layer, pat):
                hit.append(n)
        out[pat] = hit
    return out


def _keep_8bit(q: nn.Module, config: QuantConfig) -> None:
    matches = match_keep_8bit(q, config.keep_8bit)
    empty = [p for p, hit in matches.items() if not hit]
    if empty:
        names = [n for n, _ in quantizers(q)]
        layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
        raise QuantError(
            f"--keep-8bit {' '.join(repr(p) for p in empty)} matches no quantizer or layer; valid: names such as "
            f"{names[0]}, {layers[-1]}, or patterns such as 'blocks.0.*', '*.fc2' ({len(names)} quantizers; "
            "maskaq-analyse lists them)")
    for n in sorted({n for hit in matches.values() for n in hit}):
        owner_name, _, child = n.rpartition(".")
        owner = q.get_submodule(owner_name) if owner_name else q
        old = getattr(owner, child)
        if old.bits == 8:
            continue
        if isinstance(old, WeightQuantizer):
            new = WeightQuantizer(8, narrow=config.narrow_weights, axis=old.axis, block=old.block)
        else:
            new = ActQuantizer(8, symmetric=config.symmetric_activations)
        setattr(owner, child, new)


def quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, quantizer)`` for every quantizer in ``model``, in module order."""
    for n, m in model.named_modules():
        if isinstance(m, (*ACTIVATION_QUANTIZERS, WeightQuantizer)):
            yield n, m


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    for _, m in quantizers(model):
        m.enabled = enabled


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: Q runs as P while inside (restores each quantizer's previous state)."""
    prev = [(m, m.enabled) for _, m in quantizers(model)]
    try:
        for m, _ in prev:
            m.enabled = False
        yield model
    finally:
        for m, e in prev:
            m.enabled = e


def attention_modules(model: nn.Module) -> list[MaskAQAttention]:
    return [m for m in model.modules() if isinstance(m, MaskAQAttention)]


@contextmanager
def record_attention(
    model: nn.Module, what: tuple[str, ...] = ("logits", "probs", "head_out")
) -> Iterator[list[AttnRecord]]:
    """Attention adapter: collect, in the same forward pass, each layer's pre-softmax logits
    ``q @ k^T``, softmax output and per-head outputs ``softmax @ v`` (for P or Q).

    Yields a list that fills with one :class:`AttnRecord` per attention layer and forward call,
    in execution order. Tensors keep their autograd graph (synthesis differentiates through them).

    Example:
        >>> with record_attention(P, what=("logits",)) as recs:
        ...     P(x)
        >>> recs[0].logits.shape  # [B, H, N, N]
    """
    bad = set(what) - {"logits", "probs", "head_out"}
    if bad:
        raise ValueError(f"unknown attention records {sorted(bad)}; valid: logits, probs, head_out")
    mods = attention_modules(model)
    if not mods:
        raise QuantError("model has no MaskAQAttention; call prepare_model() or load it with load_model()")
    records: list[AttnRecord] = []
    for m in mods:
        m._recorder, m._record_what = records, tuple(what)
    try:
        yield records
    finally:
        for m in mods:
            m._recorder, m._record_what = None, ()
