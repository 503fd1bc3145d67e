"""Cross-runtime agreement as a contract: the exported graphs give the same answers in ORT exact
mode, ORT deploy mode and OpenVINO (CPU plugin, f32), for both profiles.

OpenVINO turns Q/DQ into FakeQuantize and computes ``round(x * (1/s') + shift)`` in float32 with
``shift = zero_point - storage_min``; with int8 storage that shift is ``128 + z`` and the float32
sum rounds away the last bits of ``x/s``, so near-half-way values round differently from ORT's
``round(x / s) + z`` (docs/export-notes.md, "OpenVINO agreement"). The ORT profile stores
sub-8-bit grids as uint8 ``q - qmin`` with zero-point ``z - qmin``, which keeps the shift small.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from export import convert_for_profile, export_onnx
from maskaq.models import DataConfig
from maskaq.quant import ActQuantizer, qrange

ov = pytest.importorskip("openvino")

# (bits, signed, scale, zero_point): signed asymmetric and symmetric sub-8-bit grids, one unsigned
CONFIGS = [(4, True, 0.0371, 3), (4, True, 0.0123, -3), (4, True, 0.29, 0), (3, True, 0.05, 1),
           (2, True, 0.37, -1), (4, False, 0.25, 5)]
N = 1 << 19  # values per quantizer


class Bank(nn.Module):
    """Quantizer i applied to input channel i."""

    def __init__(self) -> None:
        super().__init__()
        self.qs = nn.ModuleList()
        for bits, signed, s, z in CONFIGS:
            q = ActQuantizer(bits)
            with torch.no_grad():
                q.is_signed.fill_(signed)
                q.scale.fill_(s)
                q.zero_point.fill_(float(z))
                q.initialized.fill_(True)
            q.sync_flags()
            self.qs.append(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([q(x[:, i:i + 1]) for i, q in enumerate(self.qs)], dim=1)


def _ov(path, precision="f32"):
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision})


def _codes(y: np.ndarray) -> np.ndarray:
    s = np.asarray([c[2] for c in CONFIGS], np.float32).reshape(1, -1, 1, 1)
    return np.round(y / s).astype(np.int64)  # q - z, exact for these grids


@pytest.fixture(scope="module")
def bank_inputs():
    rng = np.random.default_rng(0)
    cols = []
    for bits, signed, s, z in CONFIGS:
        qmin, qmax = qrange(bits, signed)
        lo, hi = (qmin - z) * s, (qmax - z) * s
        cols.append(rng.uniform(lo, hi, N).astype(np.float32))
    x = np.stack(cols).reshape(1, len(CONFIGS), 1, N)
    return torch.from_numpy(x), DataConfig((len(CONFIGS), 1, N), (0.0,) * len(CONFIGS), (1.0,) * len(CONFIGS))


def test_sub8bit_activations_round_like_ort_in_openvino(bank_inputs, tmp_path, helpers):
    """Random values over each grid's range: OpenVINO f32 gives ORT's (and PyTorch's) integer
    for all but a few in a million (the floor of multiplying by a rounded reciprocal); the int8
    encoding with its 128 + z shift flipped ~8 in a million."""
    x, dcfg = bank_inputs
    bank = Bank().eval()
    res = export_onnx(bank, tmp_path / "bank.onnx", data_config=dcfg)
    with torch.no_grad():
        ref = _codes(bank(x).numpy())
    got_ort = _codes(helpers.ort_session(res.path, exact=True).run(None, {"input": x.numpy()})[0])
    assert (got_ort == ref).all()  # the encoding change is exact in ORT
    got_ov = _codes(_ov(res.path)(x.numpy())[0])
    bad = got_ov != ref
    per_q = bad.reshape(len(CONFIGS), -1).sum(1)
    assert np.abs(got_ov - ref).max() <= 1  # only one-step rounding flips
    assert bad.sum() <= 2e-6 * bad.size, f"flips per quantizer {per_q.tolist()} of {N}"


@pytest.mark.parametrize("fixture", ["vit", "vit_trt"])
def test_tiny_vit_agrees_across_runtimes(fixture, request, helpers):
    """Tiny 4w4a ViT, random inputs: ORT exact, ORT deploy and OpenVINO f32 give the same top-1
    and logits within a small bound, for the ort and the tensorrt profile."""
    art = request.getfixturevalue(fixture)
    x = torch.randn(96, *art.lm.data_config.input_size, generator=torch.Generator().manual_seed(5)).numpy()
    exact = helpers.ort_session(art.path, exact=True).run(None, {"input": x})[0]
    deploy = helpers.ort_session(art.path, exact=False).run(None, {"input": x})[0]
    ovf = _ov(art.path)(x)[0]
    ref_model, _ = convert_for_profile(art.Q, "tensorrt" if fixture == "vit_trt" else "ort")
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    scale = float(np.abs(exact).max())
    for name, y in (("ort deploy", deploy), ("openvino f32", ovf)):
        agree = float(np.mean(y.argmax(1) == exact.argmax(1)))
        assert agree >= 95 / 96, f"{fixture} {name}: top-1 agreement {agree:.3f}"
        assert np.abs(y - exact).max() <= 0.1 * scale, f"{fixture} {name}: max |dlogit| {np.abs(y - exact).max()}"
    assert np.mean(exact.argmax(1) == ref.argmax(1)) == 1.0  # exact mode is the (converted) torch model
