"""Issue 11: GPTQ rounding of the latent weights (``calib.weight_init=gptq``) and the scale-free
optimiser options (``calib.optimizer``, ``calib.weight_lr``). Hand-made cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maskaq.calibration import CalibConfig, CalibError, _initial_ranges, _optimizer, calibrate
from maskaq.gptq import gptq_layer, gptq_round
from maskaq.qmodel import QuantConfig, QuantConv2d, QuantLinear, prepare_model, quantize_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _grid(W: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, int, int]:
    s = 2 * W.abs().amax(1) / (2**bits - 1)
    return s, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def test_gptq_on_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal H (independent input features) there is nothing to compensate: GPTQ's
    result is exactly round-to-nearest on the same grid."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    H = torch.diag(torch.rand(16, generator=g) + 0.5)
    s, lo, hi = _grid(W)
    Wq, err = gptq_layer(W, H, s, lo, hi, damp=0.0)
    Wd, sd = W.double(), s.double()[:, None]  # GPTQ works in float64 (a row's max sits on a tie)
    rtn = (torch.clamp(torch.round(Wd / sd), lo, hi) * sd).float()
    assert torch.allclose(Wq, rtn, atol=1e-6)
    assert err["gptq"] == pytest.approx(err["rtn"], rel=1e-6)


def test_gptq_lowers_the_output_error_on_correlated_inputs_and_stays_on_the_grid():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 32, generator=g)
    base = torch.randn(256, 4, generator=g)
    X = base @ torch.randn(4, 32, generator=g) + 0.1 * torch.randn(256, 32, generator=g)  # low-rank + noise
    H = X.T @ X / X.shape[0]
    s, lo, hi = _grid(W, 3)
    Wq, err = gptq_layer(W, H, s, lo, hi, block=8)
    q = Wq / s[:, None]
    assert torch.allclose(q, q.round(), atol=1e-5)  # every weight on its row's grid
    assert float(q.min()) >= lo and float(q.max()) <= hi
    assert err["gptq"] < 0.7 * err["rtn"]
    # the reported error is the real one: ||(W - Wq) X||^2 / ||W X||^2
    real = float(((W - Wq) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())
    assert err["gptq"] == pytest.approx(real, rel=1e-4)


def _tiny(bits: str = "3w8a", seed: int = 0):
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                          depth=2, num_heads=3, num_classes=10, in_chans=3)
    P = prepare_model(m.eval())
    return P, quantize_model(P, QuantConfig.parse(bits))


def test_gptq_round_keeps_each_grid_and_brings_q_closer_to_p():
    P, Q = _tiny()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, 32, 32, generator=g)
    x = x + 2.0 * x.mean(1, keepdim=True)  # correlated channels
    Q2 = quantize_model(P, QuantConfig.parse("3w8a"))
    layers = {n: m for n, m in Q.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    scales = {n: m.weight_quantizer.scale_for(m.weight).clone() for n, m in layers.items()}
    Q(x), Q2(x)  # initialise the activation ranges the same way in both
    Q2.load_state_dict(Q.state_dict())
    Q3 = quantize_model(P, QuantConfig.parse("3w8a"))
    Q3.load_state_dict(Q.state_dict())
    with torch.no_grad():
        rep = gptq_round(Q, lambda model: model(x))
        gptq_round(Q3, lambda model: model(x), latent="grid")
    assert set(rep["layers"]) == set(layers)  # the patch conv (stride = kernel) is included
    l3 = {n: m for n, m in Q3.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    for n, m in layers.items():
        wq = m.weight_quantizer
        # the grid is the one the weights were rounded to
        assert torch.allclose(wq.scale_for(m.weight), scales[n], rtol=1e-5)
        assert torch.allclose(l3[n].weight_quantizer.scale_for(l3[n].weight), scales[n], rtol=1e-5)
        # latent="grid": the latent weights sit on it; the default (compensated latent weights)
        # quantizes to the very same values, but keeps the weights off the grid points
        assert torch.allclose(l3[n].weight_quantizer(l3[n].weight), l3[n].weight, atol=1e-6)
        assert torch.allclose(wq(m.weight), l3[n].weight, atol=1e-5)
        assert not torch.allclose(m.weight, l3[n].weight, atol=1e-6)
        assert rep["layers"][n]["gptq_err"] <= rep["layers"][n]["rtn_err"] * (1 + 1e-6)
    with torch.no_grad():
        zp = P(x)
        e_gptq = float((Q(x) - zp).pow(2).mean())
        e_rtn = float((Q2(x) - zp).pow(2).mean())
    assert e_gptq < e_rtn


def test_weight_init_gptq_runs_in_the_range_initialisation_and_is_reported():
    P, Q = _tiny()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg = CalibConfig(init="mse", weight_clip="mse", weight_init="gptq", batch_size=4, init_batches=2)
    rep = _initial_ranges(Q, x, cfg, 0, torch.device("cpu"))
    assert rep["gptq"]["layers"] and rep["gptq"]["mean_err_ratio"] <= 1.0
    with pytest.raises(CalibError, match="weight_init"):
        CalibConfig(weight_init="adaround")


def test_adam_step_does_not_depend_on_the_gradient_scale():
    """The reason for ``calib.optimizer=adam``: SGD's step grows with the gradient (a pretrained
    ViT's KD gradients were 10-300x the from-scratch model's), Adam's first step is ~lr either way."""
    steps = {}
    for opt_name in ("sgd", "adam"):
        for k in (1.0, 1000.0):
            p = nn.Parameter(torch.ones(4))
            cfg = CalibConfig(epochs=1, lr=1e-3, lr_min=1e-5, optimizer=opt_name,
                              momentum=0.0, nesterov=False)
            opt = _optimizer(cfg, [p], [p], 0)
            (k * p.sum()).backward()
            opt.step()
            steps[(opt_name, k)] = float((1 - p.detach()).abs().max())
    assert steps[("sgd", 1000.0)] == pytest.approx(1000 * steps[("sgd", 1.0)], rel=1e-4)
    assert steps[("adam", 1000.0)] == pytest.approx(steps[("adam", 1.0)], rel=1e-4)
    assert steps[("adam", 1.0)] == pytest.approx(1e-3, rel=1e-3)


