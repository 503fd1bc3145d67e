"""ONNX reading (contract metadata, QDQ census, sub-8-bit detection) and ORT sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import rteval_helpers as H
from onnx import TensorProto, helper, numpy_helper

from runtime_eval import EvalError
from runtime_eval.model import load_model_info, region_of
from runtime_eval.session import (
    cpu_vnni,
    create_session,
    normalise_provider,
    resolve_providers,
)


def test_model_info_reads_the_contract(tmp_path):
    p = H.grey_classifier(tmp_path / "m.onnx", labels=[str(i) for i in range(10)])
    info, _ = load_model_info(p)
    assert info.input_name == "input" and info.input_shape == ["batch", 1, 28, 28]
    assert info.output_names == ["logits"] and info.num_classes == 10
    assert info.preprocessing["input_size"] == [1, 28, 28]
    assert info.labels == [str(i) for i in range(10)]
    assert info.source["model"] == "tiny_test.tag"
    assert info.report()["tag"] == "tiny_test.tag"
    assert info.opset == H.OPSET and len(info.sha256) == 64
    assert not info.is_quantized and info.sub8bit_reasons == []


def test_qdq_census_by_dtype_and_region(tmp_path):
    info, _ = load_model_info(H.grey_classifier(tmp_path / "q.onnx", qdq=True))
    c = info.census
    assert c["total"] == 3 and c["QuantizeLinear"] == 1 and c["DequantizeLinear"] == 2
    assert c["by_dtype"] == {
        "uint8": {"QuantizeLinear": 1, "DequantizeLinear": 1},
        "int8": {"DequantizeLinear": 1},
    }
    assert c["by_region"] == {
        "head.input_quantizer": {"QuantizeLinear": 1, "DequantizeLinear": 1},
        "head.weight_quantizer": {"DequantizeLinear": 1},
    }
    assert info.sub8bit_reasons == []  # full 8-bit, no narrowing Clip


def test_region_names():
    assert region_of("/blocks.3/attn/qkv/QuantizeLinear") == "blocks.3"
    assert region_of("blocks.11.mlp.fc1.input_quantizer") == "blocks.11"
    assert region_of("layers.1.blocks.0.attn") == "layers.1"
    assert region_of("patch_embed.proj.weight_quantizer") == "patch_embed.proj"
    assert region_of("head.weight") == "head"
    assert region_of("QuantizeLinear_12") == "(unnamed)"


def _int4_model(path: Path) -> Path:
    """Opset-21 graph with INT4 weights (DQ only) and UINT4 activations (Q/DQ), not run."""
    inits = [
        helper.make_tensor("w", TensorProto.INT4, [4, 2], [1, -2, 3, -4, 5, -6, 7, -8]),
        numpy_helper.from_array(np.array(0.1, np.float32), "ws"),
        helper.make_tensor("wz", TensorProto.INT4, [], [0]),
        numpy_helper.from_array(np.array(0.02, np.float32), "as"),
        helper.make_tensor("az", TensorProto.UINT4, [], [8]),
    ]
    nodes = [
        helper.make_node(
            "QuantizeLinear", ["input", "as", "az"], ["xq"], name="blocks.0.fc.input_quantizer.q"
        ),
        helper.make_node(
            "DequantizeLinear", ["xq", "as", "az"], ["xd"], name="blocks.0.fc.input_quantizer.dq"
        ),
        helper.make_node(
            "DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="blocks.1.fc.weight_quantizer"
        ),
        helper.make_node("MatMul", ["xd", "wd"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "int4",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


def test_census_int4_and_sub8bit(tmp_path):
    info, _ = load_model_info(_int4_model(tmp_path / "i4.onnx"))
    assert info.census["by_dtype"] == {
        "int4": {"DequantizeLinear": 1},
        "uint4": {"QuantizeLinear": 1, "DequantizeLinear": 1},
    }
    assert info.census["by_region"] == {
        "blocks.0": {"QuantizeLinear": 1, "DequantizeLinear": 1},
        "blocks.1": {"DequantizeLinear": 1},
    }
    assert any("int4" in r for r in info.sub8bit_reasons)


def test_sub8bit_from_narrow_clip_and_metadata(tmp_path):
    narrow = H.grey_classifier(tmp_path / "c.onnx", qdq=True, narrow_clip_bits=4)
    info, _ = load_model_info(narrow)
    assert any("CQDQ" in r for r in info.sub8bit_reasons)
    full = H.grey_classifier(tmp_path / "f.onnx", qdq=True, narrow_clip_bits=8)  # clip = full range
    assert load_model_info(full)[0].sub8bit_reasons == []
    meta = H.grey_classifier(
        tmp_path / "m.onnx",
        qdq=True,
        quant={"w_bits": 4, "a_bits": 8, "profile": "ort", "method": "x"},
    )
    assert load_model_info(meta)[0].sub8bit_reasons == ["maskaq.quant w_bits=4"]


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"this is not a protobuf \xff\xfe\x00garbage" * 10, "ONNX"),
        (None, "not found"),
    ],
)
def test_unreadable_models(tmp_path, content, needle):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(EvalError, match=needle):
        load_model_info(p)


def test_reference_mode_is_exact_fake_quant_and_deploy_fuses(tmp_path):
    p = H.grey_classifier(tmp_path / "q.onnx", qdq=True)
    ref = create_session(
        p, providers=["cpu"], mode="reference", optimized_model_path=tmp_path / "ref.onnx"
    )
    dep = create_session(
        p, providers=["cpu"], mode="deploy", optimized_model_path=tmp_path / "dep.onnx"
    )
    assert ref.config_entries == {"session.disable_quant_qdq": "1"} and dep.config_entries == {}
    assert ref.providers_used == ["CPUExecutionProvider"]
    ops_ref = {n.op_type for n in onnx.load(str(tmp_path / "ref.onnx")).graph.node}
    ops_dep = {n.op_type for n in onnx.load(str(tmp_path / "dep.onnx")).graph.node}
    assert "QuantizeLinear" in ops_ref and "DequantizeLinear" in ops_ref
    assert ops_dep & {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"}, ops_dep

    # reference output = numpy fake-quant maths (round half to even, as ORT)
    model = onnx.load(str(p))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32)
    pooled = x.mean(axis=(2, 3))
    s, zp = float(init["act_scale"]), int(init["act_zp"])
    q = np.clip(np.rint(pooled / s) + zp, 0, 255)
    a = ((q - zp) * s).astype(np.float32)
    w = init["head.weight_q"].astype(np.float32) * init["head.weight_scale"]
    expected = a @ w + (-init["head.neg_bias"])
    got = ref.session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    got_dep = dep.session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got_dep, expected, atol=0.05)  # fused kernels: close, not bitwise


def test_providers():
    assert normalise_provider("cuda") == "CUDAExecutionProvider"
    assert normalise_provider("CPU") == "CPUExecutionProvider"
    assert resolve_providers(["cpu"]) == (["CPUExecutionProvider"], True)
    provs, explicit = resolve_providers(None)
    assert not explicit and provs[-1] == "CPUExecutionProvider"
    with pytest.raises(EvalError, match="not available"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_silent_fallback_is_an_error(tmp_path, monkeypatch):
    """ORT falls back to CPU when CUDA cannot start: an explicit request must fail."""
    p = H.grey_classifier(tmp_path / "m.onnx")

    class FakeSession:
        def __init__(self, *a, **k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr("runtime_eval.session._preload_cuda_libraries", lambda: None)
    with pytest.raises(EvalError, match="fell back to CPUExecutionProvider"):
        create_session(p, providers=["cuda"])


def test_bad_mode_and_level(tmp_path):
    p = H.grey_classifier(tmp_path / "m.onnx")
    with pytest.raises(EvalError, match="reference, deploy"):
        create_session(p, providers=["cpu"], mode="fast")
    with pytest.raises(EvalError, match="disable, basic, extended, all"):
        create_session(p, providers=["cpu"], graph_opt="max")


def test_invalid_graph_is_eval_error(tmp_path):
    # parses as ONNX but ORT rejects it (unknown op)
    g = helper.make_graph(
        [helper.make_node("NoSuchOp", ["input"], ["logits"])],
        "bad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(EvalError, match="ONNX Runtime cannot load"):
        create_session(tmp_path / "bad.onnx", providers=["cpu"])


def test_vnni_detection(monkeypatch, tmp_path):
    import builtins
    import platform

    real_open = builtins.open
    fake = tmp_path / "cpuinfo"

    def fake_open(path, *a, **k):
        return real_open(fake if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(builtins, "open", fake_open)
    fake.write_text("processor : 0\nflags\t\t: fpu sse avx2 fma\n")
    assert cpu_vnni() is False
    fake.write_text("processor : 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_vnni() is True
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert cpu_vnni() is None
