"""Exact maths of the quantizer: hand-computed values, ONNX Runtime parity on near-ties, STE."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maskaq.quant import ActQuantizer, QuantError, WeightQuantizer, export_mode, fake_quant, qrange


def test_qrange_grids():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-8, 7)
    assert qrange(4, True, narrow=True) == (-7, 7)
    assert qrange(3, False) == (0, 7)
    assert qrange(2, True) == (-2, 1)


@pytest.mark.parametrize("bad", [1, 9, 0, 16, "4", 4.0, True])
def test_bad_bits_rejected(bad):
    with pytest.raises(QuantError, match="2..8"):
        qrange(bad, True)


def test_fake_quant_hand_values():
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 100.0, -100.0, 0.5])
    s, z = torch.tensor(0.5), torch.tensor(0.0)
    # x/s = 0.5, 1.5, -0.5, 2.5, 200, -200, 1 -> round half even 0, 2, -0, 2, clamp 7, clamp -8, 1
    expect = torch.tensor([0.0, 1.0, 0.0, 1.0, 3.5, -4.0, 0.5])
    assert torch.equal(fake_quant(x, s, z, -8, 7), expect)
    # zero-point added after rounding: x/s = 0.5 -> 0 + 3 = 3 -> (3-3)*s = 0; clamp at qmax-z = 4 steps
    z3 = torch.tensor(3.0)
    expect3 = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, -5.5, 0.5])
    assert torch.equal(fake_quant(x, s, z3, -8, 7), expect3)


def _ort_qdq(x: np.ndarray, scale: float, zp: int, dtype: int) -> np.ndarray:
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("z", dtype, [], [zp])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("signed", [True, False])
def test_matches_onnxruntime_on_near_ties(signed):
    rng = np.random.default_rng(0)
    qmin, qmax = qrange(8, signed)
    for scale in [0.1, 0.0137, 3.3e-3, 1 / 3, 0.7]:
        zp = int(rng.integers(qmin, qmax + 1) // 4)
        k = rng.integers(qmin - zp - 4, qmax - zp + 4, size=4000).astype(np.float64)
        # exact ties and values one ulp either side of them, plus random values
        ties = ((k + 0.5) * scale).astype(np.float32)
        x = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
                            rng.normal(0, 40 * scale, 4000).astype(np.float32)])
        ref = _ort_qdq(x, scale, zp, TensorProto.INT8 if signed else TensorProto.UINT8)
        ours = fake_quant(torch.from_numpy(x), torch.tensor(scale, dtype=torch.float32),
                          torch.tensor(float(zp)), qmin, qmax).numpy()
        assert np.array_equal(ours, ref), f"scale {scale}: {np.sum(ours != ref)} differ"
        with export_mode():
            op = torch.ops.maskaq.fake_quant(torch.from_numpy(x), torch.tensor([scale], dtype=torch.float32),
                                             torch.tensor([float(zp)]), qmin, qmax, -1).numpy()
        assert np.array_equal(op, ref)


def test_ste_gradients():
    x = torch.tensor([-10.0, -0.3, 0.2, 0.6, 10.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    z = torch.tensor(1.0, requires_grad=True)
    y = fake_quant(x, s, z, -4, 3)  # representable range [(-4-1)s, (3-1)s] = [-2.5, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ+: d/ds = round(x/s) - x/s inside; (qmin - z) or (qmax - z) outside
    xs = x.detach() / 0.5
    inside = (torch.round(xs) - xs)[1:4].sum()
    assert s.grad.item() == pytest.approx(float(inside) + (-4 - 1) + (3 - 1))
    # d/dz = -s when clamped, 0 inside (STE through round)
    assert z.grad.item() == pytest.approx(-2 * 0.5)


def test_weight_quantizer_per_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.1, 0.2, -0.3], [0.0, 0.0, 0.0]])
    wq = WeightQuantizer(4)
    s = wq.scale_for(w)
    assert torch.allclose(s, torch.tensor([2 * 1.0 / 15, 2 * 0.3 / 15, 1.0]))
    y = wq(w)
    q = torch.round(y / s[:, None])
    assert q.min() >= -8 and q.max() <= 7
    assert torch.equal(y[2], torch.zeros(3))
    # recomputed from the current latent weights at every forward
    w2 = w * 2
    assert torch.allclose(wq(w2), 2 * y)
    wq.enabled = False
    assert wq(w) is w


def test_act_quantizer_init_rules():
    x = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    aq = ActQuantizer(4)
    aq(x)
    assert aq.signed  # min < 1e-5
    qmin, qmax = aq.grid()
    assert (qmin, qmax) == (-8, 7)
    s = 2 * x.abs().mean() / math.sqrt(7)
    assert aq.scale.item() == pytest.approx(float(s))
    z = round(0.1 * (-1.0 - float(s) * 7))
    assert aq.effective()[1].item() == z
    pos = ActQuantizer(4)
    pos(torch.tensor([[0.5, 1.0, 2.0]]))
    assert not pos.signed and pos.grid() == (0, 15)
    sym = ActQuantizer(4, symmetric=True)
    sym(x)
    assert sym.effective()[1].item() == 0.0


def test_act_quantizer_learns_scale_and_zero_point():
    aq = ActQuantizer(3)
    x = torch.randn(4, 16)
    aq(x)
    y = aq(x * 3)
    y.square().sum().backward()
    assert aq.scale.grad is not None and aq.scale.grad.abs().item() > 0
    assert aq.zero_point.grad is not None


def test_export_mode_bit_identical_to_training_path():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7) * 2
    aq = ActQuantizer(5)
    aq(x)
    w = torch.randn(6, 7)
    wq = WeightQuantizer(3)
    train = (aq(x), wq(w))
    with export_mode():
        exp = (aq(x), wq(w))
    assert torch.equal(train[0], exp[0]) and torch.equal(train[1], exp[1])


# --- log2 quantizer (attention probabilities, quant.softmax_quant=log2) -----------------------

def _log2_ref(x: torch.Tensor, s: float, bits: int) -> torch.Tensor:
    """The definition in float64: c = clamp(round(-log2(x / s)), 0, 2^b - 1); top code -> 0."""
    M = 2**bits - 1
    c = torch.clamp(torch.round(-torch.log2(x.double() / s)), 0, M)
    return torch.where(c == M, torch.zeros_like(c), s * torch.pow(2.0, -c)).float()


def test_log2_hand_values_and_thresholds():
    from maskaq.quant import Log2Quantizer, log2_tables

    q = Log2Quantizer(3)
    q.set_scale(1.0)
    t, v = log2_tables(1.0, 3)
    assert t.dtype == v.dtype == torch.float32 and t.shape == (7,) and v.shape == (8,)
    assert torch.equal(v, torch.tensor([0.0] + [2.0**-k for k in range(6, -1, -1)]))
    assert torch.all(t[1:] > t[:-1])  # ascending geometric midpoints s * 2^-(c + 1/2)
    assert torch.equal(t, torch.tensor([2.0 ** -(c + 0.5) for c in range(6, -1, -1)], dtype=torch.float32))
    x = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.0**-6, 2.0**-7, 1e-9, -0.0])
    # 0 -> 0, 1 -> s, 0.5 -> code 1, above s -> s (code 0), lowest nonzero level 2^-6, top code 7 -> 0
    assert q(x).tolist() == [0.0, 1.0, 0.5, 1.0, 2.0**-6, 0.0, 0.0, 0.0]
    # exactly on a threshold: the lower code (larger value); one float32 step below: the next code
    for c in range(7):
        tc = t[6 - c]
        below = torch.nextafter(tc, torch.tensor(0.0))
        assert q(tc.reshape(1)).item() == v[7 - c].item() == (2.0**-c if c < 7 else 0.0)
        assert q(below.reshape(1)).item() == (2.0 ** -(c + 1) if c + 1 < 7 else 0.0)
    # against the float64 definition, scale 0.8, on values away from the midpoints
    q4 = Log2Quantizer(4)
    q4.set_scale(0.8)
    r = torch.rand(20000, generator=torch.Generator().manual_seed(0)) ** 6
    assert torch.equal(q4(r), _log2_ref(r, float(torch.tensor(0.8)), 4))


@pytest.mark.parametrize("bad", [1, 8, 0, 16, "4", 4.0, True])
def test_log2_bad_bits_rejected(bad):
    from maskaq.quant import Log2Quantizer

    with pytest.raises(QuantError, match=r"log2 .*2\.\.7"):
        Log2Quantizer(bad)


def test_log2_ste_scale_state_and_export_mode():
    from maskaq.quant import Log2Quantizer

    q = Log2Quantizer(4)
    with pytest.raises(QuantError, match="finite and > 0"):
        q.set_scale(0.0)
    x = torch.tensor([0.0, 0.01, 0.3, 0.5, 0.9], requires_grad=True)
    y = q(x)  # first batch: s = max(x)
    assert q.scale.item() == pytest.approx(0.9) and bool(q.initialized)
    (y * torch.arange(1.0, 6.0)).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # straight through for x <= s
    x2 = torch.tensor([0.2, 1.5], requires_grad=True)
    q(x2).sum().backward()
    assert x2.grad.tolist() == [1.0, 0.0]  # clamped above s: no gradient
    assert not list(q.parameters())  # the scale is a buffer, not trained
    # state dict: the scale (and initialised flag) round-trip, the tables are rebuilt from it
    q2 = Log2Quantizer(4)
    q2.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"scale", "initialized"}
    r = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q2(r), q(r)) and torch.equal(q2.thresholds, q.thresholds)
    with export_mode():
        assert torch.equal(q(r), q2(r))
    q.enabled = False
    assert q(r) is r


def test_log2_config_switch_and_default_unchanged():
    import timm

    from maskaq.qmodel import QuantConfig, quantize_model
    from maskaq.quant import Log2Quantizer

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                          depth=1, num_heads=3, num_classes=10).eval()
    assert QuantConfig().softmax_quant == "linear"
    kinds = lambda Q: {n: type(q).__name__ for n, q in Q.named_modules() if n.endswith("softmax_quantizer")}  # noqa: E731
    assert kinds(quantize_model(m, QuantConfig.parse("4w4a"))) == {"blocks.0.attn.softmax_quantizer": "ActQuantizer"}
    Q = quantize_model(m, QuantConfig.parse("4w4a", softmax_quant="log2"))
    assert kinds(Q) == {"blocks.0.attn.softmax_quantizer": "Log2Quantizer"}
    assert sum(isinstance(q, Log2Quantizer) for q in Q.modules()) == 1  # only the softmax output
    # 8-bit activations, or the softmax quantizer kept at 8 bit: the linear quantizer stays
    assert kinds(quantize_model(m, QuantConfig.parse("4w8a", softmax_quant="log2")))["blocks.0.attn.softmax_quantizer"] == "ActQuantizer"
    Qk = quantize_model(m, QuantConfig.parse("4w4a", softmax_quant="log2", keep_8bit=("*.softmax_quantizer",)))
    assert kinds(Qk)["blocks.0.attn.softmax_quantizer"] == "ActQuantizer"
    with pytest.raises(QuantError, match="softmax quantizer 'exp' is not known"):
        QuantConfig(softmax_quant="exp")
