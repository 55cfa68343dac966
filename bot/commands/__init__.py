"""`bot` subcommand groups, one module each, and the argparse types they share."""

from __future__ import annotations

import argparse
from typing import Callable


def int_between(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]. A typo such as `--limit -1`, `--train -5` or `--workers 0` is
    refused (exit 2) instead of silently meaning "none", "all but the last" or the default (and running
    minutes of work on it); `--port 99999` is refused before anything starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}" if hi is None else f"must be between {lo} and {hi}")
        return value

    return parse
