"""Helpers both ``maskaq-export`` command lines share (the classifier one in :mod:`export.cli`,
the dense one in :mod:`export.dense_cli`): one-line errors with exit status 2, the device check,
logging, file hashes. Neither CLI imports the other's private names; both import these."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

PROG = "maskaq-export"
PRESETS = ("cpu", "paper", "tiny")


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"{PROG}: error: {_one_line(msg)}", err=True)
    sys.exit(code)


def _warn(msg: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"{PROG}: warning: {_one_line(msg)}", err=True)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (a KeyboardInterrupt, so library code that catches
    ``Exception`` lets it through and ``finally`` blocks and atomic writes clean up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM (the shell's convention)


def _exit_code(e: BaseException | None) -> int:
    while e is not None:
        if isinstance(e, Interrupted):
            return e.exit_code
        e = e.__cause__ or e.__context__
    return 128 + signal.SIGINT


@contextmanager
def _signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the command runs
    (SIGTERM would otherwise end the process without running any clean-up); a second signal
    gets the default behaviour (Ctrl-C twice: KeyboardInterrupt; SIGTERM twice: killed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(signum)

    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class _Command(click.Command):
    """Usage errors and library errors become one line and exit status 2; SIGINT / SIGTERM
    become :class:`Interrupted` (exit status 130 / 143). The command line is kept in
    ``self.argv`` (for the resume hint)."""

    argv: list[str] = []

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        try:
            with _signals():
                rv = super().main(args=args, prog_name=prog_name or PROG, complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            _fail(f"{e.format_message()} (see {PROG} --help)")
        except (click.exceptions.Abort, KeyboardInterrupt) as e:
            _fail("interrupted", _exit_code(e))
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _resume_command(argv: list[str]) -> str:
    """The exact command that continues this run: the same arguments plus ``--resume``."""
    args = list(argv) + ([] if "--resume" in argv else ["--resume"])
    return shlex.join([PROG, *args])


def _plan_totals(plan: Any) -> tuple[int | None, int | None]:
    """(synthesis batches per round, calibration epochs) of a :class:`maskaq.pipeline.Plan`."""
    nb = -(-plan.num_images // plan.synth.batch_size) if plan.synth is not None else None
    return nb, plan.calib.epochs if plan.ptq == "kd" else None


def _kept_or_removed(run_path: Path, created: bool, totals: tuple[int | None, int | None] = (None, None)) -> str:
    """After a run stopped early: keep the run folder if it holds checkpoints (say how to
    resume), else remove it if this command made it. Returns what happened, for the message."""
    from maskaq.pipeline import read_checkpoints

    try:
        ck = read_checkpoints(run_path)
    except Exception:  # noqa: BLE001 - an unreadable calib.pt (killed mid-write is impossible: atomic)
        ck = None
    if ck is not None and ck.empty:
        if created:
            shutil.rmtree(run_path, ignore_errors=True)
            return "before the first checkpoint was written; nothing kept"
        return f"before the first checkpoint was written; nothing to resume in {str(run_path)!r}"
    what = ck.describe(*totals) if ck is not None else "checkpoints"
    return f"checkpoints kept in {str(run_path)!r} ({what})"


def _interrupted(e: BaseException, run_path: Path, created: bool, argv: list[str],
                 totals: tuple[int | None, int | None] = (None, None)) -> None:
    """One line (what was kept, the exact command that resumes) and exit 130 / 143."""
    code = _exit_code(e)
    name = signal.Signals(code - 128).name if code - 128 in signal.Signals._value2member_map_ else "signal"
    kept = _kept_or_removed(run_path, created, totals)
    hint = f"; resume with: {_resume_command(argv)}" if kept.startswith("checkpoints kept") else \
        "; run the same command again to start over"
    sep = "; " if kept.startswith("checkpoints kept") else " "
    click.echo(f"{PROG}: interrupted ({name}){sep}{kept}{hint}", err=True)
    sys.exit(code)


def _resume_line(run_path: Path, config: dict[str, Any], totals: tuple[int | None, int | None], quiet: bool) -> None:
    """``--resume``: refuse (one line, exit 2) when there is nothing to resume or the settings
    differ; else say what is reused."""
    from maskaq.pipeline import PipelineError, check_resumable

    try:
        ck = check_resumable(run_path, config)
    except PipelineError as e:
        _fail(str(e))
    if not quiet:
        click.echo(f"{PROG}: resuming {str(run_path)!r}: reusing {ck.describe(*totals)}", err=True)


def _check_device(device: str) -> str:
    if not re.fullmatch(r"cpu|cuda|cuda:\d+", device):
        raise click.UsageError(f"device {device!r} is not valid; valid: cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise click.UsageError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        # Same seed, same device, same result: two identical CUDA runs of the cpu preset differed by
        # up to 1.3e-3 in Q's parameters without deterministic kernels (measured on an H100).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Warnings on stderr (``-q``: errors only; ``-v``: every step, INFO); progress lines carry
    the program's name."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    from maskaq.progress import set_prefix

    set_prefix(f"{PROG}: ")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_LogFormatter())
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for name in ("maskaq", "export"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [h]
        lg.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
        lg.propagate = False
    # the one line saying what was read from a bare checkpoint (issue 13)
    logging.getLogger("maskaq.byo").setLevel(logging.ERROR if quiet else logging.INFO)


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


#: options taking several values the way timm's scripts do (``--mean 0.5 0.5 0.5``,
#: ``--model-kwargs a=1 b=2``): which following tokens each one consumes
VARIADIC = {
    "--model-kwargs": lambda t: "=" in t and not t.startswith("-"),
    "--mean": _is_number,
    "--std": _is_number,
    "--keep-8bit": lambda t: _pattern_token(t),
}


def _pattern_token(t: str) -> bool:
    """A ``--keep-8bit`` value, not the MODEL argument that may follow it."""
    if t.startswith("-") or os.path.exists(t):
        return False
    from maskaq.models import ALIASES, LOCAL_ALIASES

    if t in ALIASES or t in LOCAL_ALIASES:
        return False
    import timm

    return not timm.is_model(t.split(".", 1)[0])


def expand_variadic(argv: list[str], spec: dict[str, Any] = VARIADIC) -> list[str]:
    """``--opt a b c`` -> ``--opt a --opt b --opt c`` for the options in ``spec`` (click options
    take one value each; ``multiple=True`` collects them). Comma-separated values also split."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out.extend(argv[i:])
            break
        name, eq, val = tok.partition("=")
        if name in spec and (eq or i + 1 < len(argv)):
            vals = [val] if eq else []
            j = i + 1
            if not eq:
                if j < len(argv):
                    vals.append(argv[j])  # the first value is always taken
                    j += 1
                while j < len(argv) and spec[name](argv[j]):
                    vals.append(argv[j])
                    j += 1
            for v in vals:
                parts = [p for p in v.split(",")] if name in ("--keep-8bit", "--mean", "--std") else [v]
                for p in parts:
                    out += [name, p]
            i = j
            continue
        out.append(tok)
        i += 1
    return out
