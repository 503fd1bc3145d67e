"""``maskaq-analyse``: which quantizers lose the accuracy (per-quantizer sensitivity report).

Reads a finished run's calibrated state (``OUT.run/calibrated.pt``, no re-calibration) and its
calibration samples, and writes ``<stem>.json`` (sorted table), ``<stem>.txt`` (one screen, also
printed) and ``<stem>.png`` (bar chart), keyed by the quantizer names the ONNX tensors carry.
Bad input prints one line, ``maskaq-analyse: error: ...``, and exits with status 2.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_common import _check_device, _one_line

PROG = "maskaq-analyse"


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"{PROG}: error: {_one_line(msg)}", err=True)
    sys.exit(code)


class _AnalyseCommand(click.Command):
    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name or PROG, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            _fail(f"{e.format_message()} (see {PROG} --help)")
        except (click.exceptions.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


EPILOG = """\b
Examples:
  maskaq-export fmnist_vit --bits 4 -o fmnist_4w4a.onnx
  maskaq-analyse fmnist_4w4a.run/calibrated.pt            # -> fmnist_4w4a.run/sensitivity.{json,txt,png}
  maskaq-analyse fmnist_4w4a.run/calibrated.pt -n 128 --data val_images/ -o fmnist_sens
  # then keep the worst at 8 bit in one re-run:
  maskaq-export fmnist_vit --bits 4 --keep-8bit blocks.7.mlp.fc2.input_quantizer head -o fixed.onnx
"""


@click.command(cls=_AnalyseCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                                    "max_content_width": 100})
@click.argument("state", metavar="calibrated.pt")
@click.option("-n", "--num-images", type=int, default=32, show_default=True, help="Images to measure on.")
@click.option("--data", default=None, metavar="DIR",
              help="Folder of images to measure on [default: the run's own calibration samples].")
@click.option("-o", "--output", default=None, metavar="STEM",
              help="Write STEM.json, STEM.txt, STEM.png [default: <run dir>/sensitivity].")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per forward pass.")
@click.option("--top", type=int, default=20, show_default=True, help="Rows in the printed table.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N", help="Where to compute.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no table on stdout.")
def main(state: str, num_images: int, data: str | None, output: str | None, batch_size: int, top: int,
         device: str, quiet: bool) -> None:
    """Per-quantizer sensitivity of a calibrated model: SQNR of every quantized tensor against P's
    float tensor, and the output KL / top-1 agreement with P when only that quantizer is on."""
    from maskaq.calibration import CalibError
    from maskaq.models import ModelError
    from maskaq.pipeline import PipelineError, load_calibrated
    from maskaq.quant import QuantError
    from maskaq.sensitivity import analyse_quantizers, calibration_images, format_text, write_report

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if num_images <= 0:
        raise click.UsageError(f"--num-images must be positive, got {num_images}")
    if batch_size <= 0:
        raise click.UsageError(f"--batch-size must be positive, got {batch_size}")
    if data is not None and not Path(data).is_dir():
        _fail(f"image folder {data!r} does not exist")
    device = _check_device(device)
    run_dir = Path(state).parent
    stem = Path(output) if output else run_dir / "sensitivity"
    if not (stem.parent if str(stem.parent) else Path(".")).is_dir():
        _fail(f"output directory {str(stem.parent)!r} does not exist")
    t0 = time.perf_counter()
    try:
        Q, loaded, rc = load_calibrated(state, device)
        imgs, src = calibration_images(run_dir, rc, loaded.data_config, num_images, data)
        if tuple(imgs.shape[1:]) != tuple(loaded.data_config.input_size):
            _fail(f"the images are {tuple(imgs.shape[1:])} but the model takes {tuple(loaded.data_config.input_size)}")
        res = analyse_quantizers(Q, imgs.to(device), batch_size=batch_size, progress=not quiet)
    except (PipelineError, ModelError, QuantError, CalibError, ValueError) as e:
        _fail(str(e))
    res["images"] = {"count": int(imgs.shape[0]), "source": src}
    res["model"] = {"name": loaded.name, "source": loaded.source, "state": str(state)}
    res["run_config"] = rc.to_json()
    paths = write_report(res, stem)
    if not quiet:
        click.echo(format_text(res, top=top), nl=False)
        click.echo(f"wrote {paths['json']}, {paths['text']}, {paths['png']} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
