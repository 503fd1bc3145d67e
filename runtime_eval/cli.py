"""``maskaq-eval``: the command line of :func:`runtime_eval.evaluate`.

Bad input (options, model, data) prints one line, ``maskaq-eval: error: ...``, on stderr and
exits with status 2, without a traceback and without writing a report.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .errors import EvalError
from .runner import TASKS

PROG = "maskaq-eval"


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"{PROG}: error: {_one_line(msg)}", err=True)
    sys.exit(code)


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


class _Command(click.Command):
    """Click command whose usage errors and EvalErrors are one line and exit status 2."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or PROG,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.UsageError as e:
            hint = f" (see {PROG} --help)"
            _fail(e.format_message() + hint)
        except EvalError as e:
            _fail(str(e))
        except (click.exceptions.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", metavar="MODEL.onnx")  # or a dense detection export directory
@click.option("--task", "-t", required=True, metavar="TASK", help=f"One of: {', '.join(TASKS)}.")
@click.option(
    "--data",
    "-d",
    default=None,
    metavar="PATH",
    help="Dataset folder (fashion-mnist: default /usr/share/datasets/fashion-mnist).",
)
@click.option(
    "--output", "-o", default=None, metavar="REPORT.json", help="Write the JSON report here."
)
@click.option(
    "--fp32",
    default=None,
    metavar="FP32.onnx",
    help="Float model to evaluate in the same run; deltas reported (quant - fp32, pp).",
)
@click.option(
    "--mode",
    default=None,
    metavar="MODE",
    help="reference (default with ort): exact fake-quant (session.disable_quant_qdq=1); "
    "deploy: ORT's fused integer kernels. OpenVINO is always deploy (its int8 kernels).",
)
@click.option(
    "--runtime",
    default="ort",
    show_default=True,
    type=click.Choice(["ort", "openvino"]),
    help="ort: ONNX Runtime; openvino: OpenVINO's CPU plugin (pip install 'maskaq[openvino]').",
)
@click.option(
    "--precision",
    default=None,
    type=click.Choice(["f32", "bf16"]),
    help="--runtime openvino only: the CPU plugin's INFERENCE_PRECISION_HINT for the float "
    "parts. Default f32, so results compare with ORT; OpenVINO's own default is bf16 on CPUs "
    "with AMX/AVX512-BF16.",
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    metavar="EP",
    help="Execution provider (cpu, cuda, tensorrt or a full ORT name); repeatable or "
    "comma-separated. Default: CUDA if usable, else CPU.",
)
@click.option("--batch-size", "-b", default=32, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="Evaluate only N images (evenly spaced).")
@click.option(
    "--split", default=None, help="fashion-mnist: test|train; ade20k: validation; coco: val2017."
)
@click.option(
    "--workers", default=None, type=int, help="Preprocessing threads (default: CPUs, max 8)."
)
@click.option(
    "--threads",
    default=0,
    show_default=True,
    type=int,
    help="ORT intra-op threads (0 = ORT default).",
)
@click.option(
    "--graph-opt",
    default="all",
    show_default=True,
    help="ORT graph optimisation level: disable, basic, extended, all.",
)
@click.option(
    "--seg-mode",
    default=None,
    type=click.Choice(["whole", "slide"]),
    help="ADE20K maskaq dense (UperNet) exports: whole-image or sliding-window inference "
    "(default: the export's own test_cfg).",
)
@click.option(
    "--class-order",
    default=None,
    type=click.Choice(["sorted"]),
    help="imagefolder: class index = sorted folder order (timm's default), instead of matching "
    "folder names to the model's labels.",
)
@click.option(
    "--class-map",
    default=None,
    metavar="FILE",
    help="imagefolder: folder name -> output index (one folder name a line, as timm; or JSON "
    "{folder: index or label}).",
)
@click.option("--latency", is_flag=True, help="Also time the model alone on random input.")
@click.option(
    "--latency-batch", default="1,32", show_default=True, help="Batch sizes for --latency."
)
@click.option(
    "--latency-iters", default=50, show_default=True, type=int, help="Timed runs per batch size."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="Log details (INFO) to stderr.")
def main(
    model: str,
    task: str,
    data: str | None,
    output: str | None,
    fp32: str | None,
    mode: str | None,
    runtime: str,
    precision: str | None,
    providers: tuple[str, ...],
    batch_size: int,
    limit: int | None,
    split: str | None,
    workers: int | None,
    threads: int,
    graph_opt: str,
    seg_mode: str | None,
    class_order: str | None,
    class_map: str | None,
    latency: bool,
    latency_batch: str,
    latency_iters: int,
    quiet: bool,
    verbose: bool,
) -> None:
    """Evaluate an exported ONNX model in ONNX Runtime (or OpenVINO) and write a JSON report.

    \b
    Example:
      maskaq-eval model.onnx --task imagenet --data ~/imagenet -o report.json
      maskaq-eval q.onnx --task fashion-mnist --fp32 f.onnx --mode deploy --latency
      maskaq-eval q.onnx --task fashion-mnist --runtime openvino --precision f32
      maskaq-eval mask_rcnn_q/ --task coco --data ~/coco --fp32 mask_rcnn_fp32/
      maskaq-eval upernet_q.onnx --task ade20k --data ~/ADEChallengeData2016 --seg-mode slide
    """
    import onnxruntime as ort

    from . import report as _report
    from .runner import evaluate

    ort.set_default_logger_severity(2 if verbose else 4)  # its errors reach us as exceptions
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    lg = logging.getLogger("runtime_eval")
    lg.handlers = [h for h in lg.handlers if not getattr(h, "_maskaq_cli", False)]
    handler._maskaq_cli = True  # type: ignore[attr-defined]
    lg.addHandler(handler)
    lg.setLevel(logging.INFO if verbose else logging.WARNING)
    lg.propagate = False
    progress = not quiet  # a bar on a terminal, a line every ~10 s off one
    try:
        rep = evaluate(
            model,
            task,
            data,
            fp32=fp32,
            mode=mode,
            providers=list(providers) or None,
            batch_size=batch_size,
            limit=limit,
            workers=workers,
            threads=threads,
            graph_opt=graph_opt,
            split=split,
            latency=latency,
            latency_batches=latency_batch,
            latency_iters=latency_iters,
            progress=progress,
            output=output,
            seg_mode=seg_mode,
            class_order=class_order,
            class_map=class_map,
            runtime=runtime,
            precision=precision,
        )
    finally:
        lg.removeHandler(handler)
    click.echo(_report.summary(rep, output))


if __name__ == "__main__":  # pragma: no cover
    main()
