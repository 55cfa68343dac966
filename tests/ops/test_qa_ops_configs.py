"""What on-call relies on, checked against the code that exports the metrics (ops/metrics.py) rather than
against itself: every dashboard query names a metric the registry defines with labels it really has (and a
legend only names labels that survive the query's aggregation), panel units match what is plotted, every
alert has a promtool case that fires it and one that shows it quiet, every alert threshold on a histogram
quantile is one of that histogram's bucket bounds, Alertmanager sends pages and tickets to different
receivers, and the PromQL a runbook tells on-call to type parses (promtool).

Each check also counts what it checked, so an empty dashboard, a renamed field or a regex that stops
matching fails the test instead of passing it on nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from ops import metrics
from ops.grafana.build_dashboards import voicebot
from tests.ops.queries import ROOT, alert_rules, family, metric_names

PROM = ROOT / "ops" / "prometheus"
# labels Prometheus adds to every scraped series (prometheus.yml: job/instance, relabelled service)
TARGET_LABELS = {"instance", "job", "service"}


def _registry() -> dict[str, tuple[str, set[str], Any]]:
    """Exported series name -> (type, labels, metric) for everything ops/metrics.py defines."""
    out: dict[str, tuple[str, set[str], Any]] = {}
    for m in vars(metrics).values():
        if not isinstance(m, (Counter, Gauge, Histogram)):
            continue
        labels = set(m._labelnames)
        if isinstance(m, Gauge) and m._multiprocess_mode.startswith("live"):
            labels.add("pid")  # liveall gauges: one series per worker process
        if isinstance(m, Counter):
            out[m._name + "_total"] = ("counter", labels, m)
        elif isinstance(m, Histogram):
            for suffix in ("_bucket", "_sum", "_count"):
                out[m._name + suffix] = ("histogram", labels | ({"le"} if suffix == "_bucket" else set()), m)
        else:
            out[m._name] = ("gauge", labels, m)
    return out


def _panels() -> list[dict[str, Any]]:
    # the generator itself (test_configs checks the committed JSON equals it)
    return [p for p in voicebot().json()["panels"] if p["type"] != "row"]


def _outer_by(expr: str) -> set[str] | None:
    """Labels kept by the query's outermost aggregation (`sum by (a, b) (...)`, or a histogram_quantile over
    one), None when the result keeps the series' own labels."""
    e = expr.strip()
    m = re.match(r"histogram_quantile\(\s*[\d.]+\s*,\s*(?:sum|max|min)\s+by\s*\(([^)]*)\)", e)
    if m:
        return {x.strip() for x in m.group(1).split(",")} - {"le"}
    m = re.match(r"(?:sum|min|max|count|avg)\s+by\s*\(([^)]*)\)", e)
    if m:
        return {x.strip() for x in m.group(1).split(",")}
    if re.match(r"(?:sum|min|max|count|avg)\s*\(", e):
        return set()
    return None


def test_dashboard_queries_match_the_registry() -> None:
    reg = _registry()
    panels = _panels()
    assert len(panels) >= 30
    n_names = n_selector_labels = n_groupings = n_legend_labels = 0
    problems: list[str] = []
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr, where = t["expr"], p["title"]
            names = metric_names(expr)
            if not names:
                problems.append(f"{where}: no metric in {expr}")
            own: set[str] = set(TARGET_LABELS)
            for n in names:
                n_names += 1
                if n == "up":
                    continue
                if n not in reg:
                    problems.append(f"{where}: {n} is not exported by ops/metrics.py "
                                    f"(family {family(n)} {'exists' if family(n) + '_bucket' in reg else 'unknown'})")
                    continue
                own |= reg[n][1]
            for name, body in re.findall(r"\b((?:voicebot_|up\b)[a-zA-Z0-9_]*)\s*\{([^}]*)\}", expr):
                allowed = TARGET_LABELS | (reg[name][1] if name in reg else set())
                for matcher in filter(None, (m.strip() for m in body.split(","))):
                    lb = re.split(r"[=!~]", matcher)[0].strip()
                    n_selector_labels += 1
                    if lb not in allowed:
                        problems.append(f"{where}: {name} has no label {lb!r}")
            for grp in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
                for lb in filter(None, (g.strip() for g in grp.split(","))):
                    n_groupings += 1
                    if lb not in own:
                        problems.append(f"{where}: grouping by {lb!r}, which none of {sorted(names)} has")
            kept = _outer_by(expr)
            for lb in re.findall(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}", t.get("legendFormat", "")):
                n_legend_labels += 1
                if lb not in own:
                    problems.append(f"{where}: legend names {lb!r}, which the series do not have")
                elif kept is not None and lb not in kept:
                    problems.append(f"{where}: legend names {lb!r}, aggregated away by {expr[:40]}...")
    assert not problems, "\n".join(problems)
    # not vacuous: the parsing found what a dashboard of this size must contain
    assert n_names >= 40 and n_selector_labels >= 5 and n_groupings >= 30 and n_legend_labels >= 30, (
        n_names, n_selector_labels, n_groupings, n_legend_labels)


