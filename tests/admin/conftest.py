"""Admin fixtures: an isolated Redis DB per test, the admin router in a FastAPI app, tokens per role."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from bot.admin.auth import TokenRegistry
from policies.store import DEFAULT_POLICY_PATH, PolicyStore
from tests.admin.browser import silence_wav_48k

TOKENS = {"viewer": "view-token-123", "editor": "edit-token-456", "publisher": "publish-token-789"}
_db = itertools.count(1)


@pytest.fixture(scope="session")
def silence_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A silent caller for the softphone tests' fake microphone (3 s, 48 kHz, looped by Chromium)."""
    return silence_wav_48k(tmp_path_factory.mktemp("softphone-audio") / "silence.wav")


@pytest.fixture
def default_yaml() -> str:
    return Path(DEFAULT_POLICY_PATH).read_text(encoding="utf-8")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    url = f"{redis_url.rsplit('/', 1)[0]}/{8 + next(_db) % 8}"  # DBs 8-15: apart from bot serve tests
    r = aioredis.from_url(url, decode_responses=True)
    await r.flushdb()
    yield r
    await r.flushdb()
    await r.aclose()


@pytest.fixture
async def store(redis: aioredis.Redis) -> PolicyStore:
    s = PolicyStore(redis)
    await s.ensure_seeded()
    return s


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    p = tmp_path / "tokens"
    p.write_text("# role:name:token\n" + "\n".join(f"{r}:{r}-user:{t}" for r, t in TOKENS.items()) + "\n")
    return p


@pytest.fixture
async def app(redis: aioredis.Redis, store: PolicyStore, tokens_file: Path) -> FastAPI:
    from bot.admin.api import router

    app = FastAPI()
    app.include_router(router, prefix="/admin")  # as bot/app.py mounts it
    app.state.redis = redis
    app.state.policy_store = store
    app.state.admin_tokens = TokenRegistry.from_env(admin_token="", tokens_file=str(tokens_file))
    return app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as c:
        yield c


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}
