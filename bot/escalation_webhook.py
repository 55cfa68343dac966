"""Delivery of hand-offs (transfers, accepted callbacks) to the contact center's own systems.

`BOT_ESCALATION_WEBHOOK` receives one JSON POST per hand-off, delivered the way Twilio/Stripe-style
webhooks are: signed (HMAC-SHA256 over `<timestamp>.<body>` with `BOT_ESCALATION_WEBHOOK_SECRET`),
retried with backoff on timeouts, connection errors, 429 and 5xx (never on other 4xx), carrying a
delivery id that stays the same across retries so the receiver can de-duplicate. Deliveries run in
their own tasks: a slow or dead receiver never delays a call. At most `max_pending` are in flight;
beyond that the oldest is dropped (counted, logged). On shutdown pending ones get what is left of
the grace period.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
import uuid
from collections import OrderedDict
from typing import Any

import httpx

from ops import metrics
from ops.logs import get_logger

log = get_logger("bot.escalation_webhook")

EVENT_HEADER = "X-Voicebot-Event"
DELIVERY_HEADER = "X-Voicebot-Delivery"
TIMESTAMP_HEADER = "X-Voicebot-Timestamp"
SIGNATURE_HEADER = "X-Voicebot-Signature"
EVENTS = ("transfer", "callback")

def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value; receivers recompute it over the raw body they received."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does (also used by our tests): constant-time compare, and a timestamp too old
    or too far ahead is a replay."""
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        return False
    return abs(age) <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


class _Retryable(Exception):
    def __init__(self, why: str, retry_after_s: float | None = None) -> None:
        super().__init__(why)
        self.retry_after_s = retry_after_s


class _Rejected(Exception):
    """The receiver refused the delivery (4xx other than 429): the same body would be refused again."""


