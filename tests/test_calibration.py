"""Calibration: the losses on hand-made cases, the augmentation, the training loop (improves
agreement, trains every parameter group, warm-up gate, exact resume, DDP = single process),
and PSAQ's min/max PTQ."""
from __future__ import annotations

import math

import pytest
import torch

from maskaq.calibration import (
    CalibConfig,
    CalibError,
    TensorBatches,
    calibrate,
    cls_attention_weights,
    cosine_lr,
    head_distill_loss,
    head_token_weights,
    kd_loss,
    minmax_calibrate,
    simclr_augment,
    weighted_ssim_cs,
)
from maskaq.models import DataConfig
from maskaq.qmodel import QuantConfig, prepare_model, quantize_model, quantizers, quantizers_disabled
from maskaq.quant import ActQuantizer

C2 = 0.03**2


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_vit(seed: int = 0):
    """A tiny timm ViT built directly (``load_model`` would pay for ``timm.list_models``)."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                          depth=2, num_heads=3, num_classes=10)
    return prepare_model(m.eval()), DataConfig.from_model(m)


def _setup(bits: str = "4w4a", n: int = 32, head_scale: float = 3.0, **qkw):
    """Tiny ViT P (head scaled so that logits are not all ~0), Q, and N(0,1) samples."""
    P, dcfg = _tiny_vit()
    with torch.no_grad():
        P.head.weight.mul_(head_scale)
    Q = quantize_model(P, QuantConfig.parse(bits, **qkw))
    data = torch.randn(n, *dcfg.input_size, generator=torch.Generator().manual_seed(0))
    return dcfg, P, Q, data


# --- losses ---------------------------------------------------------------------------------

def test_kd_loss_hand_cases():
    z = torch.tensor([[1.0, 0.0]])
    zero = torch.zeros(1, 2)
    e = math.e
    p = [e / (e + 1), 1 / (e + 1)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)  # KL(softmax([1,0]) || [.5,.5])
    assert kd_loss(zero, z, temperature=1.0).item() == pytest.approx(kl, rel=1e-6)
    # T scales logits by 1/T and the loss by T^2
    p2 = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kl2 = sum(pi * math.log(pi / 0.5) for pi in p2)
    assert kd_loss(zero, z, temperature=2.0).item() == pytest.approx(4 * kl2, rel=1e-6)
    # batch mean: a second, identical row halves the loss
    assert kd_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1.0).item() == pytest.approx(kl / 2, rel=1e-6)
    # direction: KL(P || Q), not KL(Q || P)
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    pa, pb = a.softmax(-1), b.softmax(-1)
    assert kd_loss(b, a, 1.0).item() == pytest.approx((pa * (pa / pb).log()).sum().item(), rel=1e-6)
    assert kd_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)


def test_weighted_ssim_hand_case():
    t = torch.tensor([0.0, 1.0])
    q = torch.tensor([0.0, 2.0])
    w = torch.tensor([1.0, 3.0])
    # weighted mean t 3/4, q 3/2; var_t 3/16, var_q 3/4, cov 3/8
    expect = (2 * 3 / 8 + C2) / (3 / 16 + 3 / 4 + C2)
    assert weighted_ssim_cs(t, q, w).item() == pytest.approx(expect, rel=1e-6)
    # uniform weights, reversed profile: cov = -var
    t3 = torch.tensor([1.0, 2.0, 3.0])
    expect3 = (2 * (-2 / 3) + C2) / (4 / 3 + C2)
    assert weighted_ssim_cs(t3, t3.flip(0)).item() == pytest.approx(expect3, rel=1e-6)
    assert weighted_ssim_cs(t3, t3).item() == pytest.approx(1.0)
    # weights only matter relatively
    assert weighted_ssim_cs(t, q, 5 * w).item() == pytest.approx(expect, rel=1e-6)


def test_head_token_weights_topk():
    o = torch.zeros(2, 3, 20, 4)
    o[0, :, 7] = 5.0
    o[0, 1, 3] = -9.0  # |.| counts; mean over heads 3 > 5? no: 9/3 = 3 < 5
    o[1, :, 11] = 1.0
    o[1, :, 12] = -2.0
    w = head_token_weights(o, ratio=0.1, high=2.0)  # k = round(20 * 0.1) = 2
    assert w.shape == (2, 20)
    assert set(torch.nonzero(w[0] == 2).flatten().tolist()) == {7, 3}
    assert set(torch.nonzero(w[1] == 2).flatten().tolist()) == {11, 12}
    assert int((w == 1).sum()) == 2 * 18
    # at least one token even when the ratio rounds to 0
    assert int((head_token_weights(o[:, :, :3], ratio=0.1) == 2).sum()) == 2


def _hd_loop(op, oq, prefix, weights):
    """Reference: an explicit loop over (layer, image, head, channel)."""
    vals = []
    for li, (a, b) in enumerate(zip(op, oq)):
        for i in range(a.shape[0]):
            w = weights[li][i]
            for h in range(a.shape[1]):
                for c in range(a.shape[3]):
                    t, q = a[i, h, prefix:, c].double(), b[i, h, prefix:, c].double()
                    W = w.double() / w.sum()
                    mt, mq = (W * t).sum(), (W * q).sum()
                    vt, vq = (W * (t - mt) ** 2).sum(), (W * (q - mq) ** 2).sum()
                    cov = (W * (t - mt) * (q - mq)).sum()
                    vals.append(((2 * cov + C2) / (vt + vq + C2)).item())
    return 1 - sum(vals) / len(vals)


def test_head_distill_loss_matches_loop_and_masks():
    g = torch.Generator().manual_seed(3)
    op = [torch.randn(2, 3, 11, 4, generator=g) for _ in range(2)]
    oq = [o + 0.3 * torch.randn(o.shape, generator=g) for o in op]
    # identical outputs -> 0; differences only in the prefix (CLS) token -> still 0
    assert head_distill_loss(op, op, 1).item() == pytest.approx(0.0, abs=1e-6)
    oq_cls = [o.clone() for o in op]
    for o in oq_cls:
        o[:, :, 0] += 10
    assert head_distill_loss(op, oq_cls, 1).item() == pytest.approx(0.0, abs=1e-6)
    # anti-correlated outputs -> loss near 2
    assert head_distill_loss(op, [-o for o in op], 1).item() > 1.9
    # unmasked = uniform weights; topk = weights 2 on the top 10% tokens (here 1 of 10)
    ones = [torch.ones(2, 10) for _ in op]
    assert head_distill_loss(op, oq, 1, mask="none").item() == pytest.approx(_hd_loop(op, oq, 1, ones), rel=1e-5)
    tk = [head_token_weights(o[:, :, 1:], 0.1, 2.0) for o in op]
    assert all(int((w == 2).sum()) == 2 for w in tk)  # one token per image
    got = head_distill_loss(op, oq, 1, mask="topk")
    assert got.item() == pytest.approx(_hd_loop(op, oq, 1, tk), rel=1e-5)
    assert got.item() != pytest.approx(head_distill_loss(op, oq, 1, mask="none").item(), rel=1e-4)
    # explicit weights win over the mask; gradient reaches Q's outputs
    oqg = [o.clone().requires_grad_(True) for o in oq]
    head_distill_loss(op, oqg, 1, weights=tk).backward()
    assert all(o.grad is not None and o.grad[:, :, 1:].abs().sum() > 0 for o in oqg)
    assert all(float(o.grad[:, :, 0].abs().sum()) == 0 for o in oqg)  # CLS dropped
    with pytest.raises(CalibError, match="cls_attention"):
        head_distill_loss(op, oq, 1, mask="cls_attention")


def test_cls_attention_weights():
    S = torch.zeros(2, 3, 17, 17)  # prefix 1 + 16 patches
    S[0, :, 0, 1 + 5] = 4.0
    S[1, :, 0, 1 + 9] = 4.0
    S[1, :, 0, 1 + 2] = 3.0
    w = cls_attention_weights([S, S], prefix=1, ratio=0.1)  # k = round(1.6) = 2
    assert w.shape == (2, 16)
    assert 5 in torch.nonzero(w[0] == 2).flatten().tolist()
    assert set(torch.nonzero(w[1] == 2).flatten().tolist()) == {9, 2}
    with pytest.raises(CalibError, match="CLS"):
        cls_attention_weights([S], prefix=0)


def test_calib_config_validation_and_json():
    cfg = CalibConfig(epochs=3, head_mask="none")
    assert CalibConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(CalibError, match="head_mask.*topk, none, cls_attention"):
        CalibConfig(head_mask="top")
    with pytest.raises(CalibError, match="augment"):
        CalibConfig(augment="autoaugment")
    with pytest.raises(CalibError, match="batch_size"):
        CalibConfig(batch_size=0)
    with pytest.raises(CalibError, match="unknown calibration settings"):
        CalibConfig.from_json({"epochs": 2, "epoch": 3})
    # per-epoch cosine from lr (first epoch) towards lr_min
    c = CalibConfig(epochs=4)
    assert cosine_lr(c, 0) == c.lr
    assert cosine_lr(c, 2) == pytest.approx((c.lr + c.lr_min) / 2)
    assert c.lr_min < cosine_lr(c, 3) < cosine_lr(c, 1) < c.lr
    assert cosine_lr(c, 4) == pytest.approx(c.lr_min)


# --- augmentation ---------------------------------------------------------------------------

def test_simclr_augment_properties():
    x = torch.randn(1, 3, 32, 32).repeat(6, 1, 1, 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a = simclr_augment(x, mean, std, torch.Generator().manual_seed(0))
    b = simclr_augment(x, mean, std, torch.Generator().manual_seed(0))
    c = simclr_augment(x, mean, std, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded by the generator
    assert all(not torch.allclose(a[0], a[i]) for i in range(1, 6))  # per-image parameters
    # jittered/grey pixels stay in the valid range; blur and crop never leave it
    lo = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)
    xv = x.clamp(lo, hi)
    av = simclr_augment(xv, mean, std, torch.Generator().manual_seed(2))
    assert (av >= lo - 1e-4).all() and (av <= hi + 1e-4).all()
    g1 = simclr_augment(torch.randn(4, 1, 28, 28), (0.5,), (0.5,), torch.Generator().manual_seed(0))
    assert g1.shape == (4, 1, 28, 28) and torch.isfinite(g1).all()


# --- the loop -------------------------------------------------------------------------------

def _agreement(P, Q, x):
    with torch.no_grad():
        return kd_loss(Q(x), P(x)).item()


def test_calibration_improves_agreement():
    lm, P, Q, data = _setup(n=48)
    with torch.no_grad():
        Q(data[:16])  # initialise the activation quantizers so "before" is measurable
    before = _agreement(P, Q, data)
    cfg = CalibConfig(epochs=5, batch_size=16, warmup_gate_epochs=1, augment="none")
    res = calibrate(P, Q, data, cfg, seed=0, device="cpu", progress=False)
    after = _agreement(P, Q, data)
    assert after < 0.85 * before, (before, after)
    assert len(res.epochs) == 5 and len(res.steps) == 5 * 3
    assert res.epochs[-1]["kd"] < res.epochs[0]["kd"]
    assert {"total_s", "epoch_s"} <= set(res.timings)
    assert not any(p.requires_grad for p in P.parameters()) or all(p.grad is None for p in P.parameters())


def test_every_parameter_group_is_trained():
    lm, P, Q, data = _setup(n=16)
    names = {id(p): n for n, p in Q.named_parameters()}
    seen: dict[str, float] = {}
    optimised: set[str] = set()

    def pre_step(opt, args, kwargs):  # what the optimiser is about to apply
        for g in opt.param_groups:
            for p in g["params"]:
                optimised.add(names[id(p)])
                if p.grad is not None:
                    seen[names[id(p)]] = max(seen.get(names[id(p)], 0.0), float(p.grad.abs().max()))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    h = register_optimizer_step_pre_hook(pre_step)
    try:
        calibrate(P, Q, data, CalibConfig(epochs=1, batch_size=8, warmup_gate_epochs=0), seed=0, device="cpu",
                  progress=False)
    finally:
        h.remove()
    assert optimised == set(names.values())  # every parameter of Q is trained
    groups = {
        "latent weights": [n for n in optimised if n.endswith(".weight") and ("qkv" in n or "fc1" in n or "proj" in n)],
        "biases": [n for n in optimised if n.endswith(".bias")],
        "LayerNorm": [n for n in optimised if "norm" in n],
        "embeddings": [n for n in optimised if n in ("cls_token", "pos_embed", "patch_embed.proj.weight")],
        "act step": [n for n in optimised if n.endswith("quantizer.scale")],
        "act zero-point": [n for n in optimised if n.endswith("quantizer.zero_point")],
    }
    for g, ns in groups.items():
        assert ns, g
        if g == "act zero-point":
            # a zero-point's gradient comes only from clipped values: d/dz of
            # (clamp(round(x/s) + z) - z) * s is 0 inside the grid, so some sit at exactly 0
            assert any(seen.get(n, 0) > 0 for n in ns), g
        else:
            assert all(seen.get(n, 0) > 0 for n in ns), (g, [n for n in ns if not seen.get(n, 0) > 0])


def test_symmetric_zero_points_stay_zero():
    lm, P, Q, data = _setup(n=16, symmetric_activations=True)
    calibrate(P, Q, data, CalibConfig(epochs=1, batch_size=8, warmup_gate_epochs=0, augment="none"),
              seed=0, device="cpu", progress=False)
    acts = [m for _, m in quantizers(Q) if isinstance(m, ActQuantizer)]
    assert acts and all(float(m.zero_point.abs().sum()) == 0 for m in acts)


def test_warmup_gate_takes_no_step():
    lm, P, Q, data = _setup(n=16)
    states = []

    def snap(epoch, rec):
        states.append(({k: v.clone() for k, v in Q.state_dict().items()}, rec))

    calibrate(P, Q, data, CalibConfig(epochs=3, batch_size=8, warmup_gate_epochs=2),
              seed=0, device="cpu", progress=False, on_epoch_end=snap)
    (s0, r0), (s1, r1), (s2, r2) = states
    assert not r0["stepped"] and not r1["stepped"] and r2["stepped"]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # weights unchanged after epoch 1
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)
    assert all(bool(m.initialized) for _, m in quantizers(Q) if isinstance(m, ActQuantizer))


def test_resume_equals_uninterrupted(tmp_path):
    cfg = CalibConfig(epochs=4, batch_size=8, warmup_gate_epochs=1, lr=5e-3)
    lm, P, Qa, data = _setup(n=16)
    full = calibrate(P, Qa, data, cfg, seed=7, device="cpu", progress=False)

    _, _, Qb, _ = _setup(n=16)
    ck = tmp_path / "calib.pt"

    def stop(epoch, rec):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(P, Qb, data, cfg, seed=7, device="cpu", progress=False, checkpoint_path=ck, on_epoch_end=stop)
    assert ck.is_file()
    _, _, Qc, _ = _setup(n=16)  # a fresh process would rebuild Q from P
    resumed = calibrate(P, Qc, data, cfg, seed=7, device="cpu", progress=False, checkpoint_path=ck)
    assert resumed.resumed_from == 2
    sa, sc = Qa.state_dict(), Qc.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [e["loss"] for e in resumed.epochs] == [e["loss"] for e in full.epochs]
    assert len(resumed.steps) == len(full.steps)
    # a checkpoint from another config is refused
    with pytest.raises(CalibError, match="another config or seed"):
        calibrate(P, Qc, data, cfg, seed=8, device="cpu", progress=False, checkpoint_path=ck)


def test_refresh_callback_swaps_data():
    lm, P, Q, data = _setup(n=8)
    calls = []

    def refresh(r):
        calls.append(r)
        return data + r

    res = calibrate(P, Q, data, CalibConfig(epochs=5, batch_size=8, refresh_every=2, warmup_gate_epochs=0),
                    seed=0, device="cpu", progress=False, refresh=refresh)
    assert calls == [1, 2]  # at epochs 2 and 4
    assert [e["round"] for e in res.epochs] == [0, 0, 1, 1, 2]
    assert all(p.requires_grad for n, p in Q.named_parameters())


def test_batch_source_and_errors():
    lm, P, Q, data = _setup(n=12)
    src = TensorBatches(data, 5)
    assert len(src) == 3
    res = calibrate(P, Q, src, CalibConfig(epochs=1, warmup_gate_epochs=0, augment="none"),
                    seed=0, device="cpu", progress=False)
    assert res.epochs[0]["images"] == 12
    res = calibrate(P, Q, lambda: ((b, None) for b in src), CalibConfig(epochs=1, augment="none"),
                    seed=0, device="cpu", progress=False)
    assert res.epochs[0]["images"] == 12
    with pytest.raises(CalibError, match="image tensor"):
        calibrate(P, Q, [torch.zeros(3)], CalibConfig(epochs=1), seed=0, device="cpu", progress=False)


# --- DDP ------------------------------------------------------------------------------------

# 6 images in global batches of 5 and 1: ranks get 3+2 images, then 1+0 (rank 1 runs a
# zero-weighted dummy). One epoch at 8 bit: low-bit training is chaotic (a float-order difference
# that flips one rounding grows over later steps), and the point here is the gradient averaging.
DDP_CFG = dict(epochs=1, batch_size=5, warmup_gate_epochs=0, lr=5e-3)
DDP_SETUP = dict(bits="8w8a", n=6)


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lm, P, Q, data = _setup(**DDP_SETUP)
        res = calibrate(P, Q, data, CalibConfig(**DDP_CFG), seed=3, device="cpu", progress=False)
        if rank == 0:
            torch.save({"state": Q.state_dict(), "losses": [s["loss"] for s in res.steps]}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, out), nprocs=2, join=True)
    got = torch.load(out)
    lm, P, Q, data = _setup(**DDP_SETUP)
    init = {k: v.clone() for k, v in Q.state_dict().items()}
    res = calibrate(P, Q, data, CalibConfig(**DDP_CFG), seed=3, device="cpu", progress=False)
    ref = Q.state_dict()
    keys = [k for k in ref if ref[k].is_floating_point() and ref[k].numel()]

    def norm(d):
        return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d))

    diff = norm(got["state"][k] - ref[k] for k in keys)
    update = norm(ref[k] - init[k] for k in keys)
    worst = max(float((got["state"][k] - ref[k]).abs().max()) for k in keys)
    # equal up to float summation order (chunked batches, all-reduce), measured against the update
    assert diff < 1e-3 * update, (diff, update, worst)
    assert len(got["losses"]) == 2
    assert got["losses"] == pytest.approx([s["loss"] for s in res.steps], rel=1e-3, abs=2e-6)  # float32 KL


# --- min/max PTQ ----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_covers_observed_ranges(symmetric):
    lm, P, Q, data = _setup(n=24, symmetric_activations=symmetric)
    # observe quantizer inputs independently (FP activations everywhere)
    seen = {}
    hooks = []
    for n, m in quantizers(Q):
        if isinstance(m, ActQuantizer):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, a, n=n: seen.setdefault(n, []).append((float(a[0].min()), float(a[0].max())))))
    with quantizers_disabled(Q), torch.no_grad():
        Q(data)
    for h in hooks:
        h.remove()
    ranges = minmax_calibrate(Q, TensorBatches(data, 8))
    acts = {n: m for n, m in quantizers(Q) if isinstance(m, ActQuantizer)}
    assert set(ranges) == set(acts) == set(seen)
    for n, m in acts.items():
        lo, hi = min(v[0] for v in seen[n]), max(v[1] for v in seen[n])
        assert ranges[n][0] == pytest.approx(lo, abs=1e-5) and ranges[n][1] == pytest.approx(hi, abs=1e-5)
        s, z = m.effective()
        qmin, qmax = m.grid()
        s, z = float(s), float(z)
        assert qmin <= z <= qmax and bool(m.initialized)
        assert (qmin - z) * s <= min(lo, 0) + s / 2 + 1e-6
        assert (qmax - z) * s >= max(hi, 0) - s / 2 - 1e-6
        if symmetric:
            assert z == 0
        else:  # tight: the grid spans exactly the observed range (with 0)
            assert (qmax - qmin) * s == pytest.approx(max(hi, 0) - min(lo, 0), rel=1e-5)
    # Q with the new ranges tracks P better than with untouched (unit) ranges
    with torch.no_grad():
        err = (Q(data) - P(data)).abs().mean()
        assert float(err) < float(P(data).abs().mean())


@pytest.mark.parametrize("kind", ["deit_distilled", "swin"])
def test_other_architectures(kind):
    """Distilled DeiT (two prefix tokens) and Swin (windows as batch entries, no CLS)."""
    import timm

    tiny = {  # as tests/conftest.py's TINY (not imported: tests/runtime_eval has a conftest too)
        "deit_distilled": ("deit_tiny_distilled_patch16_224",
                           dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),
        "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, patch_size=4, embed_dim=24, depths=(2, 2),
                                                      num_heads=(3, 6), window_size=7, num_classes=10)),
    }
    arch, kw = tiny[kind]
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, **kw)
    dcfg = DataConfig.from_model(m)
    P = prepare_model(m.eval())
    Q = quantize_model(P, QuantConfig.parse("4w4a"))
    x = torch.randn(4, *dcfg.input_size, generator=torch.Generator().manual_seed(0))
    res = calibrate(P, Q, x, CalibConfig(epochs=1, batch_size=4, warmup_gate_epochs=0), seed=0, device="cpu",
                    progress=False)
    assert math.isfinite(res.epochs[0]["loss"]) and res.epochs[0]["hd"] > 0
    if kind == "swin":
        with pytest.raises(CalibError, match="CLS token"):
            calibrate(P, Q, x, CalibConfig(epochs=1, batch_size=4, head_mask="cls_attention"), seed=0,
                      device="cpu", progress=False)
    else:
        calibrate(P, Q, x, CalibConfig(epochs=1, batch_size=4, head_mask="cls_attention"), seed=0, device="cpu",
                  progress=False)
