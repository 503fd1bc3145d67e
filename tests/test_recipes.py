"""Methods as recipes (maskaq.recipes): the registry, PSAQ-ViT's faithful recipe (schedule,
rounds, jitter, TV target), SPDFQ's losses (priors, APA, crops, soft labels) on hand-made cases,
and synthesis sizes scaled from 224 px."""
from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch

from maskaq import losses as L
from maskaq import recipes as R
from maskaq.models import DataConfig
from maskaq.pipeline import METHODS, RunConfig, resolve_plan
from maskaq.qmodel import prepare_model
from maskaq.synthesis import SynthConfig, attention_layout, augment_code, augment_roll_flip, lr_at, synthesize


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kw)
    return prepare_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval())


def tiny_swin():
    torch.manual_seed(0)
    return prepare_model(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24, depths=(2, 2),
        num_heads=(3, 6), window_size=7, num_classes=10).eval())


# --- the registry --------------------------------------------------------------------------

def test_methods_come_from_the_registry():
    from export.cli import METHODS as CLI_METHODS
    from export.dense_cli import DENSE_METHODS as CLI_DENSE
    from maskaq.dense.quantize import DENSE_METHODS

    assert METHODS == CLI_METHODS == tuple(R.RECIPES)
    assert {"maskaq", "mimiq", "psaq", "psaq_maskaq_settings", "spdfq", "noise", "real"} <= set(METHODS)
    assert "real" not in DENSE_METHODS and DENSE_METHODS == CLI_DENSE
    for name, rec in R.RECIPES.items():  # every synthesis recipe names a registered objective and terms
        if rec.data == "synth":
            obj = R.OBJECTIVES[rec.settings["synth.objective"]]
            assert all(t in R.TERMS for t in obj.terms)
            assert resolve_plan(RunConfig(model="fmnist_vit", method=name)).synth.objective == obj.name


def test_adding_a_method_is_one_entry():
    """A new objective + recipe (with its own term) runs through resolve_plan without other code."""
    name = "test_only_ce"
    try:
        @R.term("test_const", "w_ce", "use_ce")
        def _t(ctx):
            return ctx.logits.square().mean()

        R.OBJECTIVES[name] = R.Objective(name, ("test_const", "tv"))
        R.register(R.Recipe(name, "CE only", settings={"synth.objective": name, "synth.steps": 2}, ptq="minmax"))
        plan = resolve_plan(RunConfig(model="fmnist_vit", method=name))
        assert plan.synth.terms == ("total", "test_const", "tv") and plan.ptq == "minmax" and not plan.synth_uses_q
        P = tiny_vit(depth=2)
        res = synthesize(P, None, 2, dataclasses.replace(plan.synth, batch_size=2), DataConfig.from_model(P),
                         seed=0, device="cpu", progress=False)
        assert set(res.losses[0]) == {"total", "test_const", "tv"}
        with pytest.raises(ValueError, match="registered twice"):
            R.register(R.Recipe(name, "again", settings={"synth.objective": name}))
    finally:
        R.RECIPES.pop(name, None)
        R.OBJECTIVES.pop(name, None)
        R.TERMS.pop("test_const", None)


# --- PSAQ-ViT's recipe -----------------------------------------------------------------------

def test_psaq_plan_is_psaq_vits_own_recipe():
    paper = resolve_plan(RunConfig(model="deit_t", method="psaq", preset="paper"))
    s = paper.synth
    assert (s.optimizer, s.lr, s.lr_windowed, s.betas, s.adam_eps, s.weight_decay) == ("adam", 0.2, 0.25, (0.5, 0.9), 1e-8, 0.0)
    assert (s.steps, s.restarts, s.lr_schedule, s.warmup_frac, s.lr_min) == (1000, 2, "warmup_cosine", 0.2, 0.0)
    assert (s.augment, s.jitter, s.jitter_late, s.size_ref) == ("roll_flip", 15, 30, 224)
    assert (s.tv_form, s.w_tv, s.tv_target, s.w_ce, s.w_psaq) == ("psaq", 0.05, (2500.0, 3000.0), 1.0, 1.0)
    assert paper.num_images == 32 and s.batch_size == 32 and paper.ptq == "minmax" and not paper.refresh
    assert s.terms == ("total", "psaq", "ce", "tv")
    old = resolve_plan(RunConfig(model="deit_t", method="psaq_maskaq_settings", preset="paper")).synth
    assert (old.objective, old.optimizer, old.lr, old.tv_form, old.w_tv, old.augment) == \
        ("psaq", "adamw", 0.1, "eq2", 2.5e-5, "code")


