"""runtime_eval runs where only ONNX Runtime is: it must import neither torch, maskaq nor timm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import rteval_helpers as H

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys

    BLOCKED = ("torch", "maskaq", "timm")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    import importlib, pkgutil
    import runtime_eval
    for mod in pkgutil.walk_packages(runtime_eval.__path__, "runtime_eval."):
        importlib.import_module(mod.name)  # every module of the package, dense ones included
    from runtime_eval import evaluate

    rep = evaluate(sys.argv[1], "fashion-mnist", sys.argv[2], fp32=sys.argv[3], providers=["cpu"],
                   latency=True, latency_batches="2", latency_iters=2)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"top1": rep["fp32"]["metrics"]["top1"], "leaked": leaked}))
    """
)


def test_no_torch_maskaq_or_timm(tmp_path):
    root, _ = H.fashion_fixture(tmp_path / "fm", n=10)
    q = H.grey_classifier(tmp_path / "q.onnx", qdq=True)
    f = H.grey_classifier(tmp_path / "f.onnx")
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(q), str(root), str(f)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"top1": 100.0, "leaked": []}
