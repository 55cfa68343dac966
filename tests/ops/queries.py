"""Every PromQL expression the ops configs use (dashboards + alert rules) and the metric names in
them, so tests can check them against promtool and a live /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "ops" / "grafana" / "dashboards"
# series Prometheus itself makes (not exported by the bot)
PROMETHEUS_SYNTHETIC = {"up"}
_NAME = re.compile(r"(?<![\w:])([a-zA-Z_][a-zA-Z0-9_]*)(?=\s*[{\[])|(?<![\w:])((?:voicebot|process)_[a-zA-Z0-9_]+)")
_HIST_SUFFIX = ("_bucket", "_sum", "_count")


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        for p in json.loads(f.read_text())["panels"]:
            for t in p.get("targets", []):
                out.append((f"{f.stem}/{p['title']}", t["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    return [(r.get("alert") or r.get("record"), r["expr"]) for r in alert_rules()]


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (selectors and bare names)."""
    text = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in _NAME.finditer(text):
        name = m.group(1) or m.group(2)
        if name and (name.startswith(("voicebot_", "process_")) or name in PROMETHEUS_SYNTHETIC):
            names.add(name)
    return names


def family(name: str) -> str:
    """voicebot_x_seconds_bucket -> voicebot_x_seconds (what `# TYPE` names)."""
    for s in _HIST_SUFFIX:
        if name.endswith(s):
            return name[: -len(s)]
    return name
