"""The library never reaches up into the exporter: no module of ``maskaq`` imports ``export``
(issue 14 item 7; the dense part-wise export lives in ``export/dense_export.py``)."""
from __future__ import annotations

import ast
from pathlib import Path

MASKAQ = Path(__file__).resolve().parents[1] / "maskaq"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_maskaq_never_imports_export():
    files = sorted(MASKAQ.rglob("*.py"))
    assert len(files) > 10
    bad = [str(p.relative_to(MASKAQ)) for p in files if "export" in _imports(p)]
    assert bad == []


def test_rewrite_passes_are_public():
    import export.onnx_export as oe

    for name in ("fold_constants", "rewrite_quantizers", "translation_table"):
        assert name in oe.__all__ and callable(getattr(oe, name))
