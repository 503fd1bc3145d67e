"""``maskaq-export``: load -> quantize -> synthesise -> calibrate -> export, in one command.

Writes ``OUT.onnx`` (QDQ, docs/onnx-contract.md), ``OUT.encodings.json`` (AIMET layout),
``OUT.report.json`` (config, seed, timings, sizes) and the run directory ``OUT.run/``
(``calibrated.pt``, ``params.json``, ``run.json``, ``samples.png``, checkpoints).

Bad input prints one line, ``maskaq-export: error: ...``, on stderr and exits with status 2,
without a traceback and without leaving files behind.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_common import (PRESETS, _check_device, _Command, _fail, _interrupted, _kept_or_removed, _plan_totals, _resume_line,
                         _setup_logging, _sha256, _warn, expand_variadic)

from maskaq.recipes import RECIPES, method_names  # noqa: E402

METHODS = method_names()
BLOCK_SIZES = (32, 64, 128)

EPILOG = """\b
Examples:
  # 4-bit weights and activations, MaskAQ, the default cpu budget:
  maskaq-export fmnist_vit --bits 4 -o fmnist_4w4a.onnx
  # DeiT-T from a local weights file, 4-bit weights / 8-bit activations, paper budget, on a GPU:
  maskaq-export deit_t --checkpoint deit_tiny.pth --bits 4 --a-bits 8 --preset paper \\
      --device cuda -o deit_t_4w8a.onnx
  # the MimiQ baseline with a shorter synthesis:
  maskaq-export deit_t --checkpoint deit_tiny.pth --bits 4 --method mimiq --set synth.steps=200 -o mimiq.onnx
  # real-data calibration (upper bound) from a folder of images:
  maskaq-export vit_s --checkpoint vit_s.pth --bits 4 --method real --calib-data imgs/ -o real.onnx
  # calibrate for TensorRT (symmetric int8, narrow weights) from the start:
  maskaq-export deit_t --checkpoint deit_tiny.pth --bits 8 --profile tensorrt -o deit_trt.onnx
  # re-export a finished run to TensorRT / to a weight-only INT4 file, no re-synthesis:
  maskaq-export --from-state fmnist_4w4a.run/calibrated.pt --profile tensorrt -o fmnist_trt.onnx
  maskaq-export --from-state fmnist_4w4a.run/calibrated.pt --weight-only-int4 --block-size 32 -o w4.onnx
  # weight-only INT4 calibrated data-free in the file's own blocks (activations float throughout):
  maskaq-export fmnist_vit --bits 4 --weight-only --block-size 32 -o fmnist_w4.onnx
  # 4-bit per-channel weights stored as real INT4 initializers (half the file):
  maskaq-export fmnist_vit --bits 4 --weight-storage int4 -o fmnist_4w4a_int4.onnx
  # continue an interrupted run (same command plus --resume):
  maskaq-export fmnist_vit --bits 4 -o fmnist_4w4a.onnx --resume
  # your own ViT: a bare state dict (the tensors say the rest), your preprocessing and labels,
  # the float graph beside the quantized one, and the sensitivity report:
  maskaq-export vit_tiny_patch16_224 --checkpoint my_vit.pth --model-kwargs num_heads=4 \\
      --mean 0.286 --std 0.353 --labels classes.txt --bits 4 --fp32-out my_vit_fp32.onnx --analyse -o my_vit.onnx
  # a folder written by timm's save_for_hf / push_to_hf_hub (config.json + model.safetensors):
  maskaq-export ./my_vit_hf/ --bits 4 -o my_vit.onnx
  # fix the worst layers the report names, in one re-run:
  maskaq-export fmnist_vit --bits 4 --keep-8bit 'blocks.0.attn.*' head -o fmnist_mixed.onnx

\b
Outputs: OUT.onnx, OUT.encodings.json, OUT.report.json, run directory OUT.run/ (--run-dir).
A state calibrated with asymmetric activations is converted for --profile tensorrt (each range
widened to a symmetric one covering it; the report and a warning give the cost).
"""


class _ExportCommand(_Command):
    """``maskaq-export``: a dense model alias (``swin_t_upernet``, ``swin_t_mask_rcnn``...) hands
    the whole command line over to :func:`export.dense_cli.dense_main`."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        from maskaq.dense.quantize import DENSE_MODELS

        if any(a in DENSE_MODELS for a in argv):
            from .dense_cli import dense_main

            return dense_main.main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                   standalone_mode=standalone_mode, **extra)
        return super().main(args=expand_variadic(argv), prog_name=prog_name, complete_var=complete_var,
                            standalone_mode=standalone_mode, **extra)