def test_psaq_schedule_warmup_then_cosine_per_round():
    s = resolve_plan(RunConfig(model="deit_t", method="psaq", preset="paper")).synth
    n = 500  # two rounds of 500 iterations; warm-up over 100
    lrs = [lr_at(s, i, n) for i in range(n)]
    assert lrs[0] == pytest.approx(0.2 / 100) and lrs[99] == pytest.approx(0.2)
    assert all(b > a for a, b in zip(lrs[:99], lrs[1:100]))  # linear warm-up
    assert lrs[100] == pytest.approx(0.2) and lrs[300] == pytest.approx(0.1)  # cosine, half-way at 300
    assert all(b < a for a, b in zip(lrs[100:-1], lrs[101:])) and 0 < lrs[-1] < 1e-4
    assert lr_at(s, 0, n, base_lr=0.25) == pytest.approx(0.25 / 100)  # Swin's lr


def test_psaq_rounds_restart_the_optimiser(monkeypatch):
    """T steps in `restarts` rounds: a fresh Adam each round, the lr schedule restarting with it."""
    import maskaq.synthesis as S

    made, seen = [], []
    real = S._optimizer

    def spy(x, cfg, lr, n):
        opt, sched = real(x, cfg, lr, n)
        made.append(n)
        orig = opt.step

        def step(*a, **k):
            seen.append(opt.param_groups[0]["lr"])
            return orig(*a, **k)
        opt.step = step
        return opt, sched

    monkeypatch.setattr(S, "_optimizer", spy)
    P = tiny_vit(depth=2)
    cfg = SynthConfig(objective="psaq", steps=20, batch_size=2, restarts=2, optimizer="adam", lr=0.2,
                      lr_schedule="warmup_cosine", warmup_frac=0.2, lr_min=0.0, augment="roll_flip",
                      tv_form="psaq", w_tv=0.05)
    res = synthesize(P, None, 2, cfg, DataConfig.from_model(P), seed=0, device="cpu", progress=False)
    assert made == [10, 10] and len(res.losses) == 20
    assert seen[:10] == seen[10:] and seen[0] == pytest.approx(0.1) and seen[1] == pytest.approx(0.2)  # warm-up 2
    assert seen[9] < 0.01


def test_roll_flip_and_scaled_offsets():
    # 224 px reproduces the stated offsets exactly; 28 px scales them
    assert [L.scaled_offset(j, 224, 224) for j in (8, 16, 15, 30)] == [8, 16, 15, 30]
    assert [L.scaled_offset(j, 28, 224) for j in (8, 16, 15, 30)] == [1, 2, 2, 4]
    assert L.scaled_offset(0, 28, 224) == 0 and L.scaled_offset(8, 28, 0) == 8 and L.scaled_offset(8, 8, 224) == 1
    cfg = SynthConfig(augment="roll_flip", jitter=15, jitter_late=30)
    for size, lim in ((224, (15, 30)), (28, (2, 4))):
        x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
        g = torch.Generator().manual_seed(0)
        seen = {0: set(), 1: set()}
        flips = 0
        for t in range(200):
            half = int(t >= 100)
            y = augment_roll_flip(x, t, 200, cfg, g)
            flipped = bool(y[0, 0, 0, 1] < y[0, 0, 0, 0]) if size > 1 else False
            flips += flipped
            z = torch.flip(y, dims=(3,)) if flipped else y
            # recover the roll: where pixel 0 went
            pos = int((z.flatten() == 0).nonzero())
            dy, dx = divmod(pos, size)
            dy = dy if dy <= size // 2 else dy - size
            dx = dx if dx <= size // 2 else dx - size
            assert abs(dy) <= lim[half] and abs(dx) <= lim[half]
            seen[half].update((abs(dy), abs(dx)))
        assert max(seen[1]) > lim[0] or size == 224  # late offsets exceed the early limit
        assert 60 < flips < 140  # p = 0.5
    # MaskAQ's roll scales the same way (8 -> 1 px at 28 px)
    x = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28)
    cfg = SynthConfig(noise_std=0.0, jitter_mean=0.0, jitter_log_std=0.0)
    g = torch.Generator().manual_seed(1)
    for t in range(50):
        y = augment_code(x, t, 100, g, cfg)
        pos = int((y.flatten() == 0).nonzero())
        dy, dx = divmod(pos, 28)
        assert min(dy, 28 - dy) <= 1 and min(dx, 28 - dx) <= 1


