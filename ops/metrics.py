"""Every Prometheus metric the bot exports, defined once.

Dashboards (ops/grafana) and alert rules (ops/prometheus) reference these names; a test
checks each query against a live /metrics. Units are in the names; latencies are histograms.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Voice-to-voice and engine latencies sit between ~10 ms and a few seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)

ACTIVE_CALLS = Gauge("voicebot_active_calls", "Calls in progress on this worker", ["transport"], multiprocess_mode="liveall")
CALLS_TOTAL = Counter("voicebot_calls_total", "Calls ended, by transport and outcome", ["transport", "outcome"])
CALLS_STARTED = Counter("voicebot_calls_started_total", "Calls answered, by transport", ["transport"])
# a reaper counts a call of a worker it cannot hear from as worker_lost; a worker that was only cut off from Redis
# takes the call back (bot/state.py _reclaim) and counts its real end later: subtract these from worker_lost
CALLS_RECLAIMED = Counter("voicebot_calls_reclaimed_total", "Calls counted worker_lost by a reaper that their worker, "
                          "only cut off from Redis, took back (their real end is counted too)", ["transport"])
TURN_LATENCY = Histogram(
    "voicebot_turn_latency_seconds",
    "Turn declared complete (after the end-of-turn wait) to first bot audio frame sent; the caller's "
    "voice-to-voice adds voicebot_end_of_turn_wait_seconds",
    ["transport"],
    buckets=_LATENCY_BUCKETS,
)
VOICE_TO_VOICE = Histogram(
    "voicebot_voice_to_voice_seconds",
    "What the caller waits: end of their speech to first bot audio frame sent (end-of-turn wait + turn latency)",
    ["transport"],
    buckets=_LATENCY_BUCKETS,
)
END_OF_TURN_WAIT = Histogram(
    "voicebot_end_of_turn_wait_seconds",
    "Silence waited after the caller stopped speaking before the turn was declared complete",
    buckets=_LATENCY_BUCKETS,
)
GREETING_LATENCY = Histogram(
    "voicebot_greeting_latency_seconds",
    "Stream start to first greeting audio frame sent",
    ["transport"],
    buckets=_LATENCY_BUCKETS,
)
ENGINE_INFERENCE = Histogram(
    "voicebot_engine_inference_seconds",
    "Engine model run time per request",
    ["op", "backend"],
    buckets=_LATENCY_BUCKETS,
)
ENGINE_QUEUE = Histogram(
    "voicebot_engine_queue_seconds",
    "Time a request waited in the engine batching queue",
    ["op"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
ENGINE_BATCH_SIZE = Histogram(
    "voicebot_engine_batch_size",
    "Requests per engine batch",
    ["op"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INTENT_CONFIDENCE = Histogram(
    "voicebot_intent_confidence",
    "Calibrated confidence of the top intent per caller turn",
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
)
POLICY_DECISIONS = Counter("voicebot_policy_decisions_total", "Policy decisions", ["action", "reason"])
ESCALATIONS = Counter("voicebot_escalations_total", "Transfers to humans, by reason", ["reason"])
TRANSFERS = Counter("voicebot_transfers_total", "Transfers carried out by a bridge", ["transport", "queue", "result"])
TWILIO_STREAM_ENDS = Counter("voicebot_twilio_stream_ends_total", "Twilio's reports that a call's stream ended "
                             "(<Connect action>), by the answer: hangup (the bot or the caller ended the call), "
                             "call_over, reconnect (stream lost with the caller on the line: a new stream), gave_up "
                             "(lost too often: system-error route)", ["result"])
TWILIO_REST_HANGUPS = Counter("voicebot_twilio_rest_hangups_total", "Twilio calls the bot ended with a REST update "
                              "to <Hangup/> because its end could not be recorded in Redis, by result: ok, timeout, "
                              "or the REST failure (unconfigured, call_gone, auth, ...)", ["result"])
SIP_REGISTERED = Gauge("voicebot_sip_registered", "1 while this worker's SIP server holds a registration at the "
                       "provider's registrar (BOT_SIP_REGISTRAR), 0 while it cannot register", multiprocess_mode="liveall")
SIP_REGISTRATIONS = Counter("voicebot_sip_registrations_total", "REGISTER attempts with the provider's registrar, by "
                            "result: ok, auth_failed, refused, no_answer, unresolved (its name led to no server: DNS)", ["result"])
SIP_RESUMES = Counter("voicebot_sip_resumes_total", "SIP calls of a dead worker that its restarted process tried to "
                      "carry on (re-INVITE from the new process, bot/sip_recovery.py), by result: resumed, hung_up (a BYE "
                      "instead: the bot was hanging up, or the call was lost longer ago than BOT_SIP_RESUME_WINDOW_S), "
                      "gone (the phone had hung up: 481/408), no_answer, refused, ended, expired, unreadable, "
                      "bad_answer, no_rtp_port, error", ["result"])
AUDIO_LOSS = Histogram("voicebot_call_audio_loss_ratio", "Share of a SIP call's RTP packets lost, per call at its "
                       "end: direction in (the caller's audio, as we received it), out (the bot's audio, as the "
                       "phone's RTCP reported it)", ["direction"],
                       buckets=(0.0005, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5))
AUDIO_JITTER = Histogram("voicebot_call_audio_jitter_seconds", "RTP interarrival jitter of a SIP call (RFC 3550), per "
                         "call at its end, by direction as for voicebot_call_audio_loss_ratio", ["direction"],
                         buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.5))
SIP_CALLS_ANSWERED = Counter("voicebot_sip_calls_answered_total", "SIP calls answered (first leg), by the transport "
                             "their signalling came over (udp, tcp, tls) and their audio (rtp, srtp): how much of the "
                             "traffic is encrypted", ["signalling", "media"])
ERRORS = Counter("voicebot_errors_total", "Errors by component and kind", ["component", "kind"])
BARGE_INS = Counter("voicebot_barge_ins_total", "Caller speech that interrupted the bot", ["transport"])
AUDIO_FRAMES = Counter("voicebot_audio_frames_total", "20 ms audio frames", ["transport", "direction"])
LATE_FRAMES = Counter("voicebot_late_frames_total", "Outbound frames sent later than their pacing deadline", ["transport"])
# Escalation webhook (bot/escalation_webhook.py): ok (delivered), retried (an attempt failed, another follows),
# failed (gave up), dropped (never finished: overflow or shutdown).
WEBHOOK_DELIVERIES = Counter("voicebot_webhook_deliveries_total", "Escalation webhook deliveries and retries",
                             ["event", "result"])
WEBHOOK_DELIVERY_LATENCY = Histogram("voicebot_webhook_delivery_seconds",
                                     "Hand-off to the receiver's 2xx, retries included", ["event"],
                                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0))
FILLERS = Counter("voicebot_fillers_total", "Fillers or apologies played to avoid dead air", ["kind"])
REDIS_UP = Gauge("voicebot_redis_up", "1 when the last Redis operation succeeded", multiprocess_mode="liveall")
SIP_LISTENING = Gauge("voicebot_sip_listening", "1 while this worker's SIP server is bound; 0 while it retries the bind",
                      multiprocess_mode="liveall")
# A failover or restart behind the connection: the only trace of a forced/manual Sentinel failover, where the old
# master acknowledges (and then discards) writes until it is demoted and voicebot_redis_up never drops
REDIS_SERVER_CHANGES = Counter("voicebot_redis_server_changes_total",
                               "Times the Redis server behind this worker's connection changed (a new run_id: failover "
                               "or restart); writes acknowledged just before it may be lost")
REDIS_LATENCY = Histogram(
    "voicebot_redis_op_seconds", "Redis call-state operation latency", ["op"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
)
ENGINE_BACKEND = Gauge("voicebot_engine_backend", "1 for the backend this worker's engine runs on: requested is "
                       "BOT_ENGINE_BACKEND, serving what could run (onnx when a GPU backend fell back)",
                       ["requested", "serving"], multiprocess_mode="liveall")
ENGINE_MODEL = Gauge("voicebot_engine_model", "1 for the understanding model and int8 graph this worker loaded: graph "
                     "model.vnni.onnx (8-bit weights, x86 CPUs with VNNI) or model.onnx (7-bit, every CPU)",
                     ["model", "graph"], multiprocess_mode="liveall")
POLICY_VERSION = Gauge("voicebot_policy_version", "Policy version this worker serves new calls with", multiprocess_mode="liveall")
WORKER_INFO = Gauge("voicebot_worker_info", "Static worker info", ["worker", "version"], multiprocess_mode="liveall")
# prometheus_client's process_* metrics are not exported in multiprocess mode (--workers N), so each worker
# samples its own (ops/process_metrics.py); "liveall" = one series per live pid, a dead worker's series go.
WORKER_CPU = Gauge("voicebot_worker_cpu_seconds", "CPU time (user + system) this worker process has used",
                   multiprocess_mode="liveall")
WORKER_RSS = Gauge("voicebot_worker_resident_memory_bytes", "Resident memory of this worker process",
                   multiprocess_mode="liveall")
# Leak detectors for the on-call engineer: each must return to its idle level when the calls are gone.
WORKER_OPEN_FDS = Gauge("voicebot_worker_open_fds", "Open file descriptors of this worker process",
                        multiprocess_mode="liveall")
WORKER_THREADS = Gauge("voicebot_worker_threads", "OS threads of this worker process", multiprocess_mode="liveall")
WORKER_TASKS = Gauge("voicebot_worker_asyncio_tasks", "asyncio tasks alive in this worker's event loop",
                     multiprocess_mode="liveall")
SIP_MESSAGES = Counter("voicebot_sip_messages_total", "SIP messages received", ["method", "result"])
RTP_PACKETS = Counter("voicebot_rtp_packets_total", "RTP packets", ["direction", "result"])


# Series the alerts' increase()/rate() read. prometheus-client creates a labelled series on its first increment,
# and increase() needs a sample before the event: without a 0 scraped first, the first call or error of each
# label set after a deploy is never counted (NoCallsInBusinessHours, ErrorRateHigh, EscalationWebhookFailing).
TRANSPORTS = ("twilio", "sip", "webrtc")
MAIN_OUTCOMES = ("completed", "caller_hangup", "transferred", "transfer_failed", "no_input", "out_of_hours",
                 "callback", "system_error", "disconnected", "abandoned")
ALERTED_ERRORS = (
    ("state", "redis_unavailable"), ("engine", "understand"), ("engine", "timeout"), ("engine", "speak"),
    ("conversation", "exception"), ("conversation", "turn"), ("sip", "start_failed"),
    ("escalation_webhook", "failed"), ("escalation_webhook", "rejected"), ("escalation_webhook", "dropped"),
    ("escalation_webhook", "bad_context"), ("escalation_webhook", "internal"),
)


def init_series() -> None:
    """Export the series above at 0 (idempotent; values already counted are kept). Called when a worker starts,
    not at import: tools and tests that import this module get no extra series."""
    for transport in TRANSPORTS:
        CALLS_STARTED.labels(transport)
        CALLS_RECLAIMED.labels(transport)
        for outcome in MAIN_OUTCOMES:
            CALLS_TOTAL.labels(transport, outcome)
    for component, kind in ALERTED_ERRORS:
        ERRORS.labels(component, kind)
    for result in ("hangup", "call_over", "reconnect", "gave_up"):
        TWILIO_STREAM_ENDS.labels(result)
    TWILIO_REST_HANGUPS.labels("ok")
    for result in ("resumed", "hung_up", "gone", "no_answer"):
        SIP_RESUMES.labels(result)