def _out_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("") if out.suffix.lower() == ".onnx" else out
    return {"onnx": out, "encodings": Path(f"{stem}.encodings.json"), "report": Path(f"{stem}.report.json"),
            "run": Path(f"{stem}.run")}


def _check_model_name(name: str) -> None:
    from maskaq.models import LOCAL_ALIASES, resolve_name

    if name in LOCAL_ALIASES or os.path.isfile(name) or os.path.isdir(name):
        return
    resolve_name(name)  # raises ModelError listing what would work


def _hub_offline_if_unreachable(model: str) -> None:
    """Make the Hugging Face hub fail fast (cache only) when it cannot be reached, instead of
    ~45 s of retries per file printed on stderr; loading then either finds the weights in the
    cache or fails with one line saying how to supply them."""
    import socket

    from maskaq.models import LOCAL_ALIASES

    if model in LOCAL_ALIASES or os.path.exists(model):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    except Exception:  # noqa: BLE001 - hub not installed or another layout: nothing to switch
        pass


def conversion_cost(Q: Any, data_config: Any, n: int = 64, seed: int = 0) -> dict[str, Any]:
    """How much the TensorRT conversion changes Q's outputs, on ``n`` seeded N(0,1) inputs
    (no data needed): top-1 agreement and logit SQNR of converted vs calibrated fake-quant."""
    import torch

    from .profiles import convert_for_profile

    Qc, changes = convert_for_profile(Q, "tensorrt")
    dev = next(Q.parameters()).device
    x = torch.randn(n, *data_config.input_size, generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        a, b = Q.eval()(x).float(), Qc.eval()(x).float()
    err = (a - b).pow(2).mean().item()
    sqnr = math.inf if err == 0 else 10 * math.log10(a.pow(2).mean().item() / err)
    ratios = sorted(c.scale_ratio for c in changes if c.kind == "activation")
    return {
        "inputs": f"{n} N(0,1) images, seed {seed}",
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
        "logit_sqnr_db": sqnr,
        "activations_converted": len(ratios),
        "weights_narrowed": sum(c.kind == "weight" for c in changes),
        "weights_moved": sum(c.moved for c in changes),
        "step_ratio_median": ratios[len(ratios) // 2] if ratios else 1.0,
        "step_ratio_max": ratios[-1] if ratios else 1.0,
    }


def _given(ctx: click.Context, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@click.command(cls=_ExportCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--bits", "w_bits", type=int, default=None, metavar="W",
              help="Weight bit width, 2-8 (also the activation width unless --a-bits).")
@click.option("--a-bits", "a_bits", type=int, default=None, metavar="A",
              help="Activation bit width, 2-8; 16 (or 32) = float activations (weight-only, no activation quantizers).")
@click.option("--method", type=click.Choice(METHODS), default="maskaq", show_default=True,
              help="Method (maskaq.recipes): " + "; ".join(f"{n}: {r.title}" for n, r in RECIPES.items()) + ".")
@click.option("--ablation", "ablation", multiple=True, metavar="NAME",
              help="An ablation or variant of --method (repeatable): " + "; ".join(
                  f"{n}: {', '.join(r.ablations)}" for n, r in RECIPES.items() if r.ablations)
              + " (spdfq own_stage: SPDFQ's own learning stage, block-wise reconstruction + log2 softmax quantizer).")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True,
              help="Budget: cpu (minutes on a laptop), paper (the paper's), tiny (tests).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. synth.steps=200, calib.epochs=5, num_images=512 (repeatable); "
                   "quant.softmax_quant=log2: log2 quantizer for the attention probabilities (activations < 8 bit; "
                   "8-bit keeps the linear one; exports as float ops, profile ort only).")
@click.option("--checkpoint", default=None, metavar="PATH", help="Local weights (.pth/.pt/.safetensors) for MODEL.")
@click.option("--calib-data", default=None, metavar="DIR", help="Folder of images for --method real.")
@click.option("--profile", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True,
              help="ort: exact CQDQ for ONNX Runtime; tensorrt: symmetric int8, narrow weights.")
@click.option("--weight-only", is_flag=True,
              help="Weight-only flow: float activations during calibration (--a-bits 16), Linear weights calibrated "
                   "in the blocks of the INT4 file (--block-size), written as the weight-only INT4 model.")
@click.option("--weight-only-int4", is_flag=True,
              help="Write a weight-only INT4 model (opset 21, float activations); from a per-channel state: "
                   "round-to-nearest blocks.")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default=None,
              help="INT4 block size along the reduction axis [default: 32].")
@click.option("--patch-embed", type=click.Choice(["channel", "float"]), default="channel", show_default=True,
              help="Patch-embedding conv weight: per output channel (exact), or left in float.")
@click.option("--weight-storage", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="Per-channel weights of <= 4 bits as int8 (ORT's integer kernels take it) or opset-21 INT4 "
                   "initializers (half the size; see README).")
@click.option("--opset", type=int, default=None, metavar="N", help="ONNX opset [default: 20; 21 with INT4].")
@click.option("--keep-first-last-8bit", is_flag=True, help="Patch embedding and classifier head at 8 bit.")
@click.option("--keep-8bit", "keep_8bit", multiple=True, metavar="NAME|PATTERN ...",
              help="Keep these quantizers / layers at 8 bit (names as in the sensitivity report, fnmatch "
                   "patterns such as 'blocks.0.*'; several values, or comma-separated).")
@click.option("--model-kwargs", "model_kwargs", multiple=True, metavar="KEY=VALUE ...",
              help="timm constructor arguments (as timm's train.py), e.g. num_heads=4 mlp_ratio=2.0.")
@click.option("--num-classes", type=int, default=None, metavar="N", help="Classifier outputs (timm num_classes).")
@click.option("--img-size", default=None, metavar="N|HxW", help="Input size, square N or HxW (timm img_size).")
@click.option("--in-chans", type=int, default=None, metavar="C", help="Input channels (timm in_chans).")
@click.option("--mean", multiple=True, type=float, metavar="M ...", help="Normalisation mean (1 or C values), overriding the model's.")
@click.option("--std", multiple=True, type=float, metavar="S ...", help="Normalisation std (1 or C values), overriding the model's.")
@click.option("--crop-pct", type=float, default=None, metavar="F", help="Centre-crop fraction, overriding the model's (1.0 = no crop).")
@click.option("--interpolation", default=None, metavar="MODE",
              help="Resize interpolation, overriding the model's: bicubic, bilinear, nearest, lanczos, box, hamming.")
@click.option("--labels", "labels_file", default=None, metavar="FILE", help="Class names, one a line, in output order.")
@click.option("--fp32-out", default=None, metavar="FP32.onnx",
              help="Also write P's float graph (same metadata, input and output names) for maskaq-eval --fp32.")
@click.option("--analyse", is_flag=True,
              help="Also write the per-quantizer sensitivity report OUT.sensitivity.{json,txt,png} (see maskaq-analyse).")
@click.option("--seed", type=int, default=0, show_default=True, help="The one seed of every random choice.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N", help="Where to compute.")
@click.option("--run-dir", default=None, metavar="DIR", help="Run directory [default: OUT.run/].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints.")
@click.option("--from-state", default=None, metavar="calibrated.pt",
              help="Re-export a finished run's calibrated state (no synthesis, no calibration).")
@click.option("--random-weights", is_flag=True, help="Random model weights (speed tests).")
@click.option("--quiet", "-q", is_flag=True, help="No progress, no summary (errors only).")
@click.option("--verbose", "-v", is_flag=True, help="Log every step (INFO) on stderr.")
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="Output ONNX file.")
@click.pass_context
def main(ctx: click.Context, model: str | None, w_bits: int | None, a_bits: int | None, method: str, preset: str,
         overrides: tuple[str, ...], checkpoint: str | None, calib_data: str | None, profile: str,
         weight_only_int4: bool, block_size: str | None, opset: int | None, keep_first_last_8bit: bool, seed: int,
         device: str, run_dir: str | None, resume: bool, from_state: str | None, random_weights: bool,
         quiet: bool, verbose: bool, output: str, keep_8bit: tuple[str, ...] = (), model_kwargs: tuple[str, ...] = (),
         num_classes: int | None = None, img_size: str | None = None, in_chans: int | None = None,
         mean: tuple[float, ...] = (), std: tuple[float, ...] = (), crop_pct: float | None = None,
         interpolation: str | None = None, labels_file: str | None = None, fp32_out: str | None = None,
         analyse: bool = False, weight_only: bool = False, patch_embed: str = "channel",
         weight_storage: str = "int8", ablation: tuple[str, ...] = ()) -> None:
    """Quantize a Vision Transformer without data (MaskAQ) and export it as a QDQ ONNX file.

    MODEL is an alias (fmnist_vit, fmnist_vit_p7, fmnist_dinov2 (built once by
    benchmarks/build_dinov2_reference.py), deit_t, deit_s, deit_b, vit_t, vit_s, vit_b, swin_t, swin_s),
    a timm model name, or a maskaq checkpoint file. Dense models (swin_t_mask_rcnn,
    swin_t_upernet) take their own options and write a directory: maskaq-export swin_t_upernet --help.
    """
    t_start = time.perf_counter()
    _setup_logging(quiet, verbose)
    argv = list(getattr(ctx.command, "argv", []) or [])
    from maskaq.models import ModelError
    from maskaq.presets import PresetError, parse_overrides
    from maskaq.quant import QuantError, check_bits

    from .onnx_export import INT4_OPSET, SUPPORTED_OPSETS, ExportError

    out = Path(output)
    paths = _out_paths(out)
    if out.is_dir():
        raise click.UsageError(f"output {output!r} is a directory; give a file name such as {output.rstrip('/')}/model.onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        _fail(f"output directory {str(parent)!r} does not exist")
    block = int(block_size) if block_size is not None else None
    if block is not None and not (weight_only_int4 or weight_only):
        raise click.UsageError("--block-size applies to --weight-only / --weight-only-int4 only")
    if weight_only:
        if a_bits is not None and a_bits not in (16, 32):
            raise click.UsageError(f"--weight-only keeps activations float; --a-bits {a_bits} contradicts it")
        if from_state is not None:
            raise click.UsageError("--weight-only calibrates weights only; with --from-state use --weight-only-int4")
        a_bits = 16
        weight_only_int4 = True
    if weight_only_int4 and block is None:
        block = 32
    if weight_storage == "int4" and weight_only_int4:
        raise click.UsageError("--weight-storage applies to per-channel weights; the weight-only INT4 model "
                               "always stores its blocks as INT4")
    if opset is not None:
        if opset not in SUPPORTED_OPSETS:
            raise click.UsageError(f"opset {opset} is not supported; valid: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
        if weight_only_int4 and opset < INT4_OPSET:
            raise click.UsageError(f"--weight-only-int4 needs --opset >= {INT4_OPSET}")
        if weight_storage == "int4" and opset < INT4_OPSET:
            raise click.UsageError(f"--weight-storage int4 needs --opset >= {INT4_OPSET}")
    device = _check_device(device)
    if fp32_out is not None:
        f32 = Path(fp32_out)
        if f32.is_dir():
            raise click.UsageError(f"--fp32-out {fp32_out!r} is a directory; give a file name such as model_fp32.onnx")
        if not (f32.parent if str(f32.parent) else Path(".")).is_dir():
            _fail(f"--fp32-out directory {str(f32.parent)!r} does not exist")
        if f32.resolve() == out.resolve():
            raise click.UsageError("--fp32-out must differ from -o/--output")

    from maskaq.pipeline import PipelineError, RunConfig, load_calibrated, run_pipeline

    from maskaq.calibration import CalibError
    from maskaq.synthesis import SynthesisError

    known = (PipelineError, ModelError, QuantError, PresetError, CalibError, SynthesisError, ExportError)
    report: dict[str, Any] = {"schema": "maskaq-export-report/1",
                              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()}}
    timings: dict[str, Any] = {}
    run_path: Path | None = None
    created = False
    totals: tuple[int | None, int | None] = (None, None)
    try:
        if from_state is not None:
            clash = [f"--{n.replace('_', '-')}" for n in ("w_bits", "a_bits", "method", "ablation", "preset", "overrides", "checkpoint",
                                                         "calib_data", "keep_first_last_8bit", "seed", "run_dir",
                                                         "resume", "random_weights", "keep_8bit", "model_kwargs",
                                                         "num_classes", "img_size", "in_chans", "mean", "std",
                                                         "crop_pct", "interpolation", "labels_file") if _given(ctx, n)]
            clash = [c.replace("--w-bits", "--bits").replace("--overrides", "--set").replace("--labels-file", "--labels")
                     for c in clash]
            if clash:
                raise click.UsageError(f"--from-state re-exports a calibrated state; {', '.join(clash)} "
                                      f"{'does' if len(clash) == 1 else 'do'} not apply")
            t0 = time.perf_counter()
            Q, loaded, rc = load_calibrated(from_state, device)
            if model is not None and model not in (rc.model, loaded.name):
                _fail(f"MODEL {model!r} does not match the state's model {rc.model!r} (leave MODEL out with --from-state)")
            timings["load_state_s"] = round(time.perf_counter() - t0, 3)
            state_path, run_path = Path(from_state), Path(from_state).parent
            report["pipeline"] = {"from_state": str(state_path)}
        else:
            if model is None:
                raise click.UsageError("missing MODEL (or --from-state calibrated.pt)")
            if w_bits is None:
                raise click.UsageError("missing option '--bits'")
            check_bits(w_bits)
            if a_bits not in (16, 32):
                check_bits(a_bits if a_bits is not None else w_bits)
            if calib_data is not None and method != "real":
                raise click.UsageError("--calib-data applies to --method real only")
            if method == "real":
                if calib_data is None:
                    raise click.UsageError("--method real needs --calib-data DIR (a folder of images)")
                if not Path(calib_data).is_dir():
                    _fail(f"calibration image folder {calib_data!r} does not exist")
            if checkpoint is not None and not Path(checkpoint).is_file():
                _fail(f"checkpoint {checkpoint!r} does not exist or is not a file")
            if checkpoint is not None and random_weights:
                raise click.UsageError("--checkpoint and --random-weights exclude each other")
            _check_model_name(model)
            if checkpoint is None and not random_weights:
                _hub_offline_if_unreachable(model)
            model_args, preprocessing, labels = _byo_options(model_kwargs, num_classes, img_size, in_chans, mean,
                                                             std, crop_pct, interpolation, labels_file)
            trt = profile == "tensorrt" and not weight_only_int4
            rc = RunConfig(model=model, checkpoint=checkpoint, method=method, w_bits=w_bits,
                           a_bits=a_bits if a_bits is not None else w_bits,
                           symmetric_activations=trt, narrow_weights=trt,
                           keep_first_last_8bit=keep_first_last_8bit, preset=preset,
                           overrides=parse_overrides(overrides), seed=seed, calib_data=calib_data,
                           ablations=tuple(ablation),
                           random_weights=random_weights, model_args=model_args, keep_8bit=tuple(keep_8bit),
                           preprocessing=preprocessing, labels=labels,
                           weight_block=block if weight_only else None, patch_embed=patch_embed)
            if trt and rc.quant_config().log2_softmax:  # refuse before any work is done
                _fail("profile tensorrt needs pure Q/DQ, but quant.softmax_quant=log2 quantizes the attention "
                      "probabilities with float ops; use --profile ort, or quant.softmax_quant=linear")
            run_path = Path(run_dir) if run_dir else paths["run"]
            if run_dir and not run_path.parent.is_dir():
                _fail(f"run directory parent {str(run_path.parent)!r} does not exist")
            from maskaq.pipeline import resolve_plan

            totals = _plan_totals(resolve_plan(rc))
            if resume:  # say what is reused, or refuse: nothing to resume / other settings
                _resume_line(run_path, rc.to_json(), totals, quiet)
            created = not run_path.exists()
            t0 = time.perf_counter()
            try:
                res = run_pipeline(rc, run_path, resume=resume, device=device, progress=not quiet)
            except KeyboardInterrupt:
                raise
            except BaseException:
                if created and not _kept_or_removed(run_path, created, totals).startswith("checkpoints kept"):
                    created = False  # removed: nothing half-written is left behind
                raise
            timings["pipeline_s"] = round(time.perf_counter() - t0, 3)
            timings["pipeline"] = res.report.get("timings")
            Q, loaded, state_path = res.Q, res.loaded, res.state_path
            report["pipeline"] = {"run_dir": str(run_path), "run_json": str(run_path / "run.json"),
                                  "state": str(state_path), "samples_png": str(res.samples_png),
                                  "losses": res.report.get("losses")}

        from .profiles import low_bit_storage, pure_qdq_refusal

        refusal = None if weight_only_int4 else pure_qdq_refusal(Q, profile)
        if refusal:
            _fail(refusal)
        low_bit = None if weight_only_int4 else low_bit_storage(Q, profile)
        if low_bit is not None:
            _warn(f"--profile tensorrt writes the {'/'.join(map(str, sorted(set(low_bit['weight_bits'] + low_bit['activation_bits']))))}"
                  f"-bit grids as int8 ({low_bit['weight_quantizers']} weight and {low_bit['activation_quantizers']} "
                  "activation quantizers; weights as int8 holding only the low-bit values, activations clipped to "
                  "the low-bit range before an int8 Q/DQ): TensorRT has no sub-8-bit type, so it computes the "
                  "low-bit model with int8 kernels and int8 weight memory; use --profile ort or "
                  "--weight-only-int4 for 4-bit storage", quiet)
        cost = None
        if profile == "tensorrt" and not weight_only_int4:
            cost = conversion_cost(Q, loaded.data_config)
            if cost["activations_converted"] or cost["weights_narrowed"]:
                _warn(f"converted for TensorRT: {cost['activations_converted']} activation ranges widened to "
                      f"symmetric (step x{cost['step_ratio_median']:.2f} median, x{cost['step_ratio_max']:.2f} max), "
                      f"{cost['weights_narrowed']} weight grids narrowed ({cost['weights_moved']} weights moved); "
                      f"top-1 agreement with the calibrated model {100 * cost['top1_agreement']:.1f}%, "
                      f"logit SQNR {cost['logit_sqnr_db']:.1f} dB on noise inputs (a sensitivity hint, not an accuracy: "
                      f"measure that with maskaq-eval; details in the report)", quiet)
        export_cfg = {"profile": profile, "opset": opset, "weight_only_int4": weight_only_int4, "block_size": block,
                      "weight_storage": weight_storage, "patch_embed": patch_embed}
        t0 = time.perf_counter()
        from .onnx_export import export_onnx

        result = export_onnx(
            Q, out, data_config=loaded.data_config, profile=profile, opset=opset,
            metadata={"method": rc.method, "seed": rc.seed, "config": {"run": rc.to_json(), "export": export_cfg}},
            labels=loaded.labels, source=loaded.source, weight_only_int4_block=block if weight_only_int4 else None,
            weight_storage=weight_storage, patch_embed=patch_embed,
        )
        if result.partial_blocks:
            _warn(f"{len(result.partial_blocks)} Linear weights are not a multiple of --block-size {block} along "
                  f"their input ({', '.join(result.partial_blocks[:2])}...): ONNX Runtime runs the file, OpenVINO "
                  "rejects it; choose a block size that divides every input width", quiet)
        timings["export_s"] = round(time.perf_counter() - t0, 3)
        timings["export"] = {k: round(v, 3) for k, v in result.timings.items()}
        fp32_result = None
        if fp32_out is not None:
            t0 = time.perf_counter()
            try:
                fp32_result = export_onnx(
                    loaded.model, Path(fp32_out), data_config=loaded.data_config, profile="ort", opset=opset,
                    metadata={"method": "fp32", "seed": rc.seed, "config": {"run": rc.to_json(), "export": export_cfg},
                              "fp32_of": out.name},
                    labels=loaded.labels, source=loaded.source, write_encodings=False,
                )
            except BaseException:
                for f in (result.path, result.encodings_path):  # nothing half-written
                    Path(f).unlink(missing_ok=True)
                raise
            timings["fp32_export_s"] = round(time.perf_counter() - t0, 3)
        sensitivity = None
        if analyse:
            from maskaq.sensitivity import analyse_quantizers, calibration_images, write_report

            t0 = time.perf_counter()
            imgs, img_src = calibration_images(run_path, rc, loaded.data_config, 32)
            sens = analyse_quantizers(Q, imgs.to(device), progress=not quiet)
            sens["images"] = {"count": int(imgs.shape[0]), "source": img_src}
            sens["model"] = {"name": loaded.name, "source": loaded.source, "state": str(state_path)}
            stem = out.with_suffix("") if out.suffix.lower() == ".onnx" else out
            sensitivity = write_report(sens, Path(f"{stem}.sensitivity"))
            timings["analyse_s"] = round(time.perf_counter() - t0, 3)
    except click.UsageError:
        raise
    except KeyboardInterrupt as e:
        if run_path is None:
            raise
        _interrupted(e, run_path, created, argv, totals)
    except known as e:
        kept = ""
        if created and run_path is not None and run_path.exists():  # work was done: its checkpoints stay
            kept = f" ({_kept_or_removed(run_path, False, totals)}; fix the cause and rerun the same command with --resume)"
        _fail(f"{e}{kept}")

    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    report.update({
        "config": {"run": rc.to_json(), "export": export_cfg},
        "seed": rc.seed,
        "export": result.to_json(),
        "tensorrt_conversion": cost,
        "tensorrt_low_bit_storage": low_bit,
        "model": {"name": loaded.name, "model_args": loaded.model_args, "data_config": loaded.data_config.to_json(),
                  "labels": loaded.labels, "source": loaded.source},
        "fp32": None if fp32_result is None else fp32_result.to_json(),
        "sensitivity": sensitivity,
        "timings": timings,
        "files": {
            "onnx": {"path": str(result.path), "bytes": result.size_bytes, "sha256": _sha256(result.path)},
            "encodings": {"path": str(result.encodings_path), "bytes": result.encodings_path.stat().st_size},
            "report": str(paths["report"]),
            "run_dir": str(run_path),
            "state": str(state_path),
        },
    })
    from maskaq.io import atomic_write_json

    from .onnx_export import package_versions

    report["versions"] = package_versions()
    atomic_write_json(paths["report"], report)
    if not quiet:
        tag = result.profile
        click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {tag}, opset {result.opset}, "
                   f"{result.num_quantizers} quantizers) in {timings['total_s']:.1f} s")
        click.echo(f"      {result.encodings_path}, {paths['report']}; run directory {run_path}")
        if fp32_result is not None:
            click.echo(f"      float graph {fp32_result.path} ({fp32_result.size_bytes / 1e6:.2f} MB)")
        if sensitivity is not None:
            click.echo(f"      sensitivity report {sensitivity['text']} (+ .json, .png)")


