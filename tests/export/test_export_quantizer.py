"""Exact maths: one quantizer at a time, ORT against PyTorch fake-quant, bit for bit.

A bank of activation quantizers (2-8 bits, signed and unsigned grids, zero-points inside the
grid, awkward scales) sees the same input: every rounding tie of every quantizer, one and two
ulps either side of it, the clamp edges, values far outside the range, and random values. The
exported CQDQ / QDQ graph must reproduce ``maskaq.quant.fake_quant`` exactly, in ORT's exact
mode and in its default (optimised) mode, for both profiles.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import ExportError, convert_for_profile, export_onnx, freeze_model
from maskaq.models import DataConfig
from maskaq.quant import ActQuantizer, qrange

# (bits, signed, scale, zero_point)
CONFIGS = [
    (2, True, 0.37, -1), (2, False, 0.1, 0), (3, True, 0.05, 1), (3, False, 1 / 3, 2),
    (4, True, 0.0123, -3), (4, False, 0.25, 5), (5, True, 0.071, 0), (6, False, 0.003, 7),
    (7, True, 1.7, -20), (8, True, 0.02, -7), (8, False, 0.01, 100), (8, False, 0.0039, 0),
]


class Bank(nn.Module):
    """Every quantizer of CONFIGS applied to the same input, results concatenated on dim 1."""

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
            if hasattr(q, "sync_flags"):
                q.sync_flags()  # the quantizer mirrors its buffers in Python attributes
            self.qs.append(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([q(x) for q in self.qs], dim=1)


def adversarial_values() -> np.ndarray:
    vals = []
    for bits, signed, s, z in CONFIGS:
        qmin, qmax = qrange(bits, signed)
        s32 = np.float32(s)
        k = np.arange(qmin - z - 3, qmax - z + 3, dtype=np.float32)
        ties = (k + np.float32(0.5)) * s32  # x/s lands on (or next to) .5
        ties2 = np.float32(k + 0.5) * s32
        on = k * s32
        for t in (ties, ties2, on):
            up1 = np.nextafter(t, np.float32(np.inf))
            dn1 = np.nextafter(t, np.float32(-np.inf))
            vals += [t, up1, dn1, np.nextafter(up1, np.float32(np.inf)), np.nextafter(dn1, np.float32(-np.inf))]
        lo, hi = np.float32(qmin - z) * s32, np.float32(qmax - z) * s32
        vals.append(np.array([lo, hi, np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf), 1e6 * s32, -1e6 * s32, 0.0,
                              -0.0], np.float32))
    rng = np.random.default_rng(0)
    vals.append(rng.normal(0, 2, 4000).astype(np.float32))
    vals.append(rng.uniform(-300, 300, 2000).astype(np.float32))
    v = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in vals])
    pad = (-len(v)) % 64
    return np.concatenate([v, np.zeros(pad, np.float32)])


@pytest.fixture(scope="module")
def bank_data():
    v = adversarial_values()
    x = torch.from_numpy(v).reshape(2, 1, 1, -1)  # batch 2 (dynamic), 1 channel, 1 row
    dcfg = DataConfig((1, 1, x.shape[-1]), (0.0,), (1.0,))
    return Bank().eval(), x, dcfg


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_quantizer_bank_matches_torch_exactly(bank_data, tmp_path, helpers, profile):
    bank, x, dcfg = bank_data
    res = export_onnx(bank, tmp_path / f"bank_{profile}.onnx", data_config=dcfg, profile=profile)
    ref_model, _ = convert_for_profile(bank, profile)
    with torch.no_grad():
        ref = ref_model(x).numpy()
    assert ref.shape == (2, len(CONFIGS), 1, x.shape[-1])
    for exact in (True, False):
        got = helpers.ort_session(res.path, exact=exact).run(None, {"input": x.numpy()})[0]
        bad = np.argwhere(got != ref)
        assert bad.size == 0, (f"{profile} exact={exact}: {len(bad)} values differ, first at {bad[:3].tolist()}: "
                               f"ort {got[tuple(bad[0])]} torch {ref[tuple(bad[0])]}")
    # the adversarial input really hits ties: the torch quantizer rounds half-way values both ways
    assert np.unique(ref).size > 100


def test_bank_graph_encoding(bank_data, tmp_path):
    """Per quantizer: 8-bit -> Q/DQ only; 2-7 bit -> float Clip to the exact range -> Q -> DQ;
    profile ort: 8-bit grids int8 zero-point if signed, uint8 if unsigned; 2-7 bit grids uint8
    holding ``q - qmin`` with zero-point ``z - qmin`` (exact in OpenVINO's float32 maths too)."""
    bank, x, dcfg = bank_data
    res = export_onnx(bank, tmp_path / "bank.onnx", data_config=dcfg)
    m = onnx.load(str(res.path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    for i, (bits, signed, s, z) in enumerate(CONFIGS):
        name = f"qs.{i}"
        q = nodes[f"{name}/QuantizeLinear"]
        zp = inits[f"{name}.zero_point"]
        assert zp.shape == () and inits[f"{name}.scale"].shape == ()
        qmin, qmax = qrange(bits, signed)
        if bits == 8:
            assert zp.dtype == (np.int8 if signed else np.uint8) and int(zp) == z
        else:
            assert zp.dtype == np.uint8 and int(zp) == z - qmin
        assert inits[f"{name}.scale"] == np.float32(s)
        if bits == 8:
            assert f"{name}/Clip" not in nodes and q.input[0] == "input"
        else:
            clip = nodes[f"{name}/Clip"]
            assert q.input[0] == clip.output[0] == f"{name}.clipped"
            lo, hi = inits[f"{name}.clip_min"], inits[f"{name}.clip_max"]
            assert lo == np.float32(qmin - z) * np.float32(s) and hi == np.float32(qmax - z) * np.float32(s)
        assert nodes[f"{name}/DequantizeLinear"].output[0] == f"{name}.dequantized"


def test_frozen_copy_is_bit_identical(helpers):
    """The export-time twin of Q (constant quantizers + the custom op) computes exactly Q."""
    lm, Q, x = helpers.build("vit", "3w3a", batch=4)
    E = copy.deepcopy(Q)
    recs = freeze_model(E, "ort")
    with torch.no_grad():
        assert torch.equal(E(x), Q(x))
    assert {r.kind for r in recs.values()} == {"activation", "weight"}
    assert all(r.clip is not None for r in recs.values() if r.kind == "activation")  # 3-bit: CQDQ


def test_uninitialised_quantizers_refused(tmp_path):
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model

    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=1,
                    num_heads=3, num_classes=10)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a"))
    with pytest.raises(ExportError, match="never initialised"):
        export_onnx(Q, tmp_path / "q.onnx", data_config=lm.data_config)
    with pytest.raises(ExportError, match="output directory"):
        export_onnx(Q, tmp_path / "missing" / "q.onnx", data_config=lm.data_config)
    with pytest.raises(ExportError, match="profile"):
        export_onnx(Q, tmp_path / "q.onnx", data_config=lm.data_config, profile="openvino")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(Q, tmp_path / "q.onnx", data_config=lm.data_config, opset=11)
    with pytest.raises(ExportError, match="block size"):
        export_onnx(Q, tmp_path / "q.onnx", data_config=lm.data_config, weight_only_int4_block=24)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_float_model_exports_as_fp32(tmp_path, helpers):
    """A model without (enabled) quantizers exports as a plain float graph, profile fp32."""
    import json

    from maskaq.models import load_model

    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=1,
                    num_heads=3, num_classes=10)
    res = export_onnx(lm.model, tmp_path / "fp32.onnx", data_config=lm.data_config)
    m = onnx.load(str(res.path))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip") for n in m.graph.node)
    assert json.loads({p.key: p.value for p in m.metadata_props}["maskaq.quant"])["profile"] == "fp32"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = lm.model(x).numpy()
    got = helpers.ort_session(res.path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
