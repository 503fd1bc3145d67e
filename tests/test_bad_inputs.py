"""Every bad input a new user can give either command (``maskaq-export``, classifier and dense,
and ``maskaq-eval``) is refused the same way: exit status 2, exactly one line on stderr
(``PROG: error: ...`` naming what is wrong), no traceback, and nothing left behind: no output,
no run folder, no temp file, neither where the output would go nor beside the inputs (issue 15).

Run in-process through click's test runner (fast: each case fails before any work)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "runtime_eval"))

import rteval_helpers as H  # noqa: E402

from export.cli import main as export_main  # noqa: E402
from maskaq.models import ASSETS, LOCAL_ALIASES, load_model, save_checkpoint  # noqa: E402
from runtime_eval.cli import main as eval_main  # noqa: E402

TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10)


def listing(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input file the cases point at, made once: broken checkpoints, a NaN checkpoint of
    fmnist_vit, a garbage calibrated state, the ONNX and data fixtures of maskaq-eval."""
    d = tmp_path_factory.mktemp("inputs")
    ref = torch.load(ASSETS / LOCAL_ALIASES["fmnist_vit"], map_location="cpu", weights_only=True)
    sd = {k: v.clone() for k, v in ref["state_dict"].items()}
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(sd, d / "nan.pt")
    torch.manual_seed(0)
    lm = load_model("vit_tiny_patch16_224", pretrained=False, **TINY_ARGS)
    save_checkpoint(d / "tiny.maskaq.pt", lm.model, "vit_tiny_patch16_224", TINY_ARGS, lm.data_config)
    torch.save({k: v for k, v in lm.model.state_dict().items()}, d / "tiny_sd.pt")  # wrong shapes for fmnist_vit
    obj = torch.load(d / "tiny.maskaq.pt", weights_only=True)
    torch.save({k: v for k, v in obj.items() if k != "architecture"}, d / "noarch.maskaq.pt")
    torch.save({k: v for k, v in obj.items() if k != "data_config"}, d / "nodcfg.maskaq.pt")
    (d / "garbage.pth").write_bytes(b"not a checkpoint")
    (d / "garbage_state.pt").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"format": "something/else"}, d / "other_state.pt")
    (d / "notadir").write_text("a file")
    H.fashion_fixture(d / "fm", n=20)
    H.grey_classifier(d / "q.onnx", qdq=True, narrow_clip_bits=4)
    (d / "corrupt.onnx").write_bytes(b"\x08\x01 not onnx")
    (d / "flat").mkdir()
    H.save_jpeg(H.solid((1, 2, 3)), d / "flat" / "one.jpg")
    return d


