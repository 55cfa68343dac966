"""The FastAPI app of one `bot serve` worker: Twilio webhook + Media Streams WebSocket, /metrics,
/healthz, /readyz, the admin console (when installed), and the SIP server (worker 0, when enabled).

Start-up order: Redis (call state) -> policy (seeded into Redis, watched) -> engine + the prompts of a
call's first seconds (greeting, filler, apology, calm escalations) -> batched VAD -> routes ready. /readyz
answers 200 only once all of that is up and the worker is not draining. The policy's other prompts are
rendered after ready, in the background at low priority (`prompts_prerendered` logged when done); one a
caller needs first is rendered on demand. A Ctrl-C/SIGTERM during start-up stops it (startup_aborted).
"""

from __future__ import annotations

import asyncio
import inspect
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
from bot.sip_recovery import RESUME_TIMEOUT_S, adopt_forever, resume_lost_calls
from bot.state import STREAM_LOST_OUTCOMES, CallStore, call_key, connect
from bot.turns import TurnParams
from bot.turns_vad import BatchedVad
from ops import metrics, process_metrics
from ops.logs import configure_logging, get_logger
from telephony.twilio.rest import TwilioRest
from telephony.twilio.server import TwilioRouteConfig, make_router
from telephony.twilio.signature import SignatureChecker

log = get_logger("bot.app")
VERSION = "0.1.0"
# a Twilio stream's end with its call record still `active`: how long to wait for a worker that is ending the call
# itself (its end record lands a few ms after the socket closed) before taking the stream as lost
STREAM_END_SETTLE_S = 2.0


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
        shutdown_action=os.environ.get("BOT_SHUTDOWN_ACTION", "transfer").strip().lower(),
        shutdown_end_s=float(os.environ.get("BOT_SHUTDOWN_END_S", 8.0)),
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


def first_second_keys(policy: Any) -> list[tuple[str, str]]:
    """(text, style) of what a call may say in its first seconds: greeting, filler, apology and the calm
    escalation prompts. These are rendered before the worker goes ready; everything else after."""
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
    return keys


async def prerender(engine: Any, policy: Any, cache: dict[tuple[str, str], np.ndarray]) -> None:
    """The prompts of a call's first seconds (first_second_keys) into our RAM cache, so the first frame
    leaves within milliseconds of the stream's start. The policy's other prompts: prerender_rest."""
    keys = first_second_keys(policy)
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


async def prerender_rest(engine: Any, policy: Any) -> None:
    """Every other prompt known in advance into the engine's caches, at low priority while calls are taken
    (rendering them all cold took ~105 s on a 2-core box before the first call could be answered). A prompt
    a caller needs before its turn here is rendered on demand (streamed), as any uncached sentence."""
    texts = list(policy.static_prompts()) if hasattr(policy, "static_prompts") else []
    fn = getattr(engine, "prerender", None)
    if not texts or fn is None:
        return
    t0 = time.monotonic()
    try:
        background = "background" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        background = False
    rendered = await (fn(texts, background=True) if background else fn(texts))
    log.info("prompts_prerendered", prompts=len(texts), rendered=rendered if isinstance(rendered, int) else None,
             background=background, seconds=round(time.monotonic() - t0, 2))


