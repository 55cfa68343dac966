"""`bot`: the one command. Each subcommand group lives in bot/commands/<name>.py and exposes
`register(subparsers)`; handlers take the parsed args and return an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

# module name under bot.commands -> registered subcommands
COMMAND_MODULES = ("serve", "call", "calls", "engine", "policy", "load", "chaos")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bot", description="Contact-center voice bot")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"bot.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bot.commands.{name}":
                continue  # a subcommand group not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
