"""Documentation versus reality: what a newcomer or an on-call engineer copies from README.md, docs/ and
ops/runbooks/ must exist and behave as written.

- every environment variable the code reads is documented, every documented one is read, and the
  defaults the tables give are the code's;
- every `bot ...` command in a fenced block of the docs parses with the real CLI;
- the PromQL the runbooks hand to on-call is valid (promtool);
- the compose file can carry the settings SIP and the Triton profile need;
- bad input to the CLI (an invalid setting, a bad --sip target, a file that is no WAV) is one clear
  line and exit code 2, never a traceback.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("bot", "engine", "policies", "telephony", "ops")
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNBOOKS = sorted((ROOT / "ops" / "runbooks").glob("*.md"))

# read by the code but not settings a user sets: standard variables, and what the supervisor hands its workers
NOT_SETTINGS = {
    "PYTHONPATH": "the supervisor prepends the project root for its workers",
    "OMP_NUM_THREADS": "data synthesis pins numeric libraries to one thread per process",
    "BOT_LISTEN_FD": "set by `bot serve --workers N` for its workers (the inherited socket)",
    "BOT_WORKER_INDEX": "set by `bot serve --workers N` for its workers (0 serves SIP)",
}
# only the compose file reads these (host-side interpolation)
COMPOSE_ONLY = {"BOT_HTTP_PUBLISH", "BOT_SIP_PUBLISH", "BOT_SIP_TLS_PUBLISH", "GRAFANA_ADMIN_PASSWORD"}

_NAME = r"([A-Z][A-Z0-9_]*[A-Z0-9])"
# os.environ.get("X", d), os.environ["X"], os.getenv("X"), and the settings helpers _env/_int/_float/_f/_flag
_READ = re.compile(r"(?:os\.environ(?:\.get|\.setdefault)?\(?\[?|getenv\(|\b_(?:env|int|float|f|flag)\()\s*"
                   rf"""["']{_NAME}["']""")
_READ_DEFAULT = re.compile(r"(?:os\.environ\.get|getenv|\b_(?:env|int|float|f|flag))\(\s*"
                           rf"""["']{_NAME}["']\s*,\s*([^,)\n]+)""")
_CONST = re.compile(rf"""^\s*[A-Z_]+_ENV\s*=\s*["']{_NAME}["']""", re.M)  # LISTEN_FD_ENV = "BOT_LISTEN_FD"


def _code_files() -> list[Path]:
    return [f for d in CODE_DIRS for f in (ROOT / d).rglob("*.py") if "__pycache__" not in f.parts]


def _vars_read() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in _code_files():
        text = f.read_text()
        for name in [*_READ.findall(text), *_CONST.findall(text)]:
            out.setdefault(name, set()).add(str(f.relative_to(ROOT)))
    return out


def _literal(expr: str) -> str | None:
    """The default argument as text, when it is a literal or literal arithmetic (7 * 24 * 3600)."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None
    if not all(isinstance(n, (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop))
               for n in ast.walk(tree)):
        return None
    value = eval(compile(tree, "<default>", "eval"), {"__builtins__": {}})  # noqa: S307 - constants only
    return {True: "1", False: "0"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _code_defaults() -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for f in _code_files():
        for name, expr in _READ_DEFAULT.findall(f.read_text()):
            if (value := _literal(expr)) is not None:
                out.setdefault(name, set()).add((value, str(f.relative_to(ROOT))))
    return out


def _documented() -> set[str]:
    return {n for f in DOC_FILES for n in re.findall(rf"`{_NAME}`", f.read_text())}


def test_every_variable_the_code_reads_is_documented() -> None:
    documented = _documented()
    missing = {n: sorted(fs) for n, fs in _vars_read().items() if n not in documented and n not in NOT_SETTINGS}
    assert not missing, f"read in code but in no README.md/docs/*.md table or text: {missing}"


def test_every_documented_variable_is_read() -> None:
    """A documented setting nothing reads is a knob an admin turns in vain (a typo, or a removed feature)."""
    read = set(_vars_read())
    compose = (ROOT / "docker-compose.yml").read_text()
    texts = [f.read_text() for f in [*DOC_FILES, *RUNBOOKS]]
    named = {n for t in texts for n in re.findall(rf"`{_NAME}`", t) if n.startswith(("BOT_", "TWILIO_", "REDIS_"))}
    stale = sorted(n for n in named - read if not (n in COMPOSE_ONLY and n in compose))
    assert not stale, f"documented but read nowhere in {CODE_DIRS}: {stale}"


def _doc_default_rows() -> list[tuple[str, str, str]]:
    """(file, VARIABLE, default cell) from the docs' tables: `| `A` / `B` | `1` / `2` | meaning |`."""
    rows = []
    for f in DOC_FILES:
        for ln in f.read_text().splitlines():
            if not ln.startswith("|"):
                continue
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if len(cells) < 3:
                continue
            names = re.findall(rf"`{_NAME}`", cells[0])
            if not names or re.sub(r"[`A-Z0-9_/ ]", "", cells[0]):
                continue  # not a variable table row (or a list of variables sharing one note)
            values = [v.strip() for v in cells[1].split(" / ")]
            assert len(values) == len(names), f"{f.name}: {len(names)} variables, {len(values)} defaults: {ln}"
            rows += [(f.name, n, v) for n, v in zip(names, values)]
    return rows


def _doc_value(cell: str) -> str | None:
    """A default cell as the literal it states; None where it is prose (computed, 'auto', a formula)."""
    if cell in ("", "–", "—", '""', "-") or cell.startswith("*(empty"):
        return ""
    if "$" in cell or "BOT_" in cell:
        return None  # derived from another setting ($BOT_DATA_DIR/trt-cache): the code's literal is ""
    if m := re.match(r"^`([^`]*)`", cell):
        return m.group(1).strip('"')
    if re.fullmatch(r"-?[0-9.]+|[a-z][a-z0-9_-]*", cell) and cell not in ("auto", "none"):
        return cell
    return None


def _same(doc: str, code: str) -> bool:
    try:
        return float(doc) == float(code)
    except ValueError:
        return doc == code


def test_documented_defaults_are_the_code_defaults() -> None:
    code = _code_defaults()
    problems = []
    for where, name, cell in _doc_default_rows():
        doc = _doc_value(cell)
        if doc is None or name not in code:
            continue
        problems += [f"{where}: {name} documented {cell!r}, {src} uses {value!r}"
                     for value, src in sorted(code[name]) if not _same(doc, value)]
    # two readers of one variable with different defaults behave differently depending on who reads first
    for name, uses in code.items():
        if len({v for v, _ in uses}) > 1 and not all(_same(a, b) for a, _ in uses for b, _ in uses):
            problems.append(f"{name}: different defaults in code {sorted(uses)}")
    assert not problems, "\n".join(problems)


def _fenced_bot_commands(path: Path) -> list[str]:
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S):
        for line in block.splitlines():
            line = re.split(r"\s#\s", line)[0]
            for part in re.split(r"&&|;|\|", line):
                if m := re.search(r"(?:^|\s)(?:\.venv/bin/)?bot ((?:serve|calls?|engine|policy|load|chaos)\b.*)", part):
                    out.append(m.group(1).strip())
    return out


