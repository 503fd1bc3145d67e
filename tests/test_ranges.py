"""Issue 11: range search before training, the calibration guard, and the quantizer fidelity
fixes (LSQ gradient scale over the whole batch tensor, zero-point gradient through the clamp,
per-batch augmentation). Hand-made cases; each fails on the behaviour before the fix."""
from __future__ import annotations

import math

import pytest
import torch

from maskaq.calibration import CalibConfig, CalibError, _split_holdout, calibrate, simclr_augment
from maskaq.models import DataConfig
from maskaq.params import load_params, read_params
from maskaq.qmodel import QuantConfig, prepare_model, quantize_model, quantizers
from maskaq.quant import ActQuantizer, WeightQuantizer
from maskaq.ranges import init_ranges, quant_mse, search_range, search_weight_clip


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, bits: str = "4w4a"):
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                          depth=2, num_heads=3, num_classes=10)
    P = prepare_model(m.eval())
    with torch.no_grad():
        P.head.weight.mul_(3.0)
    return P, DataConfig.from_model(m), quantize_model(P, QuantConfig.parse(bits))


# --- quantizer fidelity ------------------------------------------------------------------------

def test_lsq_step_gradient_scaled_by_whole_batch_numel():
    """method.md §1: g = 1/sqrt(numel * qmax) with numel of the whole batch tensor (the old code
    divided numel by the batch size: a 16x larger step gradient at batch 16)."""
    q = ActQuantizer(4)
    x = torch.rand(16, 5, 7) + 0.1  # unsigned grid [0, 15]
    q.initialize(x)
    s0 = float(q.scale.detach())
    y = q(x)
    y.sum().backward()
    # the same forward without the scaling: d(sum y)/ds through the STE
    s = torch.tensor(s0, requires_grad=True)
    z = q.effective()[1]
    qq = torch.clamp(x / s + (torch.round(x / s) - x / s).detach() + z, 0, 15)
    ((qq - z) * s).sum().backward()
    expected = float(s.grad) / math.sqrt(x.numel() * 15)
    assert float(q.scale.grad) == pytest.approx(expected, rel=1e-5)


def test_zero_point_outside_grid_keeps_its_gradient():
    """A zero-point pushed outside the grid is clamped in forward; a plain clamp would cut its
    gradient for good (it could never come back), the straight-through clamp passes the
    gradient of the clamped value."""
    q = ActQuantizer(4)
    x = torch.randn(8, 10)
    q.initialize(x)  # signed grid [-8, 7]
    with torch.no_grad():
        q.zero_point.fill_(40.0)  # used as 7 in forward
    y = q(x)
    y.sum().backward()
    ref = ActQuantizer(4)
    ref.initialize(x)
    with torch.no_grad():
        ref.zero_point.fill_(7.0)  # inside the grid: the gradient the clamped value gets
    ref(x).sum().backward()
    assert float(ref.zero_point.grad.abs()) > 0
    assert q.zero_point.grad is not None and float(q.zero_point.grad) == pytest.approx(float(ref.zero_point.grad))


def test_per_batch_augmentation_draws_once_per_batch():
    x = torch.randn(1, 3, 16, 16).expand(6, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    y = simclr_augment(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), g, per_batch=True)
    assert torch.allclose(y, y[:1].expand_as(y), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    y2 = simclr_augment(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), g, per_batch=False)
    assert not torch.allclose(y2, y2[:1].expand_as(y2), atol=1e-3)


# --- the search ---------------------------------------------------------------------------------

