"""Generates ops/grafana/dashboards/*.json (run: python -m ops.grafana.build_dashboards).

Dashboards are code so that panels stay consistent and every query is reviewable in one place;
tests/ops checks each query's metric names against a live /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"


def _q(expr: str, legend: str = "", ref: str = "A", fmt: str = "time_series") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "format": fmt}


def _quantiles(metric: str, by: str = "", window: str = "5m") -> list[dict[str, Any]]:
    grp = f"le{', ' + by if by else ''}"
    lg = "{{" + by + "}} " if by else ""
    return [_q(f"histogram_quantile({q}, sum by ({grp}) (rate({metric}_bucket[{window}])))", f"{lg}p{int(q * 100)}",
               chr(65 + i)) for i, q in enumerate((0.5, 0.95, 0.99))]


class Board:
    def __init__(self, uid: str, title: str) -> None:
        self.uid, self.title = uid, title
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self._id = 0

    def row(self, title: str) -> None:
        self._newline()
        self._id += 1
        self.panels.append({"type": "row", "title": title, "id": self._id, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8

    def panel(self, title: str, targets: list[dict[str, Any]], kind: str = "timeseries", unit: str = "short",
              w: int = 8, h: int = 8, desc: str = "", **extra: Any) -> None:
        if self.x + w > 24:
            self._newline()
        self._id += 1
        p: dict[str, Any] = {"id": self._id, "type": kind, "title": title, "description": desc, "datasource": DS,
                             "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}, "targets": targets,
                             "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}
        p.update(extra)
        self.panels.append(p)
        self.x += w
        if self.x >= 24:
            self._newline()

    def json(self) -> dict[str, Any]:
        return {"uid": self.uid, "title": self.title, "tags": ["voicebot"], "timezone": "utc", "schemaVersion": 39,
                "version": 1, "editable": False, "refresh": "10s", "time": {"from": "now-3h", "to": "now"},
                "templating": {"list": []}, "annotations": {"list": []}, "panels": self.panels}


def voicebot() -> Board:
    b = Board("voicebot-overview", "Voicebot")
    b.row("Calls")
    b.panel("Calls now", [_q("sum by (transport) (voicebot_active_calls)", "{{transport}}")], "stat", w=6,
            desc="Calls in progress, by transport (Twilio, SIP, WebRTC)")
    b.panel("Calls started / min", [_q("sum by (transport) (rate(voicebot_calls_started_total[5m])) * 60",
                                       "{{transport}}")], w=9, unit="cpm")
    b.panel("Calls ended / min by outcome", [
        _q("sum by (transport, outcome) (rate(voicebot_calls_total[5m])) * 60", "{{transport}} {{outcome}}"),
        _q("sum by (transport) (rate(voicebot_calls_reclaimed_total[5m])) * 60",
           "{{transport}} worker_lost taken back", "B")], w=9, unit="cpm",
        desc="worker_lost taken back: calls a reaper counted as worker_lost whose worker had only been cut off from "
             "Redis and carried them on; their real end is counted too")
    b.panel("Automation rate (1h)", [_q(
        'sum(increase(voicebot_calls_total{outcome="completed"}[1h])) / clamp_min(sum(increase(voicebot_calls_total[1h]))'
        ' - (sum(increase(voicebot_calls_reclaimed_total[1h])) or vector(0)), 1)',
        "automated")], "stat", w=6, unit="percentunit", desc="Calls the bot completed without a human")
    b.panel("Escalation rate (1h)", [_q(
        "sum(increase(voicebot_escalations_total[1h])) / clamp_min(sum(increase(voicebot_calls_started_total[1h])), 1)",
        "escalated")], "stat", w=6, unit="percentunit", desc="Transfers to humans per answered call")
    b.panel("Clarification rate (1h)", [_q(
        'sum(increase(voicebot_policy_decisions_total{action=~"clarify|confirm|reprompt",reason!~"read_back|out_of_hours|resumed"}[1h])) / '
        "clamp_min(sum(increase(voicebot_policy_decisions_total[1h])), 1)", "clarify")], "stat", w=6,
        unit="percentunit", desc="Decisions that ask the caller again because the bot was unsure (read-backs and callback offers not counted)")
    b.panel("Greeting latency p95", [_q(
        "histogram_quantile(0.95, sum by (le, transport) (rate(voicebot_greeting_latency_seconds_bucket[5m])))",
        "{{transport}}")], "stat", w=6, unit="s")

    b.row("Latency")
    b.panel("Voice-to-voice: what callers wait (end of speech -> first bot audio)",
            _quantiles("voicebot_voice_to_voice_seconds"), w=12, unit="s",
            desc="End-of-turn wait + bot turn latency, per answered turn. Up to BOT_EOT_MAX_SILENCE_MS (1 s) of it is "
            "deliberate: the end-of-turn head waits for callers who only paused")
    b.panel("Bot turn latency (turn declared complete -> first bot audio)", _quantiles("voicebot_turn_latency_seconds"),
            w=12, unit="s", desc="Starts after the end-of-turn wait: the caller's voice-to-voice is this + the end-of-turn "
            "wait (next panels) + ~0.1 s VAD hangover/playout. Alert VoiceToVoiceLatencyHigh: p95 > 800 ms")
    b.panel("Bot turn latency p95 by transport", [_q(
        "histogram_quantile(0.95, sum by (le, transport) (rate(voicebot_turn_latency_seconds_bucket[5m])))",
        "{{transport}}")], w=12, unit="s")
    b.panel("End-of-turn wait", _quantiles("voicebot_end_of_turn_wait_seconds"), w=12, unit="s",
            desc="Silence waited before a turn is declared complete (part of voice-to-voice, not of bot turn latency)")

    b.row("Engine")
    b.panel("Engine inference p50/p95 by op", [
        _q("histogram_quantile(0.5, sum by (le, op, backend) (rate(voicebot_engine_inference_seconds_bucket[5m])))",
           "{{op}} {{backend}} p50", "A"),
        _q("histogram_quantile(0.95, sum by (le, op, backend) (rate(voicebot_engine_inference_seconds_bucket[5m])))",
           "{{op}} {{backend}} p95", "B")], w=8, unit="s")
    b.panel("Engine queue wait p95", [_q(
        "histogram_quantile(0.95, sum by (le, op) (rate(voicebot_engine_queue_seconds_bucket[5m])))", "{{op}}")],
        w=8, unit="s", desc="Alert EngineSaturated above 100 ms")
    b.panel("Engine batch size (mean)", [_q(
        "sum by (op) (rate(voicebot_engine_batch_size_sum[5m])) / clamp_min(sum by (op) (rate(voicebot_engine_batch_size_count[5m])), 1e-9)",
        "{{op}}")], w=8)
    b.panel("Engine batch size distribution", [_q(
        "sum by (le) (increase(voicebot_engine_batch_size_bucket[$__rate_interval]))", "{{le}}", fmt="heatmap")],
        "heatmap", w=12)
    b.panel("Intent confidence distribution", [_q(
        "sum by (le) (increase(voicebot_intent_confidence_bucket[$__rate_interval]))", "{{le}}", fmt="heatmap")],
        "heatmap", w=12, desc="Calibrated top-intent confidence per caller turn; a shift left means the bot understands less")

    b.row("Decisions and transfers")
    b.panel("Decisions / min by action and reason", [_q(
        "sum by (action, reason) (rate(voicebot_policy_decisions_total[5m])) * 60", "{{action}} {{reason}}")],
        w=8, unit="cpm")
    b.panel("Escalations / min by reason", [_q(
        "sum by (reason) (rate(voicebot_escalations_total[5m])) * 60", "{{reason}}")], w=8, unit="cpm")
    b.panel("Transfers / min by queue", [_q(
        "sum by (queue, transport, result) (rate(voicebot_transfers_total[5m])) * 60",
        "{{queue}} {{transport}} {{result}}")], w=8, unit="cpm")
    b.panel("Fillers and apologies / min", [_q("sum by (kind) (rate(voicebot_fillers_total[5m])) * 60", "{{kind}}")],
            w=8, unit="cpm")
    b.panel("Barge-ins / min", [_q("sum by (transport) (rate(voicebot_barge_ins_total[5m])) * 60", "{{transport}}")],
            w=8, unit="cpm")
    b.panel("Policy version per worker", [_q("voicebot_policy_version", "{{instance}} {{pid}}")], "stat", w=4)
    b.panel("Hand-offs to the escalation webhook / min", [_q(
        "sum by (event, result) (rate(voicebot_webhook_deliveries_total[5m])) * 60", "{{event}} {{result}}")],
        w=4, unit="cpm", desc="Transfer contexts and accepted callbacks sent to BOT_ESCALATION_WEBHOOK; "
        "failed/dropped ones never reached it (alert EscalationWebhookFailing)")
    b.panel("Escalation webhook delivery p95 (retries included)", [_q(
        "histogram_quantile(0.95, sum by (le, event) (rate(voicebot_webhook_delivery_seconds_bucket[5m])))",
        "{{event}}")], w=8, unit="s", desc="Hand-off to the receiver's 2xx; a climb means the receiver is slow or "
        "answers with retries (5xx/429) before it fails outright")

    b.row("Errors and media")
    b.panel("Errors / min by component", [_q(
        "sum by (component, kind) (rate(voicebot_errors_total[5m])) * 60", "{{component}} {{kind}}")], w=12,
        unit="cpm", desc="Alert ErrorRateHigh: > 0.2 errors per call")
    b.panel("Late outbound frames / s", [_q(
        "sum by (transport) (rate(voicebot_late_frames_total[5m]))", "{{transport}} late"),
        _q("sum by (transport, direction) (rate(voicebot_audio_frames_total[5m]))", "{{transport}} {{direction}}", "B")],
        w=12, unit="pps")
    b.panel("Twilio streams ended / min by answer", [
        _q("sum by (result) (rate(voicebot_twilio_stream_ends_total[5m])) * 60", "{{result}}"),
        _q("sum by (result) (rate(voicebot_twilio_rest_hangups_total[5m])) * 60", "REST hang-up {{result}}", "B")],
        w=12, unit="cpm",
        desc="Twilio's <Connect action> after each stream: hangup (the call was over), reconnect (the stream was "
             "lost with the caller on the line, e.g. a worker died: a new stream on a live worker), gave_up (lost "
             "three times: the system-error queue). REST hang-up: calls the bot ended with a REST update to "
             "<Hangup/> because Redis could not record their end (an outage): anything but ok may have given "
             "a caller who had heard the goodbye a new stream")
    b.panel("SIP messages / s", [_q("sum by (method, result) (rate(voicebot_sip_messages_total[5m]))",
                                    "{{method}} {{result}}")], w=12, unit="reqps")
    b.panel("RTP packets / s", [_q("sum by (direction, result) (rate(voicebot_rtp_packets_total[5m]))",
                                   "{{direction}} {{result}}")], w=12, unit="pps")
    b.panel("SIP calls answered by transport and media (1h)", [_q(
        "sum by (signalling, media) (increase(voicebot_sip_calls_answered_total[1h]))", "{{signalling}} / {{media}}")],
        "stat", w=12, desc="How the SIP calls came: signalling over udp, tcp or tls, audio as rtp or srtp (SDES, "
        "BOT_SIP_SRTP). Calls with tls / srtp are encrypted end to end of the trunk leg; udp or tcp with srtp still "
        "carries the SRTP keys in clear SDP (docs/sip.md, SRTP)")
    b.panel("SIP call audio lost (p95 of calls, 1h)", [_q(
        "histogram_quantile(0.95, sum by (le, direction) (rate(voicebot_call_audio_loss_ratio_bucket[1h])))",
        "{{direction}}")], w=6, unit="percentunit",
        desc="Share of RTP packets lost per SIP call, the worst 5 % of calls: in = the caller's audio as the bot "
             "received it; out = the bot's audio as the phone's RTCP reported it. Over ~3 % callers hear (or are "
             "heard) choppy; a call's own figures are in `bot calls show` and its call_ended log")
    b.panel("SIP call audio jitter (p95 of calls, 1h)", [_q(
        "histogram_quantile(0.95, sum by (le, direction) (rate(voicebot_call_audio_jitter_seconds_bucket[1h])))",
        "{{direction}}")], w=6, unit="s",
        desc="RTP interarrival jitter (RFC 3550) per SIP call, the worst 5 %: above the jitter buffer's depth "
             "(BOT_SIP_JITTER_FRAMES x 20 ms) packets arrive too late to be played")
    b.panel("SIP calls carried on after a worker died", [_q(
        "sum by (result) (increase(voicebot_sip_resumes_total[15m]))", "{{result}}")], w=12,
        desc="The restarted worker 0 re-INVITEs the phones of the SIP calls its previous process lost: resumed (the "
             "call goes on from where it was), gone (the caller had hung up), no_answer / refused (the phone did not "
             "take the re-INVITE), hung_up (a BYE instead: the bot was saying goodbye, or the call was lost longer ago "
             "than BOT_SIP_RESUME_WINDOW_S)")

    b.row("Redis and workers")
    b.panel("Redis up (per worker)", [_q("min by (instance) (voicebot_redis_up)", "{{instance}}")], "stat", w=4,
            desc="0: the worker buffers call events in memory (alert RedisDown)")
    b.panel("SIP listening", [_q("max by (instance) (voicebot_sip_listening)", "{{instance}}")], "stat", w=4,
            desc="0: worker 0 cannot bind the SIP port and retries (alert SipNotListening), or SIP is off "
            "(BOT_SIP_ENABLED=0); Twilio unaffected. Only worker 0 serves SIP, so the instance shows the max")
    b.panel("SIP registered", [
        _q("max by (instance) (voicebot_sip_registered)", "{{instance}}"),
        _q("sum by (result) (increase(voicebot_sip_registrations_total[1h]))", "REGISTER {{result}} (1h)", "B")],
        "stat", w=4, desc="with BOT_SIP_REGISTRAR: 1 while worker 0 holds a registration at the provider; 0: the "
        "provider's calls go nowhere (alert SipNotRegistered). Empty without a registrar")
    b.panel("Engine backend", [_q('sum by (requested, serving) (voicebot_engine_backend)', "{{requested}} → {{serving}}")],
            "stat", w=4, desc="workers per requested → serving backend; a GPU backend → onnx is a fallback (alert EngineGpuFallback)")
    b.panel("Engine model / graph", [_q("sum by (model, graph) (voicebot_engine_model)", "{{model}} {{graph}}")],
            "stat", w=4, desc="workers per understanding model and int8 graph: model.vnni.onnx (8-bit weights) on x86 "
            "CPUs with VNNI, model.onnx (7-bit) elsewhere. Two graphs in one fleet read callers slightly differently "
            "(docs/engine.md: held-out test 0.867 vs 0.849); BOT_ENGINE_INT8_GRAPH pins one")
    b.panel("Redis op latency p99", [_q(
        "histogram_quantile(0.99, sum by (le, op) (rate(voicebot_redis_op_seconds_bucket[5m])))", "{{op}}")],
        w=8, unit="s")
    b.panel("Redis server changes (10 min)", [_q(
        "sum by (instance) (increase(voicebot_redis_server_changes_total[10m]))", "{{instance}}")], "stat", w=4,
        desc="Failovers or restarts behind each worker's Redis connection (alert RedisServerChanged). A forced "
        "Sentinel failover shows only here (Redis up stays 1): events written just before it may be lost")
    b.panel("Workers up", [_q('up{job="voicebot"}', "{{instance}}"),
                           _q("count by (instance) (voicebot_worker_info)", "{{instance}} workers", "B")], w=8)
    b.panel("CPU per worker (cores)", [_q('rate(voicebot_worker_cpu_seconds{job="voicebot"}[1m])', "{{instance}} {{pid}}")],
            w=12, unit="short", desc="1.0 = one full core (sampled by each worker every 5 s)")
    b.panel("Resident memory per worker", [_q('voicebot_worker_resident_memory_bytes{job="voicebot"}', "{{instance}} {{pid}}")],
            w=12, unit="bytes")
    b.panel("Open FDs, threads and asyncio tasks per worker", [
        _q('voicebot_worker_open_fds{job="voicebot"}', "{{instance}} {{pid}} fds", "A"),
        _q('voicebot_worker_threads{job="voicebot"}', "{{instance}} {{pid}} threads", "B"),
        _q('voicebot_worker_asyncio_tasks{job="voicebot"}', "{{instance}} {{pid}} tasks", "C")], w=12,
        desc="Leak detectors: each returns to its idle level when the calls are gone; one that climbs with the "
        "call count and never comes back down is a leak (compare with Calls now)")
    return b


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for board in (voicebot(),):
        (OUT / f"{board.uid}.json").write_text(json.dumps(board.json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
