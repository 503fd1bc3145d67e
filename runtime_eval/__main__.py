"""``python -m runtime_eval`` = ``maskaq-eval``."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main(prog_name="maskaq-eval")
