"""Worker 0's SIP server, kept trying. A SIP port that cannot be bound (another process holds it, a
previous worker is still on its way out) must not take the Twilio side of the worker down, and must not
be forgotten either: the bind is retried every BOT_SIP_RETRY_S, `voicebot_sip_listening` is 0 meanwhile
(alert SipNotListening), and /readyz reports `"sip": "retrying"`."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from ops import metrics
from ops.logs import get_logger

log = get_logger("bot.sip_listener")


class SipListener:
    def __init__(self, make_server: Callable[[], Any], retry_s: float = 5.0,
                 on_listening: Callable[[Any], Awaitable[Any]] | None = None) -> None:
        self._make = make_server
        self.retry_s = max(0.1, retry_s)
        self.server: Any = None
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        # run in the background once the port is bound (the calls a dead predecessor lost are carried on)
        self._on_listening = on_listening
        self._listening_task: asyncio.Task[Any] | None = None

    @property
    def status(self) -> str:
        return "listening" if self.server is not None else "retrying"

    async def start(self) -> None:
        """Bind now if possible; otherwise keep retrying in the background."""
        if not await self._try():
            self._task = asyncio.create_task(self._retry(), name="sip-bind-retry")

    async def _try(self) -> bool:
        server = self._make()
        try:
            await server.start()
        except Exception as exc:  # noqa: BLE001 - any bind/start failure is retried, never fatal
            self.failures += 1
            metrics.ERRORS.labels("sip", "start_failed").inc()
            metrics.SIP_LISTENING.set(0)
            # the first failure and then one in twelve: a port held for hours must not flood the log
            if self.failures == 1 or self.failures % 12 == 0:
                log.error("sip_start_failed", error=repr(exc), attempts=self.failures, retry_s=self.retry_s)
            return False
        self.server = server
        metrics.SIP_LISTENING.set(1)
        if self.failures:
            log.info("sip_started_after_retry", attempts=self.failures + 1)
        if self._on_listening is not None:
            self._listening_task = asyncio.create_task(self._listening(server), name="sip-on-listening")
        return True

    async def _listening(self, server: Any) -> None:
        assert self._on_listening is not None
        try:
            await self._on_listening(server)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never fatal to the listener
            metrics.ERRORS.labels("sip", "resume_failed").inc()
            log.error("sip_on_listening_failed", error=repr(exc)[:200])

    async def _retry(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            if await self._try():
                return

    def refuse_new_calls(self) -> None:
        """Draining: new INVITEs get 503 (a bind still being retried is given up: no new SIP calls here)."""
        if self._task is not None:
            self._task.cancel()
        if self.server is not None:
            self.server.refuse_new_calls()

    async def stop(self) -> None:
        for task in (self._task, self._listening_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self.server is not None:
            await self.server.stop()