def test_documented_commands_parse() -> None:
    """Every `bot ...` line of a fenced block in README.md, docs/ and the runbooks parses with the real CLI
    (a renamed flag or subcommand breaks a copy-pasted command)."""
    from bot.cli import build_parser

    parser = build_parser()
    problems, seen = [], 0
    for f in [*DOC_FILES, *RUNBOOKS]:
        for cmd in _fenced_bot_commands(f):
            argv = [re.sub(r"^(N|CALL_ID|CANDIDATE_DIR)$", "2", a) for a in shlex.split(cmd)]
            seen += 1
            try:
                parser.parse_args(argv)
            except SystemExit:
                problems.append(f"{f.relative_to(ROOT)}: `bot {cmd}`")
    assert seen > 50, seen  # the extraction still finds the docs' commands
    assert not problems, "commands in the docs the CLI refuses:\n" + "\n".join(problems)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_runbook_promql_is_valid(tmp_path: Path) -> None:
    """The queries a runbook tells on-call to paste into Prometheus parse (promtool checks them as rules)."""
    exprs = set()
    for f in [*RUNBOOKS, ROOT / "docs" / "ops.md"]:
        for span in re.findall(r"`([^`\n]+)`", f.read_text()):
            if (not re.match(r"(voicebot_[a-z0-9_]+|up\b|[a-z_]+\()", span) or not re.search(r"[({=]", span)
                    or not re.search(r"\b(voicebot_[a-z0-9_]+|up)\b", span)):
                continue  # a query starts with a metric or a function (not `docker compose up ...`)
            if "..." in span or re.search(r"\{[a-z_]+(,[a-z_]+)*\}", span):
                continue  # notation: a placeholder value or a list of label names, not a query
            if re.fullmatch(r"[a-z_]+ [0-9]+", span):
                continue  # a sample as /metrics shows it
            exprs.add(span)
    assert len(exprs) >= 10, exprs
    rules = {"groups": [{"name": "runbooks", "rules": [{"record": f"runbook:q{i}", "expr": e}
                                                       for i, e in enumerate(sorted(exprs))]}]}
    path = tmp_path / "runbook_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_carries_sip_and_engine_settings() -> None:
    """`docker compose up` must be able to run SIP calls and use its own Triton: the settings that needs
    reach the bot container, unset ones stay unset (an empty BOT_SIP_ALLOW would admit nobody), and the
    RTP range the bot uses is the one published."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    bot = doc["services"]["bot"]
    env = bot["environment"]
    for name in ("BOT_SIP_ALLOW", "BOT_SIP_USER", "BOT_SIP_PASSWORD", "BOT_SIP_PUBLIC_IP", "BOT_SIP_TLS_PORT",
                 "BOT_SIP_TLS_CERT", "BOT_SIP_TLS_KEY", "BOT_SIP_SRTP", "BOT_SIP_REGISTRAR"):
        assert name in env and env[name] is None, f"{name}: pass through from the host, unset by default"
    lo = re.fullmatch(r"\$\{BOT_RTP_PORT_MIN:-(\d+)\}", env["BOT_RTP_PORT_MIN"])
    hi = re.fullmatch(r"\$\{BOT_RTP_PORT_MAX:-(\d+)\}", env["BOT_RTP_PORT_MAX"])
    assert lo and hi
    rtp = f"{env['BOT_RTP_PORT_MIN']}-{env['BOT_RTP_PORT_MAX']}"
    assert f"{rtp}:{rtp}/udp" in bot["ports"]
    pairs = (int(hi.group(1)) - int(lo.group(1)) + 1) // 2
    max_calls = re.fullmatch(r"\$\{BOT_SIP_MAX_CALLS:-(\d+)\}", env["BOT_SIP_MAX_CALLS"])
    assert max_calls and int(max_calls.group(1)) < pairs  # ports are picked at random: leave headroom
    assert "triton" in env["BOT_TRITON_URL"] and "BOT_ENGINE_BACKEND" in env
    # the data volume is where the image keeps BOT_DATA_DIR (admin token, voice cache)
    data_dir = re.search(r"BOT_DATA_DIR=(\S+)", (ROOT / "Dockerfile").read_text())
    assert data_dir and any(v.endswith(":" + data_dir.group(1)) for v in bot["volumes"])
    # every variable the compose file hands the bot is one the bot reads
    unknown = sorted(set(env) - set(_vars_read()))
    assert not unknown, unknown


# ---- bad input to the CLI: one clear line and exit code 2 ----

def _bot(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(("name", "value", "says"), [
    ("BOT_HTTP_PORT", "80a", "expected an integer"),
    ("BOT_HTTP_PORT", "70000", "between 0 and 65535"),
    ("BOT_CALL_TTL_S", "7d", "expected an integer"),
    ("BOT_CALL_TTL_S", "0", ">= 1"),  # EXPIRE 0 would delete every call record at once
    ("BOT_WORKERS", "0", ">= 1"),
    ("BOT_SHUTDOWN_GRACE_S", "thirty", "expected a number"),
])
def test_invalid_setting_stops_serve_with_one_clear_line(tmp_path: Path, name: str, value: str, says: str) -> None:
    r = _bot("serve", env={name: value, "BOT_DATA_DIR": str(tmp_path), "BOT_SIP_ENABLED": "0", "REDIS_URL": ""})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"{name}={value!r}" in r.stderr and says in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "redis").exists()  # refused before the embedded Redis started


def test_invalid_setting_in_a_tool_keeps_stdout_clean(tmp_path: Path) -> None:
    """`bot calls live` reads the settings too; its error (and the log event) go to stderr, so a script
    parsing stdout as JSON sees nothing rather than a log line."""
    r = _bot("calls", "live", env={"BOT_CALL_TTL_S": "1w", "BOT_DATA_DIR": str(tmp_path), "REDIS_URL": ""})
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert "BOT_CALL_TTL_S='1w'" in r.stderr


def test_settings_accept_documented_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.config import ConfigError, load_settings

    for k in ("BOT_HTTP_PORT", "BOT_WORKERS", "BOT_SIP_ENABLED", "BOT_CALL_TTL_S"):
        monkeypatch.delenv(k, raising=False)
    s = load_settings()
    assert (s.http_port, s.workers, s.sip_enabled, s.call_ttl_s) == (8080, 1, True, 604800)
    monkeypatch.setenv("BOT_HTTP_PORT", " 9090 ")
    monkeypatch.setenv("BOT_SIP_ENABLED", "Off")
    monkeypatch.setenv("BOT_WORKERS", "")  # empty, as compose's ${BOT_WORKERS:-} would pass it: the default
    s = load_settings()
    assert (s.http_port, s.sip_enabled, s.workers) == (9090, False, 1)
    monkeypatch.setenv("BOT_SIP_PORT", "five")
    with pytest.raises(ConfigError, match="BOT_SIP_PORT"):
        load_settings()


@pytest.mark.parametrize("args", [["--workers", "0"], ["--workers", "-1"], ["--port", "99999"], ["--workers", "x"]])
def test_serve_refuses_bad_flags(args: list[str]) -> None:
    r = _bot("serve", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert args[0] in r.stderr


def test_serve_on_a_taken_port_says_so(tmp_path: Path) -> None:
    """`make run` while something already holds 8080: one line naming the address and the settings to change
    (and the embedded Redis it started is stopped again), not an OSError traceback."""
    import socket

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("0.0.0.0", 0))  # the bot binds 0.0.0.0 by default: hold the same address
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        r = _bot("serve", "--port", str(port), env={"BOT_DATA_DIR": str(tmp_path), "BOT_SIP_ENABLED": "0",
                                                    "REDIS_URL": "", "BOT_HTTP_HOST": "0.0.0.0"}, timeout=120)
    finally:
        holder.close()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert f"cannot listen on 0.0.0.0:{port}" in r.stderr and "BOT_HTTP_PORT" in r.stderr
    assert "embedded_redis_stopped" in r.stderr


def _wav(path: Path, subtype: str = "PCM_16") -> Path:
    t = np.arange(8000) / 8000
    sf.write(path, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000, subtype=subtype)
    return path


@pytest.mark.parametrize(("case", "says"), [
    ("sip_bad_port", "expected HOST[:PORT]"),
    ("sip_no_host", "expected HOST[:PORT]"),
    ("sip_float_wav", "16-bit PCM"),
    ("not_audio", "not a readable audio file"),
    ("sip_not_audio", "not a readable audio file"),
    ("missing", "no such file"),
    ("directory", "no such file"),
    ("url_without_scheme", "expected http(s)://"),
    ("srtp_without_sip", "--srtp needs --sip"),
])
def test_call_refuses_bad_input_before_dialing(tmp_path: Path, case: str, says: str) -> None:
    """Nothing listens on the URLs used here: a refusal must come from the checks, not from a failed call."""
    good = str(_wav(tmp_path / "ok.wav"))
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    args = {
        "sip_bad_port": ["--sip", "127.0.0.1:abc", good],
        "sip_no_host": ["--sip", ":5060", good],
        "sip_float_wav": ["--sip", "127.0.0.1:9", str(_wav(tmp_path / "f.wav", "FLOAT"))],
        "not_audio": ["--url", "http://127.0.0.1:9", str(text)],
        "sip_not_audio": ["--sip", "127.0.0.1:9", str(text)],
        "missing": ["--url", "http://127.0.0.1:9", str(tmp_path / "nope.wav")],
        "directory": ["--url", "http://127.0.0.1:9", str(tmp_path)],
        "url_without_scheme": ["--url", "127.0.0.1:8080", good],
        "srtp_without_sip": ["--url", "http://127.0.0.1:9", "--srtp", good],
    }[case]
    r = _bot("call", *args, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and says in r.stderr
    assert r.stdout == ""


def test_chaos_bad_lines_goes_to_stderr() -> None:
    r = _bot("chaos", "--lines", "0", "--json")
    assert r.returncode == 2 and r.stdout == "" and "--lines" in r.stderr


@pytest.mark.parametrize("args", [["eval", "DIR", "--limit", "-1"], ["eval", "DIR", "--limit", "0"],
                                  ["compare", "DIR", "--b", "x", "--limit", "-2"],
                                  ["compare", "DIR", "--b", "x", "--reps", "0"]])
def test_engine_counts_must_be_positive(tmp_path: Path, args: list[str]) -> None:
    """`bot engine eval DIR --limit -1` evaluated all clips but the last (a Python slice) and reported it as
    the set's accuracy; `--limit 0` reported 0.0 over no clips. Refused by the parser now (exit 2)."""
    from bot.cli import build_parser

    argv = ["engine", *[str(tmp_path) if a == "DIR" else a for a in args]]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    ok = build_parser().parse_args(["engine", "eval", str(tmp_path), "--limit", "3"])
    assert ok.limit == 3


def test_runbook_decision_reasons_exist() -> None:
    """`action/reason` pairs a runbook tells on-call to look for on the decisions panel are real label values."""
    from policies.decide import REASONS

    pairs = [(f.name, a, r) for f in RUNBOOKS
             for a, r in re.findall(r"`(clarify|confirm|reprompt|answer|collect|transfer|hangup)/([a-z_]+)`", f.read_text())]
    assert len(pairs) >= 3
    unknown = [p for p in pairs if p[2] not in REASONS]
    assert not unknown, unknown
