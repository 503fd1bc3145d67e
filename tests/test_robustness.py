"""Runs that survive their user (issue 15): Ctrl-C and SIGTERM keep the checkpoints and say how to
resume; ``--resume`` says what it reuses; long phases report progress off a terminal; settings and
weights are checked before any work; the files a run writes are byte-reproducible.

One test per defect of the issue, each failing on the code before it; plus a real
``maskaq-export`` subprocess interrupted with SIGINT mid-synthesis and resumed to the same bytes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import maskaq.pipeline as pipeline
from export.cli import main
from maskaq.calibration import CalibConfig, CalibError
from maskaq.io import atomic_torch_save
from maskaq.models import ASSETS, LOCAL_ALIASES, ModelError, check_finite_weights, load_model, save_checkpoint
from maskaq.progress import LineProgress
from maskaq.synthesis import SynthConfig

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10)
FAST = ["--bits", "4", "--preset", "tiny", "--set", "num_images=4", "--set", "synth.steps=1",
        "--set", "calib.epochs=1", "--seed", "3"]


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, **TINY_ARGS)
    p = d / "tiny.maskaq.pt"
    save_checkpoint(p, lm.model, "vit_tiny_patch16_224", TINY_ARGS, lm.data_config)
    return p


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_ckpt):
    """The same tiny run twice, in different folders (progress lines every step)."""
    out = []
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(name)
        r = invoke(tiny_ckpt, *FAST, "-o", d / "m.onnx", env={"MASKAQ_PROGRESS_EVERY": "0"})
        assert r.exit_code == 0, r.output
        out.append((d, r))
    return out


# --- 1. Ctrl-C / SIGTERM keep the checkpoints and say how to resume -----------------------------

def _stop_in_calibration(monkeypatch, how):
    def stop(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "calibrate", stop)


@pytest.mark.parametrize("how,code,name", [("ctrl-c", 130, "SIGINT"), ("sigterm", 143, "SIGTERM")])
def test_interrupt_keeps_checkpoints_and_prints_the_resume_command(tmp_path, tiny_ckpt, monkeypatch, how, code,
                                                                    name):
    _stop_in_calibration(monkeypatch, how)
    out = tmp_path / "m.onnx"
    # what the handlers were before the run (SIG_IGN for SIGINT when pytest runs in the background)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    r = invoke(tiny_ckpt, *FAST, "-q", "-o", out)
    assert r.exit_code == code, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"maskaq-export: interrupted ({name}); checkpoints kept in ")
    assert line.endswith(f"resume with: maskaq-export {tiny_ckpt} {' '.join(FAST)} -q -o {out} --resume")
    assert (tmp_path / "m.run" / "ckpt" / "synth_r000.pt").is_file()  # the synthesis is kept
    assert not out.exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


def test_interrupt_before_any_checkpoint_leaves_nothing(tmp_path, tiny_ckpt, monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_model", stop)
    r = invoke(tiny_ckpt, *FAST, "-o", tmp_path / "m.onnx")
    assert r.exit_code == 130
    (line,) = r.stderr.strip().splitlines()
    assert "before the first checkpoint was written; nothing kept" in line
    assert list(tmp_path.iterdir()) == []


def test_failure_after_work_keeps_the_checkpoints(tmp_path, tiny_ckpt, monkeypatch):
    def fail(*a, **k):
        raise CalibError("calibration went wrong (test)")

    monkeypatch.setattr(pipeline, "calibrate", fail)
    r = invoke(tiny_ckpt, *FAST, "-q", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert "calibration went wrong" in line and "checkpoints kept" in line and "--resume" in line
    assert (tmp_path / "m.run" / "ckpt" / "synth_r000.pt").is_file()


# --- 2. --checkpoint with a local alias is loaded, never ignored --------------------------------

def test_checkpoint_with_a_local_alias_is_loaded(tmp_path):
    ref = torch.load(ASSETS / LOCAL_ALIASES["fmnist_vit"], map_location="cpu", weights_only=True)
    sd = {k: v.clone() for k, v in ref["state_dict"].items()}
    sd["head.bias"] += 1.0
    torch.save(sd, tmp_path / "w.pt")
    shipped = load_model("fmnist_vit")
    lm = load_model("fmnist_vit", checkpoint=tmp_path / "w.pt")
    assert torch.equal(lm.model.head.bias, shipped.model.head.bias + 1.0)
    assert lm.source["checkpoint"] == str(tmp_path / "w.pt") and lm.data_config == shipped.data_config
    torch.manual_seed(0)
    rnd = load_model("fmnist_vit", pretrained=False)  # --random-weights is not ignored either
    assert not torch.equal(rnd.model.head.weight, shipped.model.head.weight)


# --- 3. checkpoint keys, synthesis settings ------------------------------------------------------

@pytest.mark.parametrize("drop", ["architecture", "data_config"])
def test_maskaq_checkpoint_missing_a_key_is_a_model_error(tmp_path, tiny_ckpt, drop):
    obj = torch.load(tiny_ckpt, weights_only=True)
    del obj[drop]
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(ModelError, match=f"lacks '{drop}'"):
        load_model(str(tmp_path / "c.pt"))


@pytest.mark.parametrize("kw,needle", [
    (dict(lr=-1.0), "synth.lr=-1.0"), (dict(lr_min=-1.0), "synth.lr_min"), (dict(betas=(2.0, 3.0)), "synth.betas"),
    (dict(jitter=-3), "synth.jitter=-3"), (dict(jitter_late=1.5), "synth.jitter_late"),
    (dict(adam_eps=0.0), "synth.adam_eps"), (dict(beta=float("nan")), "synth.beta"), (dict(w_tv=-1.0), "synth.w_tv"),
])
def test_synth_config_is_validated_like_calib_config(kw, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        SynthConfig(**kw)
    SynthConfig(lr=5e-4)  # below the default lr_min: a floor above lr is allowed (cosine rises), not refused


# --- 4. calib.epochs=0 ----------------------------------------------------------------------------

def test_zero_calibration_epochs_refused_at_parse_time():
    with pytest.raises(CalibError, match="calib.epochs=0 is invalid; valid: an integer >= 1"):
        CalibConfig(epochs=0)
    with pytest.raises(pipeline.PipelineError, match="calib.epochs=0"):
        pipeline.RunConfig(model="fmnist_vit", preset="tiny", overrides={"calib.epochs": "0"})


# --- 5. signs of life off a terminal; --resume says what it reuses, or refuses -----------------

def test_line_progress_says_phase_done_total_elapsed_eta(capsys, monkeypatch):
    import maskaq.progress

    monkeypatch.setattr(maskaq.progress, "_PREFIX", "")
    bar = LineProgress(10, "synthesis round 0", "step", every=0)
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("synthesis round 0: 1/10 steps (10%), 0:00 elapsed, ETA ")
    assert lines[-1].startswith("synthesis round 0: 10/10 steps, done in 0:00")
    quiet = LineProgress(1000, "calibration", "epoch", every=10)  # rate-limited: only the closing line
    for _ in range(1000):
        quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err.strip().splitlines() == [lines[-1].replace("synthesis round 0: 10/10 steps",
                                                                              "calibration: 1000/1000 epochs")]
    unfinished = LineProgress(5, "calibration", "epoch", every=10)
    unfinished.update(2)
    unfinished.close()  # interrupted phase: no "done" line
    assert capsys.readouterr().err == ""


def test_cli_run_reports_every_phase_off_a_terminal(two_runs):
    (_, r), _ = two_runs
    err = r.stderr
    for phase in ("synthesis round 0: ", "calibration: "):
        assert f"maskaq-export: {phase}" in err, err
    assert "ETA" in err or "done in" in err


def test_resume_says_what_it_reuses_and_gives_the_same_bytes(two_runs, tiny_ckpt):
    (d, _), _ = two_runs
    onnx_before = (d / "m.onnx").read_bytes()
    r = invoke(tiny_ckpt, *FAST, "--resume", "-o", d / "m.onnx")
    assert r.exit_code == 0, r.output
    assert ("maskaq-export: resuming " + repr(str(d / "m.run")) +
            ": reusing synthesis round 0 (done); calibration: 1 of 1 epoch") in r.stderr
    assert (d / "m.onnx").read_bytes() == onnx_before


def test_resume_with_nothing_to_resume_refuses(tmp_path, tiny_ckpt):
    r = invoke(tiny_ckpt, *FAST, "--resume", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert "nothing to resume" in line and "without --resume" in line
    assert list(tmp_path.iterdir()) == []


def test_verbose_logs_the_steps(tmp_path, tiny_ckpt):
    r = invoke(tiny_ckpt, *FAST, "-v", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
    assert "maskaq-export: info: run: maskaq 4w4a" in r.stderr


# --- 6. non-finite weights: once, up front, naming the tensor ------------------------------------

def test_nonfinite_weights_are_found_before_synthesis(tmp_path, monkeypatch):
    ref = torch.load(ASSETS / LOCAL_ALIASES["fmnist_vit"], map_location="cpu", weights_only=True)
    sd = {k: v.clone() for k, v in ref["state_dict"].items()}
    sd["blocks.1.mlp.fc1.bias"][3] = float("inf")
    torch.save(sd, tmp_path / "inf.pt")

    def never(*a, **k):
        raise AssertionError("synthesis ran on non-finite weights")

    monkeypatch.setattr(pipeline, "synthesize", never)
    out = tmp_path / "o"
    out.mkdir()
    r = invoke("fmnist_vit", "--bits", "4", "--checkpoint", tmp_path / "inf.pt", "-o", out / "m.onnx")
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert "non-finite weights" in line and "'blocks.1.mlp.fc1.bias'" in line and "1 Inf" in line
    assert list(out.iterdir()) == []
    with pytest.raises(ModelError, match="'blocks.1.mlp.fc1.bias'"):
        lm = load_model("fmnist_vit", checkpoint=tmp_path / "inf.pt")
        check_finite_weights(lm.model)


# --- 8. byte-reproducible calibrated.pt; tensorrt at 4 bit says what it writes ------------------

def test_calibrated_state_is_byte_reproducible(two_runs, tmp_path):
    (a, _), (b, _) = two_runs
    assert (a / "m.run" / "calibrated.pt").read_bytes() == (b / "m.run" / "calibrated.pt").read_bytes()
    assert (a / "m.onnx").read_bytes() == (b / "m.onnx").read_bytes()
    obj = {"w": torch.arange(6.0).view(2, 3)}
    atomic_torch_save(obj, tmp_path / "one.pt")
    atomic_torch_save(obj, tmp_path / "two.pt")
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()


def test_tensorrt_at_4_bit_says_it_writes_int8(two_runs, tmp_path):
    (a, _), _ = two_runs
    out = tmp_path / "trt.onnx"
    r = invoke("--from-state", a / "m.run" / "calibrated.pt", "--profile", "tensorrt", "-o", out)
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if "--profile tensorrt writes the 4-bit grids as int8" in ln]
    assert len(warn) == 1, r.stderr
    rep = json.loads((tmp_path / "trt.report.json").read_text())
    low = rep["tensorrt_low_bit_storage"]
    assert low["storage"] == "int8" and low["weight_bits"] == [4] and low["weight_quantizers"] > 0
    r8 = invoke("--from-state", a / "m.run" / "calibrated.pt", "-o", tmp_path / "ort.onnx")
    assert "grids as int8" not in r8.stderr
    assert json.loads((tmp_path / "ort.report.json").read_text())["tensorrt_low_bit_storage"] is None


# --- a real process, a real Ctrl-C ---------------------------------------------------------------

def _export(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "export.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigint_mid_synthesis_then_resume_gives_the_same_bytes(tmp_path, tiny_ckpt):
    # two synthesis batches of 300 steps (seconds each): SIGINT once the first is checkpointed
    args = [tiny_ckpt, "--bits", "4", "--preset", "tiny", "--set", "num_images=8", "--set", "synth.steps=300",
            "--set", "calib.epochs=1", "--seed", "1"]
    out = tmp_path / "run" / "m.onnx"
    out.parent.mkdir()
    p = _export([*args, "-o", out])
    batch0 = tmp_path / "run" / "m.run" / "ckpt" / "synth_r000" / "batch_00000.pt"
    t0 = time.monotonic()
    while not batch0.is_file():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 240, "no synthesis checkpoint appeared"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    (line,) = err.strip().splitlines()
    assert line.startswith("maskaq-export: interrupted (SIGINT); checkpoints kept in ")
    assert "synthesis round 0: 1 of 2 batches" in line, line  # interrupted mid-synthesis
    cmd = line.split("resume with: ", 1)[1]
    assert cmd.startswith("maskaq-export ") and cmd.endswith(f"-o {out} --resume")
    assert batch0.is_file() and not out.exists()
    assert not list((tmp_path / "run").rglob("*.tmp"))  # no half-written file

    resumed = _export(cmd.split()[1:])
    _, err2 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err2
    assert "reusing synthesis round 0: 1 of 2 batches" in err2

    ref_out = tmp_path / "ref" / "m.onnx"
    ref_out.parent.mkdir()
    ref = _export([*args, "-q", "-o", ref_out])
    _, err3 = ref.communicate(timeout=300)
    assert ref.returncode == 0, err3
    assert out.read_bytes() == ref_out.read_bytes()
    assert (out.parent / "m.run" / "calibrated.pt").read_bytes() == (ref_out.parent / "m.run" / "calibrated.pt").read_bytes()