X = "export"
E = "eval"
# (command, argv with {i} = inputs folder and {w} = the (empty) working folder, needle in the line)
CASES = [
    # --- maskaq-export: options
    (X, "fmnist_vit --bits 9 -o {w}/m.onnx", "bit width 9"),
    (X, "fmnist_vit --bits 4 --a-bits 1 -o {w}/m.onnx", "bit width 1"),
    (X, "fmnist_vit --bits 0 -o {w}/m.onnx", "bit width 0"),
    (X, "fmnist_vit --bits four -o {w}/m.onnx", "'four' is not a valid integer"),
    (X, "fmnist_vit -o {w}/m.onnx", "--bits"),
    (X, "fmnist_vit --bits 4", "--output"),
    (X, "--bits 4 -o {w}/m.onnx", "MODEL"),
    (X, "no_such_model --bits 4 -o {w}/m.onnx", "unknown model 'no_such_model'"),
    (X, "fmnist_vit --bits 4 --method magic -o {w}/m.onnx", "--method"),
    (X, "fmnist_vit --bits 4 --preset huge -o {w}/m.onnx", "--preset"),
    (X, "fmnist_vit --bits 4 --profile coreml -o {w}/m.onnx", "--profile"),
    (X, "fmnist_vit --bits 4 --device tpu -o {w}/m.onnx", "device 'tpu'"),
    (X, "fmnist_vit --bits 4 --seed x -o {w}/m.onnx", "'x' is not a valid integer"),
    (X, "fmnist_vit --bits 4 --opset 11 -o {w}/m.onnx", "opset 11"),
    (X, "fmnist_vit --bits 4 --weight-only-int4 --opset 20 -o {w}/m.onnx", "opset >= 21"),
    (X, "fmnist_vit --bits 4 --block-size 64 -o {w}/m.onnx", "--weight-only-int4"),
    (X, "fmnist_vit --bits 4 --weight-only-int4 --block-size 48 -o {w}/m.onnx", "--block-size"),
    (X, "fmnist_vit --bits 4 -q -v -o {w}/m.onnx", "--quiet and --verbose"),
    (X, "fmnist_vit --bits 4 --nope -o {w}/m.onnx", "No such option"),
    # --- output and run folders
    (X, "fmnist_vit --bits 4 -o {w}/missing/m.onnx", "output directory"),
    (X, "fmnist_vit --bits 4 -o {w}", "is a directory"),
    (X, "fmnist_vit --bits 4 --run-dir {w}/no/run -o {w}/m.onnx", "run directory parent"),
    (X, "fmnist_vit --bits 4 --resume -o {w}/m.onnx", "nothing to resume"),
    # --- settings (--set): validated at parse time
    (X, "fmnist_vit --bits 4 --set synth.nope=1 -o {w}/m.onnx", "unknown override key"),
    (X, "fmnist_vit --bits 4 --set synth.steps -o {w}/m.onnx", "KEY=VALUE"),
    (X, "fmnist_vit --bits 4 --set calib.epochs=many -o {w}/m.onnx", "does not fit"),
    (X, "fmnist_vit --bits 4 --set calib.epochs=0 -o {w}/m.onnx", "calib.epochs=0 is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.lr=-1 -o {w}/m.onnx", "synth.lr=-1.0 is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.lr=inf -o {w}/m.onnx", "synth.lr=inf is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.lr_min=-1 -o {w}/m.onnx", "synth.lr_min=-1.0 is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.betas=2,3 -o {w}/m.onnx", "synth.betas=2,3 is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.betas=0.9 -o {w}/m.onnx", "2 comma-separated values"),
    (X, "fmnist_vit --bits 4 --set synth.jitter=-3 -o {w}/m.onnx", "synth.jitter=-3 is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.steps=0 -o {w}/m.onnx", "steps must be an integer >= 1"),
    (X, "fmnist_vit --bits 4 --set synth.weight_decay=-1 -o {w}/m.onnx", "synth.weight_decay=-1.0 is invalid"),
    (X, "fmnist_vit --bits 4 --set synth.mask_drop=1 -o {w}/m.onnx", "mask_drop"),
    (X, "fmnist_vit --bits 4 --set synth.objective=magic -o {w}/m.onnx", "objective 'magic'"),
    (X, "fmnist_vit --bits 4 --set num_images=0 -o {w}/m.onnx", "num_images"),
    (X, "fmnist_vit --bits 4 --set calib.lr=0 -o {w}/m.onnx", "calib.lr=0.0 is invalid"),
    (X, "fmnist_vit --bits 4 --set calib.momentum=1 -o {w}/m.onnx", "calib.momentum"),
    (X, "fmnist_vit --bits 4 --set calib.head_mask=most -o {w}/m.onnx", "calib.head_mask"),
    # --- weights
    (X, "deit_t --bits 4 --checkpoint {w}/nope.pth -o {w}/m.onnx", "does not exist"),
    (X, "fmnist_vit --bits 4 --checkpoint {i}/nan.pt -o {w}/m.onnx", "'blocks.0.attn.qkv.weight'"),
    (X, "fmnist_vit --bits 4 --checkpoint {i}/tiny_sd.pt -o {w}/m.onnx", "does not match the model"),
    (X, "fmnist_vit --bits 4 --checkpoint {i}/tiny.maskaq.pt -o {w}/m.onnx", "not the 'fmnist_vit' architecture"),
    (X, "fmnist_vit --bits 4 --checkpoint {i}/garbage.pth -o {w}/m.onnx", "cannot read checkpoint"),
    (X, "{i}/noarch.maskaq.pt --bits 4 -o {w}/m.onnx", "lacks 'architecture'"),
    (X, "{i}/nodcfg.maskaq.pt --bits 4 -o {w}/m.onnx", "lacks 'data_config'"),
    (X, "{i}/tiny.maskaq.pt --bits 4 --checkpoint {i}/tiny_sd.pt -o {w}/m.onnx", "--checkpoint does not apply"),
    (X, "fmnist_vit --bits 4 --checkpoint {i}/nan.pt --random-weights -o {w}/m.onnx", "exclude each other"),
    # --- calibration data, calibrated states
    (X, "fmnist_vit --bits 4 --method real -o {w}/m.onnx", "--calib-data"),
    (X, "fmnist_vit --bits 4 --method real --calib-data {w}/none -o {w}/m.onnx", "does not exist"),
    (X, "fmnist_vit --bits 4 --calib-data {i}/flat -o {w}/m.onnx", "--method real only"),
    (X, "--from-state {w}/nope.pt -o {w}/m.onnx", "does not exist"),
    (X, "--from-state {i}/garbage_state.pt -o {w}/m.onnx", "cannot read calibrated state"),
    (X, "--from-state {i}/other_state.pt -o {w}/m.onnx", "not a maskaq calibrated state"),
    (X, "--from-state {i}/other_state.pt --bits 4 -o {w}/m.onnx", "--bits does not apply"),
    # --- maskaq-export, dense models
    (X, "tiny_upernet --random-weights --bits 9 -o {w}/seg", "bit width 9"),
    (X, "tiny_upernet --bits 4 -o {w}/seg", "--random-weights"),
    (X, "tiny_upernet --random-weights --bits 4 --input-size 0x5 -o {w}/seg", "--input-size"),
    (X, "tiny_upernet --random-weights --bits 4 --set calib.epochs=0 -o {w}/seg", "calib.epochs=0 is invalid"),
    (X, "tiny_upernet --random-weights --bits 4 --set synth.lr=-1 -o {w}/seg", "synth.lr=-1.0 is invalid"),
    (X, "tiny_upernet --random-weights --bits 4 --resume -o {w}/seg", "nothing to resume"),
    (X, "tiny_upernet --random-weights --bits 4 -q -v -o {w}/seg", "--quiet and --verbose"),
    # --- maskaq-eval
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm -o /no/such/dir/r.json", "does not exist"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm -o {w}/sub/r.json", "does not exist"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm -o {i}/notadir/r.json", "is not a folder"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm -o {w}", "is a folder"),
    (E, "{w}/none.onnx -t fashion-mnist -d {i}/fm -o {w}/r.json", "model file not found"),
    (E, "{i}/corrupt.onnx -t fashion-mnist -d {i}/fm -o {w}/r.json", "corrupt.onnx"),
    (E, "{i}/q.onnx -t cifar -d {i}/fm -o {w}/r.json", "unknown task 'cifar'"),
    (E, "{i}/q.onnx -d {i}/fm -o {w}/r.json", "Missing option"),
    (E, "{i}/q.onnx -t fashion-mnist -d {w}/nope -o {w}/r.json", "fashion-mnist data folder not found"),
    (E, "{i}/q.onnx -t imagefolder -d {i}/flat -o {w}/r.json", "holds 1 image but"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --mode fast -o {w}/r.json", "valid: reference, deploy"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --limit many -o {w}/r.json", "'many' is not a valid integer"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --provider NoSuchEP -o {w}/r.json", "not available"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --latency --latency-batch 1,x -o {w}/r.json", "not an integer"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --seg-mode tiles -o {w}/r.json", "--seg-mode"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --fp32 {w}/none.onnx -o {w}/r.json", "none.onnx"),
    (E, "{i}/q.onnx -t fashion-mnist -d {i}/fm --nope -o {w}/r.json", "No such option"),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 40
    assert sum(c == X for c, _, _ in CASES) >= 20 and sum(c == E for c, _, _ in CASES) >= 15


@pytest.mark.parametrize("cmd,argv,needle", CASES, ids=[f"{c}: {a.split(' -o ')[0]}" for c, a, _ in CASES])
def test_bad_input_exit_2_one_line_nothing_left(tmp_path, inputs, cmd, argv, needle):
    w = tmp_path / "work"
    w.mkdir()
    before = listing(w, inputs)
    args = [a.format(i=inputs, w=w) for a in argv.split()]
    r = CliRunner().invoke(export_main if cmd == X else eval_main, args + (["-q"] if cmd == E else []))
    prog = "maskaq-export" if cmd == X else "maskaq-eval"
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout and r.stdout == ""
    assert listing(w, inputs) == before  # no output, no run folder, no temp file
