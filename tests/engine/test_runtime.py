"""engine.runtime.Engine: the async facade (batching across calls, speak, faults, bad input).

Uses the shipped understanding model when engine/models/ holds one (required once it is shipped);
before that, pipecat's smart-turn ONNX (a real batched model) through the same interface."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from engine.batching import BatchConfig
from engine.bench import SmartTurnReference, speech_clips
from engine.runtime import Engine, EngineError, EngineFault, EngineInputError, EngineOverloaded, EngineUnavailable
from engine.types import SpeechStyle, Understanding
from engine.voice import PiperVoice, Voice, split_chunks
from ops.metrics import ENGINE_BATCH_SIZE, ERRORS

MODELS = Path(__file__).resolve().parents[2] / "engine" / "models"


def model_shipped() -> bool:
    return MODELS.is_dir() and any(p.name != "__init__.py" and not p.name.startswith(".") for p in MODELS.iterdir())


@pytest.fixture(scope="module")
def model():
    if model_shipped():
        from engine.understanding import UnderstandingModel

        return UnderstandingModel.load()
    return SmartTurnReference()


@pytest.fixture(scope="module")
def voice() -> Voice:
    return Voice(PiperVoice.default())


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return speech_clips([1.5, 3.0], 12, voice_kind="espeak")


def err(kind: str) -> float:
    return ERRORS.labels(component="engine", kind=kind)._value.get()


def same(a: Understanding, b: Understanding) -> bool:
    """Batching must not change anything: the shipped int8 model runs each clip on its own inside a batch
    (its activation scales are per input tensor; engine/understanding.py), the reference model is
    batch-independent by construction."""
    return (a.intent == b.intent and abs(a.confidence - b.confidence) < 1e-4 and a.slots == b.slots
            and abs(a.end_of_turn - b.end_of_turn) < 1e-4 and a.error == b.error)


async def test_concurrent_understand_is_batched_and_equals_unbatched(model, voice, clips) -> None:
    engine = Engine(model, voice, config=BatchConfig(max_batch=16, wait_ms=5, adaptive=False))
    try:
        await engine.understand(clips[0])  # warm-up
        hist_before = ENGINE_BATCH_SIZE.labels(op="understand")._sum.get()
        results = await asyncio.gather(*(engine.understand(c) for c in clips))
        eots = await asyncio.gather(*(engine.end_of_turn(c) for c in clips))
    finally:
        await engine.close()
    st = engine.stats()["understand"]
    assert st["items"] == len(clips) + 1 and st["batches"] < st["items"]  # batched across calls
    assert ENGINE_BATCH_SIZE.labels(op="understand")._sum.get() - hist_before == len(clips)
    reference = [model.understand_batch([c])[0] for c in clips]
    assert all(same(a, b) for a, b in zip(results, reference))
    ref_eot = [model.end_of_turn_batch([c])[0] for c in clips]
    assert np.allclose(eots, ref_eot, atol=1e-4)


async def test_lone_call_is_not_slower_than_unbatched(model, voice, clips) -> None:
    engine = Engine(model, voice, config=BatchConfig(max_batch=32, wait_ms=5))
    clip = clips[1]
    try:
        await engine.understand(clip)
        direct, facade = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            model.understand_batch([clip])
            direct.append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)  # idle between turns, as on a real call
            t0 = time.perf_counter()
            await engine.understand(clip)
            facade.append(time.perf_counter() - t0)
    finally:
        await engine.close()
    assert statistics.median(facade) <= statistics.median(direct) + 0.05


async def test_back_pressure(model, voice, clips) -> None:
    engine = Engine(model, voice, config=BatchConfig(max_batch=2, wait_ms=0, max_queue=3, adaptive=False))
    before = err("queue_full")
    try:
        results = await asyncio.gather(*(engine.understand(clips[i % 4]) for i in range(10)), return_exceptions=True)
    finally:
        await engine.close()
    over = [r for r in results if isinstance(r, EngineOverloaded)]
    ok = [r for r in results if isinstance(r, Understanding)]
    assert over and ok and len(over) + len(ok) == 10
    assert err("queue_full") == before + len(over)


async def test_fault_injection(model, voice, clips, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(model, voice)
    before = err("fault_injected")
    try:
        monkeypatch.setenv("BOT_ENGINE_FAULT", "understand")
        with pytest.raises(EngineFault):
            await engine.understand(clips[0])
        assert len(await engine.speak("Still here.")) > 0  # only the named op fails
        monkeypatch.setenv("BOT_ENGINE_FAULT", "speak")
        with pytest.raises(EngineError):
            await engine.speak("Hello.")
        with pytest.raises(EngineError):
            async for _ in engine.speak_stream("Hello there, caller."):
                pass
        assert isinstance(await engine.understand(clips[0]), Understanding)
        monkeypatch.setenv("BOT_ENGINE_FAULT", "none")
        assert len(await engine.speak("Hello.")) > 0
    finally:
        await engine.close()
    assert err("fault_injected") == before + 3


@pytest.mark.parametrize("bad", [
    [0, 1, 2], np.zeros(8000, np.float32), np.zeros((2, 8000), np.int16), np.zeros(0, np.int16),
    np.zeros(8000 * 61, np.int16)])
async def test_bad_audio_is_a_clear_error(model, voice, clips, bad) -> None:
    engine = Engine(model, voice)
    before = err("bad_input")
    try:
        with pytest.raises(EngineInputError) as exc_info:
            await engine.understand(bad)
        assert isinstance(exc_info.value, ValueError) and str(exc_info.value)
        with pytest.raises(EngineInputError):
            await engine.end_of_turn(bad)
        assert isinstance(await engine.understand(clips[0]), Understanding)  # the engine keeps serving
    finally:
        await engine.close()
    assert err("bad_input") == before + 2


async def test_silence_and_clipping_do_not_crash(model, voice) -> None:
    engine = Engine(model, voice)
    try:
        quiet = await engine.understand(np.zeros(16000, np.int16))
        loud = await engine.understand(np.where(np.arange(16000) % 20 < 10, 32767, -32768).astype(np.int16))
    finally:
        await engine.close()
    assert isinstance(quiet, Understanding) and isinstance(loud, Understanding)


async def test_speak_cache_stream_and_prerender(voice) -> None:
    engine = Engine(None, voice)
    try:
        a = await engine.speak("Please hold while I look that up.")
        assert a.dtype == np.int16 and len(a) > 4000
        assert await engine.speak("Please hold while I look that up.") is a  # cached
        calm = await engine.speak("Please hold while I look that up.", SpeechStyle.named("calm"))
        assert len(calm) > len(a)
        text = "Your payment of 42 dollars is scheduled for Monday, and you will get a confirmation text."
        chunks = [c async for c in engine.speak_stream(text)]
        assert len(chunks) >= 3 and all(c.dtype == np.int16 and len(c) > 800 for c in chunks)
        assert len(chunks[0]) < len(np.concatenate(chunks)) / 2  # the first clause is short
        again = [c async for c in engine.speak_stream(text)]
        assert len(again) == 1 and np.array_equal(again[0], np.concatenate(chunks))  # now cached
        await engine.prerender(["Goodbye.", "", "Thanks for calling."])  # bad prompt skipped, not fatal
        assert voice.cached("Goodbye.", memory_only=True) is not None
        with pytest.raises(EngineInputError):
            await engine.speak("")
        with pytest.raises(EngineUnavailable):
            await engine.understand(np.zeros(8000, np.int16))
    finally:
        await engine.close()


async def test_template_clauses_are_rendered_once_and_digits_never_kept(voice) -> None:
    """Every read-back starts with the same words: the second caller's head comes from memory, not the
    renderer; clauses with an amount or account number are rendered every time and never kept."""
    engine = Engine(None, voice)
    try:
        async def stream(text: str) -> list[np.ndarray]:
            return [c async for c in engine.speak_stream(text)]

        first = await stream("That's a payment of 42 dollars, is that right?")
        kept = dict(engine._clauses)
        assert kept
        heads = split_chunks("That's a payment of 42 dollars, is that right?")
        assert any(ch.isdigit() for ch in heads[1]) and not any(ch.isdigit() for ch in heads[0])
        assert engine.voice.key(heads[0], SpeechStyle()) in kept
        assert engine.voice.key(heads[1], SpeechStyle()) not in kept
        second = await stream("That's a payment of 57 dollars, is that right?")
        assert np.array_equal(second[0], first[0])  # the same head, from memory
        assert not np.array_equal(second[1], first[1])  # the amount was rendered
        engine.clause_cache_size = 2
        await stream("Your technician will come on Monday morning, and you will get a text the day before.")
        assert len(engine._clauses) <= 2  # bounded
        engine.clear_clause_cache()
        assert not engine._clauses
        engine.clause_cache_size = 0
        await stream("That's a payment of 61 dollars, is that right?")
        assert not engine._clauses  # off
    finally:
        await engine.close()


async def test_engine_load_is_fast_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path))
    t0 = time.perf_counter()
    engine = Engine.load()
    elapsed = time.perf_counter() - t0
    try:
        assert engine.has_understanding == model_shipped()
        assert elapsed < 4.0  # target 2 s (understanding ready; the voice loads in the background)
        speech = asyncio.ensure_future(engine.speak("Welcome."))  # waits for the voice, not the loop
        await engine.wait_ready()
        assert engine.ready and engine.voice.name == "piper"
        assert len(await speech) > 0
        assert list((tmp_path / "voice-cache").glob("*.npy"))
    finally:
        await engine.close()


async def test_strict_equality_with_a_batch_independent_model(voice, clips) -> None:
    """The scheduler itself never changes a result: exact with pipecat's smart-turn (static int8)."""
    ref_model = SmartTurnReference()
    engine = Engine(ref_model, voice, config=BatchConfig(max_batch=8, wait_ms=5, adaptive=False))
    try:
        got = await asyncio.gather(*(engine.end_of_turn(c) for c in clips[:6]))
    finally:
        await engine.close()
    assert engine.stats()["end_of_turn"]["batches"] < 6
    assert got == [ref_model.end_of_turn_batch([c])[0] for c in clips[:6]] or np.allclose(
        got, [ref_model.end_of_turn_batch([c])[0] for c in clips[:6]], atol=1e-5)
