"""The FastAPI app of one `bot serve` worker: Twilio webhook + Media Streams WebSocket, /metrics,
/healthz, /readyz, the admin console (when installed), and the SIP server (worker 0, when enabled).

Start-up order: Redis (call state) -> policy (seeded into Redis, watched) -> engine + pre-rendered
prompts -> batched VAD -> routes ready. /readyz answers 200 only once all of that is up and the
worker is not draining.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bot.config import Settings, load_settings
from bot.conversation import APOLOGY_TEXT, FILLER_TEXT, ConversationConfig, Services
from bot.conversation_manager import CallManager
from bot.conversation_policy import CallPolicy, load_local_policy
from bot.escalation_webhook import EscalationWebhook
from bot.sip_listener import SipListener
from bot.state import CallStore, connect
from bot.turns import TurnParams
from bot.turns_vad import BatchedVad
from ops import metrics, process_metrics
from ops.logs import configure_logging, get_logger
from telephony.twilio.rest import TwilioRest
from telephony.twilio.server import TwilioRouteConfig, make_router
from telephony.twilio.signature import SignatureChecker

log = get_logger("bot.app")
VERSION = "0.1.0"


def _conv_config(settings: Settings) -> ConversationConfig:
    return ConversationConfig(
        no_input_s=float(os.environ["BOT_NO_INPUT_S"]) if os.environ.get("BOT_NO_INPUT_S") else None,
        filler_after_s=float(os.environ.get("BOT_FILLER_AFTER_S", 1.0)),
        silence_budget_s=float(os.environ.get("BOT_SILENCE_BUDGET_S", 1.6)),
        engine_timeout_s=float(os.environ.get("BOT_ENGINE_TIMEOUT_S", 5.0)),
        eot_timeout_s=float(os.environ.get("BOT_EOT_TIMEOUT_S", 0.5)),
        fallback_queue=os.environ.get("BOT_FALLBACK_QUEUE", "general"),
        transfer_wait_s=float(os.environ.get("BOT_TRANSFER_WAIT_S", 5.0)),
        max_call_s=float(os.environ.get("BOT_MAX_CALL_S", 1800)),
    )


def load_engine() -> Any:
    """engine.runtime.Engine, or the module named by BOT_ENGINE_FACTORY ("pkg.mod:callable")."""
    factory = os.environ.get("BOT_ENGINE_FACTORY", "")
    if factory:
        import importlib

        mod, _, name = factory.partition(":")
        return getattr(importlib.import_module(mod), name)()
    from engine.runtime import Engine  # type: ignore[import-not-found]

    return Engine.load()


async def prerender(engine: Any, policy: Any, cache: dict[tuple[str, str], np.ndarray]) -> None:
    """Prompts known in advance go to the engine's cache and ours (greeting/filler/apology in RAM
    so the first frame leaves within milliseconds of the stream's start)."""
    texts = list(policy.static_prompts()) if hasattr(policy, "static_prompts") else []
    if texts and hasattr(engine, "prerender"):
        await engine.prerender(texts)
    prompts = getattr(policy, "prompts", {}) or {}
    keys = [(prompts.get(getattr(policy, "greeting", "greeting")), "neutral"),
            (prompts.get("filler") or FILLER_TEXT, "neutral"), (FILLER_TEXT, "neutral"), (APOLOGY_TEXT, "calm")]
    # escalations speak in the calm style: a system failure hits every live call at once, so these
    # must never wait for the voice (measured: 50 calls queued ~330 ms each behind one renderer)
    esc = getattr(policy, "escalation", None)
    calm = {"apology", "apology_closed"}
    for rule in ("system_error", "frustration", "max_failures"):
        key = getattr(getattr(esc, rule, None), "prompt", None)
        if key:
            calm.add(key)
    keys += [(prompts[k], "calm") for k in sorted(calm) if k in prompts]
    from engine.types import SpeechStyle

    for stale in set(cache) - set(keys):  # prompts an earlier version had: bounded by the live policy
        del cache[stale]
    for text, style in keys:
        if text and (text, style) not in cache:
            try:
                cache[(text, style)] = np.asarray(await engine.speak(text, SpeechStyle.named(style)), dtype=np.int16)
            except Exception as exc:  # noqa: BLE001 - a prompt the voice refuses is rendered on demand
                metrics.ERRORS.labels("engine", "prerender").inc()
                log.warning("prerender_failed", text=text[:40], error=repr(exc))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    configure_logging()
    state: dict[str, Any] = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.monotonic()
        redis = connect(settings.redis_url)
        store = CallStore(redis, settings.worker_id, settings.call_ttl_s)
        await store.start()
        app.state.redis = redis
        app.state.call_store = store

        policy_holder = await _start_policy(app, redis, settings)
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(None, load_engine)  # model load is disk/CPU work
        app.state.engine = engine
        wait_voice = getattr(engine, "wait_ready", None)
        if wait_voice is not None:  # no voice (espeak-ng missing) would answer every call with silence:
            await wait_voice()      # fail start-up with the voice's error instead of going ready
        cache: dict[tuple[str, str], np.ndarray] = {}
        await prerender(engine, policy_holder()[1], cache)
        watcher = getattr(app.state, "policy_watcher", None)
        if watcher is not None:  # a version published from another worker: render its prompts here too
            watcher.on_change = lambda _v, policy, _text: prerender(engine, policy, cache)

        vad = BatchedVad(gate_dbfs=float(os.environ.get("BOT_VAD_GATE_DBFS", -50)))
        await vad.start()
        app.state.vad = vad
        webhook = _escalation_webhook(settings)
        app.state.escalation_webhook = webhook

        def new_policy(info: Any) -> CallPolicy:
            version, policy = policy_holder()
            return CallPolicy(policy, str(version), info)

        services = Services(engine=engine, store=store, vad=vad, new_policy=new_policy, prompt_audio=cache,
                            config=_conv_config(settings), turn_params=TurnParams(),
                            notify_escalation=webhook, engine_backend=settings.engine_backend)
        calls = CallManager(services)
        app.state.calls = calls
        app.state.services = services
        app.state.rest = rest
        sip = await _start_sip(calls, settings)
        app.state.sip = sip
        if sip is not None:
            calls.on_drain.append(sip.refuse_new_calls)
        metrics.WORKER_INFO.labels(settings.worker_id, VERSION).set(1)
        resources = asyncio.create_task(process_metrics.run(), name="process-metrics")
        state["ready"] = True
        log.info("worker_ready", worker=settings.worker_id, startup_s=round(time.monotonic() - t0, 2))
        try:
            yield
        finally:
            state["ready"] = False
            resources.cancel()
            t_stop = time.monotonic()
            await calls.drain(settings.shutdown_grace_s)  # no-op when the server drained already
            if webhook is not None:
                # hand-offs still being delivered get what is left of the grace, and at least one attempt's
                # time (bounded by the grace) for the transfers the last calls made as the grace ran out
                left = settings.shutdown_grace_s - (time.monotonic() - t_stop)
                await webhook.close(max(left, min(settings.shutdown_grace_s, settings.escalation_webhook_timeout_s)))
            if sip is not None:
                await sip.stop()
            watcher = getattr(app.state, "policy_watcher", None)
            if watcher is not None:
                await watcher.stop()
            await vad.stop()
            if rest is not None:
                await rest.aclose()
            await store.close()
            close = getattr(engine, "close", None)
            if close is not None:
                res = close()
                if asyncio.iscoroutine(res):
                    await res
            log.info("worker_stopped", worker=settings.worker_id)

    app = FastAPI(title="voicebot", version=VERSION, lifespan=lifespan)
    rest = (TwilioRest(settings.twilio_api_base, settings.twilio_account_sid, settings.twilio_auth_token,
                       api_key=settings.twilio_api_key, api_secret=settings.twilio_api_secret)
            if settings.twilio_auth_token or settings.twilio_api_key else None)

    async def on_twilio_call(bridge: Any) -> None:
        await app.state.calls.run_call(bridge)

    cfg = TwilioRouteConfig(
        checker=SignatureChecker(settings.twilio_auth_token, settings.public_url, settings.twilio_webhook_shared_key),
        rest=rest,
        public_url=settings.public_url,
        lead_ms=int(os.environ.get("BOT_TWILIO_LEAD_MS", 120)),
        max_bad_messages=int(os.environ.get("BOT_TWILIO_MAX_BAD_MESSAGES", 0)),
        is_draining=lambda: (not state["ready"]) or app.state.calls.draining,
        dial_caller_id=settings.twilio_dial_caller_id,
        dial_timeout_s=settings.twilio_dial_timeout_s,
        on_transfer_outcome=lambda sid, status, reached: _record_transfer_outcome(app, sid, status, reached),
    )
    app.include_router(make_router(on_twilio_call, cfg))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "worker": settings.worker_id}

    @app.get("/readyz")
    async def readyz() -> Response:
        calls = getattr(app.state, "calls", None)
        store = getattr(app.state, "call_store", None)
        body = {"ready": bool(state["ready"]) and not (calls and calls.draining), "worker": settings.worker_id,
                "draining": bool(calls and calls.draining), "active_calls": len(calls.active) if calls else 0,
                "redis": bool(store and store.healthy),
                "sip": sip.status if (sip := getattr(app.state, "sip", None)) is not None else "off",
                "understanding": bool(getattr(getattr(app.state, "engine", None), "has_understanding", False)),
                "voice": bool(getattr(getattr(app.state, "engine", None), "ready", False))}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(_metrics_text(), media_type=CONTENT_TYPE_LATEST)

    try:
        from bot.admin.api import router as admin_router  # type: ignore[import-not-found]
    except ImportError as exc:
        log.info("admin_console_unavailable", error=str(exc))
    else:
        app.include_router(admin_router, prefix="/admin")
    return app


