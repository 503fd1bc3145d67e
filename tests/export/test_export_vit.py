"""The main artifact, a tiny ViT at 4w4a, profile ort: structure, contract, exactness, kernels."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from maskaq.qmodel import QuantLinear
from maskaq.quant import ActQuantizer, WeightQuantizer


def _graph(m: onnx.ModelProto):
    prod = {o: n for n in m.graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return prod, cons, inits


def test_contract_io_and_metadata(vit, helpers):
    m = vit.model
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain or "": o.version for o in m.opset_import}[""] == 20
    (inp,) = m.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    (out,) = m.graph.output
    assert out.name == "logits"
    od = out.type.tensor_type.shape.dim
    assert od[0].dim_param == "batch" and od[1].dim_value == 10
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["maskaq.schema"] == "1" and meta["maskaq.task"] == "classification"
    pre = json.loads(meta["maskaq.preprocessing"])
    dc = vit.lm.data_config
    assert pre == {"input_size": [3, 32, 32], "mean": list(dc.mean), "std": list(dc.std), "crop_pct": dc.crop_pct,
                   "crop_mode": "center", "interpolation": dc.interpolation, "channels": 3}
    assert json.loads(meta["maskaq.labels"]) == helpers.LABELS
    assert json.loads(meta["maskaq.source"]) == {"model": "vit_tiny_patch16_224", "checkpoint": None,
                                                 "weights": "random"}
    assert json.loads(meta["maskaq.quant"]) == {"w_bits": 4, "a_bits": 4, "profile": "ort", "method": "test"}
    assert json.loads(meta["maskaq.config"]) == {"test": "vit_4w4a_ort"}
    assert meta["maskaq.seed"] == "7"
    versions = json.loads(meta["maskaq.versions"])
    assert {"torch", "onnx", "onnxruntime", "onnxscript", "timm", "maskaq", "python"} <= set(versions)
    assert vit.res.size_bytes == vit.path.stat().st_size
    assert not list(vit.path.parent.glob(f".{vit.path.name}.*"))  # no temporary left by the atomic write


def test_encodings_structure(vit):
    """Weights: int8 initializers with the b-bit integers -> DequantizeLinear per output channel,
    no Q and no Clip; activations: float Clip (4-bit grid) -> Q -> DQ, uint8 zero-point
    ``z - qmin``; names follow the quantizers; LayerNorm, GELU, softmax, residual adds float."""
    m = vit.model
    prod, cons, inits = _graph(m)
    nodes = {n.name: n for n in m.graph.node}
    specs = {n: q for n, q in vit.Q.named_modules() if isinstance(q, (ActQuantizer, WeightQuantizer))}
    n_act = n_w = 0
    for name, q in specs.items():
        if isinstance(q, ActQuantizer):
            n_act += 1
            s, z = q.effective()
            qmin, qmax = q.grid()
            zp = inits[f"{name}.zero_point"]
            # 4-bit grid: uint8 storage q - qmin, zero-point z - qmin (export.activation_storage)
            assert zp.dtype == np.uint8 and int(zp) == int(z) - qmin
            assert inits[f"{name}.scale"] == np.float32(s.item())
            clip = nodes[f"{name}/Clip"]
            assert [inits[clip.input[1]], inits[clip.input[2]]] == [np.float32(qmin - int(z)) * np.float32(s.item()),
                                                                   np.float32(qmax - int(z)) * np.float32(s.item())]
            qn = nodes[f"{name}/QuantizeLinear"]
            assert qn.input == [f"{name}.clipped", f"{name}.scale", f"{name}.zero_point"]
            assert nodes[f"{name}/DequantizeLinear"].output == [f"{name}.dequantized"]
        else:
            n_w += 1
            owner = name.rsplit(".", 1)[0]
            dq = prod[f"{owner}.weight"]
            assert dq.op_type == "DequantizeLinear" and dq.name == f"{name}/DequantizeLinear"
            qw = inits[dq.input[0]]
            assert dq.input[0] == f"{name}.qweight" and qw.dtype == np.int8
            assert qw.min() >= -8 and qw.max() <= 7  # 4-bit integers stored in int8
            assert not np.any(inits[dq.input[2]])  # zero-points 0
            axis = {a.name: a.i for a in dq.attribute}["axis"]
            w = vit.Q.get_submodule(owner).weight
            if w.dim() == 2:  # Linear: stored [in, out], per output channel on axis 1
                assert qw.shape == (w.shape[1], w.shape[0]) and axis == 1
            else:  # patch-embedding conv: [out, in, kh, kw], axis 0
                assert qw.shape == tuple(w.shape) and axis == 0
            assert inits[dq.input[1]].shape == (w.shape[0],)
    assert n_act == 17 and n_w == 10
    # no QuantizeLinear on a constant, no Clip on weights, no float weights left
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "Clip"):
            assert n.input[0] not in inits
        if n.op_type in ("MatMul", "Gemm"):
            assert all(prod[i].op_type == "DequantizeLinear" for i in n.input[:2]), n.name  # Q/DQ on both inputs
        if n.op_type in ("LayerNormalization", "Gelu", "Softmax", "Add"):
            assert not any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input), n.name
    # 4 Linear + 2 attention matmuls per block, and the head (MatMul, not Gemm: it runs integer in ORT)
    assert sum(n.op_type == "MatMul" for n in m.graph.node) == 13
    owners = {n.rsplit(".", 1)[0] for n, q in specs.items() if isinstance(q, WeightQuantizer)}
    assert not owners & set(inits) and all(f"{o}.weight" not in inits for o in owners)  # no float weights left


def test_sidecar_lists_every_quantized_tensor(vit):
    enc, m = vit.enc, vit.model
    _, _, inits = _graph(m)
    tensors = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    act, par = enc["activation_encodings"], enc["param_encodings"]
    assert enc["version"] == "0.6.1" and len(act) == 17 and len(par) == 10
    for name, info in enc["maskaq"]["quantizers"].items():
        if info["kind"] == "activation":
            (e,) = act[info["onnx_input"]]
            assert info["onnx_input"] in tensors
            s, zp = inits[f"{name}.scale"], int(inits[f"{name}.zero_point"])
            # 4-bit grids are stored as uint8 q - qmin: stored zero-point z - qmin = AIMET's -offset
            assert info["storage"] == "uint8" and info["stored_zero_point"] == zp
            z = zp + info["grid"][0]
            assert e["scale"] == float(s) and e["offset"] == info["grid"][0] - z == -zp and e["bitwidth"] == 4
            assert e["min"] == float(np.float32(info["grid"][0] - z) * s) and e["dtype"] == "int"
            assert e["is_symmetric"] == ("True" if z == 0 and info["grid"][0] < 0 else "False")
            assert info["clip"] == [e["min"], e["max"]]
        else:
            encs = par[info["onnx_output"]]
            scales = inits[f"{name}.scale"]
            assert len(encs) == scales.size and [e["scale"] for e in encs] == [float(v) for v in scales]
            assert all(e["offset"] == -8 and e["is_symmetric"] == "True" for e in encs)


def test_ort_exact_mode_top1_and_dynamic_batch(vit, helpers):
    """End to end in ORT's exact mode: same top-1 as PyTorch fake-quant; logits equal up to float
    summation order (MLAS and torch add the MatMul products in different orders, ~1e-7 relative)."""
    sess = helpers.ort_session(vit.path)
    for b in (1, 5, 16):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = vit.Q(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == (b, 10)
        assert (got.argmax(1) == ref.argmax(1)).all()
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_every_quantizer_exact_on_real_activations(vit, helpers):
    """Per quantizer, on the activations the model really produces: ORT's Q/DQ output equals the
    PyTorch quantizer applied to ORT's own input tensor, bit for bit. Weights: ORT's dequantized
    weight equals the PyTorch weight quantizer's output, bit for bit."""
    info = vit.enc["maskaq"]["quantizers"]
    names = sorted({v["onnx_input"] for v in info.values() if v["kind"] == "activation"}
                   | {v["onnx_output"] for v in info.values()})
    sess = helpers.ort_session(vit.path, extra_outputs=names)
    got = helpers.run(sess, vit.x, names)
    for qname, v in info.items():
        mod = vit.Q.get_submodule(qname)
        with torch.no_grad():
            if v["kind"] == "activation":
                ref = mod(torch.from_numpy(got[v["onnx_input"]])).numpy()
            else:
                ref = mod(vit.Q.get_submodule(qname.rsplit(".", 1)[0]).weight).numpy()
                if v["transposed"]:
                    ref = ref.T
        assert np.array_equal(got[v["onnx_output"]], ref), qname


