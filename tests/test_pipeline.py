"""The pipeline end to end on a tiny model (every method, the ``tiny`` preset, a few seconds
each), presets and overrides, the output files, resume, and real-image loading."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import maskaq.pipeline as pipeline
from maskaq.models import DataConfig, save_checkpoint
from maskaq.params import QuantParams
from maskaq.pipeline import (
    PipelineError,
    RunConfig,
    image_folder_loop,
    load_calibrated,
    load_image,
    resolve_plan,
    run_pipeline,
)
from maskaq.presets import PRESETS, PresetError, apply_overrides, get_preset, override_keys, parse_overrides
from maskaq.qmodel import prepare_model

ARCH = "vit_tiny_patch16_224"
ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A self-describing checkpoint of a tiny ViT (no downloads, no timm.list_models)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model(ARCH, pretrained=False, **ARGS)
    with torch.no_grad():
        m.head.weight.mul_(3)
    m = prepare_model(m.eval())
    path = tmp_path_factory.mktemp("model") / "tiny.maskaq.pt"
    save_checkpoint(path, m, ARCH, ARGS, DataConfig.from_model(m), labels=[f"c{i}" for i in range(10)])
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    g = torch.Generator().manual_seed(0)
    (d / "sub").mkdir()
    for i in range(6):
        arr = (torch.rand(40 + 4 * i, 36, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / ("sub" if i % 2 else ".") / f"img{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def _check_outputs(res, method):
    out = res.out_dir
    for name in ("calibrated.pt", "params.json", "run.json", "samples.png", "losses.png"):
        assert (out / name).is_file(), name
    for png in (res.samples_png, res.losses_png):
        with Image.open(png) as im:
            im.verify()
    report = json.loads((out / "run.json").read_text())
    assert report["config"]["method"] == method and report["seed"] == 1
    assert {"config", "plan", "seeds", "losses", "timings", "versions", "quant", "model"} <= set(report)
    assert report["versions"]["torch"] == torch.__version__
    params = QuantParams.load(out / "params.json")
    assert len(params) == len(res.params) > 0 and params.meta["method"] == method
    # the calibrated state rebuilds Q without synthesis
    Q2, loaded, rc = load_calibrated(res.state_path)
    assert rc.method == method and loaded.labels == [f"c{i}" for i in range(10)]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(Q2(x), res.Q(x))
        assert torch.equal(loaded.model(x), res.P(x))
    return report


@pytest.mark.parametrize("method", ["maskaq", "mimiq", "psaq", "noise", "real"])
def test_end_to_end_each_method(method, ckpt, image_dir, tmp_path):
    rc = RunConfig(model=ckpt, method=method, preset="tiny", seed=1,
                   calib_data=str(image_dir) if method == "real" else None)
    res = run_pipeline(rc, tmp_path / "run", progress=False)
    report = _check_outputs(res, method)
    plan = report["plan"]
    cal = report["losses"]["calibration"]
    if method == "psaq":
        assert plan["ptq"] == "minmax" and cal is None
    else:
        assert len(cal["epochs"]) == PRESETS["tiny"].calib.epochs and cal["steps"]
    if method == "maskaq":  # refresh every epoch: two synthesis rounds, Q used by L_MAA
        assert plan["synth_uses_q"] and plan["refresh"]
        assert sorted(report["losses"]["synthesis"]) == ["0", "1"]
        assert plan["calib"]["head_mask"] == "topk"
    elif method in ("mimiq", "psaq"):
        assert not plan["synth_uses_q"] and not plan["refresh"] and list(report["losses"]["synthesis"]) == ["0"]
        assert plan["synth"]["objective"] == method
        if method == "mimiq":
            assert plan["calib"]["head_mask"] == "none"
    else:
        assert plan["synth"] is None and report["losses"]["synthesis"] == {}


def test_real_from_tensor_and_errors(ckpt, tmp_path):
    data = torch.randn(6, 3, 32, 32)
    res = run_pipeline(RunConfig(model=ckpt, method="real", preset="tiny", seed=1), tmp_path / "a",
                       progress=False, real_data=data)
    assert res.report["losses"]["calibration"]["epochs"][0]["images"] == 6
    with pytest.raises(PipelineError, match="calib_data"):
        run_pipeline(RunConfig(model=ckpt, method="real", preset="tiny"), tmp_path / "b", progress=False)
    with pytest.raises(PipelineError, match="shape"):
        run_pipeline(RunConfig(model=ckpt, method="real", preset="tiny"), tmp_path / "c", progress=False,
                     real_data=torch.randn(4, 1, 28, 28))


def test_existing_checkpoints_need_resume(ckpt, tmp_path):
    rc = RunConfig(model=ckpt, method="noise", preset="tiny", seed=1)
    run_pipeline(rc, tmp_path, progress=False)
    with pytest.raises(PipelineError, match="--resume"):
        run_pipeline(rc, tmp_path, progress=False)
    # resuming a finished run redoes nothing and gives the same model
    again = run_pipeline(rc, tmp_path, progress=False, resume=True)
    assert again.calib.resumed_from == PRESETS["tiny"].calib.epochs
    other = RunConfig(model=ckpt, method="noise", preset="tiny", seed=2)
    with pytest.raises(PipelineError, match="differs in: seed"):
        run_pipeline(other, tmp_path, progress=False, resume=True)


def test_resume_equals_uninterrupted(ckpt, tmp_path, monkeypatch):
    """Interrupt once inside calibration and once while synthesising a refresh round; the
    resumed run ends with exactly the model of an uninterrupted run with the same seed."""
    rc = RunConfig(model=ckpt, method="maskaq", preset="tiny", seed=1,
                   overrides={"calib.epochs": 4, "calib.refresh_every": 2, "calib.warmup_gate_epochs": 0})
    full = run_pipeline(rc, tmp_path / "full", progress=False)

    real_calibrate, real_synth = pipeline.calibrate, pipeline.synthesize

    def calib_stop(*a, **k):
        def stop(epoch, rec):
            if epoch == 0:
                raise KeyboardInterrupt
        return real_calibrate(*a, on_epoch_end=stop, **k)

    def synth_stop(*a, **k):
        if k["round"] == 1:
            raise KeyboardInterrupt
        return real_synth(*a, **k)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(pipeline, "calibrate", calib_stop)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(rc, out, progress=False)
    monkeypatch.setattr(pipeline, "calibrate", real_calibrate)
    monkeypatch.setattr(pipeline, "synthesize", synth_stop)
    with pytest.raises(KeyboardInterrupt):  # epochs 1 done, then the refresh at epoch 2 is cut
        run_pipeline(rc, out, progress=False, resume=True)
    monkeypatch.setattr(pipeline, "synthesize", real_synth)
    res = run_pipeline(rc, out, progress=False, resume=True)
    a, b = full.Q.state_dict(), res.Q.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    def losses(r):
        return [{k: v for k, v in e.items() if k != "time_s"} for e in r.report["losses"]["calibration"]["epochs"]]

    assert losses(res) == losses(full)
    assert res.report["resumed"] and not full.report["resumed"]
    assert sorted(res.report["losses"]["synthesis"]) == ["0", "1"]
    assert len(list((out / "ckpt").glob("synth_r*.pt"))) == 1  # only the current round is kept


# --- presets, overrides, plans --------------------------------------------------------------

def test_presets_and_overrides():
    assert set(PRESETS) == {"paper", "cpu", "tiny"}
    paper = get_preset("paper")
    assert (paper.num_images, paper.synth.steps, paper.synth.batch_size) == (10_000, 2000, 32)
    assert (paper.calib.epochs, paper.calib.batch_size, paper.calib.refresh_every) == (200, 16, 30)
    p = apply_overrides(get_preset("cpu"), {"synth.steps": "60", "calib.epochs": 3, "num_images": "48",
                                            "calib.augment": "none", "synth.use_de": "false",
                                            "synth.betas": "0.5,0.9", "calib.lr": "2e-3"})
    assert (p.synth.steps, p.calib.epochs, p.num_images, p.calib.augment) == (60, 3, 48, "none")
    assert p.synth.use_de is False and p.synth.betas == (0.5, 0.9) and p.calib.lr == 2e-3
    assert get_preset("cpu").synth.steps != 60  # presets are not mutated
    with pytest.raises(PresetError, match=r"unknown override key 'synth.stepz'.*valid synth settings:.*steps"):
        apply_overrides(paper, {"synth.stepz": 1})
    with pytest.raises(PresetError, match=r"unknown override key 'optim.lr'.*num_images, synth.<setting>.*quant.softmax_quant"):
        apply_overrides(paper, {"optim.lr": 1})
    with pytest.raises(PresetError, match="calib.epochs='three'.*int"):
        apply_overrides(paper, {"calib.epochs": "three"})
    with pytest.raises(PresetError, match="head_mask"):
        apply_overrides(paper, {"calib.head_mask": "random"})
    with pytest.raises(PresetError, match="unknown preset 'fast'; valid: paper, cpu, tiny"):
        get_preset("fast")
    assert parse_overrides(["synth.steps=50", " calib.epochs = 3"]) == {"synth.steps": "50", "calib.epochs": "3"}
    with pytest.raises(PresetError, match="KEY=VALUE"):
        parse_overrides(["synth.steps"])
    assert "calib.refresh_every" in override_keys() and "synth.use_maa" in override_keys()


def test_run_config_and_plans(ckpt):
    rc = RunConfig(model="fmnist_vit", method="maskaq", ablations=("no_de", "no_maa", "no_calib_mask", "no_refresh"))
    plan = resolve_plan(rc)
    assert plan.synth.objective == "maskaq" and not plan.synth.use_de and not plan.synth.use_maa
    assert plan.calib.head_mask == "none" and not plan.refresh and not plan.synth_uses_q
    full = resolve_plan(RunConfig(model="fmnist_vit"))
    assert full.synth.use_de and full.synth.use_maa and full.synth_uses_q and full.refresh
    assert full.calib.head_mask == "topk" and full.preset.name == "cpu"
    # overrides have the last word over the method's settings
    assert resolve_plan(RunConfig(model="x", method="mimiq", overrides={"calib.head_mask": "topk"})).calib.head_mask == "topk"
    assert RunConfig.from_json(rc.to_json()) == rc
    assert json.loads(json.dumps(rc.to_json()))["ablations"] == ["no_de", "no_maa", "no_calib_mask", "no_refresh"]
    with pytest.raises(PipelineError, match="unknown method .maskq.; valid: maskaq, mimiq, psaq, psaq_maskaq_settings, spdfq, noise, real"):
        RunConfig(model="x", method="maskq")
    with pytest.raises(PipelineError, match="apply to method 'maskaq' only"):
        RunConfig(model="x", method="mimiq", ablations=("no_de",))
    with pytest.raises(PipelineError, match="unknown ablation"):
        RunConfig(model="x", ablations=("no_iha",))
    with pytest.raises(PipelineError, match="unknown override key"):
        RunConfig(model="x", overrides={"calib.epoch": 3})
    with pytest.raises(PipelineError, match="unknown preset"):
        RunConfig(model="x", preset="fast")
    with pytest.raises(ValueError, match="bit width"):
        RunConfig(model="x", w_bits=9)


# --- real images ----------------------------------------------------------------------------

def test_image_loading_matches_timm_eval_transform(image_dir):
    from timm.data import create_transform

    dcfg = DataConfig((3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")
    tf = create_transform(input_size=(3, 32, 32), interpolation="bicubic", mean=dcfg.mean, std=dcfg.std,
                          crop_pct=0.875, crop_mode="center", is_training=False)
    for path in sorted(image_dir.rglob("*.png"))[:3]:
        with Image.open(path) as im:
            ref = tf(im.convert("RGB"))
        assert torch.allclose(load_image(path, dcfg), ref, atol=1e-6)
    grey = DataConfig((1, 28, 28), (0.286,), (0.353,), 1.0, "bilinear")
    assert load_image(next(image_dir.rglob("*.png")), grey).shape == (1, 28, 28)

    loop = image_folder_loop(image_dir, dcfg, batch_size=4, limit=5, seed=0)
    assert len(loop.files) == 5 and len(loop) == 2
    sizes = [b.shape for b in loop]
    assert sizes == [(4, 3, 32, 32), (1, 3, 32, 32)]
    loop.set_epoch(0)
    e0 = torch.cat(list(loop))
    loop.set_epoch(1)
    e1 = torch.cat(list(loop))
    assert not torch.equal(e0, e1) and torch.allclose(e0.sum(0), e1.sum(0), atol=1e-4)  # reshuffled
    assert len(image_folder_loop(image_dir, dcfg, 2).files) == 6  # recursive, non-images skipped


def test_image_folder_errors(tmp_path):
    dcfg = DataConfig((3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(PipelineError, match="does not exist"):
        image_folder_loop(tmp_path / "missing", dcfg, 4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(PipelineError, match="no images"):
        image_folder_loop(tmp_path / "empty", dcfg, 4)