def test_search_range_clips_rare_outliers_and_never_loses_to_minmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g)
    x[:5] = 60.0  # a few huge outliers
    lo, hi, mse = search_range(x, float(x.min()), float(x.max()), -8, 7)
    mse_mm = float(quant_mse(x, torch.tensor([float(x.min())]), torch.tensor([float(x.max())]), -8, 7)[0])
    assert hi < 30.0  # the outliers are clipped (MSE-optimal: ~23)
    assert mse < 0.7 * mse_mm  # = the brute-force 2-D optimum on this tensor
    # a uniform tensor: the observed range is (close to) optimal, and the search is never worse
    u = torch.rand(20_000, generator=g) * 2 - 1
    lo, hi, mse = search_range(u, -1.0, 1.0, -8, 7)
    mse_mm = float(quant_mse(u, torch.tensor([-1.0]), torch.tensor([1.0]), -8, 7)[0])
    assert mse <= mse_mm + 1e-12 and hi > 0.8


def test_quant_mse_matches_the_quantizer():
    """The search scores a range exactly as ActQuantizer rounds it."""
    x = torch.randn(1000)
    q = ActQuantizer(4)
    q.initialize(x)
    from maskaq.ranges import range_to_qparams

    s, z = range_to_qparams(torch.tensor([-1.3]), torch.tensor([2.1]), *q.grid())
    with torch.no_grad():
        q.scale.fill_(float(s)); q.zero_point.fill_(float(z))
    got = float((q(x) - x).pow(2).mean().detach())
    assert got == pytest.approx(float(quant_mse(x, torch.tensor([-1.3]), torch.tensor([2.1]), *q.grid())[0]), rel=1e-5)


def test_weight_clip_search_lowers_channel_error_and_exports_through_scale():
    g = torch.Generator().manual_seed(0)
    # heavy-tailed (Laplace) channels, as trained weights are: at 4 bit clipping pays (seeded inverse CDF)
    u = torch.rand(6, 256, generator=g) - 0.5
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    r = search_weight_clip(w, 4)
    assert r.shape == (6,) and bool(((r > 0) & (r <= 1)).all())
    assert float(r.max()) < 0.95
    wq = WeightQuantizer(4)
    err0 = float((wq(w) - w).pow(2).mean())
    wq.set_clip(r)
    assert float((wq(w) - w).pow(2).mean()) < err0
    s_clip = wq.scale_for(w)
    wq.set_clip(None)
    assert torch.allclose(s_clip, wq.scale_for(w) * r)


