"""Helpers both ``maskaq-export`` command lines share (the classifier one in :mod:`export.cli`,
the dense one in :mod:`export.dense_cli`): one-line errors with exit status 2, the device check,
logging, file hashes. Neither CLI imports the other's private names; both import these."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

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


class _Command(click.Command):
    """Usage errors and library errors become one line and exit status 2."""

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


def _setup_logging(quiet: bool) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_LogFormatter())
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for name in ("maskaq", "export"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [h]
        lg.setLevel(logging.ERROR if quiet else logging.WARNING)
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
