"""Every metric a dashboard panel or alert rule queries is exported by a live `bot serve`.

Starts the real server, places real simulated Twilio calls (one spoken turn, one keypad transfer)
so labelled series exist, scrapes /metrics and checks each name from ops/grafana/dashboards and
ops/prometheus/alerts.yml (histograms via _bucket/_sum/_count)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers.audio import silence, synth
from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url, metric_value
from tests.ops.queries import PROMETHEUS_SYNTHETIC, dashboard_exprs, family, metric_names, rule_exprs

pytestmark = pytest.mark.slow

# series that exist once a call with a spoken turn and a transfer went through; the rest must at
# least be declared (# TYPE) because their labels only appear on rarer events (errors, SIP, ...)
MUST_HAVE_SAMPLES = {
    "voicebot_active_calls", "voicebot_calls_started_total", "voicebot_calls_total", "voicebot_turn_latency_seconds_bucket",
    "voicebot_voice_to_voice_seconds_bucket",
    "voicebot_greeting_latency_seconds_bucket", "voicebot_intent_confidence_bucket", "voicebot_policy_decisions_total",
    "voicebot_engine_inference_seconds_bucket", "voicebot_transfers_total", "voicebot_escalations_total",
    "voicebot_redis_up", "voicebot_worker_cpu_seconds", "voicebot_worker_resident_memory_bytes", "voicebot_audio_frames_total",
}


@pytest.fixture(scope="module")
def live(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("ops-live")
    with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as api:
        env = twilio_env(api.url, open_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp())
        with BotServer(isolated_redis_url(redis_url), tmp, env) as server:
            yield server


def _exposition(text: str) -> tuple[set[str], set[str]]:
    """(families declared by # TYPE, sample names that have a value)."""
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    samples = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
    return declared, samples


async def test_every_query_metric_is_exported(live: BotServer) -> None:
    a = await place_call(live.url)
    await a.wait_bot_quiet(quiet_s=0.5, timeout_s=20)
    turn = await a.say(__import__("numpy").concatenate([synth("I want to pay my bill"), silence(900)]), "pay",
                       wait_reply_s=20)
    assert turn.v2v_ms is not None, "the bot never answered the spoken turn"
    b = await place_call(live.url)
    await b.wait_bot_quiet(quiet_s=0.5, timeout_s=20)
    text_live = live.metrics()  # calls in progress: the active-calls gauge has its labelled series
    for d in "0#":
        await b.send_dtmf(d)
    assert await b.wait_ended(25)
    await a.hangup()
    await b.close()
    assert (await wait_outcome(live.redis_url, b.call_sid))["record"].get("outcome") == "transferred"
    text = live.metrics()
    declared, samples = _exposition(text + "\n" + text_live)
    # what the caller waited includes the end-of-turn silence on top of the bot's own turn latency
    tw = {"transport": "twilio"}
    assert metric_value(text, "voicebot_voice_to_voice_seconds_count", tw) == metric_value(
        text, "voicebot_turn_latency_seconds_count", tw) >= 1
    assert metric_value(text, "voicebot_voice_to_voice_seconds_sum", tw) > metric_value(
        text, "voicebot_turn_latency_seconds_sum", tw) + 0.2  # BOT_EOT_MIN_SILENCE_MS is 250

    used: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs() + rule_exprs():
        for n in metric_names(expr):
            used.setdefault(n, set()).add(where)
    assert len(used) >= 20
    missing = []
    for name, where in sorted(used.items()):
        if name in PROMETHEUS_SYNTHETIC:
            continue
        fam = family(name)
        # counters are declared without _total in # TYPE by some client versions
        is_declared = fam in declared or name in declared or name.removesuffix("_total") in declared
        has_samples = name in samples
        if not is_declared and not has_samples:
            missing.append(f"{name} (used by {sorted(where)[:2]})")
        if name in MUST_HAVE_SAMPLES and not has_samples:
            missing.append(f"{name} has no samples after a call")
    assert not missing, "\n".join(missing)
