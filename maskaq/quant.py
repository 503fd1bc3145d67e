"""The quantizer: pure maths, the exportable custom op, and the two quantizer modules.

One quantizer with ONNX semantics (method.md §1, paper Eq. 26)::

    q = clamp(round_half_even(x / s) + z, qmin, qmax)
    y = (q - z) * s

We divide by ``s`` (never multiply by ``1/s``) and add ``z`` after rounding, which is what ONNX
``QuantizeLinear`` does; that makes ONNX Runtime reproduce PyTorch exactly layer by layer.
``torch.round`` rounds half to even, like ONNX.

Two implementations of the same maths live here:

* :func:`fake_quant` - plain torch ops with straight-through gradients, used in training;
* ``torch.ops.maskaq.fake_quant`` - a ``torch.library.custom_op`` used while exporting, so
  the dynamo exporter sees one opaque op that the exporter maps to standard ONNX
  (Clip -> QuantizeLinear -> DequantizeLinear) and 2-7 bit ranges survive. A test asserts the two
  are bit-identical.

Switch a model to the custom op with :func:`export_mode` (a context manager).
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "QuantError",
    "qrange",
    "fake_quant",
    "round_ste",
    "clamp_ste",
    "WeightQuantizer",
    "ActQuantizer",
    "export_mode",
    "is_export_mode",
    "QuantizerSpec",
    "expand_blocks",
    "Log2Quantizer",
    "LOG2_BITS",
    "check_log2_bits",
    "log2_tables",
    "log2_fake_quant",
    "ACTIVATION_QUANTIZERS",
    "SOFTMAX_QUANTS",
]


class QuantError(ValueError):
    """A bad quantization setting (bit width, config string, parameter file)."""


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer grid of a ``bits``-bit quantizer.

    Args:
        bits: 2..8.
        signed: ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]``.
        narrow: drop the most negative level (symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]``, TensorRT).

    Returns:
        ``(qmin, qmax)``. Example: ``qrange(4, True) == (-8, 7)``.
    """
    check_bits(bits)
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, 2**bits - 1


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise QuantError(f"bit width {bits!r} is not supported; valid bit widths are 2..8")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp with a straight-through (identity) gradient: a learnable zero-point pushed outside
    the grid keeps its gradient and can come back (a plain clamp would freeze it for good)."""
    return x + (torch.clamp(x, lo, hi) - x).detach()


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """ONNX-exact fake quantization with straight-through gradients (Eq. 26).

    ``zero_point`` must already hold integers (round it with :func:`round_ste` first if it is a
    learnable float). Gradients: identity for ``x`` inside the clamp range and zero outside; the
    LSQ+ gradients for ``scale`` and ``zero_point`` follow from autograd through the STE.

    Args:
        x: input tensor.
        scale: positive scale, broadcastable to ``x`` (per-tensor or per-channel).
        zero_point: integer-valued zero-point tensor, broadcastable to ``x``.
        qmin, qmax: integer grid.

    Returns:
        Dequantized tensor, same shape and dtype as ``x``.

    Example:
        >>> fake_quant(torch.tensor([0.25]), torch.tensor(0.5), torch.tensor(0.), -8, 7)
        tensor([0.])
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


# --- the exportable op ----------------------------------------------------------------------

@torch.library.custom_op("maskaq::fake_quant", mutates_args=())
def _fake_quant_op(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int
) -> torch.Tensor:
    """Same maths as :func:`fake_quant`; ``axis`` (-1 = per tensor) tells the exporter which axis
    ``scale``/``zero_point`` index. ``scale``/``zero_point`` are 1-D (length 1 or C)."""
    shape = [1] * x.dim()
    if axis >= 0:
        shape[axis] = -1
    s = scale.reshape(shape) if axis >= 0 else scale.reshape([])
    z = zero_point.reshape(shape) if axis >= 0 else zero_point.reshape([])
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return (q - z) * s


@_fake_quant_op.register_fake
def _(x, scale, zero_point, qmin, qmax, axis):  # noqa: ANN001 - signature fixed by torch.library
    return torch.empty_like(x)


def expand_blocks(t: torch.Tensor, block: int, size: int) -> torch.Tensor:
    """``[C, ceil(size / block)]`` per-block values -> ``[C, size]`` (each repeated ``block``
    times along axis 1, the last partial block cut), the layout of ONNX blocked quantization."""
    return t.repeat_interleave(block, dim=1)[:, :size]