def test_the_registry_check_catches_a_wrong_metric_or_label() -> None:
    """The checker above fails on what it is meant to catch (a dashboard query with a typo)."""
    reg = _registry()
    assert "voicebot_calls_total" in reg and "outcome" in reg["voicebot_calls_total"][1]
    assert "voicebot_turn_latency_seconds_bucket" in reg and "le" in reg["voicebot_turn_latency_seconds_bucket"][1]
    assert "voicebot_turn_latency_seconds" not in reg  # a histogram is only queryable by its series
    assert "pid" in reg["voicebot_redis_up"][1] and "pid" not in reg["voicebot_calls_total"][1]
    assert "transport" not in reg["voicebot_end_of_turn_wait_seconds_bucket"][1]
    assert _outer_by("sum by (transport) (rate(voicebot_calls_total[5m])) * 60") == {"transport"}
    assert _outer_by("histogram_quantile(0.95, sum by (le, op) (rate(x_bucket[5m])))") == {"op"}
    assert _outer_by("voicebot_policy_version") is None


def test_panel_units_match_what_they_plot() -> None:
    checked = 0
    problems = []
    for p in _panels():
        unit = p["fieldConfig"]["defaults"]["unit"]
        exprs = [t["expr"] for t in p["targets"]]
        if all(e.startswith("histogram_quantile(") and "_seconds_bucket" in e for e in exprs):
            checked += 1
            if unit != "s":
                problems.append(f"{p['title']}: latency quantiles in {unit!r}, not 's'")
        elif all(re.search(r"\)\s*\*\s*60\s*$", e) for e in exprs):
            checked += 1
            if unit != "cpm":
                problems.append(f"{p['title']}: per-minute rates in {unit!r}, not 'cpm'")
        elif all("_bytes" in e for e in exprs):
            checked += 1
            if unit != "bytes":
                problems.append(f"{p['title']}: bytes in {unit!r}")
        if unit == "percentunit":
            checked += 1
            if not all("/" in e or "_ratio_bucket" in e for e in exprs):  # a division, or a histogram of ratios
                problems.append(f"{p['title']}: percentunit on something that is not a ratio")
    assert not problems, "\n".join(problems)
    assert checked >= 20, checked


