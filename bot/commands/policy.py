"""`bot policy validate|schema|prompts|simulate|tune`: the policy layer's command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bot.commands import int_between
from ops.logs import configure_logging, get_logger
from ops.metrics import ERRORS

log = get_logger("bot.policy")


def _fail(kind: str, message: str, code: int = 2) -> int:
    """Bad input: a clear message on stderr, a log line, a counted error, a non-zero exit."""
    ERRORS.labels(component="policy", kind=kind).inc()
    log.warning("policy_cli_error", kind=kind, error=message)
    print(f"error: {message}", file=sys.stderr)
    return code


def _policy_path(args: argparse.Namespace) -> str | None:
    if args.policy:
        return str(args.policy)
    from bot.config import load_settings

    return load_settings().policy_path or None


def _load(args: argparse.Namespace) -> Any | None:
    """The policy named by --policy / BOT_POLICY_PATH / the default; None (reason on stderr) if invalid."""
    from policies.schema import PolicyError, load_policy

    try:
        return load_policy(_policy_path(args) or None)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)  # already logged and counted by the loader
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    from policies.schema import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:  # already logged and counted by the loader
        if args.json:
            print(json.dumps({"ok": False, "errors": exc.to_list()}, indent=2))
        else:
            for e in exc.errors:
                where = f"{e.line}:{e.column}" if e.line else "?"
                print(f"{args.file}:{where}: {e.field or '<document>'}: {e.message}")
        return 1
    if args.json:
        print(json.dumps({"ok": True, "errors": [], "name": policy.name, "intents": len(policy.intents)}))
    else:
        print(f"ok: {args.file}: policy {policy.name!r}, {len(policy.intents)} intents, {len(policy.queues)} queues")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from policies.schema import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    if (policy := _load(args)) is None:
        return 1
    for text in policy.static_prompts():
        print(text)
    return 0


def _model_loader(model_dir: str | None) -> Any:
    def load() -> Any:
        from policies.replay import load_model

        return load_model(model_dir)

    return load


def cmd_simulate(args: argparse.Namespace) -> int:
    from policies.replay import ReplayError
    from policies.simulate import ScriptError, load_script, simulate

    if (policy := _load(args)) is None:
        return 1
    try:
        script = load_script(args.script)
        results = simulate(policy, script, Path(args.script).resolve().parent, _model_loader(args.model_dir))
    except (ScriptError, ReplayError) as exc:
        return _fail("bad_script", f"{args.script}: {exc}")
    if args.json:
        print(json.dumps([{"name": r.name, "ok": r.ok, "expected": r.expected,
                           "steps": [s.__dict__ for s in r.steps]} for r in results], indent=2, default=str))
    else:
        for r in results:
            status = "" if r.expected is None else ("  [ok]" if r.ok else f"  [MISMATCH: expected {r.expected}]")
            print(f"== {r.name}{status}")
            for s in r.steps:
                print(s.line())
            print()
    return 0 if all(r.ok for r in results) else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from policies.replay import ReplayError, read_outputs, run_engine
    from policies.tune import Costs, format_table, tune

    if (policy := _load(args)) is None:
        return 1
    costs = Costs(wrong=args.cost_wrong, clarify=args.cost_clarify, escalate=args.cost_escalate)
    if min(costs.wrong, costs.clarify, costs.escalate) < 0:
        return _fail("bad_argument", "costs must be >= 0")
    try:
        if args.outputs:
            records, cache, source = read_outputs(args.outputs), None, "outputs"
        elif args.eval_dir:
            records, cache = run_engine(args.eval_dir, model_dir=args.model_dir, limit=args.limit, cache=args.cache)
            source = "engine"
        else:
            return _fail("bad_argument", "give EVAL_DIR or --outputs FILE.jsonl")
        result = tune(policy, records, costs, keep_caller_state=args.with_caller_state)
    except ReplayError as exc:
        return _fail("bad_eval_input", str(exc))
    except ValueError as exc:
        return _fail("bad_eval_input", str(exc))
    result["source"] = source
    result["cache"] = str(cache) if cache else None
    if args.json:
        print(json.dumps(result, indent=None))
    else:
        print(format_table(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("policy", help="validate, inspect, simulate and tune dialog policies")
    sub = p.add_subparsers(dest="policy_command", required=True)

    v = sub.add_parser("validate", help="check a policy file; print errors with line numbers")
    v.add_argument("file")
    v.add_argument("--json", action="store_true", help="print {ok, errors: [{line, column, field, message}]}")
    v.set_defaults(func=_wrap(cmd_validate))

    s = sub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    s.set_defaults(func=_wrap(cmd_schema))

    pr = sub.add_parser("prompts", help="list the prompts the voice pre-renders")
    pr.add_argument("--policy", help="policy file (default: BOT_POLICY or policies/default.yaml)")
    pr.set_defaults(func=_wrap(cmd_prompts))

    sim = sub.add_parser("simulate", help="run scripted dialogues through decide() and print the trace")
    sim.add_argument("script")
    sim.add_argument("--policy", help="policy file (default: BOT_POLICY or policies/default.yaml)")
    sim.add_argument("--model-dir", help="engine model directory for WAV turns")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=_wrap(cmd_simulate))

    t = sub.add_parser("tune", help="recommend thresholds from engine outputs on an evaluation set")
    t.add_argument("eval_dir", nargs="?", help="evaluation set: WAVs + manifest.jsonl")
    t.add_argument("--outputs", help="precomputed understandings (JSON lines) instead of running the engine")
    t.add_argument("--policy", help="policy file (default: BOT_POLICY or policies/default.yaml)")
    t.add_argument("--model-dir", help="engine model directory (default: the engine's)")
    t.add_argument("--cache", help="cache file for engine outputs (default under BOT_TUNE_CACHE_DIR)")
    t.add_argument("--limit", type=int_between(1), metavar="N", help="only the first N manifest rows (not cached unless --cache)")
    t.add_argument("--cost-wrong", type=float, default=10.0, help="cost of acting on the wrong intent")
    t.add_argument("--cost-clarify", type=float, default=1.0, help="cost of a confirm/clarify question")
    t.add_argument("--cost-escalate", type=float, default=4.0, help="cost of a failed turn (reprompt / escalation)")
    t.add_argument("--with-caller-state", action="store_true", help="keep frustration cues (transfers) in the replay")
    t.add_argument("--json", action="store_true", help="print one JSON object: table, recommendation, current")
    t.set_defaults(func=_wrap(cmd_tune))




def _wrap(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        configure_logging()
        try:
            return fn(args)
        except KeyboardInterrupt:
            return 130

    return run