@torch.library.custom_op("maskaq::fake_quant_blocked", mutates_args=())
def _fake_quant_blocked_op(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, block: int
) -> torch.Tensor:
    """Blocked weight quantization of a 2-D weight ``x`` ``[C, K]``: ``scale``/``zero_point``
    ``[C, ceil(K / block)]``, one value per ``block`` consecutive elements along axis 1 (ONNX
    opset-21 ``QuantizeLinear(axis=1, block_size=block)``). Same maths as :func:`fake_quant`."""
    s = expand_blocks(scale, block, x.shape[1])
    z = expand_blocks(zero_point, block, x.shape[1])
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return (q - z) * s


@_fake_quant_blocked_op.register_fake
def _(x, scale, zero_point, qmin, qmax, block):  # signature fixed by torch.library
    return torch.empty_like(x)


_STATE = threading.local()


def is_export_mode() -> bool:
    return getattr(_STATE, "export", False)


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Within this context every quantizer calls ``torch.ops.maskaq.fake_quant`` (exportable,
    no gradient) instead of the differentiable torch ops. Results are bit-identical."""
    old = is_export_mode()
    _STATE.export = True
    try:
        yield
    finally:
        _STATE.export = old


# --- quantizer modules ----------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizerSpec:
    """Read-out of one quantizer, as the exporter and the params file need it."""

    name: str
    kind: str  # "weight" | "activation"
    bits: int
    signed: bool
    narrow: bool
    symmetric: bool
    axis: int  # -1 per tensor
    qmin: int
    qmax: int
    scale: torch.Tensor  # 1-D float32
    zero_point: torch.Tensor  # 1-D float32 holding integers
    enabled: bool
    encoding: str = "linear"  # "linear" | "log2" (:class:`Log2Quantizer`)


class _Quantizer(nn.Module):
    kind = ""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


class WeightQuantizer(_Quantizer):
    """Per-output-channel (or blocked) symmetric weight quantizer (method.md §1).

    ``s_r = 2 * c_r * max|w_r| / (2^b - 1)`` is recomputed from the current latent weights at every
    forward (``c_r`` = 1 unless a range search set a per-channel clipping ratio, ``clip``) (weights are trained during calibration); zero-point 0. The scale is computed from
    ``w.detach()``: the gradient reaches the latent weights through the STE only.
    ``narrow=True`` uses ``[-(2^(b-1)-1), 2^(b-1)-1]`` (TensorRT).

    ``block=B`` (2-D Linear weights ``[out, in]``, ``axis=0`` only): one scale per output channel
    *and* per ``B`` consecutive input elements, ``s_{r,j} = 2 c_{r,j} max|w_{r, jB:(j+1)B}| /
    (2^b - 1)``; the scale tensor is ``[out, ceil(in / B)]``, exactly the layout of ONNX
    blocked ``DequantizeLinear`` / ORT ``MatMulNBits`` (the weight-only INT4 export).
    """

    kind = "weight"

    def __init__(self, bits: int, narrow: bool = False, axis: int = 0, block: int = 0) -> None:
        super().__init__(bits)
        self.narrow = narrow
        self.axis = axis
        if block and (not isinstance(block, int) or block < 1 or axis != 0):
            raise QuantError(f"weight block size {block!r} needs a positive integer and axis 0")
        self.block = int(block or 0)
        # Per-channel clipping ratio, > 0 (range search, :mod:`maskaq.ranges`: in (0, 1]; GPTQ
        # (:mod:`maskaq.gptq`) may set it above 1 when a channel's largest level is unused); empty = 1
        # everywhere. A buffer, not a parameter: it stays fixed while the latent weights train.
        self.register_buffer("clip", torch.ones(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        key = prefix + "clip"
        if key not in state_dict:  # a state saved before clipping existed: no clipping
            state_dict[key] = torch.ones(0)
        if state_dict[key].shape != self.clip.shape:
            self.clip = torch.empty_like(state_dict[key], device=self.clip.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_clip(self, ratio: torch.Tensor | None) -> None:
        """Set the per-channel clipping ratio (``None`` or all ones: no clipping)."""
        if ratio is None:
            self.clip = torch.ones(0, device=self.clip.device)
            return
        r = ratio.detach().float().reshape(-1)
        if not bool(((r > 0) & torch.isfinite(r)).all()):
            raise QuantError("weight clipping ratios must be finite and > 0")
        self.clip = r.to(self.clip.device)

    @property
    def signed(self) -> bool:
        return True

    def grid(self) -> tuple[int, int]:
        return qrange(self.bits, True, self.narrow)

    def block_amax(self, w: torch.Tensor) -> torch.Tensor:
        """``max|w|`` per block ``[C, ceil(K / block)]`` of a 2-D weight (``block > 0``)."""
        if w.dim() != 2:
            raise QuantError(f"blocked weight quantization needs a 2-D (Linear) weight, got shape {list(w.shape)}")
        C, K = w.shape
        nb = -(-K // self.block)
        a = w.detach().abs()
        if nb * self.block != K:
            a = torch.nn.functional.pad(a, (0, nb * self.block - K))
        return a.reshape(C, nb, self.block).amax(dim=2)

    def scale_for(self, w: torch.Tensor) -> torch.Tensor:
        """Per-channel scale ``[C]`` (blocked: ``[C, ceil(K / block)]``); all-zero channels or
        blocks get scale 1 (their integers are 0)."""
        if self.block:
            amax = self.block_amax(w)
        else:
            dims = [d for d in range(w.dim()) if d != self.axis]
            amax = w.detach().abs().amax(dim=dims)
        if self.clip.numel():
            if self.clip.numel() != amax.numel():
                raise QuantError(f"weight clipping has {self.clip.numel()} ratios for {amax.numel()} channels")
            amax = amax * self.clip.to(amax.dtype).reshape(amax.shape)
        s = 2 * amax / (2**self.bits - 1)
        return torch.where(s > 0, s, torch.ones_like(s))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        qmin, qmax = self.grid()
        s = self.scale_for(w)
        z = torch.zeros_like(s)
        if self.block:
            if is_export_mode():
                return torch.ops.maskaq.fake_quant_blocked(w, s, z, qmin, qmax, self.block)
            K = w.shape[1]
            return fake_quant(w, expand_blocks(s, self.block, K), expand_blocks(z, self.block, K), qmin, qmax)
        if is_export_mode():
            return torch.ops.maskaq.fake_quant(w, s, z, qmin, qmax, self.axis)
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return fake_quant(w, s.reshape(shape), z.reshape(shape), qmin, qmax)

    def spec(self, name: str, w: torch.Tensor) -> QuantizerSpec:
        qmin, qmax = self.grid()
        s = self.scale_for(w).float()
        return QuantizerSpec(name, "weight", self.bits, True, self.narrow, True, self.axis,
                             qmin, qmax, s, torch.zeros_like(s), self.enabled)

    def extra_repr(self) -> str:
        if self.block:
            return super().extra_repr() + f", blocked(axis=1, block={self.block}), narrow={self.narrow}"
        return super().extra_repr() + f", per_channel(axis={self.axis}), narrow={self.narrow}"


class ActQuantizer(_Quantizer):
    """Per-tensor activation quantizer with learnable step and zero-point (LSQ+, method.md §1).

    Initialised on the first batch it sees: ``signed = min(x) < 1e-5``; ``s = 2*mean|x|/sqrt(qmax)``;
    ``z = 0.1*(min(x) - s*qmax)`` (used rounded). The gradient of ``s`` is scaled by
    ``1/sqrt(numel*qmax)``, numel of the whole batch tensor (every layer; method.md §1). ``symmetric=True`` fixes ``z = 0`` (TensorRT).

    [ours] The zero-point is clamped into the integer grid ``[qmin, qmax]`` so it always fits the
    8-bit storage type of ONNX QuantizeLinear (int8 for signed grids, uint8 for unsigned ones).
    """

    kind = "activation"

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        super().__init__(bits)
        self.symmetric = symmetric
        self.scale = nn.Parameter(torch.ones(1))
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=not symmetric)
        # Buffers so that state_dict round-trips the initialisation.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("is_signed", torch.zeros((), dtype=torch.bool))
        # Python mirrors of the two buffers: reading a device buffer in forward would sync the GPU.
        self._ready = False
        self._signed = False

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module hook
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_flags()

    def sync_flags(self) -> None:
        """Refresh the Python mirrors after the buffers were written directly."""
        self._ready = bool(self.initialized)
        self._signed = bool(self.is_signed)

    @property
    def signed(self) -> bool:
        return self._signed

    @property
    def narrow(self) -> bool:
        return False

    def grid(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed, False)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """LSQ+ initialisation from one batch (method.md §1)."""
        x = x.detach().float()
        signed = bool(x.min() < 1e-5)
        self.is_signed.fill_(signed)
        self._signed = signed
        qmin, qmax = self.grid()
        s = 2 * x.abs().mean() / math.sqrt(qmax)
        if not torch.isfinite(s) or s <= 0:
            s = torch.tensor(1e-8 if torch.isfinite(s) else 1.0)
        self.scale.fill_(float(s))
        z = 0.0 if self.symmetric else float(torch.clamp(0.1 * (x.min() - s * qmax), qmin, qmax))
        self.zero_point.fill_(z)
        self.initialized.fill_(True)
        self.sync_flags()

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and integer zero-point as used in forward (no gradient tricks)."""
        qmin, qmax = self.grid()
        s = self.scale.detach().abs().clamp_min(1e-8)
        z = torch.zeros_like(s) if self.symmetric else torch.clamp(torch.round(self.zero_point.detach()), qmin, qmax)
        return s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._ready:  # first call, or buffers written directly: one read of the device buffer
            if bool(self.initialized):
                self.sync_flags()
            else:
                self.initialize(x)
        qmin, qmax = self.grid()
        if is_export_mode():
            s, z = self.effective()
            return torch.ops.maskaq.fake_quant(x, s.to(x.dtype), z.to(x.dtype), qmin, qmax, -1)
        # method.md §1: numel of the whole batch tensor, as the reference code does.
        g = 1.0 / math.sqrt(max(x.numel(), 1) * qmax)
        s = self.scale.abs().clamp_min(1e-8)
        s = (s - s * g).detach() + s * g  # LSQ gradient scaling; value unchanged
        if self.symmetric:
            z = torch.zeros_like(s)
        else:
            z = clamp_ste(round_ste(self.zero_point), qmin, qmax)
        return fake_quant(x, s, z, qmin, qmax)

    def spec(self, name: str) -> QuantizerSpec:
        s, z = self.effective()
        qmin, qmax = self.grid()
        return QuantizerSpec(name, "activation", self.bits, self.signed, False, self.symmetric, -1,
                             qmin, qmax, s.float().reshape(1), z.float().reshape(1), self.enabled)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_tensor, symmetric={self.symmetric}"