def test_weight_lr_sets_the_model_parameters_group_and_follows_the_cosine():
    P, Q = _tiny("4w4a")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cfg = CalibConfig(epochs=2, batch_size=4, lr=1e-3, lr_min=1e-5, weight_lr=1e-5, warmup_gate_epochs=0,
                      refresh_every=0, augment="none", init="mse", weight_clip="none")
    w0 = {n: p.detach().clone() for n, p in Q.named_parameters()}
    calibrate(P, Q, x, cfg, seed=0, progress=False)
    moved_w = max(float((p.detach() - w0[n]).abs().max()) for n, p in Q.named_parameters()
                  if "quantizer" not in n)
    moved_q = max(float((p.detach() - w0[n]).abs().max()) for n, p in Q.named_parameters()
                  if "quantizer" in n and p.requires_grad)
    assert moved_w > 0 and moved_q > 0
    with pytest.raises(CalibError, match="optimizer"):
        CalibConfig(optimizer="lion")
    with pytest.raises(CalibError, match="weight_lr"):
        CalibConfig(weight_lr=-1.0)
    g = _optimizer(cfg, list(Q.parameters()), [p for n, p in Q.named_parameters() if "quantizer" not in n], 1)
    assert sorted(round(pg["lr_ratio"], 6) for pg in g.param_groups) == [0.01, 1.0]


# --- block-wise reconstruction (calib.stage=blockwise) -------------------------------------------

def test_transformer_blocks_in_forward_order_for_vit_and_swin():
    from maskaq.reconstruct import transformer_blocks
    from tests.tiny_models import tiny_model

    vit = prepare_model(tiny_model("vit").model.eval())
    assert transformer_blocks(vit) == ["blocks.0", "blocks.1"]
    swin = prepare_model(tiny_model("swin").model.eval())
    assert transformer_blocks(swin) == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                        "layers.1.blocks.1"]


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_reconstruction_lowers_every_block_output_error_and_leaves_p_alone(kind):
    from maskaq.ranges import init_ranges
    from maskaq.reconstruct import reconstruct_blocks
    from tests.tiny_models import tiny_input, tiny_model

    lm = tiny_model(kind)
    P = prepare_model(lm.model.eval())
    Q = quantize_model(P, QuantConfig.parse("3w4a"))
    x = tiny_input(lm, batch=8, seed=5)
    init_ranges(Q, lambda m: m(x))
    p0 = {k: v.clone() for k, v in P.state_dict().items()}
    recs = reconstruct_blocks(P, Q, x, iters=30, lr=1e-3, batch_size=4, seed=0)
    assert len(recs) == (2 if kind == "vit" else 4)
    for r in recs:
        assert r["mse_after"] < r["mse_before"], r
    assert all(torch.equal(p0[k], v) for k, v in P.state_dict().items())


