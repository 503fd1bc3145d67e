"""``maskaq-export`` for the dense models (Mask R-CNN / Cascade Mask R-CNN / UperNet, Swin-T):
quantize data-free,
calibrate on the dense outputs, export the graphs the numpy/ORT harness (``maskaq-eval --task
coco|ade20k``) scores.

``maskaq-export MODEL ...`` hands over to this command when MODEL is a dense alias
(``swin_t_mask_rcnn``, ``swin_t_cascade_mask_rcnn``, ``swin_t_upernet``; ``tiny_mask_rcnn``,
``tiny_cascade_mask_rcnn``, ``tiny_upernet`` for tests).

Writes the directory ``OUT_DIR/`` (atomically: built beside it, then renamed): Mask R-CNN ->
``backbone_neck.onnx``, ``rpn_head.onnx``, ``bbox_head.onnx``, ``mask_head.onnx``; Cascade Mask
R-CNN -> ``backbone_neck.onnx``, ``rpn_head.onnx``, ``bbox_head_{0,1,2}.onnx``,
``mask_head_{0,1,2}.onnx``; ADE20K ->
``upernet.onnx``; each quantized part with its ``.encodings.json``; and ``report.json``. The run
directory ``OUT_DIR.run/`` holds ``calibrated.pt``, ``params.json``, ``run.json``,
``samples.png`` and the checkpoints ``--resume`` continues from.

Bad input prints one line, ``maskaq-export: error: ...``, on stderr and exits with status 2,
without a traceback and without leaving files behind.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import click

from .cli_common import PRESETS, _check_device, _Command, _fail, _interrupted, _kept_or_removed, _plan_totals, _resume_line, \
    _setup_logging, _sha256

from maskaq.recipes import RECIPES, method_names  # noqa: E402

DENSE_METHODS = method_names(dense=True)

DENSE_EPILOG = """\b
Examples:
  # UperNet Swin-T (mmseg checkpoint), backbone at 4 bit, MaskAQ synthesis at 512x512:
  maskaq-export swin_t_upernet --checkpoint upernet_swin_t.pth --bits 4 -o upernet_4w4a/
  # Mask R-CNN Swin-T, neck and heads quantized too, a smaller synthesis/calibration size:
  maskaq-export swin_t_mask_rcnn --checkpoint mask_rcnn_swin_t.pth --bits 4 --a-bits 8 \\
      --quantize all --input-size 512x512 --canvas 800x1344 --device cuda -o mrcnn_4w8a/
  # Cascade Mask R-CNN Swin-T (3x), backbone at 4 bit; 8 graphs (3 box and 3 mask heads):
  maskaq-export swin_t_cascade_mask_rcnn --checkpoint cascade_mask_rcnn_swin_t.pth --bits 4 -o cascade_4w4a/
  # score them (the directory or its backbone_neck.onnx):
  maskaq-eval mrcnn_4w8a/backbone_neck.onnx --task coco --data COCO_DIR
  maskaq-eval cascade_4w4a/ --task coco --data COCO_DIR
  maskaq-eval upernet_4w4a/upernet.onnx --task ade20k --data ADE_DIR

