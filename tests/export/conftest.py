"""Fixtures for the exporter tests: tiny timm models (no downloads), calibrated on one batch, each
exported once per session (an export costs seconds; the suite shares them)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

_root = str(Path(__file__).resolve().parents[2])
if _root not in sys.path:
    sys.path.insert(0, _root)

from export import export_onnx  # noqa: E402
from maskaq.models import load_model, save_checkpoint  # noqa: E402
from maskaq.qmodel import QuantConfig, quantize_model  # noqa: E402

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
    "deit": ("deit_tiny_distilled_patch16_224",
             dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 6), window_size=7,
                  num_classes=10)),
}
LABELS = [f"class_{i}" for i in range(10)]


def build(kind: str, bits: str, seed: int = 0, batch: int = 8, **qkw):
    """(LoadedModel, Q calibrated on one seeded batch, that batch)."""
    arch, kw = TINY[kind]
    torch.manual_seed(seed)
    lm = load_model(arch, pretrained=False, **kw)
    Q = quantize_model(lm.model, QuantConfig.parse(bits, **qkw))
    x = torch.randn(batch, *lm.data_config.input_size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        Q(x)  # initialises every activation quantizer (LSQ+ first-batch init)
    return lm, Q, x


def do_export(tmp: Path, name: str, lm, Q, **kw) -> SimpleNamespace:
    res = export_onnx(Q, tmp / f"{name}.onnx", data_config=lm.data_config, labels=LABELS, source=lm.source,
                      metadata={"method": "test", "seed": 7, "config": {"test": name}}, **kw)
    with open(res.encodings_path) as f:
        enc = json.load(f)
    return SimpleNamespace(res=res, model=onnx.load(str(res.path)), enc=enc, path=res.path)


def ort_session(path, exact: bool = True, optimized_path: str | None = None, extra_outputs=None, **cfg):
    """ORT CPU session; ``exact``: Q/DQ evaluated as written (session.disable_quant_qdq=1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    for k, v in cfg.items():
        so.add_session_config_entry(k, v)
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    src = str(path)
    if extra_outputs:
        m = onnx.load(src)
        have = {o.name for o in m.graph.output}
        for n in extra_outputs:
            if n not in have:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
                have.add(n)
        src = m.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor, names=None) -> dict[str, np.ndarray]:
    names = names or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x.numpy()})))


@pytest.fixture(scope="session")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A self-describing checkpoint of a 1-block ViT on 32x32 (fast enough for the tiny preset), for
    the command-line tests."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, **args)
    p = d / "tiny.maskaq.pt"
    save_checkpoint(p, lm.model, "vit_tiny_patch16_224", args, lm.data_config, labels=[f"c{i}" for i in range(10)])
    return p


@pytest.fixture(scope="session")
def vit(outdir):
    """ViT 4w4a, profile ort (the main artifact of the suite)."""
    lm, Q, x = build("vit", "4w4a")
    e = do_export(outdir, "vit_4w4a_ort", lm, Q)
    return SimpleNamespace(lm=lm, Q=Q, x=x, **vars(e))


@pytest.fixture(scope="session")
def vit_trt(outdir, vit):
    """The same calibrated (asymmetric) Q exported to the tensorrt profile (converted)."""
    e = do_export(outdir, "vit_4w4a_trt", vit.lm, vit.Q, profile="tensorrt")
    return SimpleNamespace(lm=vit.lm, Q=vit.Q, x=vit.x, **vars(e))


@pytest.fixture(scope="session")
def helpers():
    return SimpleNamespace(build=build, do_export=do_export, ort_session=ort_session, run=run, LABELS=LABELS)