def test_blockwise_stage_resumes_at_the_next_block_to_the_same_state(tmp_path, monkeypatch):
    import maskaq.reconstruct as rc

    P, Q = _tiny("4w4a")
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    cfg = CalibConfig(epochs=3, batch_size=4, stage="blockwise", recon_iters=5, recon_lr=1e-3, init="mse",
                      weight_clip="mse", holdout=0.25, keep_best=True, augment="none")
    ref = quantize_model(P, QuantConfig.parse("4w4a"))
    ref.load_state_dict(Q.state_dict())
    res = calibrate(P, ref, x, cfg, seed=0, progress=False, checkpoint_path=tmp_path / "a.pt")
    assert [b["block"] for b in res.blocks] == ["blocks.0", "blocks.1"]
    assert res.guard["history"][0]["epoch"] == -1 and res.guard["history"][-1]["epoch"] == 0

    real = rc.reconstruct_blocks

    def interrupted(*a, **k):
        user_end = k["on_block_end"]

        def end(i, rec):
            user_end(i, rec)
            raise KeyboardInterrupt

        return real(*a, **{**k, "on_block_end": end})

    monkeypatch.setattr(rc, "reconstruct_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(P, Q, x, cfg, seed=0, progress=False, checkpoint_path=tmp_path / "b.pt")
    monkeypatch.setattr(rc, "reconstruct_blocks", real)
    Q2 = quantize_model(P, QuantConfig.parse("4w4a"))
    res2 = calibrate(P, Q2, x, cfg, seed=0, progress=False, checkpoint_path=tmp_path / "b.pt")
    assert res2.resumed_from == 0 and [b["block"] for b in res2.blocks] == ["blocks.0", "blocks.1"]
    sa, sb = ref.state_dict(), Q2.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(CalibError, match="stage"):
        CalibConfig(stage="layerwise")


def test_blockwise_then_distill_scores_each_phase_and_keeps_the_best():
    P, Q = _tiny("4w4a")
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    cfg = CalibConfig(epochs=2, batch_size=4, stage="blockwise+distill", recon_iters=5, recon_lr=1e-3, init="mse",
                      weight_clip="mse", holdout=0.25, keep_best=True, augment="none", warmup_gate_epochs=0,
                      refresh_every=0)
    res = calibrate(P, Q, x, cfg, seed=0, progress=False)
    assert [h["phase"] for h in res.guard["history"]] == ["init", "blockwise", "distill", "distill"]
    assert len(res.blocks) == 2 and len(res.epochs) == 2
    best = min(res.guard["history"], key=lambda h: h["score"])
    assert (res.guard["kept_epoch"], res.guard["kept_phase"]) == (best["epoch"], best["phase"])


def test_patience_stops_a_diverging_run_and_keeps_the_start():
    P, Q = _tiny("4w4a")
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    cfg = CalibConfig(epochs=6, batch_size=4, lr=5.0, lr_min=1.0, init="mse", weight_clip="mse", holdout=0.25,
                      keep_best=True, patience=2, augment="none", warmup_gate_epochs=0, refresh_every=0,
                      momentum=0.0, nesterov=False)
    res = calibrate(P, Q, x, cfg, seed=0, progress=False)
    assert res.stopped_early == 2 and len(res.epochs) == 2
    assert res.guard["kept_phase"] == "init"
    with pytest.raises(CalibError, match="patience"):
        CalibConfig(patience=-1)


def test_gptq_on_blocked_weights_keeps_every_block_grid():
    """The weight-only flow's blocked quantizers (one scale per 8 inputs here) round by GPTQ too."""
    from maskaq.quant import WeightQuantizer, expand_blocks

    P, Q = _tiny("3w8a")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    lin = Q.blocks[0].mlp.fc1
    lin.weight_quantizer = WeightQuantizer(3, block=8)
    s0 = lin.weight_quantizer.scale_for(lin.weight).clone()
    Q(x)
    with torch.no_grad():
        rep = gptq_round(Q, lambda model: model(x))
    wq = lin.weight_quantizer
    assert torch.allclose(wq.scale_for(lin.weight), s0, rtol=1e-5)
    q = wq(lin.weight) / expand_blocks(s0, 8, lin.weight.shape[1])
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert rep["layers"]["blocks.0.mlp.fc1"]["gptq_err"] < rep["layers"]["blocks.0.mlp.fc1"]["rtn_err"]


def test_gptq_on_a_weight_only_model_reads_float_inputs():
    """Weight-only models (float activations) have no input quantizers: GPTQ reads the float input."""
    P, _ = _tiny()
    Q = quantize_model(P, QuantConfig(w_bits=4, a_bits=16, weight_block=16))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        rep = gptq_round(Q, lambda model: model(x))
    assert "blocks.0.attn.qkv" in rep["layers"] and rep["mean_err_ratio"] < 1.0