def test_init_ranges_beats_one_batch_lsq_and_round_trips_params():
    P, dcfg, Q = _tiny()
    data = torch.randn(64, *dcfg.input_size, generator=torch.Generator().manual_seed(1))

    def loop(m):
        with torch.no_grad():
            for i in range(0, 64, 16):
                m(data[i:i + 16])

    rep = init_ranges(Q, loop, method="mse", weight_clip="mse")
    assert len(rep["activations"]) == sum(isinstance(m, ActQuantizer) for _, m in quantizers(Q))
    assert all(a["mse"] <= a["mse_minmax"] * (1 + 1e-6) for a in rep["activations"].values())
    assert all(a["batches"] == 4 for a in rep["activations"].values())
    assert rep["weights"]  # 4-bit weights get clipping ratios
    with torch.no_grad():
        err_search = float((Q(data) - P(data)).pow(2).mean())
    Q2 = quantize_model(P, QuantConfig.parse("4w4a"))
    with torch.no_grad():
        Q2(data[:16])  # LSQ+ on one batch
        err_lsq = float((Q2(data) - P(data)).pow(2).mean())
    assert err_search < err_lsq
    # params.json records the clipping; loading it into a fresh Q reproduces Q exactly
    params = read_params(Q)
    Q3 = quantize_model(P, QuantConfig.parse("4w4a"))
    load_params(Q3, params)
    with torch.no_grad():
        assert torch.equal(Q3(data), Q(data))
    # a state dict saved with clipping loads strictly into a fresh Q (buffer shapes follow)
    Q4 = quantize_model(P, QuantConfig.parse("4w4a"))
    Q4.load_state_dict(Q.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(Q4(data), Q(data))


def test_init_ranges_rejects_non_finite_activations():
    P, dcfg, Q = _tiny()
    bad = torch.full((4, *dcfg.input_size), float("nan"))
    from maskaq.quant import QuantError

    with pytest.raises(QuantError, match="non-finite"):
        init_ranges(Q, lambda m: m(bad), method="mse")


# --- the guard ----------------------------------------------------------------------------------

def test_holdout_split_is_disjoint_and_reproducible():
    data = torch.arange(64, dtype=torch.float32).view(64, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    train, held, keep = _split_holdout(data, 0.125, seed=3)
    assert held.shape[0] == 8 and train.shape[0] == 56
    ids_t = set(train[:, 0, 0, 0].long().tolist())
    ids_h = set(held[:, 0, 0, 0].long().tolist())
    assert not ids_t & ids_h and len(ids_t | ids_h) == 64
    _, held2, _ = _split_holdout(data, 0.125, seed=3)
    assert torch.equal(held, held2)


def test_guard_keeps_the_initial_state_when_training_destroys_q():
    """A learning rate that wrecks Q: the guard measures the hold-out objective each epoch
    and ends with the best state, here the range initialisation itself (epoch -1)."""
    P, dcfg, Q = _tiny()
    data = torch.randn(40, *dcfg.input_size, generator=torch.Generator().manual_seed(2))
    cfg = CalibConfig(epochs=2, batch_size=8, lr=50.0, lr_min=1.0, warmup_gate_epochs=0, augment="none",
                      init="mse", weight_clip="mse", holdout=0.2, keep_best=True)
    res = calibrate(P, Q, data, cfg, seed=0, progress=False)
    g = res.guard
    assert g is not None and g["held_out"] == 8
    assert [h["epoch"] for h in g["history"]] == [-1, 0, 1]
    assert g["kept"] == "best" and g["kept_epoch"] == -1
    # Q is the range-initialised model: it scores exactly the epoch -1 value on the hold-out again
    from maskaq.calibration import _held_out_score

    _, held, _ = _split_holdout(data, 0.2, 0)
    again = _held_out_score(P, Q, held, cfg, torch.device("cpu"))
    assert again["score"] == pytest.approx(g["history"][0]["score"], rel=1e-6)
    assert math.isfinite(again["score"]) and not math.isfinite(g["history"][-1]["score"]) or \
        g["history"][-1]["score"] > again["score"]


def test_guard_warns_when_its_hold_out_is_too_small(caplog):
    """8 held-out samples (< GUARD_MIN_HELD): one warning that names the count and what to do; 16: none."""
    from maskaq.calibration import GUARD_MIN_HELD

    assert GUARD_MIN_HELD == 16
    P, dcfg, Q = _tiny()
    cfg = CalibConfig(epochs=1, batch_size=8, warmup_gate_epochs=0, augment="none", init="mse", holdout=0.2)
    for n, warned in ((40, True), (80, False)):
        caplog.clear()
        data = torch.randn(n, *dcfg.input_size, generator=torch.Generator().manual_seed(2))
        with caplog.at_level("WARNING", logger="maskaq.calibration"):
            calibrate(P, Q, data, cfg, seed=0, progress=False)
        msgs = [r.getMessage() for r in caplog.records if "held-out samples" in r.getMessage()]
        assert bool(msgs) is warned, msgs
        if warned:
            assert len(msgs) == 1 and "on 8 held-out samples" in msgs[0] and "num_images" in msgs[0]


def test_guard_without_keep_best_reports_but_keeps_final():
    P, dcfg, Q = _tiny()
    data = torch.randn(40, *dcfg.input_size, generator=torch.Generator().manual_seed(2))
    cfg = CalibConfig(epochs=1, batch_size=8, lr=50.0, lr_min=1.0, warmup_gate_epochs=0, augment="none",
                      init="mse", holdout=0.2, keep_best=False)
    res = calibrate(P, Q, data, cfg, seed=0, progress=False)
    assert res.guard["kept"] == "final" and res.guard["kept_epoch"] == 0


@pytest.mark.parametrize("key,value", [("init", "best"), ("weight_clip", "yes"), ("holdout", 1.0),
                                       ("holdout", -0.1), ("init_batches", 0), ("augment_per", "pixel"),
                                       ("train", "some"), ("epochs", 0), ("init_percentile", 20.0)])
def test_calib_config_rejects_bad_new_settings(key, value):
    with pytest.raises(CalibError, match=f"calib.{key}="):
        CalibConfig(**{key: value})


# --- log2 softmax quantizer (quant.softmax_quant=log2): range init in the same pass -------------

def test_log2_softmax_scale_set_by_range_init_and_minmax():
    from maskaq.calibration import TensorBatches, minmax_calibrate
    from maskaq.qmodel import record_attention
    from maskaq.quant import Log2Quantizer
    from maskaq.ranges import log2_mse

    P, _, _ = _tiny()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record_attention(P, what=("probs",)) as recs:
        P(x)
    pmax = [float(r.probs.max()) for r in recs]
    names = ["blocks.0.attn.softmax_quantizer", "blocks.1.attn.softmax_quantizer"]
    for method in ("minmax", "mse", "percentile"):
        Q = quantize_model(P, QuantConfig.parse("4w4a", softmax_quant="log2"))
        rep = init_ranges(Q, TensorBatches(x, 4), method=method)
        for name, hi in zip(names, pmax):
            m = Q.get_submodule(name)
            assert isinstance(m, Log2Quantizer) and bool(m.initialized)
            e = rep["activations"][name]
            assert e["encoding"] == "log2" and e["observed"][1] == pytest.approx(hi)
            s = float(m.scale)
            if method == "minmax":
                assert s == pytest.approx(hi)
            elif method == "mse":  # one octave below the max, never worse than s = max
                assert hi / 2 - 1e-7 <= s <= hi + 1e-7 and e["mse"] <= e["mse_minmax"]
            else:
                assert 0 < s <= hi + 1e-7
        # every linear activation quantizer got its range in the same pass
        assert all(bool(q.initialized) for _, q in quantizers(Q) if isinstance(q, ActQuantizer))
    Q = quantize_model(P, QuantConfig.parse("4w4a", softmax_quant="log2"))
    minmax_calibrate(Q, x)
    assert [float(Q.get_submodule(n).scale) for n in names] == pytest.approx(pmax)
    # lsq: the first batch initialises it (s = its max), like the linear quantizers' LSQ+ start
    Q = quantize_model(P, QuantConfig.parse("4w4a", softmax_quant="log2"))
    init_ranges(Q, TensorBatches(x, 4), method="lsq")
    assert not bool(Q.get_submodule(names[0]).initialized)
    with torch.no_grad():
        Q(x)
    assert bool(Q.get_submodule(names[0]).initialized)
    assert log2_mse(torch.tensor([0.0, 1.0, 0.5]), 1.0, 4) == 0.0


def test_log2_params_roundtrip():
    from maskaq.quant import QuantError

    P, _, _ = _tiny()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    Q = quantize_model(P, QuantConfig.parse("4w4a", softmax_quant="log2"))
    with torch.no_grad():
        ref = Q(x)
    params = read_params(Q)
    e = params.entries["blocks.0.attn.softmax_quantizer"]
    assert e["encoding"] == "log2" and e["bits"] == 4 and (e["qmin"], e["qmax"]) == (0, 15)
    assert "encoding" not in params.entries["blocks.0.attn.v_quantizer"]  # linear entries unchanged
    Q2 = quantize_model(P, QuantConfig.parse("4w4a", softmax_quant="log2"))
    load_params(Q2, params)
    with torch.no_grad():
        assert torch.equal(Q2(x), ref)
    with pytest.raises(QuantError, match="log2 quantizer in the file, linear in the model"):
        load_params(quantize_model(P, QuantConfig.parse("4w4a")), params)
