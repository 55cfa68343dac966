"""`bot`: the one command. Each subcommand group lives in bot/commands/<name>.py and exposes
`register(subparsers)`; handlers take the parsed args and return an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
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


def _config_error(command: str, exc: Exception) -> int:
    """A bad environment variable: one clear line naming it (and a JSON log event on stderr: stdout carries
    only a command's output), no traceback; exit 2 like any other usage error."""
    from ops.logs import configure_logging, get_logger

    configure_logging()
    get_logger("bot.cli").error("invalid_setting", command=command, error=str(exc))
    print(f"{'bot ' + command if command else 'bot'}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from bot.config import ConfigError

    try:
        # a subcommand's defaults may come from the environment (BOT_ENGINE_THREADS=abc): one line, not a traceback
        parser = build_parser()
    except ConfigError as exc:
        return _config_error("", exc)
    args = parser.parse_args(argv)
    from ops.logs import configure_logging

    # before any command runs: a module that logs (the engine) would otherwise get structlog's default, console
    # lines on stdout, in the middle of `bot engine eval --json`'s output
    configure_logging()

    try:
        rc = args.func(args)
        sys.stdout.flush()
    except ConfigError as exc:
        return _config_error(args.command, exc)
    except KeyboardInterrupt:
        # Ctrl-C in `bot call`, `bot engine eval`, ...: the user asked for it; say so, no traceback.
        # 130 = 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
        print(f"bot {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `bot policy schema | head`: the reader left; that is no error. Point stdout at devnull so the
        # interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