def _unit_tests() -> list[dict[str, Any]]:
    return yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    """Each alert: at least one case where it fires and one where it is expected silent (a healthy or
    near-miss system). promtool itself runs them in test_configs.py."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in _unit_tests():
        for a in case.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    assert len(alerts) >= 15
    assert not alerts - fires, f"never shown firing: {sorted(alerts - fires)}"
    assert not alerts - quiet, f"never shown quiet: {sorted(alerts - quiet)}"
    assert not (fires | quiet) - alerts, f"tests for alerts that do not exist: {sorted((fires | quiet) - alerts)}"


def _resolve_records(expr: str, records: dict[str, str]) -> str:
    for name, body in records.items():
        expr = re.sub(rf"(?<![\w:]){re.escape(name)}(?![\w:])", f"({body})", expr)
    return expr


def test_histogram_thresholds_are_bucket_bounds() -> None:
    """`histogram_quantile(q, ...x_bucket...) > T` is only exact when T is a bucket bound of x: between two
    bounds Prometheus interpolates linearly and the alert fires or stays quiet on an artefact."""
    rules = alert_rules()
    records = {r["record"]: r["expr"] for r in rules if "record" in r}
    reg = _registry()
    checked = 0
    problems = []
    for r in rules:
        if "alert" not in r:
            continue
        expr = _resolve_records(r["expr"], records)
        for m in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,.*?rate\((voicebot_\w+?)_bucket\[[^\]]+\]\)\)\)\)?\s*>\s*([\d.e]+)",
                             expr):
            hist, threshold = m.group(1), float(m.group(2))
            bounds = reg[hist + "_bucket"][2]._upper_bounds
            checked += 1
            if threshold not in bounds:
                problems.append(f"{r['alert']}: {hist} > {threshold} falls between buckets {bounds}")
    assert not problems, "\n".join(problems)
    assert checked >= 3, checked  # turn latency, engine queue, Redis op latency
    # the targets the docs judge against: 800 ms bot turn latency and caller voice-to-voice, 20 ms engine turn
    assert 0.8 in metrics.TURN_LATENCY._upper_bounds and 0.8 in metrics.VOICE_TO_VOICE._upper_bounds
    assert 0.02 in metrics.ENGINE_INFERENCE._upper_bounds and 0.1 in metrics.ENGINE_QUEUE._upper_bounds


def _route(doc: dict[str, Any], labels: dict[str, str]) -> str:
    """Alertmanager's routing for the matchers this config uses (label="v", label=~"re"): the first
    matching child route, else the root's receiver (no `continue` in this config)."""
    root = doc["route"]
    for sub in root.get("routes", []):
        ok = True
        for matcher in sub.get("matchers", []):
            lb, op, val = re.match(r'\s*(\w+)\s*(=~|!=|=)\s*"?([^"]*)"?\s*$', matcher).groups()
            v = labels.get(lb, "")
            ok &= {"=": v == val, "!=": v != val, "=~": re.fullmatch(val, v) is not None}[op]
        if ok:
            return sub["receiver"]
    return root["receiver"]


