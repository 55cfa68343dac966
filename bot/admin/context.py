"""What the admin API needs from the running app, found on `app.state` (set by bot/app.py) or,
when the API runs on its own (tests, a console-only process), built lazily from the environment.

- redis:        app.state.redis, else the CallStore's client, else REDIS_URL
- policy store: app.state.policy_store, else a PolicyStore on that Redis (prerender via the engine)
- engine:       app.state.engine, else bot.app.load_engine() once on first use
- call handler: app.state.calls.run_call(bridge, policy_override=...) for softphone calls
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from fastapi import HTTPException, Request

from ops.logs import get_logger
from policies.store import PolicyStore

log = get_logger("bot.admin")

MAX_UPLOAD_BYTES = int(os.environ.get("BOT_ADMIN_MAX_UPLOAD_BYTES", 5 * 1024 * 1024))


def _state(request: Request) -> Any:
    return request.app.state


def get_redis(request: Request) -> aioredis.Redis:
    st = _state(request)
    r = getattr(st, "redis", None)
    if r is None:
        r = getattr(getattr(st, "call_store", None), "r", None)
    if r is None:
        url = os.environ.get("REDIS_URL", "")
        if not url:
            raise HTTPException(503, "no Redis configured for the admin API")
        r = aioredis.from_url(url, decode_responses=True)
        st.redis = r
    return r


async def get_engine(request: Request) -> Any:
    st = _state(request)
    eng = getattr(st, "engine", None)
    if eng is not None:
        return eng
    lock = getattr(st, "_admin_engine_lock", None)
    if lock is None:
        lock = st._admin_engine_lock = asyncio.Lock()
    async with lock:
        eng = getattr(st, "engine", None)
        if eng is None:
            from bot.app import load_engine  # same construction as `bot serve` (BOT_ENGINE_FACTORY aware)

            loop = asyncio.get_running_loop()
            try:
                eng = await loop.run_in_executor(None, load_engine)  # model load is CPU/disk work
            except Exception as exc:  # noqa: BLE001 - the console stays up without an engine
                raise HTTPException(503, f"the speech engine is not available: {exc}") from exc
            st.engine = eng
    return eng


def background_prerender(get_engine: Callable[[], Any]) -> Callable[[list[str]], Awaitable[None]]:
    """The policy store's `prerender` for a publish: started, not awaited. After a fresh start most prompts are
    still unrendered (a worker goes ready after the first seconds' prompts), and the admin would wait for all of
    them, tens of seconds, before "Published". They render at the lowest priority, yielding to callers; a
    caller who needs one first has it rendered on demand."""
    pending: set[asyncio.Task[Any]] = set()

    def done(task: asyncio.Task[Any]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("publish_prerender_failed", error=repr(task.exception()))

    async def prerender(texts: list[str]) -> None:
        eng = get_engine()
        if eng is None or not texts:
            return
        task = asyncio.create_task(eng.prerender(texts, background=True), name="publish-prerender")
        pending.add(task)  # a task nobody references may be collected mid-run
        task.add_done_callback(done)

    return prerender


def get_store(request: Request) -> PolicyStore:
    st = _state(request)
    store = getattr(st, "policy_store", None)
    if store is None:
        store = PolicyStore(get_redis(request), prerender=background_prerender(lambda: getattr(st, "engine", None)))
        st.policy_store = store
    return store


def get_call_store(request: Request) -> Any:
    """bot.state.CallStore of the app, or a read-only one on our Redis (reads need no writer)."""
    st = _state(request)
    cs = getattr(st, "call_store", None) or getattr(st, "admin_call_reader", None)
    if cs is None:
        from bot.state import CallStore

        cs = CallStore(get_redis(request), worker="admin", ttl_s=7 * 24 * 3600)
        st.admin_call_reader = cs
    return cs