def _metrics_text() -> bytes:
    process_metrics.sample()  # this worker's figures as of now; the others' are at most 5 s old
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


async def _start_policy(app: FastAPI, redis: Any, settings: Settings) -> Any:
    """Seed the policy into Redis (versioned) and follow publishes; a file-only fallback keeps the
    bot answering calls when the policy store is unavailable at start."""
    try:
        from policies.store import PolicyStore, PolicyWatcher

        pstore = PolicyStore(redis, prerender=lambda texts: app.state.engine.prerender(texts)
                             if getattr(app.state, "engine", None) else asyncio.sleep(0))
        await pstore.ensure_seeded(path=settings.policy_path or None)
        watcher = PolicyWatcher(redis)
        await watcher.start()
        app.state.policy_store = pstore
        app.state.policy_watcher = watcher
        return watcher.current
    except Exception as exc:  # noqa: BLE001
        metrics.ERRORS.labels("policy", "store_unavailable").inc()
        log.warning("policy_store_unavailable", error=repr(exc))
        policy = load_local_policy(settings.policy_path)
        return lambda: ("file", policy)


def _record_transfer_outcome(app: FastAPI, call_sid: str, status: str, reached_agent: bool) -> None:
    """Twilio's report on a transfer (agent reached, or no answer / busy / queue full) in the call's story."""
    store = getattr(app.state, "call_store", None)
    if store is not None and call_sid:
        store.late_event(call_sid, "transfer_outcome", status=status or "unknown", reached_agent=reached_agent)


async def _start_sip(calls: CallManager, settings: Settings) -> SipListener | None:
    if not settings.sip_enabled or os.environ.get("BOT_WORKER_INDEX", "0") != "0":
        return None  # SIP dialogs live on one socket: only worker 0 serves them
    try:
        from telephony.sip.server import SipServer  # type: ignore[import-not-found]
    except ImportError:
        return None
    # a port that cannot be bound now is retried: SIP trouble must not take Twilio calls down
    sip = SipListener(lambda: SipServer(settings.http_host, settings.sip_port, on_call=calls.run_call),
                      settings.sip_retry_s)
    await sip.start()
    return sip


def _escalation_webhook(settings: Settings) -> EscalationWebhook | None:
    if not settings.escalation_webhook:
        return None
    return EscalationWebhook(settings.escalation_webhook, settings.escalation_webhook_secret,
                             timeout_s=settings.escalation_webhook_timeout_s,
                             max_attempts=settings.escalation_webhook_attempts,
                             max_pending=settings.escalation_webhook_max_pending)