def _byo_options(model_kwargs: tuple[str, ...], num_classes: int | None, img_size: str | None,
                 in_chans: int | None, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float | None,
                 interpolation: str | None, labels_file: str | None
                 ) -> tuple[dict[str, Any], dict[str, Any], list[str] | None]:
    """timm's flags -> (model_args, preprocessing overrides, labels); one-line errors on clashes."""
    from maskaq.byo import INTERPOLATIONS, parse_img_size, parse_model_kwargs, read_labels

    args = parse_model_kwargs(model_kwargs)
    for key, flag, val in (("num_classes", "--num-classes", num_classes), ("in_chans", "--in-chans", in_chans),
                           ("img_size", "--img-size", None if img_size is None else parse_img_size(img_size))):
        if val is None:
            continue
        if key in ("num_classes", "in_chans") and val <= 0:
            raise click.UsageError(f"{flag} must be positive, got {val}")
        if key in args and args[key] != val:
            raise click.UsageError(f"{flag} {val} contradicts --model-kwargs {key}={args[key]!r}; give one")
        args[key] = val
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise click.UsageError(f"--crop-pct {crop_pct} is out of range; valid: 0 < F <= 1 (1.0 = no crop)")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise click.UsageError(f"--interpolation {interpolation!r} is unknown; valid: {', '.join(INTERPOLATIONS)}")
    if std and any(v <= 0 for v in std):
        raise click.UsageError(f"--std values must be positive, got {list(std)}")
    pre = {"mean": list(mean) or None, "std": list(std) or None, "crop_pct": crop_pct, "interpolation": interpolation}
    labels = read_labels(labels_file) if labels_file is not None else None
    return args, {k: v for k, v in pre.items() if v is not None}, labels


if __name__ == "__main__":  # pragma: no cover
    main()