def test_pages_and_tickets_reach_different_receivers() -> None:
    doc = yaml.safe_load((ROOT / "ops" / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in doc["receivers"]}
    alerts = [r for r in alert_rules() if "alert" in r]
    got = {a["alert"]: _route(doc, {"alertname": a["alert"], **a["labels"]}) for a in alerts}
    pages = {got[a["alert"]] for a in alerts if a["labels"]["severity"] == "page"}
    tickets = {got[a["alert"]] for a in alerts if a["labels"]["severity"] == "ticket"}
    assert len(pages) == 1 and len(tickets) == 1 and pages != tickets, got
    urls = {n: [w["url"] for w in r.get("webhook_configs", [])] for n, r in receivers.items()}
    (page_rcv,), (ticket_rcv,) = pages, tickets
    assert urls[page_rcv] and urls[ticket_rcv] and set(urls[page_rcv]).isdisjoint(urls[ticket_rcv]), urls
    # one notification per alert across instances: a Redis outage seen by every worker pages once
    assert doc["route"]["group_by"] == ["alertname"]


def _runbook_promql() -> list[tuple[str, str]]:
    """Inline PromQL in runbooks: backticked spans with a function call or selector over voicebot_* / up."""
    out = []
    for f in sorted((ROOT / "ops" / "runbooks").glob("*.md")):
        for span in re.findall(r"`([^`]+)`", f.read_text()):
            s = span.strip()
            if re.match(r"^(?:histogram_quantile|sum|rate|increase|max|min|count|avg)\s*(?:by\s*\([^)]*\)\s*)?\(", s) \
                    or re.match(r"^(?:voicebot_\w+|up)\s*\{", s) or re.match(r"^voicebot_\w+\s*(?:==|>|<)", s):
                out.append((f.name, s))
    return out


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_runbook_promql_parses_and_names_real_metrics(tmp_path: Path) -> None:
    queries = _runbook_promql()
    assert len(queries) >= 15, queries  # the extraction still finds the runbooks' queries
    rules = {"groups": [{"name": "runbooks", "rules": [
        {"record": f"runbook:q{i}", "expr": q} for i, (_, q) in enumerate(queries)]}]}
    path = tmp_path / "runbook_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr + "\n" + "\n".join(f"{f}: {q}" for f, q in queries)
    reg = _registry()
    problems = []
    for f, q in queries:
        for n in metric_names(q):
            if n != "up" and n not in reg and family(n) + "_bucket" not in reg:
                problems.append(f"{f}: {q}: {n} is not exported")
            for name, body in re.findall(r"\b(voicebot_[a-zA-Z0-9_]*)\s*\{([^}]*)\}", q):
                own = TARGET_LABELS | (reg[name][1] if name in reg else
                                       reg.get(name + "_bucket", ("", set(), None))[1])
                for matcher in filter(None, (m.strip() for m in body.split(","))):
                    lb = re.split(r"[=!~]", matcher)[0].strip()
                    if lb not in own:
                        problems.append(f"{f}: {q}: {name} has no label {lb!r}")
    assert not problems, "\n".join(problems)


def test_every_alert_names_an_existing_runbook_about_it() -> None:
    for r in alert_rules():
        if "alert" not in r:
            continue
        path = ROOT / r["annotations"]["runbook_url"]
        assert path.is_file(), (r["alert"], path)
        assert r["alert"] in path.read_text().split("\n", 1)[0], f"{path.name}'s title does not name {r['alert']}"


def test_every_exported_metric_is_on_a_panel_or_in_an_alert() -> None:
    """A metric ops/metrics.py exports but no panel or alert shows is invisible to on-call (the leak detectors
    open FDs / threads / asyncio tasks were; docs/ops.md tells on-call to watch them)."""
    from tests.ops.queries import rule_exprs

    shown: set[str] = set()
    for p in _panels():
        for t in p["targets"]:
            shown |= {family(n) for n in metric_names(t["expr"])}
    for _, e in rule_exprs():
        shown |= {family(n) for n in metric_names(e)}
    exported = {family(n) for n in _registry()}
    assert len(exported) >= 30
    assert not exported - shown, f"exported but on no panel or alert: {sorted(exported - shown)}"


def test_inhibit_rules_name_real_alerts() -> None:
    """An inhibit rule whose matcher names no alert (a typo, a renamed alert) silently stops inhibiting:
    every alertname matcher must match an alert that exists, and a source never mutes itself."""
    doc = yaml.safe_load((ROOT / "ops" / "alertmanager" / "alertmanager.yml").read_text())
    alerts = {r["alert"]: r for r in alert_rules() if "alert" in r}
    rules = doc.get("inhibit_rules", [])
    assert rules
    for rule in rules:
        matched: dict[str, set[str]] = {}
        for side in ("source_matchers", "target_matchers"):
            names = set(alerts)
            for matcher in rule[side]:
                lb, op, val = re.match(r'\s*(\w+)\s*(=~|!=|=)\s*"?([^"]*)"?\s*$', matcher).groups()
                pick = {"=": lambda v: v == val, "!=": lambda v: v != val,
                        "=~": lambda v: re.fullmatch(val, v) is not None}[op]
                names = {n for n in names if pick(n if lb == "alertname" else alerts[n]["labels"].get(lb, ""))}
            assert names, f"{side} {rule[side]} match no alert"
            matched[side] = names
        assert not matched["source_matchers"] & matched["target_matchers"], rule


def _code_strings() -> set[str]:
    """Every string literal (and constant part of an f-string) in the code that exports metrics."""
    import ast

    out: set[str] = set()
    for d in ("bot", "telephony", "engine", "policies", "ops"):
        for f in (ROOT / d).rglob("*.py"):
            try:
                tree = ast.parse(f.read_text())
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.add(node.value)
    return out


def test_label_values_alerts_and_panels_select_are_exported_by_the_code() -> None:
    """A selector like {kind="start_failed"} on a value the code never exports makes an alert that cannot fire
    (or an exclusion that excludes nothing): every literal label value an alert or panel selects on a voicebot_
    metric (each alternative of a regex of plain words too) is a string the code writes somewhere."""
    strings = _code_strings()
    exprs = [(r.get("alert") or r.get("record"), r["expr"]) for r in alert_rules()]
    exprs += [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]
    checked = 0
    problems = []
    for where, expr in exprs:
        for name, body in re.findall(r"\b(voicebot_[a-zA-Z0-9_]*)\s*\{([^}]*)\}", expr):
            for lb, op, val in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
                if lb in TARGET_LABELS or lb == "le":
                    continue
                alts = val.split("|") if op in ("=~", "!~") else [val]
                for v in alts:
                    if not re.fullmatch(r"[A-Za-z0-9_+.-]+", v):
                        continue  # a real pattern, not a list of values
                    checked += 1
                    if v not in strings:
                        problems.append(f"{where}: {name}{{{lb}{op}...}}: {v!r} is exported nowhere in the code")
    assert not problems, "\n".join(problems)
    assert checked >= 25, checked