def test_tv_scaled_to_224_px():
    torch.manual_seed(0)
    x224 = torch.randn(2, 3, 224, 224)
    assert L.size_factor(224, 224, 224) == 1.0  # exact at 224 px
    x28 = torch.randn(2, 3, 28, 28)
    assert L.size_factor(28, 28, 224) == 8.0 and L.size_factor(28, 28, 0) == 1.0
    # i.i.d. noise has the same per-pixel roughness: scaled TV at 28 px ~ TV at 224 px
    assert L.tv_loss(x28) * 8.0 == pytest.approx(float(L.tv_loss(x224)), rel=0.05)
    # PSAQ's TV: four norms without 1/sqrt2 (3x3 ramp: sqrt6 + sqrt54 + 4 + 8)
    ramp = torch.arange(9.0).view(1, 1, 3, 3)
    assert float(L.tv_l2(ramp)) == pytest.approx(math.sqrt(6) + math.sqrt(54) + 4 + 8)


def test_psaq_tv_target_drawn_once_and_scaled_with_batch():
    cfg = SynthConfig(objective="psaq", tv_form="psaq")
    g = torch.Generator().manual_seed(0)
    st = R._psaq_state(g, 32, 10, cfg, None, (3, 224, 224))
    assert 2500 <= float(st["tv_target"]) <= 3000 and st["labels"].shape == (32,)
    rgb = R._psaq_state(torch.Generator().manual_seed(0), 8, 10, cfg, None, (3, 224, 224))
    grey = R._psaq_state(torch.Generator().manual_seed(0), 8, 10, cfg, None, (1, 28, 28))
    assert 2500 * 0.5 <= float(rgb["tv_target"]) <= 3000 * 0.5  # 8 of 32 images: sqrt(8 / 32)
    assert float(grey["tv_target"]) == pytest.approx(float(rgb["tv_target"]) / math.sqrt(3))  # 1 of 3 channels


# --- SPDFQ -----------------------------------------------------------------------------------

def test_gmm_priors_shape_normalisation_and_cls_mass():
    g = torch.Generator().manual_seed(0)
    p = L.gmm_priors(g, (5, 3), (14, 14))
    assert p.shape == (5, 3, 196) and (p >= 0).all()
    mass = p.sum(-1)
    assert ((mass > 0) & (mass < 1)).all()  # 1 - u, u ~ U(0, 1): the CLS keeps u
    assert mass.std() > 0.05  # u differs per prior
    # one prior per head: heads of one image differ
    assert not torch.allclose(p[0, 0], p[0, 1])
    g = torch.Generator().manual_seed(0)
    w = L.gmm_priors(g, (2, 4), (7, 7), cls_mass=False)  # Swin: u = 0, window grid
    assert w.shape == (2, 4, 49) and torch.allclose(w.sum(-1), torch.ones(2, 4))
    # a single component with identity covariance at the origin peaks at the grid centre
    g = torch.Generator().manual_seed(3)
    many = L.gmm_priors(g, (200,), (9, 9), cls_mass=False, max_components=1)
    peaks = many.argmax(-1)
    assert len(set(peaks.tolist())) > 20  # means spread over the grid
    # non-square grids
    assert L.gmm_priors(torch.Generator().manual_seed(0), (1, 2), (3, 5)).shape == (1, 2, 15)


def test_gmm_priors_are_reproducible():
    a = L.gmm_priors(torch.Generator().manual_seed(7), (2, 3), (4, 4))
    b = L.gmm_priors(torch.Generator().manual_seed(7), (2, 3), (4, 4))
    assert torch.equal(a, b)


