"""Edits of the shipped policy's global accept threshold for the admin/store/schema tests, written
against whatever value `bot policy tune` last put in policies/default.yaml (so re-tuning never
breaks them)."""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_TEXT = (Path(__file__).resolve().parents[2] / "policies" / "default.yaml").read_text()
_ACCEPT = re.compile(r"^  accept: (\S+) ", re.M)  # thresholds.accept (indented under `thresholds:`)
ACCEPT = _ACCEPT.search(DEFAULT_TEXT).group(1)  # type: ignore[union-attr]
ACCEPT_LINE = f"  accept: {ACCEPT} "  # as it appears in the shipped text
STRICTER, LOOSER = "0.97", "0.6"  # valid edits, both different from the shipped value
assert ACCEPT not in (STRICTER, LOOSER)


def with_accept(text: str, value: str) -> str:
    """text with its global accept threshold set to value (the rest, comment included, untouched)."""
    new, n = _ACCEPT.subn(f"  accept: {value} ", text, count=1)
    assert n == 1, "no thresholds.accept line"
    return new


def accept_line(text: str) -> int:
    """1-based line number of the global accept threshold."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("  accept: "))
