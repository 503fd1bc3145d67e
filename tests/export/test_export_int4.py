"""The weight-only INT4 artifact: opset 21, INT4 weights blocked along the reduction axis
(DequantizeLinear with block_size), float activations."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export import block_fake_quant, block_quantize
from maskaq.qmodel import quantizers_disabled


def test_block_quantize_maths():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5],
                      [3.0, -3.0, 1.5, 0.2, 0.0, 0.0, 0.0]])
    q, s = block_quantize(w, axis=1, block=4)
    assert s.shape == (2, 2)  # ceil(7 / 4) blocks, last one partial
    assert s[0, 0] == 1.0  # all-zero block: scale 1, integers 0
    assert torch.allclose(s[0, 1], torch.tensor(2 * 2.0 / 15)) and torch.allclose(s[1, 0], torch.tensor(6.0 / 15))
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    assert q[1, 0] == 7 and q[1, 1] == -8  # 3/(6/15) = 7.5 -> 8 -> clamped 7; -7.5 -> -8 (half to even)
    fq = block_fake_quant(w, axis=1, block=4)
    assert fq.shape == w.shape and torch.equal(fq, q.float() * s.repeat_interleave(4, 1)[:, :7])


@pytest.fixture(scope="module")
def int4(outdir, vit, helpers):
    e = helpers.do_export(outdir, "vit_int4_b32", vit.lm, vit.Q, weight_only_int4_block=32)
    return e


def test_int4_structure(int4, vit):
    m = int4.model
    assert {o.domain or "": o.version for o in m.opset_import}[""] == 21
    assert not any(n.op_type in ("QuantizeLinear", "Clip") for n in m.graph.node)  # float activations
    inits = {t.name: t for t in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 10
    for n in dqs:
        t = inits[n.input[0]]
        attrs = {a.name: a.i for a in n.attribute}
        q, s = numpy_helper.to_array(t), numpy_helper.to_array(inits[n.input[1]])
        assert t.data_type == onnx.TensorProto.INT4 and q.min() >= -8 and q.max() <= 7
        ax = attrs["axis"]
        if q.ndim == 2:  # Linear stored [in, out]: blocks along the reduction axis 0, no zero-point
            assert attrs["block_size"] == 32 and ax == 0 and len(n.input) == 2
            assert s.shape[ax] == -(-q.shape[ax] // 32)
        else:  # patch conv [out, in, kh, kw]: per output channel (3 input channels cannot be blocked by 32)
            assert "block_size" not in attrs and ax == 0 and s.shape == (q.shape[0],)
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["maskaq.quant"]) == {"w_bits": 4, "a_bits": 32, "profile": "int4-weight-only",
                                                "method": "test", "block_size": 32}
    assert int4.enc["activation_encodings"] == {} and len(int4.enc["param_encodings"]) == 10
    assert all(v.get("block_size") == (None if k.startswith("patch_embed") else 32)
               for k, v in int4.enc["maskaq"]["quantizers"].items() if v["kind"] == "weight")


def test_int4_matches_torch_reference(int4, vit, helpers, tmp_path):
    """Exact mode equals PyTorch with the blocked INT4 weights and quantizers off (float summation
    order aside); ORT's default mode fuses DQ -> MatMul into MatMulNBits, which is accurate to float
    error with session.qdq_matmulnbits_accuracy_level=0 (the default level 4 quantizes the
    activations to int8 inside the kernel)."""
    R = copy.deepcopy(vit.Q)
    for name, mod in R.named_modules():
        if hasattr(mod, "weight_quantizer"):
            with torch.no_grad():
                if mod.weight.dim() == 2:
                    mod.weight.copy_(block_fake_quant(mod.weight, 1, 32))
                else:  # the patch conv: its own calibrated 4-bit per-channel quantizer
                    mod.weight.copy_(mod.weight_quantizer(mod.weight))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with quantizers_disabled(R), torch.no_grad():
        ref = R(x).numpy()
    got = helpers.ort_session(int4.path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    opt = tmp_path / "int4.opt.onnx"
    sess = helpers.ort_session(int4.path, exact=False, optimized_path=opt,
                               **{"session.qdq_matmulnbits_accuracy_level": "0"})
    census = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert census.count("MatMulNBits") >= 8
    got2 = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got2 - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
