"""The one exception type the harness raises for bad input (model, data, options)."""

from __future__ import annotations


class EvalError(Exception):
    """A user-facing error: the message names what is wrong and what would be valid.

    The CLI prints it as one line (``maskaq-eval: error: ...``) and exits with status 2.
    """
