"""Profile ``tensorrt``: the rules of TensorRT's explicit quantization, stated and checked.

Rules (TensorRT developer guide, "Explicit Quantization" / "Working with Quantized Types",
docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/; the ONNX parser's
"TRT only supports symmetric quantization - zeroPt must be all zeros"):

R1 symmetric only: every QuantizeLinear/DequantizeLinear zero-point is 0.
R2 INT8 Q/DQ (INT4/FP4 only for weight-only blocked DQ); no UINT8.
R3 activations per tensor: a scalar, positive, constant scale; INT8 range [-128, 127].
R4 weights per output channel, INT8 in [-127, 127] (narrow: -128 never used); pre-quantized
   weights need a DequantizeLinear between the weights and the linear operator (no Q on them).
   For MatMul B = [K, N] the output channel is axis 1; for Conv [K, C, R, S] it is axis 0.
R5 Q/DQ on the inputs of the weighted / linear operators to run them in INT8: every MatMul and
   Gemm (the Linear layers, and both attention batched matmuls, which TensorRT's MHA fusion wants
   quantized) reads both operands from a DequantizeLinear.
R6 LayerNorm, softmax, GELU, residual adds stay float (no DQ feeds them); a float Clip is an
   ordinary pointwise layer and may sit in front of a QuantizeLinear.
R7 per-axis Q/DQ needs opset >= 13; this profile writes opset 20.

Not applied (it would change the numerics of the calibrated model): extra Q/DQ on residual-add
inputs, which only help TensorRT fuse more.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from onnx import numpy_helper

from export import convert_for_profile


def _parts(m):
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return prod, inits


def test_tensorrt_rules(vit_trt):
    m = vit_trt.model
    prod, inits = _parts(m)
    assert {o.domain or "": o.version for o in m.opset_import}[""] == 20  # R7
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        assert len(n.input) == 3 and n.input[1] in inits and n.input[2] in inits  # constant scale/zp
        zp, s = inits[n.input[2]], inits[n.input[1]]
        assert zp.dtype == np.int8, n.name  # R2
        assert not np.any(zp), n.name  # R1
        assert np.all(s > 0), n.name
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        if n.op_type == "QuantizeLinear" or n.input[0] not in inits:  # activations: R3
            assert s.shape == () and zp.shape == (), n.name
        else:  # weights: R4
            w = inits[n.input[0]]
            assert w.dtype == np.int8 and w.min() >= -127 and w.max() <= 127
            assert s.shape == (w.shape[axis],)
            consumer_ops = {c.op_type for c in m.graph.node if n.output[0] in c.input}
            if consumer_ops <= {"MatMul", "Gemm"}:
                assert w.ndim == 2 and axis == 1  # B = [K, N]: output channels on axis 1
            else:
                assert consumer_ops == {"Conv"} and axis == 0
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in inits  # R4: no Q on weights
        if n.op_type in ("MatMul", "Gemm"):  # R5
            assert all(prod[i].op_type == "DequantizeLinear" for i in n.input[:2]), n.name
        if n.op_type in ("LayerNormalization", "Softmax", "Gelu", "Add"):  # R6
            assert not any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input), n.name
        if n.op_type == "Clip":  # R6: float pointwise, straight into a Q
            assert inits[n.input[1]].dtype == np.float32
            (c,) = [c for c in m.graph.node if n.output[0] in c.input]
            assert c.op_type == "QuantizeLinear"
    meta = {p.key: p.value for p in m.metadata_props}
    quant = json.loads(meta["maskaq.quant"])
    assert quant["profile"] == "tensorrt" and quant["converted"]["activations"] > 0
    assert vit_trt.enc["quantizer_args"]["is_symmetric"] is True
    assert all(e["is_symmetric"] == "True" or e["offset"] == 0
               for encs in vit_trt.enc["activation_encodings"].values() for e in encs)


def test_tensorrt_export_reproduces_the_converted_model(vit_trt, helpers):
    """The asymmetric Q was converted (ranges widened to symmetric ones covering them); the file
    reproduces that converted model exactly (top-1, float summation order aside)."""
    Qc, changes = convert_for_profile(vit_trt.Q, "tensorrt")
    kinds = {c.kind for c in changes}
    assert "activation" in kinds
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = Qc(x).numpy()
    got = helpers.ort_session(vit_trt.path).run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert {c.name for c in vit_trt.res.conversions} == {c.name for c in changes}


def test_conversion_rules():
    """Covering ranges: nothing representable is clipped; symmetric grids already fine stay
    untouched; b < 8 weight grids already satisfy [-127, 127] and keep their integers; 8-bit
    weights lose -128."""
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model
    from maskaq.quant import ActQuantizer, WeightQuantizer

    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=1,
                    num_heads=3, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    for bits, sym in (("4w4a", False), ("4w4a", True), ("8w8a", False)):
        Q = quantize_model(lm.model, QuantConfig.parse(bits, symmetric_activations=sym))
        with torch.no_grad():
            Q(x)
        Qc, changes = convert_for_profile(Q, "tensorrt")
        by = {c.name: c for c in changes}
        for name, q in Q.named_modules():
            qc = Qc.get_submodule(name) if name else None
            if isinstance(q, ActQuantizer):
                (s, z), (sc, zc) = q.effective(), qc.effective()
                qmin, qmax = q.grid()
                cmin, cmax = qc.grid()
                assert zc.item() == 0 and cmin >= -128 and cmax <= 127
                lo, hi = (qmin - z.item()) * s.item(), (qmax - z.item()) * s.item()
                tol = 1e-6 * max(abs(lo), abs(hi))  # float32 scales
                assert cmin * sc.item() <= lo + tol and cmax * sc.item() >= hi - tol  # covers
                if z.item() == 0 and qmax <= 127:
                    assert name not in by and torch.equal(sc, s)  # already fine: untouched
            elif isinstance(q, WeightQuantizer):
                assert qc.narrow == (q.bits == 8)
                assert (name in by) == (q.bits == 8)
        if sym and bits == "4w4a":
            assert not changes  # calibrated for TensorRT (a_bits < 8): exported as is