def test_apa_loss_hand_made():
    a = [torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])]  # [B=1, H=2, P=2]
    p = [torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])]
    # head 0 matches; head 1: mean of (1, 1) = 1; weight l / L = 4 / 4
    assert float(L.apa_loss(a, p, [4], 4)) == pytest.approx(1.0)
    assert float(L.apa_loss(a, p, [2], 4)) == pytest.approx(0.5)
    assert float(L.apa_loss(a + a, p + p, [2, 4], 4)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        L.apa_loss(a, [torch.zeros(1, 2, 3)], [1], 1)
    assert R.apa_layers(12) == (list(range(5, 12)), list(range(6, 13)))  # l >= L/2
    assert R.apa_layers(3)[1] == [2, 3]


def test_cls_and_window_attention_rows():
    probs = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)  # CLS + 4 patches
    rows = L.cls_attention(probs, 1)
    assert rows.shape == (2, 3, 4) and torch.equal(rows, probs[:, :, 0, 1:])
    assert torch.allclose(rows.sum(-1) + probs[:, :, 0, 0], torch.ones(2, 3))  # patches get 1 - CLS's own
    assert L.cls_attention(probs, 2).shape == (2, 3, 3)  # distilled DeiT: drop the dist token
    with pytest.raises(ValueError, match="CLS"):
        L.cls_attention(probs, 0)
    w = torch.softmax(torch.randn(2 * 4, 3, 9, 9), dim=-1)  # 2 images x 4 windows of 3x3
    m = L.window_mean_attention(w, 2)
    assert m.shape == (2, 3, 9) and torch.allclose(m.sum(-1), torch.ones(2, 3))
    assert torch.allclose(m[1], w[4:8].mean(dim=(0, 2)))


def test_msr_boxes_do_not_overlap():
    g = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(300):
        boxes = L.msr_boxes(g, 28, 28, 4)
        counts.add(len(boxes))
        assert 1 <= len(boxes) <= 4
        cover = torch.zeros(28, 28, dtype=torch.int32)
        for t, l, h, w in boxes:
            assert 7 <= h <= 14 and 7 <= w <= 14 and t + h <= 28 and l + w <= 28
            cover[t:t + h, l:l + w] += 1
        assert int(cover.max()) == 1  # no pixel in two crops
    assert counts == {1, 2, 3, 4}


def test_msr_crops_gradient_isolation():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    boxes = [[(0, 0, 4, 8), (8, 8, 8, 8)], [(2, 3, 5, 5)]]
    crops = L.msr_crops(x, boxes)
    assert crops.shape == (3, 3, 16, 16)
    for k, (b, (t, l, h, w)) in enumerate([(0, boxes[0][0]), (0, boxes[0][1]), (1, boxes[1][0])]):
        (g,) = torch.autograd.grad(crops[k].sum(), x, retain_graph=True)
        inside = torch.zeros_like(g, dtype=torch.bool)
        inside[b, :, t:t + h, l:l + w] = True
        assert (g[~inside] == 0).all() and (g[inside] != 0).any()
    # a crop of the full image resized to its own size is the image
    same = L.msr_crops(x.detach(), [[(0, 0, 16, 16)], []])
    assert torch.allclose(same[0], x[0].detach(), atol=1e-6)


def test_soft_labels():
    g = torch.Generator().manual_seed(0)
    t = L.soft_targets(g, [[3], [1, 4]], 6)
    assert t.shape == (2, 6) and torch.allclose(t.sum(-1), torch.ones(2))
    assert int(t[0].argmax()) == 3 and set(t[1].topk(2).indices.tolist()) == {1, 4}
    # the chosen class gets exp(U(5, 10)) against exp(U(0, 1)): dominant but not one-hot
    assert 0.5 < float(t[0, 3]) < 1.0
    logits = torch.log(t[0:1])
    assert float(L.soft_ce(logits, t[0:1])) == pytest.approx(float(-(t[0] * t[0].log()).sum()), rel=1e-5)
    assert float(L.soft_ce(torch.zeros(1, 4), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))) == pytest.approx(math.log(4))


