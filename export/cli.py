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
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_common import PRESETS, _check_device, _Command, _fail, _setup_logging, _sha256, _warn

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
  # continue an interrupted run (same command plus --resume):
  maskaq-export fmnist_vit --bits 4 -o fmnist_4w4a.onnx --resume

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
        return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                            standalone_mode=standalone_mode, **extra)


def _out_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("") if out.suffix.lower() == ".onnx" else out
    return {"onnx": out, "encodings": Path(f"{stem}.encodings.json"), "report": Path(f"{stem}.report.json"),
            "run": Path(f"{stem}.run")}


def _check_model_name(name: str) -> None:
    from maskaq.models import LOCAL_ALIASES, resolve_name

    if name in LOCAL_ALIASES or os.path.isfile(name):
        return
    resolve_name(name)  # raises ModelError listing what would work


def _hub_offline_if_unreachable(model: str) -> None:
    """Make the Hugging Face hub fail fast (cache only) when it cannot be reached, instead of
    ~45 s of retries per file printed on stderr; loading then either finds the weights in the
    cache or fails with one line saying how to supply them."""
    import socket

    from maskaq.models import LOCAL_ALIASES

    if model in LOCAL_ALIASES or os.path.isfile(model):
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
@click.option("--a-bits", "a_bits", type=int, default=None, metavar="A", help="Activation bit width, 2-8.")
@click.option("--method", type=click.Choice(METHODS), default="maskaq", show_default=True,
              help="Method (maskaq.recipes): " + "; ".join(f"{n}: {r.title}" for n, r in RECIPES.items()) + ".")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True,
              help="Budget: cpu (minutes on a laptop), paper (the paper's), tiny (tests).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. synth.steps=200, calib.epochs=5, num_images=512 (repeatable).")
@click.option("--checkpoint", default=None, metavar="PATH", help="Local weights (.pth/.pt/.safetensors) for MODEL.")
@click.option("--calib-data", default=None, metavar="DIR", help="Folder of images for --method real.")
@click.option("--profile", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True,
              help="ort: exact CQDQ for ONNX Runtime; tensorrt: symmetric int8, narrow weights.")
@click.option("--weight-only-int4", is_flag=True, help="Write a weight-only INT4 model (opset 21, float activations).")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default=None,
              help="INT4 block size along the reduction axis [default: 32].")
@click.option("--opset", type=int, default=None, metavar="N", help="ONNX opset [default: 20; 21 with INT4].")
@click.option("--keep-first-last-8bit", is_flag=True, help="Patch embedding and classifier head at 8 bit.")
@click.option("--seed", type=int, default=0, show_default=True, help="The one seed of every random choice.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N", help="Where to compute.")
@click.option("--run-dir", default=None, metavar="DIR", help="Run directory [default: OUT.run/].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints.")
@click.option("--from-state", default=None, metavar="calibrated.pt",
              help="Re-export a finished run's calibrated state (no synthesis, no calibration).")