class Prerenderer:
    """One worker's prompt rendering: the first seconds' prompts now, the rest in one background task that
    a newer policy version replaces and shutdown cancels."""

    def __init__(self, engine: Any, cache: dict[tuple[str, str], np.ndarray]) -> None:
        self.engine = engine
        self.cache = cache
        self.task: asyncio.Task[None] | None = None

    async def switch(self, policy: Any) -> None:
        """A newly published version (from another worker): its first prompts now, the rest later."""
        await prerender(self.engine, policy, self.cache)
        self.start_rest(policy)

    def start_rest(self, policy: Any) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # an older version's prompts: not worth the CPU any more
        self.task = asyncio.create_task(self._rest(policy), name="prerender-rest")

    async def _rest(self, policy: Any) -> None:
        try:
            await prerender_rest(self.engine, policy)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - those prompts are then rendered on demand
            metrics.ERRORS.labels("engine", "prerender").inc()
            log.warning("prerender_rest_failed", error=repr(exc))

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    configure_logging()
    state: dict[str, Any] = {"ready": False, "abort": asyncio.Event()}

    async def start(app: FastAPI) -> Prerenderer:
        redis = connect(settings.redis_url)
        store = CallStore(redis, settings.worker_id, settings.call_ttl_s)
        app.state.redis = redis
        app.state.call_store = store
        await store.start()

        policy_holder = await _start_policy(app, redis, settings)
        app.state.policy_holder = policy_holder
        loading = asyncio.get_running_loop().run_in_executor(None, load_engine)  # model load is disk/CPU work
        try:
            engine = await asyncio.shield(loading)
        except asyncio.CancelledError:  # stopped mid-load: keep the engine (its threads) for stop() to close
            app.state.engine = await loading
            raise
        app.state.engine = engine
        wait_voice = getattr(engine, "wait_ready", None)
        if wait_voice is not None:  # no voice (espeak-ng missing) would answer every call with silence:
            await wait_voice()      # fail start-up with the voice's error instead of going ready
        cache: dict[tuple[str, str], np.ndarray] = {}
        prompts = Prerenderer(engine, cache)
        app.state.prerenderer = prompts
        await prerender(engine, policy_holder()[1], cache)
        watcher = getattr(app.state, "policy_watcher", None)
        if watcher is not None:  # a version published from another worker: render its prompts here too
            watcher.on_change = lambda _v, policy, _text: prompts.switch(policy)

        vad = BatchedVad(gate_dbfs=float(os.environ.get("BOT_VAD_GATE_DBFS", -50)))
        app.state.vad = vad
        await vad.start()
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
        sip = await _start_sip(calls, settings, store)
        app.state.sip = sip
        if sip is not None:
            calls.on_drain.append(sip.refuse_new_calls)
        return prompts

    async def stop(app: FastAPI) -> None:
        """Everything start() got to, in reverse; also after a start-up cut short by Ctrl-C."""
        st = app.state
        t_stop = time.monotonic()
        prompts: Prerenderer | None = getattr(st, "prerenderer", None)
        if prompts is not None:
            await prompts.stop()
        calls: CallManager | None = getattr(st, "calls", None)
        if calls is not None:
            await calls.drain(settings.shutdown_grace_s)  # no-op when the server drained already
        webhook: EscalationWebhook | None = getattr(st, "escalation_webhook", None)
        store_early = getattr(st, "call_store", None)
        if webhook is not None and store_early is not None:
            # the calls' ends first: a receiver that is down must not keep them unwritten until the orchestrator
            # kills the worker (its kill timeout is sized to the grace plus the shutdown endings, not more)
            await store_early.flush(timeout_s=5.0)
        if webhook is not None:
            # hand-offs still being delivered get what is left of the grace and the shutdown endings, counted
            # from the drain's start (bot.serve drains before this), and at least one attempt's time (at most
            # 5 s) for the transfers the last calls made as the grace ran out
            since = getattr(calls, "drain_started", None) or t_stop
            end_s = _conv_config(settings).shutdown_end_s
            left = settings.shutdown_grace_s + end_s - (time.monotonic() - since)
            await webhook.close(max(left, min(5.0, settings.shutdown_grace_s, settings.escalation_webhook_timeout_s)))
        if (sip := getattr(st, "sip", None)) is not None:
            await sip.stop()
        if (watcher := getattr(st, "policy_watcher", None)) is not None:
            await watcher.stop()
        if (vad := getattr(st, "vad", None)) is not None:
            await vad.stop()
        if rest is not None:
            await rest.aclose()
        if (store := getattr(st, "call_store", None)) is not None:
            await store.close()
        engine = getattr(st, "engine", None)
        wait_voice = getattr(engine, "wait_ready", None)
        if wait_voice is not None and not getattr(engine, "ready", True):
            # start-up stopped while the voice loads on its thread: onnxruntime aborts the process (SIGABRT,
            # exit 134) if the interpreter exits mid-load, so let it finish (about a second)
            try:
                await asyncio.wait_for(wait_voice(), 30)
            except Exception as exc:  # noqa: BLE001 - failed or slow: it was logged where it happened
                log.info("voice_not_loaded_at_stop", error=repr(exc))
        close = getattr(engine, "close", None)
        if close is not None:
            res = close()
            if asyncio.iscoroutine(res):
                await res

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.monotonic()
        # start-up runs for seconds (a cold voice cache: the first prompts); a Ctrl-C meanwhile
        # (bot.serve.DrainingServer -> abort_startup) cuts it short instead of waiting for it to end
        starting = asyncio.create_task(start(app), name="worker-startup")
        abort = asyncio.create_task(state["abort"].wait(), name="worker-startup-abort")
        try:
            await asyncio.wait({starting, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
        if not starting.done():
            starting.cancel()
            try:
                await starting
            except BaseException as exc:  # noqa: BLE001 - what it was doing when stopped: not an error
                if not isinstance(exc, asyncio.CancelledError):
                    log.info("startup_stopped_with", error=repr(exc))
            log.info("startup_aborted", worker=settings.worker_id, after_s=round(time.monotonic() - t0, 2))
            try:
                await stop(app)
            finally:
                log.info("worker_stopped", worker=settings.worker_id)
            yield  # uvicorn sees should_exit and shuts down at once
            return
        try:
            prompts = starting.result()  # a failed start-up raises here, as before: uvicorn exits 3
        except BaseException:
            try:  # release what it started (Redis connections, the engine's threads) before exiting
                await stop(app)
            except Exception as exc:  # noqa: BLE001 - the start-up error is the one to report
                log.warning("stop_after_failed_startup", error=repr(exc))
            raise
        metrics.WORKER_INFO.labels(settings.worker_id, VERSION).set(1)
        metrics.init_series()  # the series alerts take increase() of exist at 0 before the first call
        resources = asyncio.create_task(process_metrics.run(), name="process-metrics")
        state["ready"] = True
        log.info("worker_ready", worker=settings.worker_id, startup_s=round(time.monotonic() - t0, 2))
        prompts.start_rest(app.state.policy_holder()[1])  # after ready: the rest at low priority
        try:
            yield
        finally:
            state["ready"] = False
            resources.cancel()
            await stop(app)
            log.info("worker_stopped", worker=settings.worker_id)

    app = FastAPI(title="voicebot", version=VERSION, lifespan=lifespan)
    app.state.abort_startup = state["abort"].set  # on the event loop: bot.serve.DrainingServer on Ctrl-C
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
        stream_end=lambda sid: _stream_end(app, sid),
        stream_lost_twiml=lambda sid, dial: _stream_lost_twiml(app, sid, dial),
    )
    app.include_router(make_router(on_twilio_call, cfg))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "worker": settings.worker_id}

    @app.get("/readyz")
    async def readyz() -> Response:
        calls = getattr(app.state, "calls", None)
        store = getattr(app.state, "call_store", None)
        # draining from the signal on (bot.serve marks it before waiting for just-answered calls' streams),
        # not only once the calls themselves start draining
        draining = bool(getattr(app.state, "draining", False)) or bool(calls and calls.draining)
        body = {"ready": bool(state["ready"]) and not draining, "worker": settings.worker_id,
                "draining": draining, "active_calls": len(calls.active) if calls else 0,
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
        from bot.admin.context import background_prerender
        from policies.store import PolicyStore, PolicyWatcher

        pstore = PolicyStore(redis, prerender=background_prerender(lambda: getattr(app.state, "engine", None)))
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


async def _stream_end(app: FastAPI, call_sid: str) -> str:
    """Whether a Twilio call whose stream just ended is over ("hangup") or was lost with the caller still on the
    line ("reconnect"), from its record in Redis, which every worker shares. A record still `active` is waited
    for a moment: a worker that ended the call itself closed the socket a few milliseconds before its end
    record landed; a dead worker's call stays active (or is reaped as worker_lost)."""
    store = getattr(app.state, "call_store", None)
    if store is None:
        return "reconnect"
    local = store.local_end(call_sid)  # this worker had the call: it knows, Redis or not
    if local is not None:
        kind, what = local
        return "reconnect" if kind == "ended" and what in STREAM_LOST_OUTCOMES else "hangup"
    deadline = time.monotonic() + STREAM_END_SETTLE_S
    while True:
        status, outcome, ending = await asyncio.wait_for(
            store.r.hmget(call_key(call_sid), "status", "outcome", "ending"), 2.0)
        status, outcome, ending = _text(status), _text(outcome), _text(ending)
        if not status:
            return "reconnect"  # no call started on that stream: refused while draining, or lost before `start`
        if status == "ended":
            return "reconnect" if outcome in STREAM_LOST_OUTCOMES else "hangup"
        if ending:
            return "hangup"  # the bot is hanging up (recorded before it closed the socket)
        if time.monotonic() >= deadline:
            # its worker never ended it: dead (or stuck). The lost leg is closed now, before the new one starts
            from bot.reaper import close_lost_leg

            await asyncio.wait_for(close_lost_leg(store.r, call_sid, reaper=f"{store.worker}-stream-end",
                                                 ttl_s=store.ttl_s), 2.0)
            return "reconnect"
        await asyncio.sleep(0.1)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def _stream_lost_twiml(app: FastAPI, call_sid: str, dial: Any) -> str:
    """A call whose streams kept failing: the policy's system-error route in Twilio's voice (its queue with
    the apology, or the apology and goodbye when it is closed), recorded in the call's story."""
    from policies.decide import system_error_route
    from telephony.twilio import twiml

    policy = app.state.policy_holder()[1]
    d = system_error_route(policy, "stream_lost")
    metrics.POLICY_DECISIONS.labels(d.action, d.reason).inc()
    store = getattr(app.state, "call_store", None)
    if store is not None:
        store.late_event(call_sid, "stream_lost", action=d.action, target=d.target or "")
    if d.action == "transfer" and d.target:
        return twiml.transfer(policy.queues[d.target].target, dial, say=d.prompt)
    return twiml.apologize_and_hang_up(d.prompt or twiml.STREAM_LOST_TEXT)


async def _start_sip(calls: CallManager, settings: Settings, store: CallStore | None) -> SipListener | None:
    if not settings.sip_enabled or os.environ.get("BOT_WORKER_INDEX", "0") != "0":
        return None  # SIP dialogs live on one socket: only worker 0 serves them
    try:
        from telephony.sip.server import SipServer  # type: ignore[import-not-found]
    except ImportError:
        return None

    async def resume_lost(server: Any) -> None:
        # the SIP calls this worker id's previous process lost (it died): re-INVITEd from here, carried on; then,
        # for as long as we take calls, those of other hosts' workers that went silent
        if store is None or settings.sip_resume_window_s <= 0:
            return
        try:
            await asyncio.wait_for(resume_lost_calls(store, server, settings.sip_resume_window_s, settings.call_ttl_s),
                                   RESUME_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: those calls are lost, the rest goes on
            metrics.ERRORS.labels("sip", "resume_failed").inc()
            log.error("sip_resume_failed", error=repr(exc)[:200])
        if settings.sip_takeover_after_s > 0:
            await adopt_forever(store, server, settings.sip_resume_window_s, settings.sip_takeover_after_s,
                                settings.call_ttl_s)

    # a port that cannot be bound now is retried: SIP trouble must not take Twilio calls down
    sip = SipListener(lambda: SipServer(settings.http_host, settings.sip_port, on_call=calls.run_call,
                                        instance=settings.worker_id),
                      settings.sip_retry_s, on_listening=resume_lost)
    await sip.start()
    return sip


def _escalation_webhook(settings: Settings) -> EscalationWebhook | None:
    if not settings.escalation_webhook:
        return None
    return EscalationWebhook(settings.escalation_webhook, settings.escalation_webhook_secret,
                             timeout_s=settings.escalation_webhook_timeout_s,
                             max_attempts=settings.escalation_webhook_attempts,
                             max_pending=settings.escalation_webhook_max_pending)
