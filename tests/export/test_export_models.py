"""Every supported architecture exports (distilled DeiT, Swin), and 3/5/8-bit CQDQ graphs still get
ORT's integer MatMul kernels."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from maskaq.quant import ActQuantizer, WeightQuantizer

INTEGER_MATMULS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger")


def _census(path) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _agree(sess, Q, shape, seed=11, n=16):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = Q(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    return got, ref


def test_distilled_deit_exports_mean_of_heads(outdir, helpers):
    lm, Q, x = helpers.build("deit", "4w8a")
    e = helpers.do_export(outdir, "deit_4w8a", lm, Q)
    assert [o.name for o in e.model.graph.output] == ["logits"]
    q = e.enc["maskaq"]["quantizers"]
    assert {"head.weight_quantizer", "head_dist.weight_quantizer", "head.input_quantizer",
            "head_dist.input_quantizer"} <= set(q)
    assert json.loads({p.key: p.value for p in e.model.metadata_props}["maskaq.quant"])["a_bits"] == 8
    xx = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    got = helpers.ort_session(e.path).run(None, {"input": xx.numpy()})[0]
    with torch.no_grad():  # timm's eval output of a distilled model: the mean of the two heads
        f = Q.forward_features(xx)
        ref = ((Q.head(f[:, 0]) + Q.head_dist(f[:, 1])) / 2).numpy()
        assert np.array_equal(ref, Q(xx).numpy())
    assert got.shape == (16, 10) and (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # both heads: MatMul -> Sub(-bias) (a Gemm would stay float in ORT's deploy mode)
    assert sum(n.op_type == "Gemm" for n in e.model.graph.node) == 0
    mm_weights = {n.input[1] for n in e.model.graph.node if n.op_type == "MatMul"}
    assert {"head.weight", "head_dist.weight"} <= mm_weights



def test_swin_exports_exactly(outdir, helpers):
    lm, Q, x = helpers.build("swin", "4w4a", batch=4)
    e = helpers.do_export(outdir, "swin_4w4a", lm, Q)
    specs = [n for n, m in Q.named_modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
    assert set(e.enc["maskaq"]["quantizers"]) == set(specs)  # every quantizer, incl. patch merging
    assert any("downsample.reduction" in n for n in specs)
    sess = helpers.ort_session(e.path)
    for b in (1, 3):  # dynamic batch through window partition / reverse
        got, ref = _agree(sess, Q, lm.data_config.input_size, n=b)
        assert got.shape == (b, 10) and (got.argmax(1) == ref.argmax(1)).all()
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_mixed_3_5_8_bit_cqdq_gets_integer_kernels(outdir, helpers, tmp_path):
    """Block 0 at 3-bit activations, block 1 at 5-bit (8-bit attention operands), 8-bit head:
    every MatMul still becomes an integer kernel in ORT's default mode."""
    from maskaq.models import load_model
    from maskaq.qmodel import QuantConfig, quantize_model

    arch, kw = "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                            num_classes=10)
    torch.manual_seed(0)
    lm = load_model(arch, pretrained=False, **kw)
    Q = quantize_model(lm.model, QuantConfig.parse("4w4a", keep_first_last_8bit=True))
    for name, m in Q.named_modules():  # set widths before the first batch initialises the grids
        if isinstance(m, ActQuantizer) and name.startswith("blocks.0."):
            m.bits = 3
        elif isinstance(m, ActQuantizer) and name.startswith("blocks.1."):
            m.bits = 8 if name.split(".")[-1] in ("q_quantizer", "k_quantizer", "softmax_quantizer",
                                                  "v_quantizer") else 5
        elif isinstance(m, WeightQuantizer) and name.startswith("blocks.1."):
            m.bits = 5
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        Q(x)
    e = helpers.do_export(outdir, "vit_mixed", lm, Q)
    bits = {v["bits"] for v in e.enc["maskaq"]["quantizers"].values() if v["kind"] == "activation"}
    assert bits == {3, 5, 8}
    n_clip = sum(n.op_type == "Clip" for n in e.model.graph.node)
    assert n_clip == sum(1 for v in e.enc["maskaq"]["quantizers"].values()
                         if v["kind"] == "activation" and v["bits"] < 8)
    opt = tmp_path / "mixed.opt.onnx"
    sess = helpers.ort_session(e.path, exact=False, optimized_path=opt)
    c = _census(opt)
    # 12 Linear/attention matmuls + the head: every one integer, no float Gemm
    assert sum(c.get(k, 0) for k in INTEGER_MATMULS) == 13 and c.get("MatMul", 0) == 0, c
    assert c.get("Gemm", 0) == 0 and c.get("QGemm", 0) == 0, c
    got, ref = _agree(helpers.ort_session(e.path), Q, (3, 32, 32))
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert sess.run(None, {"input": x.numpy()})[0].shape == (8, 10)