def test_every_quantized_linear_within_float_error(vit, helpers):
    """Per quantized Linear: ORT's output from its quantized input equals PyTorch's F.linear on the
    same (bit-identical) operands up to float summation order, far below one step of the next
    quantizer."""
    m = vit.model
    prod, cons, _ = _graph(m)
    layers = {n: mod for n, mod in vit.Q.named_modules() if isinstance(mod, QuantLinear)}
    outs, pairs = [], {}
    for name in layers:
        (mm,) = [n for n in cons[f"{name}.weight"]]
        a_in = mm.input[0]
        y = mm.output[0]
        nxt = cons.get(y, [])
        if mm.op_type == "MatMul" and len(nxt) == 1 and nxt[0].op_type == "Add":
            y = nxt[0].output[0]
        pairs[name] = (a_in, y)
        outs += [a_in, y]
    sess = helpers.ort_session(vit.path, extra_outputs=outs)
    got = helpers.run(sess, vit.x, outs)
    for name, mod in layers.items():
        a_in, y = pairs[name]
        with torch.no_grad():
            ref = F.linear(torch.from_numpy(got[a_in]), mod.weight_quantizer(mod.weight), mod.bias).numpy()
        err = np.abs(got[y] - ref).max()
        assert err <= 2e-6 * max(1.0, np.abs(ref).max()), (name, err)


def test_ort_default_mode_runs_integer_kernels(vit, helpers, tmp_path):
    """ORT's default (optimised) mode fuses every quantized MatMul of the CQDQ graph into an
    integer kernel (4-bit here; 3/5/8 bit in test_export_models.py) and keeps top-1."""
    opt = tmp_path / "opt.onnx"
    sess = helpers.ort_session(vit.path, exact=False, optimized_path=opt)
    census = {}
    for n in onnx.load(str(opt)).graph.node:
        census[n.op_type] = census.get(n.op_type, 0) + 1
    integer = sum(census.get(k, 0) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul",
                                             "MatMulInteger"))
    # 12 + the classifier head (MatMul -> Sub(-bias) in the file: it runs integer whatever the
    # signedness of its input; a Gemm fused into QGemm only with a uint8 input, else stayed float)
    assert integer == 13 and census.get("MatMul", 0) == 0, census
    assert census.get("Gemm", 0) == 0 and census.get("QGemm", 0) == 0, census
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vit.Q(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_export_is_deterministic(vit, helpers, tmp_path):
    e2 = helpers.do_export(tmp_path, "vit_4w4a_ort", vit.lm, vit.Q)
    assert e2.path.read_bytes() == vit.path.read_bytes()
