"""Import rules (ARCHITECTURE.md): policies/ may import engine/ and ops/, never bot/ or telephony/."""

from __future__ import annotations

import ast
from pathlib import Path

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def test_policies_never_import_bot_or_telephony() -> None:
    bad = []
    for path in POLICIES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("bot", "telephony")]
    assert not bad, bad