class EscalationWebhook:
    def __init__(self, url: str, secret: str = "", *, timeout_s: float = 5.0, max_attempts: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, max_pending: int = 1000) -> None:
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_pending = max(1, max_pending)
        # delivery id -> (task, event, call id), oldest first
        self._pending: OrderedDict[str, tuple[asyncio.Task[None], str, str]] = OrderedDict()
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        # every series exists from the start, so the first failure shows in increase() and the alert fires
        for ev in EVENTS:
            for result in ("ok", "retried", "failed", "dropped"):
                metrics.WEBHOOK_DELIVERIES.labels(ev, result)
        for kind in ("failed", "rejected", "dropped", "bad_context", "internal"):
            metrics.ERRORS.labels("escalation_webhook", kind)
        if not secret:
            # the host only: a receiver URL may carry its own token in the path or query
            log.warning("escalation_webhook_unsigned", host=httpx.URL(url).host,
                        hint="set BOT_ESCALATION_WEBHOOK_SECRET so the receiver can verify hand-offs")

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def __call__(self, context: dict[str, Any]) -> None:
        """Services.notify_escalation: queue the delivery and return at once."""
        self.notify(context)

    def notify(self, context: dict[str, Any], event: str | None = None) -> str | None:
        """Queue one hand-off; returns its delivery id (None when refused). Never raises, never waits."""
        event = event or ("callback" if context.get("callback") else "transfer")
        call_id = str(context.get("call_id", ""))
        if self._closed:
            self._count_lost(event, call_id, "shutdown")
            return None
        delivery_id = uuid.uuid4().hex
        try:
            body = json.dumps({**context, "event": event, "delivery_id": delivery_id},
                              separators=(",", ":"), default=str).encode()
        except (TypeError, ValueError) as exc:  # a context that cannot be JSON: say so, don't crash the call
            metrics.ERRORS.labels("escalation_webhook", "bad_context").inc()
            metrics.WEBHOOK_DELIVERIES.labels(event, "failed").inc()
            log.error("escalation_webhook_bad_context", call_id=call_id, event_name=event, error=repr(exc))
            return None
        while len(self._pending) >= self.max_pending:  # the receiver is down for long: oldest goes
            _old_id, (old, old_event, old_call) = self._pending.popitem(last=False)
            old.cancel()
            self._count_lost(old_event, old_call, "overflow")
        task = asyncio.get_running_loop().create_task(self._deliver(delivery_id, event, call_id, body),
                                                      name=f"webhook-{delivery_id[:8]}")
        self._pending[delivery_id] = (task, event, call_id)
        task.add_done_callback(lambda _t, d=delivery_id: self._pending.pop(d, None))
        return delivery_id

    def _count_lost(self, event: str, call_id: str, why: str) -> None:
        metrics.WEBHOOK_DELIVERIES.labels(event, "dropped").inc()
        metrics.ERRORS.labels("escalation_webhook", "dropped").inc()
        log.error("escalation_webhook_dropped", call_id=call_id, event_name=event, why=why)

    async def _deliver(self, delivery_id: str, event: str, call_id: str, body: bytes) -> None:
        t0 = time.monotonic()
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    await self._attempt(delivery_id, event, body)
                except _Retryable as exc:
                    if attempt == self.max_attempts:
                        metrics.WEBHOOK_DELIVERIES.labels(event, "failed").inc()
                        metrics.ERRORS.labels("escalation_webhook", "failed").inc()
                        log.error("escalation_webhook_failed", call_id=call_id, event_name=event,
                                  delivery_id=delivery_id, attempts=attempt, error=str(exc))
                        return
                    delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                    delay = delay * (0.5 + random.random() / 2)  # jitter: workers don't retry in lockstep
                    if exc.retry_after_s is not None:
                        delay = min(self.max_backoff_s, max(delay, exc.retry_after_s))
                    metrics.WEBHOOK_DELIVERIES.labels(event, "retried").inc()
                    log.warning("escalation_webhook_retry", call_id=call_id, event_name=event,
                                delivery_id=delivery_id, attempt=attempt, error=str(exc), retry_in_s=round(delay, 2))
                    await asyncio.sleep(delay)
                    continue
                except _Rejected as exc:
                    metrics.WEBHOOK_DELIVERIES.labels(event, "failed").inc()
                    metrics.ERRORS.labels("escalation_webhook", "rejected").inc()
                    log.error("escalation_webhook_rejected", call_id=call_id, event_name=event,
                              delivery_id=delivery_id, error=str(exc))
                    return
                metrics.WEBHOOK_DELIVERIES.labels(event, "ok").inc()
                metrics.WEBHOOK_DELIVERY_LATENCY.labels(event).observe(time.monotonic() - t0)
                log.info("escalation_webhook_delivered", call_id=call_id, event_name=event,
                         delivery_id=delivery_id, attempts=attempt)
                return
        except Exception as exc:  # noqa: BLE001 - a bug here must not surface in the call or the loop
            metrics.WEBHOOK_DELIVERIES.labels(event, "failed").inc()
            metrics.ERRORS.labels("escalation_webhook", "internal").inc()
            log.exception("escalation_webhook_internal_error", call_id=call_id, error=repr(exc))

    async def _attempt(self, delivery_id: str, event: str, body: bytes) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        ts = str(int(time.time()))  # re-signed per attempt: a late retry is not mistaken for a replay
        headers = {"content-type": "application/json", "user-agent": "voicebot-webhook/1",
                   EVENT_HEADER: event, DELIVERY_HEADER: delivery_id, TIMESTAMP_HEADER: ts}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, ts, body)
        try:
            r = await self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timeout ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error ({type(exc).__name__}: {exc})") from None
        except httpx.HTTPError as exc:  # a bad URL and the like: retrying cannot help
            raise _Rejected(repr(exc)) from None
        if 200 <= r.status_code < 300:
            return
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retryable(f"status {r.status_code}", _retry_after(r.headers.get("retry-after")))
        raise _Rejected(f"status {r.status_code}")

    async def close(self, grace_s: float) -> None:
        """Let pending deliveries finish for up to grace_s, then drop (count, log) what is left."""
        self._closed = True
        entries = list(self._pending.values())
        if entries:
            log.info("escalation_webhook_flushing", pending=len(entries), grace_s=round(grace_s, 2))
            _done, left = await asyncio.wait([t for t, _e, _c in entries], timeout=max(0.0, grace_s))
            for t, event, call_id in entries:
                if t in left:
                    t.cancel()
                    self._count_lost(event, call_id, "shutdown")
            if left:
                await asyncio.gather(*left, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _retry_after(raw: str | None) -> float | None:
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None  # an HTTP date: our own backoff is good enough
