"""The real engine with extra understand() latency (chaos), loaded by `bot serve` through
BOT_ENGINE_FACTORY=tests.helpers.slow_engine:make to test fillers and engine-failure handling."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np


class SlowEngine:
    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def understand(self, pcm: np.ndarray) -> Any:
        await asyncio.sleep(self.delay_s)
        return await self.inner.understand(pcm)


def make() -> SlowEngine:
    from engine.runtime import Engine

    return SlowEngine(Engine.load(), float(os.environ.get("BOT_TEST_ENGINE_DELAY_S", "1.5")))