@click.option("--random-weights", is_flag=True, help="Random model weights (speed tests).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, no summary.")
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="Output ONNX file.")
@click.pass_context
def main(ctx: click.Context, model: str | None, w_bits: int | None, a_bits: int | None, method: str, preset: str,
         overrides: tuple[str, ...], checkpoint: str | None, calib_data: str | None, profile: str,
         weight_only_int4: bool, block_size: str | None, opset: int | None, keep_first_last_8bit: bool, seed: int,
         device: str, run_dir: str | None, resume: bool, from_state: str | None, random_weights: bool,
         quiet: bool, output: str) -> None:
    """Quantize a Vision Transformer without data (MaskAQ) and export it as a QDQ ONNX file.

    MODEL is an alias (fmnist_vit, deit_t, deit_s, deit_b, vit_t, vit_s, vit_b, swin_t, swin_s),
    a timm model name, or a maskaq checkpoint file. Dense models (swin_t_mask_rcnn,
    swin_t_upernet) take their own options and write a directory: maskaq-export swin_t_upernet --help.
    """
    t_start = time.perf_counter()
    _setup_logging(quiet)
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
    if block is not None and not weight_only_int4:
        raise click.UsageError("--block-size applies to --weight-only-int4 only")
    if weight_only_int4 and block is None:
        block = 32
    if opset is not None:
        if opset not in SUPPORTED_OPSETS:
            raise click.UsageError(f"opset {opset} is not supported; valid: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
        if weight_only_int4 and opset < INT4_OPSET:
            raise click.UsageError(f"--weight-only-int4 needs --opset >= {INT4_OPSET}")
    device = _check_device(device)

    from maskaq.pipeline import PipelineError, RunConfig, load_calibrated, run_pipeline

    from maskaq.calibration import CalibError
    from maskaq.synthesis import SynthesisError

    known = (PipelineError, ModelError, QuantError, PresetError, CalibError, SynthesisError, ExportError)
    report: dict[str, Any] = {"schema": "maskaq-export-report/1",
                              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.params.items()}}
    timings: dict[str, Any] = {}
    try:
        if from_state is not None:
            clash = [f"--{n.replace('_', '-')}" for n in ("w_bits", "a_bits", "method", "preset", "overrides", "checkpoint",
                                                         "calib_data", "keep_first_last_8bit", "seed", "run_dir",
                                                         "resume", "random_weights") if _given(ctx, n)]
            clash = [c.replace("--w-bits", "--bits").replace("--overrides", "--set") for c in clash]
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
            trt = profile == "tensorrt" and not weight_only_int4
            rc = RunConfig(model=model, checkpoint=checkpoint, method=method, w_bits=w_bits,
                           a_bits=a_bits if a_bits is not None else w_bits,
                           symmetric_activations=trt, narrow_weights=trt,
                           keep_first_last_8bit=keep_first_last_8bit, preset=preset,
                           overrides=parse_overrides(overrides), seed=seed, calib_data=calib_data,
                           random_weights=random_weights)
            run_path = Path(run_dir) if run_dir else paths["run"]
            created = not run_path.exists()
            if run_dir and not run_path.parent.is_dir():
                _fail(f"run directory parent {str(run_path.parent)!r} does not exist")
            t0 = time.perf_counter()
            try:
                res = run_pipeline(rc, run_path, resume=resume, device=device, progress=not quiet)
            except BaseException:
                if created and not resume:  # nothing half-written: drop the run directory we made
                    shutil.rmtree(run_path, ignore_errors=True)
                raise
            timings["pipeline_s"] = round(time.perf_counter() - t0, 3)
            timings["pipeline"] = res.report.get("timings")
            Q, loaded, state_path = res.Q, res.loaded, res.state_path
            report["pipeline"] = {"run_dir": str(run_path), "run_json": str(run_path / "run.json"),
                                  "state": str(state_path), "samples_png": str(res.samples_png),
                                  "losses": res.report.get("losses")}

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
        export_cfg = {"profile": profile, "opset": opset, "weight_only_int4": weight_only_int4, "block_size": block}
        t0 = time.perf_counter()
        from .onnx_export import export_onnx

        result = export_onnx(
            Q, out, data_config=loaded.data_config, profile=profile, opset=opset,
            metadata={"method": rc.method, "seed": rc.seed, "config": {"run": rc.to_json(), "export": export_cfg}},
            labels=loaded.labels, source=loaded.source, weight_only_int4_block=block if weight_only_int4 else None,
        )
        timings["export_s"] = round(time.perf_counter() - t0, 3)
        timings["export"] = {k: round(v, 3) for k, v in result.timings.items()}
    except click.UsageError:
        raise
    except known as e:
        _fail(str(e))

    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    report.update({
        "config": {"run": rc.to_json(), "export": export_cfg},
        "seed": rc.seed,
        "export": result.to_json(),
        "tensorrt_conversion": cost,
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
        tag = "int4-weight-only" if weight_only_int4 else profile
        click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {tag}, opset {result.opset}, "
                   f"{result.num_quantizers} quantizers) in {timings['total_s']:.1f} s")
        click.echo(f"      {result.encodings_path}, {paths['report']}; run directory {run_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
