"""The operations configs validate: Prometheus config and rules (promtool), alert unit tests,
Alertmanager routing, Grafana provisioning and dashboards, docker-compose and Dockerfile, Kamailio."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ops import metrics
from tests.ops.queries import ROOT, alert_rules, dashboard_exprs, family, metric_names, rule_exprs

PROM = ROOT / "ops" / "prometheus"
promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (apt prometheus) not installed")


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


@promtool
def test_promtool_check_config_and_rules() -> None:
    r = _run("promtool", "check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run("promtool", "check", "rules", str(PROM / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


@promtool
def test_promtool_alert_unit_tests() -> None:
    r = _run("promtool", "test", "rules", "alerts_test.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    # every alert has at least one firing case in the unit tests
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROM / "alerts_test.yml").read_text()))
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    assert alerts <= tested, alerts - tested


def test_every_alert_has_runbook_and_severity() -> None:
    alerts = [r for r in alert_rules() if "alert" in r]
    names = {r["alert"] for r in alerts}
    for needed in ("VoiceToVoiceLatencyHigh", "EscalationRateSpike", "ClarificationRateSpike", "ErrorRateHigh",
                   "NoCallsInBusinessHours", "EngineSaturated", "RedisDown", "RedisFailingOver", "WorkerDown"):
        assert needed in names
    for r in alerts:
        url = r["annotations"]["runbook_url"]
        assert (ROOT / url).is_file(), f"{r['alert']}: runbook {url} missing"
        assert r["labels"]["severity"] in ("page", "ticket")
        assert r["annotations"]["summary"]


def test_queries_use_only_defined_metrics() -> None:
    defined = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    # prometheus-client stores counters without _total
    defined |= {n + "_total" for n in defined}
    allowed = defined | {"up"}
    exprs = dashboard_exprs() + rule_exprs()
    assert len(exprs) > 30
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        for n in names:
            assert family(n) in allowed or n in allowed, f"{where}: {n} is not defined in ops/metrics.py"


def test_alertmanager_routes_to_receivers() -> None:
    doc = yaml.safe_load((ROOT / "ops" / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in doc["receivers"]}
    assert doc["route"]["receiver"] in receivers
    for sub in doc["route"].get("routes", []):
        assert sub["receiver"] in receivers
    if shutil.which("amtool"):
        r = _run("amtool", "check-config", "ops/alertmanager/alertmanager.yml")
        assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_and_dashboards() -> None:
    ds = yaml.safe_load((ROOT / "ops/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((ROOT / "ops/grafana/provisioning/dashboards/voicebot.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    boards = list((ROOT / "ops/grafana/dashboards").glob("*.json"))
    assert boards
    text = " ".join(e for _, e in dashboard_exprs())
    for needed in ("voicebot_active_calls", "voicebot_calls_total", "voicebot_turn_latency_seconds_bucket",
                   "voicebot_engine_inference_seconds_bucket", "voicebot_engine_batch_size", "voicebot_intent_confidence_bucket",
                   "voicebot_policy_decisions_total", "voicebot_transfers_total", "voicebot_errors_total",
                   "voicebot_redis_up", "voicebot_worker_cpu_seconds", "voicebot_worker_resident_memory_bytes"):
        assert needed in text, needed
    for b in boards:
        d = json.loads(b.read_text())
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] == uid and p["targets"]
    # the committed JSON is what the generator makes (nobody hand-edited it out of sync)
    r = _run(sys.executable, "-c", "import json,ops.grafana.build_dashboards as b;"
             "print(json.dumps(b.voicebot().json(), indent=2))")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((ROOT / "ops/grafana/dashboards/voicebot-overview.json").read_text())


def test_compose_file() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = doc["services"]
    assert {"bot", "redis", "prometheus", "alertmanager", "grafana"} <= set(svc)
    bot = svc["bot"]
    assert bot["build"] == "." and "serve" in bot["command"]
    assert any(p.startswith("${BOT_HTTP_PUBLISH:-8080}:8080") for p in bot["ports"])
    assert any(p.endswith("5060/udp") for p in bot["ports"])
    assert "/healthz" in " ".join(bot["healthcheck"]["test"])
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    assert bot["environment"]["REDIS_URL"].endswith("redis://redis:6379/0}")
    redis_cmd = " ".join(svc["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd
    assert any(v.startswith("redis-data:/data") for v in svc["redis"]["volumes"])
    assert "redis-cli" in " ".join(svc["redis"]["healthcheck"]["test"])
    prom_vols = " ".join(svc["prometheus"]["volumes"])
    assert "./ops/prometheus:/etc/prometheus" in prom_vols
    assert "./ops/alertmanager:/etc/alertmanager" in " ".join(svc["alertmanager"]["volumes"])
    gvols = " ".join(svc["grafana"]["volumes"])
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning" in gvols and "./ops/grafana/dashboards" in gvols
    for name, s in svc.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src} missing"
            else:
                assert src in doc["volumes"], f"{name}: named volume {src} not declared"
        if name != "kamailio":
            assert "healthcheck" in s, name
    assert "./ops/triton/model_repository:/models:ro" in svc["triton"]["volumes"]
    # the scrape config finds the bot service the compose file defines, on its HTTP port
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "voicebot")
    assert job["dns_sd_configs"][0]["names"] == ["bot"] and job["dns_sd_configs"][0]["port"] == 8080
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert "espeak-ng" in text and "redis-tools" in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    hc = next(ln for ln in lines if ln.startswith("HEALTHCHECK"))
    assert "/healthz" in text[text.index(hc):]
    assert 'CMD ["serve"]' in text and 'ENTRYPOINT ["bot"]' in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


@pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio not installed")
def test_kamailio_config_checks(tmp_path: Path) -> None:
    kdir = ROOT / "ops" / "kamailio"
    lst = tmp_path / "dispatcher.list"
    lst.write_text("1 sip:127.0.0.1:5071 0 0 weight=50\n1 sip:127.0.0.1:5072 0 0 weight=50\n")
    for extra in ([], ["-A", f'DISPATCHER_LIST="{lst}"', "-A", "LISTEN_IP=127.0.0.1", "-A", "LISTEN_PORT=5070"]):
        r = _run("kamailio", "-c", "-f", str(kdir / "kamailio.cfg"), *extra)
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    for ln in (kdir / "dispatcher.list").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            setid, uri, *_ = ln.split()
            assert setid == "1" and uri.startswith("sip:")


# target labels Prometheus adds (instance, job; service from prometheus.yml) and the per-worker pid of
# prometheus-client's multiprocess mode
_TARGET_LABELS = {"instance", "job", "service", "pid"}


def _defined_labels() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in vars(metrics).values():
        if hasattr(m, "_name") and hasattr(m, "_labelnames"):
            out[m._name] = set(m._labelnames)
            if m._type == "counter":
                out[m._name + "_total"] = set(m._labelnames)
    return out


def test_queries_use_only_defined_labels() -> None:
    """Selectors, by()/without() groupings, legends and alert annotations name labels the metric has
    (a label typo silently matches nothing: a dead panel or an alert that never fires)."""
    defined = _defined_labels()
    legends = {}
    for f in (ROOT / "ops/grafana/dashboards").glob("*.json"):
        for p in json.loads(f.read_text())["panels"]:
            for t in p.get("targets", []):
                legends[(p["title"], t["expr"])] = t.get("legendFormat", "")
    items = [(w, e, legends.get((w.split("/", 1)[1], e), "")) for w, e in dashboard_exprs()]
    for r in alert_rules():
        ann = " ".join(str(v) for v in r.get("annotations", {}).values())
        items.append((r.get("alert") or r.get("record"), r["expr"], ann))
    assert len(items) > 30 and sum(1 for _, _, t in items if "{{" in t) > 20, len(items)  # not vacuous
    problems = []
    for where, expr, text in items:
        allowed = set(_TARGET_LABELS) | {"le"}
        for n in metric_names(expr):
            allowed |= defined.get(family(n), defined.get(n, set()))
        for name, body in re.findall(r"\b((?:voicebot_|up\b)[a-zA-Z0-9_]*)\s*\{([^}]*)\}", expr):
            own = set(_TARGET_LABELS) if name == "up" else (
                defined.get(family(name), defined.get(name, set())) | _TARGET_LABELS
                | ({"le"} if name.endswith("_bucket") else set()))
            used = {re.split(r"[=!~]", m.strip())[0].strip() for m in body.split(",") if m.strip()}
            problems += [f"{where}: {name} has no label {lb}" for lb in used - own]
        for grp in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            used = {g.strip() for g in grp.split(",") if g.strip()}
            problems += [f"{where}: grouping by unknown label {lb}" for lb in used - allowed]
        for lb in re.findall(r"\{\{\s*(?:\$labels\.)?([a-zA-Z_]\w*)\s*\}\}", text):
            if lb not in allowed:
                problems.append(f"{where}: legend/annotation uses unknown label {lb}")
    assert not problems, "\n".join(problems)


def test_runbook_commands_and_metrics_exist() -> None:
    """Every `bot ...` command a runbook tells on-call to run parses with the real CLI, and every
    voicebot_* metric it names (with its labels) is defined in ops/metrics.py."""
    import shlex

    from bot.cli import build_parser

    defined = _defined_labels()
    parser = build_parser()
    problems = []
    n_cmds = 0
    for f in sorted((ROOT / "ops" / "runbooks").glob("*.md")):
        text = f.read_text()
        for cmd in re.findall(r"`(bot [^`]+)`", text):
            n_cmds += 1
            argv = [re.sub(r"^<[^>]*>$|^(N|CALL_ID)$", "x2", a).replace("<", "").replace(">", "")
                    for a in shlex.split(cmd)[1:]]
            argv = ["2" if a == "x2" and i and argv[i - 1].startswith("--") else a for i, a in enumerate(argv)]
            try:
                parser.parse_args(argv)
            except SystemExit:
                problems.append(f"{f.name}: `{cmd}` is not a valid bot command")
        for name, body in re.findall(r"\b(voicebot_[a-z0-9_]+)(?:\{([^}]*)\})?", text):
            fam = family(name)
            if fam not in defined and name not in defined:
                problems.append(f"{f.name}: {name} is not defined in ops/metrics.py")
                continue
            own = defined.get(fam, defined.get(name, set())) | _TARGET_LABELS
            for m in (body or "").split(","):
                lb = re.split(r"[=!~]", m.strip())[0].strip()
                if lb and lb not in own:
                    problems.append(f"{f.name}: {name} has no label {lb}")
    assert not problems, "\n".join(problems)
    assert n_cmds >= 15, n_cmds  # the extraction still finds the runbooks' commands (not a vacuous pass)
