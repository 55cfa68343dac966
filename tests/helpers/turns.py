"""Turn taking driven by real audio through the real (batched) Silero VAD, as a live call feeds it:
20 ms frames, the batch loop given a turn every 400 ms. Shared by the turn-taking tests."""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np

from bot.turns import TurnDetector, TurnEvent, TurnParams
from bot.turns_vad import BatchedVad
from tests.helpers.audio import synth

PARAMS = TurnParams(threshold=0.5, start_ms=96, barge_ms=288, echo_margin_db=12, min_speech_ms=200,
                    min_silence_ms=250, max_silence_ms=1000, eot_threshold=0.5, max_turn_s=15)


def bot_voice_pcm() -> np.ndarray:
    """The bot's own prompt, for echo and barge-in tests."""
    return synth("Thanks for calling. How can I help you today? You can pay a bill or report an outage.",
                 voice="en-gb", level_dbfs=-18)


async def feed_vad(pcm: np.ndarray, on_window: Callable[[float, float, float], None], timeout_s: float = 60) -> None:
    """Push `pcm` through the VAD; on_window(speech_prob, level_db, t) for every 32 ms window, in order."""
    vad = BatchedVad()
    await vad.start()
    done = asyncio.Event()
    n_windows = (len(pcm) // 160) * 160 // 256
    seen = 0

    def on_prob(p: float, db: float, t: float) -> None:
        nonlocal seen
        on_window(p, db, t)
        seen += 1
        if seen >= n_windows:
            done.set()

    stream = vad.open(on_prob)
    pos = 0
    for i in range(0, len(pcm) - 159, 160):
        pos += 160
        stream.push(pcm[i : i + 160], pos / 8000)
        if i % 3200 == 0:
            await asyncio.sleep(0)  # let the batch loop run, as on a live call
    await asyncio.wait_for(done.wait(), timeout_s)
    stream.close()
    await vad.stop()


async def turn_events(pcm: np.ndarray, bot_level: float | None, params: TurnParams = PARAMS) -> list[TurnEvent]:
    """The detector's events for `pcm`; bot_level: the bot's prompt level while it plays (barge-in mode)."""
    det = TurnDetector(params)
    det.bot_level_db = bot_level
    events: list[TurnEvent] = []

    def on_window(p: float, db: float, t: float) -> None:
        ev = det.update(p, db, t)
        if ev is not None:
            events.append(ev)

    await feed_vad(pcm, on_window)
    return events
