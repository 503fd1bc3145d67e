"""Sample synthesis (method.md §2) on tiny timm models: runs, determinism, clamping, the model
state left alone, non-finite batches redrawn, resume from checkpoints, 2-rank sharding."""
from __future__ import annotations

import json
import logging
import math
import os

import pytest
import timm
import torch
from torch import nn

from maskaq.models import DataConfig
from maskaq.qmodel import QuantConfig, prepare_model, quantize_model
from maskaq.quant import ActQuantizer
from maskaq.synthesis import SynthConfig, SynthesisError, derive_seed, synthesize

# augmentation switched off: every step sees the same images (used where a trend is checked)
NO_AUG = dict(jitter=0, jitter_late=0, noise_std=0.0, jitter_mean=0.0, jitter_log_std=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return prepare_model(timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
        num_heads=3, num_classes=10).eval())


def tiny_deit_distilled() -> nn.Module:
    torch.manual_seed(0)
    return prepare_model(timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
        depth=2, num_heads=3, num_classes=10).eval())


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    return prepare_model(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24, depths=(2, 2),
        num_heads=(3, 6), window_size=7, num_classes=10).eval())


def models(build):
    P = build()
    Q = quantize_model(P, QuantConfig.parse("4w4a"))
    return P, Q, DataConfig.from_model(P)


@pytest.fixture(scope="module")
def vit():
    return models(tiny_vit)


def run(P, Q, dc, n=3, seed=0, **kw):
    cfg = SynthConfig(**{"steps": 3, "batch_size": 2, **kw})
    return synthesize(P, Q, n, cfg, dc, seed=seed, device="cpu", progress=False)


def clamp_range(dc):
    mean = torch.tensor(dc.mean).view(1, -1, 1, 1)
    std = torch.tensor(dc.std).view(1, -1, 1, 1)
    return -mean / std, (1 - mean) / std


# --- runs on the three model families --------------------------------------------------------

@pytest.mark.parametrize("build,grid", [(tiny_vit, 16), (tiny_deit_distilled, 16), (tiny_swin, 14 * 14)])
def test_maskaq_runs_and_stays_in_pixel_range(build, grid):
    P, Q, dc = models(build)
    res = run(P, Q, dc, n=3)
    C, H, W = dc.input_size
    assert res.images.shape == (3, C, H, W) and res.images.dtype == torch.float32
    assert res.images.device.type == "cpu" and torch.isfinite(res.images).all()
    lo, hi = clamp_range(dc)
    assert (res.images >= lo - 1e-6).all() and (res.images <= hi + 1e-6).all()
    assert res.masks is not None and res.masks.shape == (3, grid) and res.masks.dtype == torch.bool
    assert (res.masks.sum(1) >= 1).all()
    assert res.labels.shape == (3,) and int(res.labels.max()) < 10
    assert len(res.losses) == 3 and set(res.losses[0]) == {"total", "iha", "ce", "tv", "de", "maa"}
    assert all(math.isfinite(v) for d in res.losses for v in d.values())
    assert res.timings["computed_batches"] == [0, 1] and res.timings["redraws"] == 0


@pytest.mark.parametrize("objective,terms", [("mimiq", {"total", "iha", "ce", "tv"}),
                                             ("psaq", {"total", "psaq", "ce", "tv"})])
def test_p_only_objectives(vit, objective, terms):
    P, _, dc = vit
    res = run(P, None, dc, n=2, objective=objective)
    assert res.masks is None and set(res.losses[0]) == terms
    assert torch.isfinite(res.images).all()


def test_maskaq_needs_q(vit):
    P, _, dc = vit
    with pytest.raises(SynthesisError, match="needs Q"):
        run(P, None, dc)
    assert run(P, None, dc, n=2, use_maa=False).masks is None  # ablation without L_MAA: P only


def test_simclr_augmentation_runs(vit):
    P, Q, dc = vit
    res = run(P, Q, dc, n=2, augment="simclr")
    assert torch.isfinite(res.images).all()


@pytest.mark.parametrize("objective", ["maskaq", "mimiq"])
def test_loss_decreases(vit, objective):
    P, Q, dc = vit
    res = run(P, Q if objective == "maskaq" else None, dc, n=2, steps=12, objective=objective,
              use_de=False, **NO_AUG)
    first, last = res.losses[0], res.losses[-1]
    assert last["total"] < first["total"]
    assert last["ce"] < first["ce"]


# --- determinism and model state -------------------------------------------------------------

