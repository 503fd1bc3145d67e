"""runtime_eval: evaluate an exported (QDQ) ONNX model in ONNX Runtime (or OpenVINO's CPU plugin,
``runtime="openvino"``, the optional ``maskaq[openvino]`` extra).

Imports neither torch nor maskaq nor timm: everything it needs travels inside the ``.onnx``
file (docs/onnx-contract.md). Entry points: :func:`evaluate` and the ``maskaq-eval`` CLI.

Example:
    >>> from runtime_eval import evaluate
    >>> report = evaluate("deit_t_w4a4.onnx", "imagenet", "~/imagenet", limit=1000)  # doctest: +SKIP
"""

from __future__ import annotations

from .errors import EvalError
from .runner import TASKS, evaluate

__all__ = ["TASKS", "EvalError", "evaluate"]