# --- log2 quantizer for post-softmax attention probabilities (SPDFQ, method.md §7) --------------

#: ``quant.softmax_quant`` values: the quantizer of the attention probabilities (softmax output).
SOFTMAX_QUANTS = ("linear", "log2")
#: Bit widths of the log2 quantizer (at 8 bits the attention probabilities keep the linear one).
LOG2_BITS = range(2, 8)


def check_log2_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in LOG2_BITS:
        raise QuantError(f"log2 quantizer bit width {bits!r} is not supported; valid bit widths are "
                         f"{LOG2_BITS.start}..{LOG2_BITS.stop - 1} (8-bit attention probabilities use the linear quantizer)")
    return bits


def log2_tables(scale: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 tables of a ``bits``-bit log2 quantizer with scale ``s``.

    Code ``c = clamp(round(-log2(x / s)), 0, M)``, ``M = 2^b - 1``, value ``s * 2^-c`` for
    ``c < M`` and exactly 0 for the top code ``M`` (tiny probabilities vanish). The rounding is
    done by comparison with the geometric midpoints ``T_c = s * 2^-(c + 1/2)`` (``c = 0..M-1``),
    each computed once in float64 from the float32 ``s`` and rounded to float32; the same tables
    serve PyTorch and the ONNX graph, so both compute the same codes bit for bit.

    Returns:
        ``(thresholds, values)``: ``thresholds`` ``[M]`` ascending (``T_{M-1} ... T_0``);
        ``values`` ``[M + 1]`` indexed by ``n = #{i: thresholds[i] <= x}`` (code ``M - n``):
        ``values[0] = 0``, ``values[n] = s * 2^-(M - n)``. A value exactly on a threshold takes
        the lower code (the larger value).
    """
    check_log2_bits(bits)
    M = 2**bits - 1
    s = float(torch.tensor(float(scale), dtype=torch.float32))
    codes = torch.arange(M - 1, -1, -1, dtype=torch.float64)  # ascending thresholds: T_{M-1} .. T_0
    thresholds = (s * torch.pow(2.0, -(codes + 0.5))).to(torch.float32)
    n = torch.arange(M + 1, dtype=torch.float64)
    values = (s * torch.pow(2.0, -(M - n))).to(torch.float32)
    values[0] = 0.0
    return thresholds, values


def log2_fake_quant(x: torch.Tensor, thresholds: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Log2 fake quantization by table (no gradient; see :func:`log2_tables`): ``n`` = number of
    thresholds ``<= x`` (exact float32 comparisons), output ``values[n]`` in ``x``'s dtype."""
    n = torch.bucketize(x.float(), thresholds.to(device=x.device, dtype=torch.float32), right=True)
    return values.to(x.device)[n].to(x.dtype)


@torch.library.custom_op("maskaq::log2_quant", mutates_args=())
def _log2_quant_op(x: torch.Tensor, thresholds: torch.Tensor, values: torch.Tensor, bits: int) -> torch.Tensor:
    """Same maths as :func:`log2_fake_quant`; the exporter maps it to float ONNX ops
    (comparisons against ``thresholds`` by binary search, then a Gather from ``values``)."""
    return log2_fake_quant(x, thresholds, values)


@_log2_quant_op.register_fake
def _(x, thresholds, values, bits):  # signature fixed by torch.library
    return torch.empty_like(x)


class Log2Quantizer(_Quantizer):
    """Log2 quantizer of probabilities in ``[0, 1]`` (the post-softmax attention of SPDFQ's learning
    stage, method.md §7), ``bits`` 2..7.

    ``c = clamp(round(-log2(x / s)), 0, 2^b - 1)``; ``y = s * 2^-c``, the top code meaning exactly 0.
    The scale ``s`` is a buffer (default 1.0, not trained), set by range initialisation
    (:func:`maskaq.ranges.init_ranges`, :func:`maskaq.calibration.minmax_calibrate`) or, like the
    linear quantizer's LSQ+ start, from the first batch it sees (``s = max(x)``). Rounding goes
    through the threshold table of :func:`log2_tables` (exact, and exported as the same table).
    Gradient: straight through (identity) for ``x <= s``, zero above (clamped to code 0).
    The tables are derived from ``s`` and not saved in the state dict.
    """

    kind = "activation"
    encoding = "log2"

    def __init__(self, bits: int) -> None:
        nn.Module.__init__(self)
        self.bits = check_log2_bits(bits)
        self.enabled = True
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        t, v = log2_tables(1.0, self.bits)
        self.register_buffer("thresholds", t, persistent=False)
        self.register_buffer("values", v, persistent=False)
        self._ready = False

    # the attributes other code reads off an activation quantizer
    signed = False
    symmetric = True
    narrow = False

    def grid(self) -> tuple[int, int]:
        """Code range ``(0, 2^b - 1)``."""
        return 0, 2**self.bits - 1

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - nn.Module hook
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def _refresh(self) -> None:
        t, v = log2_tables(float(self.scale.reshape(-1)[0]), self.bits)
        dev = self.scale.device
        self.thresholds, self.values = t.to(dev), v.to(dev)
        self.sync_flags()

    def sync_flags(self) -> None:
        self._ready = bool(self.initialized)

    @torch.no_grad()
    def set_scale(self, s: float) -> None:
        """Set ``s`` (finite, > 0) and rebuild the tables; marks the quantizer initialised."""
        s = float(s)
        if not (math.isfinite(s) and s > 0):
            raise QuantError(f"log2 quantizer scale must be finite and > 0, got {s!r}")
        self.scale.fill_(s)
        self.initialized.fill_(True)
        self._refresh()

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """First-batch start: ``s = max(x)`` (1.0 if that is not a positive finite number)."""
        m = float(x.detach().float().max()) if x.numel() else 1.0
        self.set_scale(m if math.isfinite(m) and m > 0 else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._ready:
            if bool(self.initialized):
                self._refresh()
            else:
                self.initialize(x)
        if is_export_mode():
            return torch.ops.maskaq.log2_quant(x, self.thresholds, self.values, self.bits)
        q = log2_fake_quant(x.detach(), self.thresholds, self.values)
        if not x.requires_grad:
            return q
        g = (x.detach() <= self.scale.to(x.dtype)).to(x.dtype)
        return q + (x - x.detach()) * g  # value q exactly; gradient 1 for x <= s, 0 above

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale.detach().reshape(1)
        return s, torch.zeros_like(s)

    def spec(self, name: str) -> QuantizerSpec:
        qmin, qmax = self.grid()
        s = self.scale.detach().float().reshape(1)
        return QuantizerSpec(name, "activation", self.bits, False, False, True, -1, qmin, qmax, s,
                             torch.zeros_like(s), self.enabled, "log2")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}, log2, scale={float(self.scale.reshape(-1)[0]):.6g}"


#: Every activation quantizer type (linear LSQ+ and log2); ``isinstance(m, ACTIVATION_QUANTIZERS)``.
ACTIVATION_QUANTIZERS = (ActQuantizer, Log2Quantizer)