def test_spdfq_state_and_plan():
    P = tiny_vit()
    layout = attention_layout(P)
    cfg = resolve_plan(RunConfig(model="fmnist_vit", method="spdfq")).synth
    st = R._spdfq_state(torch.Generator().manual_seed(0), 6, 10, cfg, layout, (3, 32, 32))
    assert st["labels"].shape == (6,) and st["soft"].shape == (6, 10)
    n_crops = sum(len(b) for b in st["boxes"])
    assert st["crop_soft"].shape == (n_crops, 10) and n_crops >= 6
    assert len(st["priors"]) == 3 and all(p.shape == (6, 3, 16) for p in st["priors"])  # layers 2, 3, 4 of 4
    for i, bx in enumerate(st["boxes"]):  # the whole image's soft label favours all its crops' classes
        top = set(st["soft"][i].topk(len(bx)).indices.tolist())
        assert int(st["labels"][i]) in top
    off = dataclasses.replace(cfg, use_msr=False, soft_labels=False)
    st = R._spdfq_state(torch.Generator().manual_seed(0), 4, 10, off, layout, (3, 32, 32))
    assert st["crop_soft"].shape == (0, 10) and torch.equal(st["soft"].argmax(-1), st["labels"])
    assert torch.equal(st["soft"].sum(-1), torch.ones(4)) and float(st["soft"].max()) == 1.0
    # alpha1 per model: the paper's values, the validation choice for the reference model
    assert R.spdfq_alpha1("deit_t") == 1e5 and R.spdfq_alpha1("deit_base_patch16_224") == 1e4
    assert R.spdfq_alpha1("swin_small_patch4_window7_224") == 10.0 and R.spdfq_alpha1("vit_s") in (1.0, None)
    assert resolve_plan(RunConfig(model="deit_t", method="spdfq")).synth.w_apa == 1e5
    assert resolve_plan(RunConfig(model="fmnist_vit", method="spdfq")).synth.w_apa == R.SPDFQ_ALPHA1_CHOSEN["fmnist_vit"]
    assert resolve_plan(RunConfig(model="deit_t", method="spdfq", overrides={"synth.w_apa": 3})).synth.w_apa == 3.0
    # the shared calibration gets the preset's image count; own_stage is the paper's 32 images + its stage
    from maskaq.presets import get_preset

    shared = resolve_plan(RunConfig(model="fmnist_vit", method="spdfq"))
    assert shared.num_images == get_preset("cpu").num_images and shared.synth.steps == 200
    own = resolve_plan(RunConfig(model="fmnist_vit", method="spdfq", ablations=("own_stage",)))
    assert own.num_images == 32 and own.calib.stage == "blockwise" and own.synth.steps == 200


@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
def test_spdfq_synthesis_runs_and_reproduces(build):
    P = build()
    dc = DataConfig.from_model(P)
    plan = resolve_plan(RunConfig(model="deit_t", method="spdfq", preset="tiny"))
    cfg = dataclasses.replace(plan.synth, steps=3, batch_size=2)
    a = synthesize(P, None, 3, cfg, dc, seed=0, device="cpu", progress=False)
    assert set(a.losses[0]) == {"total", "apa", "sl", "tv"}
    assert all(math.isfinite(v) for d in a.losses for v in d.values()) and torch.isfinite(a.images).all()
    b = synthesize(P, None, 3, cfg, dc, seed=0, device="cpu", progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_apa_pulls_attention_to_the_priors():
    """Only APA on (no CE/TV, no augmentation): its loss falls; with weight 0 it stays put."""
    P = tiny_vit(depth=2)
    dc = DataConfig.from_model(P)
    end = {}
    for w in (0.0, 1e3):
        cfg = SynthConfig(objective="spdfq", steps=40, batch_size=2, optimizer="adam", lr=0.1, lr_min=0.0,
                          use_ce=False, use_tv=False, w_apa=w, jitter=0, jitter_late=0, noise_std=0.0,
                          jitter_mean=0.0, jitter_log_std=0.0)
        res = synthesize(P, None, 2, cfg, dc, seed=0, device="cpu", progress=False)
        end[w] = (res.losses[0]["apa"], res.losses[-1]["apa"])
    assert end[1e3][1] < 0.95 * end[1e3][0]
    assert end[0.0][1] == pytest.approx(end[0.0][0], rel=0.01) and end[1e3][0] == end[0.0][0]


def test_psaq_faithful_runs_on_swin_with_swin_lr():
    P = tiny_swin()
    dc = DataConfig.from_model(P)
    plan = resolve_plan(RunConfig(model="deit_t", method="psaq", preset="tiny"))
    cfg = dataclasses.replace(plan.synth, steps=2, batch_size=2)
    res = synthesize(P, None, 2, cfg, dc, seed=0, device="cpu", progress=False)
    assert set(res.losses[0]) == {"total", "psaq", "ce", "tv"} and torch.isfinite(res.images).all()