\b
Outputs: OUT_DIR/ (graphs, .encodings.json sidecars, report.json) and the run directory
OUT_DIR.run/ (--run-dir). Profile: ort (exact CQDQ).
"""

_HW = re.compile(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*")


def _hw(value: str | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    m = _HW.fullmatch(value)
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise click.UsageError(f"{what} {value!r} is not HxW (e.g. 512x512)")
    return int(m.group(1)), int(m.group(2))


def is_dense_model(name: str | None) -> bool:
    from maskaq.dense.quantize import DENSE_MODELS

    return name in DENSE_MODELS


@click.command(cls=_Command, epilog=DENSE_EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", metavar="MODEL")
@click.option("--checkpoint", default=None, metavar="PATH", help="mmdet / mmseg weights (.pth) for MODEL.")
@click.option("--random-weights", is_flag=True, help="Seeded random weights (tests, speed runs).")
@click.option("--bits", "w_bits", type=int, required=True, metavar="W",
              help="Weight bit width, 2-8 (also the activation width unless --a-bits).")
@click.option("--a-bits", "a_bits", type=int, default=None, metavar="A", help="Activation bit width, 2-8.")
@click.option("--method", type=click.Choice(DENSE_METHODS), default="maskaq", show_default=True,
              help="Method (maskaq.recipes): " + "; ".join(f"{n}: {RECIPES[n].title}" for n in DENSE_METHODS) + ".")
@click.option("--quantize", "scope", type=click.Choice(("backbone", "all")), default="backbone", show_default=True,
              help="backbone: the Swin backbone; all: the neck and heads too.")
@click.option("--input-size", default=None, metavar="HxW",
              help="Synthesis / calibration image size [default: 800x1344 (Cascade) Mask R-CNN, 512x512 UperNet].")
@click.option("--canvas", default=None, metavar="HxW",
              help="Fixed input size of the exported graphs [default: --input-size; COCO detectors: rounded up to 32].")
@click.option("--test-scale", default=None, metavar="LONGxSHORT",
              help="The harness's test resize scale written into the graphs [default: 1333x800 COCO, 2048x512 ADE20K].")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True,
              help="Budget: cpu, paper, tiny (tests).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. synth.steps=200, calib.epochs=5, num_images=64 (repeatable).")
@click.option("--keep-first-last-8bit", is_flag=True, help="Patch embedding (and, with --quantize all, the predictors) at 8 bit.")
@click.option("--opset", type=int, default=20, show_default=True, metavar="N", help="ONNX opset (18-23).")
@click.option("--seed", type=int, default=0, show_default=True, help="The one seed of every random choice.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N", help="Where to compute.")
@click.option("--run-dir", default=None, metavar="DIR", help="Run directory [default: OUT_DIR.run/].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints.")
@click.option("--quiet", "-q", is_flag=True, help="No progress, no summary (errors only).")
@click.option("--verbose", "-v", is_flag=True, help="Log every step (INFO) on stderr.")
@click.option("-o", "--output", required=True, metavar="OUT_DIR", help="Output directory (must not exist or be empty).")
@click.pass_context
def dense_main(ctx: click.Context, model: str, checkpoint: str | None, random_weights: bool, w_bits: int,
               a_bits: int | None, method: str, scope: str, input_size: str | None, canvas: str | None,
               test_scale: str | None, preset: str,
               overrides: tuple[str, ...], keep_first_last_8bit: bool, opset: int, seed: int, device: str,
               run_dir: str | None, resume: bool, quiet: bool, verbose: bool, output: str) -> None:
    """Quantize a dense Swin model (Mask R-CNN, Cascade Mask R-CNN, UperNet) without data and export
    its QDQ graphs.

    MODEL: swin_t_mask_rcnn, swin_t_cascade_mask_rcnn, swin_t_upernet (or tiny_mask_rcnn,
    tiny_cascade_mask_rcnn, tiny_upernet: tiny random models).
    """
    t_start = time.perf_counter()
    _setup_logging(quiet, verbose)
    argv = list(getattr(ctx.command, "argv", []) or [])
    from maskaq.calibration import CalibError
    from maskaq.dense.checkpoint import CheckpointError
    from maskaq.dense.quantize import DENSE_MODELS, DenseError, DenseRunConfig, run_dense_pipeline
    from maskaq.io import atomic_write_json
    from maskaq.models import ModelError
    from maskaq.pipeline import PipelineError
    from maskaq.presets import PresetError, parse_overrides
    from maskaq.quant import QuantError, check_bits
    from maskaq.synthesis import SynthesisError

    from .dense_export import DenseExportError, export_dense
    from .onnx_export import SUPPORTED_OPSETS, package_versions

    if model not in DENSE_MODELS:
        raise click.UsageError(f"unknown dense model {model!r}; valid: {', '.join(DENSE_MODELS)}")
    out = Path(output.rstrip("/") or output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"output {str(out)!r} already exists and is not an empty directory; remove it or choose another")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        _fail(f"output directory parent {str(parent)!r} does not exist")
    if checkpoint is None and not random_weights:
        raise click.UsageError(f"{model} needs --checkpoint PATH (its mmdet/mmseg weights) or --random-weights")
    if checkpoint is not None and random_weights:
        raise click.UsageError("--checkpoint and --random-weights exclude each other")
    if checkpoint is not None and not Path(checkpoint).is_file():
        _fail(f"checkpoint {checkpoint!r} does not exist or is not a file")
    if opset not in SUPPORTED_OPSETS:
        raise click.UsageError(f"opset {opset} is not supported; valid: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    task = DENSE_MODELS[model][0]
    hw = _hw(input_size, "--input-size") or DENSE_MODELS[model][3]
    cv = _hw(canvas, "--canvas")
    if cv is None:
        cv = (-(-hw[0] // 32) * 32, -(-hw[1] // 32) * 32) if task == "coco" else hw
    if task == "coco" and (cv[0] % 32 or cv[1] % 32):
        raise click.UsageError(f"--canvas {cv[0]}x{cv[1]} must be multiples of 32 for the COCO detectors")
    scale = _hw(test_scale, "--test-scale")
    device = _check_device(device)
    run_path = Path(run_dir) if run_dir else Path(f"{out}.run")
    if run_dir and not run_path.parent.is_dir():
        _fail(f"run directory parent {str(run_path.parent)!r} does not exist")

    known = (DenseError, CheckpointError, DenseExportError, QuantError, PresetError, PipelineError, CalibError,
             SynthesisError, ModelError)
    report: dict[str, Any] = {"schema": "maskaq-dense-export-report/1",
                              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()}}
    timings: dict[str, Any] = {}
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    created = False
    totals: tuple[int | None, int | None] = (None, None)
    try:
        check_bits(w_bits)
        check_bits(a_bits if a_bits is not None else w_bits)
        cfg = DenseRunConfig(model=model, checkpoint=checkpoint, method=method, w_bits=w_bits,
                             a_bits=a_bits if a_bits is not None else w_bits, keep_first_last_8bit=keep_first_last_8bit,
                             scope=scope, input_size=hw, preset=preset, overrides=parse_overrides(overrides), seed=seed,
                             random_weights=random_weights)
        totals = _plan_totals(cfg.plan())
        if resume:  # say what is reused, or refuse: nothing to resume / other settings
            _resume_line(run_path, cfg.to_json(), totals, quiet)
        created = not run_path.exists()
        t0 = time.perf_counter()
        try:
            res = run_dense_pipeline(cfg, run_path, resume=resume, device=device, progress=not quiet)
        except KeyboardInterrupt:
            raise
        except BaseException:
            if created and not _kept_or_removed(run_path, created, totals).startswith("checkpoints kept"):
                created = False  # removed: nothing half-written is left behind
            raise
        timings["pipeline_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            extra: dict[str, Any] = {"maskaq_run": {"config": cfg.to_json(), "seed": seed, "method": method,
                                                    "distill": res.report["distill"]}}
            paths = export_dense(res.Q.cpu(), task, tmp, cv, opset=opset, extra=extra, test_scale=scale)
            timings["export_s"] = round(time.perf_counter() - t0, 3)
            timings["total_s"] = round(time.perf_counter() - t_start, 3)
            files = {}
            for part, p in paths.items():
                enc = p.with_suffix(".encodings.json")
                files[part] = {"path": str(out / p.name), "bytes": p.stat().st_size, "sha256": _sha256(p),
                               "encodings": str(out / enc.name) if enc.is_file() else None}
            report.update({"config": cfg.to_json(), "task": task, "seed": seed, "input_size": list(hw),
                           "canvas": list(cv), "opset": opset, "distill": res.report["distill"],
                           "run_dir": str(run_path), "state": str(res.state_path), "files": files,
                           "timings": timings, "versions": package_versions()})
            atomic_write_json(tmp / "report.json", report)
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except click.UsageError:
        raise
    except KeyboardInterrupt as e:
        _interrupted(e, run_path, created, argv, totals)
    except known as e:
        kept = ""
        if created and run_path.exists():  # work was done: its checkpoints stay
            kept = f" ({_kept_or_removed(run_path, False, totals)}; fix the cause and rerun the same command with --resume)"
        _fail(f"{e}{kept}")
    if not quiet:
        size = sum(f["bytes"] for f in files.values())
        click.echo(f"wrote {out}/ ({', '.join(Path(f['path']).name for f in files.values())}; {size / 1e6:.2f} MB, "
                   f"{cfg.quant_config().tag}, scope {scope}, canvas {cv[0]}x{cv[1]}) in {timings['total_s']:.1f} s")
        click.echo(f"      run directory {run_path}; score with: maskaq-eval {out / next(iter(files.values()))['path'].split('/')[-1]} "
                   f"--task {task} --data DIR")


__all__ = ["dense_main", "is_dense_model"]