def test_same_seed_same_result_other_seed_differs(vit):
    P, Q, dc = vit
    a, b, c = run(P, Q, dc, seed=7), run(P, Q, dc, seed=7), run(P, Q, dc, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert a.losses == b.losses
    assert not torch.equal(a.images, c.images)
    assert derive_seed(7, 0, 1) != derive_seed(7, 1, 0) != derive_seed(7, 0, 1, 1)


def test_models_are_left_as_they_were(vit):
    P, Q, dc = vit
    Q.train()
    p_state = {k: v.clone() for k, v in P.state_dict().items()}
    q_state = {k: v.clone() for k, v in Q.state_dict().items()}
    flags = [p.requires_grad for p in Q.parameters()]
    assert not any(bool(m.initialized) for m in Q.modules() if isinstance(m, ActQuantizer))
    run(P, Q, dc, n=2)
    assert Q.training and not P.training
    assert [p.requires_grad for p in Q.parameters()] == flags
    assert all(p.grad is None for p in list(P.parameters()) + list(Q.parameters()))
    for ref, model in ((p_state, P), (q_state, Q)):
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k  # incl. the quantizers' 'initialized' buffers
    Q.eval()


def test_config_json_round_trip_and_errors(tmp_path):
    cfg = SynthConfig(objective="mimiq", steps=5, betas=(0.5, 0.9), de_offdiag_only=True)
    d = json.loads(json.dumps(cfg.to_json()))
    assert SynthConfig.from_json(d) == cfg
    with pytest.raises(ValueError, match="unknown SynthConfig fields"):
        SynthConfig.from_json({"stepz": 3})
    with pytest.raises(ValueError, match="valid: maskaq, mimiq, psaq"):
        SynthConfig(objective="maskq")
    with pytest.raises(ValueError, match="augment"):
        SynthConfig(augment="none")
    assert SynthConfig.preset("paper").batch_size == 32
    assert SynthConfig().w_tv == 2.5e-5 and SynthConfig().beta == 0.1 and SynthConfig().lr == 0.1


# --- non-finite batches ----------------------------------------------------------------------

class NaNModel(nn.Module):
    """Wraps a model; its logits are NaN on the first ``bad_calls`` forward calls."""

    def __init__(self, inner: nn.Module, bad_calls: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes
        self.bad_calls = bad_calls
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls <= self.bad_calls else out


def test_non_finite_batch_is_discarded_and_redrawn(vit, caplog):
    P, Q, dc = vit
    bad = NaNModel(P, bad_calls=1)
    with caplog.at_level(logging.WARNING, logger="maskaq.synthesis"):
        res = run(bad, Q, dc, n=2)
    assert torch.isfinite(res.images).all() and res.timings["redraws"] == 1
    assert any("non-finite" in r.getMessage() for r in caplog.records)
    # attempt 1 used a fresh seed: the images differ from a clean run's attempt 0
    assert not torch.equal(res.images, run(P, Q, dc, n=2).images)


def test_always_non_finite_gives_up(vit):
    P, Q, dc = vit
    with pytest.raises(SynthesisError, match="non-finite after 2 attempts"):
        run(NaNModel(P, bad_calls=10**9), Q, dc, n=2, max_redraws=1)


# --- checkpoint and resume -------------------------------------------------------------------

def test_resume_recomputes_only_missing_batches(vit, tmp_path):
    P, Q, dc = vit
    cfg = SynthConfig(steps=3, batch_size=2)
    kw = dict(seed=1, device="cpu", progress=False, checkpoint_dir=tmp_path)
    full = synthesize(P, Q, 5, cfg, dc, **kw)
    files = sorted(p.name for p in tmp_path.glob("batch_*.pt"))
    assert files == ["batch_00000.pt", "batch_00001.pt", "batch_00002.pt"]
    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    os.remove(tmp_path / "batch_00001.pt")
    again = synthesize(P, Q, 5, cfg, dc, **kw)
    assert torch.equal(full.images, again.images) and torch.equal(full.masks, again.masks)
    assert full.losses == again.losses
    assert again.timings["computed_batches"] == [1] and again.timings["resumed_batches"] == [0, 2]
    for f in ("batch_00000.pt", "batch_00002.pt"):
        assert os.stat(tmp_path / f).st_mtime_ns == mtimes[f]  # not rewritten
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries
    with pytest.raises(SynthesisError, match="another synthesis run"):
        synthesize(P, Q, 5, cfg, dc, **{**kw, "seed": 2})


# --- torch.distributed ------------------------------------------------------------------------

DIST_CFG = dict(steps=2, batch_size=2)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        P, Q, dc = models(tiny_vit)
        res = synthesize(P, Q, 5, SynthConfig(**DIST_CFG), dc, seed=11, device="cpu", progress=False)
        torch.save({"images": res.images, "masks": res.masks, "labels": res.labels, "losses": res.losses,
                    "computed": res.timings["computed_batches"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_sharding_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    P, Q, dc = models(tiny_vit)
    single = synthesize(P, Q, 5, SynthConfig(**DIST_CFG), dc, seed=11, device="cpu", progress=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["images"], single.images)
        assert torch.equal(got["masks"], single.masks) and torch.equal(got["labels"], single.labels)
        assert got["losses"] == single.losses
        assert got["computed"] == [0, 1, 2]  # every batch computed once, by rank b % 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_and_is_deterministic():
    P, Q, dc = models(tiny_vit)
    P, Q = P.cuda(), Q.cuda()
    a = synthesize(P, Q, 3, SynthConfig(steps=20, batch_size=2), dc, seed=0, device="cuda", progress=False)
    b = synthesize(P, Q, 3, SynthConfig(steps=20, batch_size=2), dc, seed=0, device="cuda", progress=False)
    assert a.images.device.type == "cpu" and torch.isfinite(a.images).all()
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    lo, hi = clamp_range(dc)
    assert (a.images >= lo - 1e-6).all() and (a.images <= hi + 1e-6).all()
