"""Exact maths of the quantizer: hand-computed values, ONNX Runtime parity on near-ties, STE."""
from __future__ import annotations

import math

import numpy as np
import onnx
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
    npdt = np.uint8 if dtype == TensorProto.UINT8 else np.int8
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
