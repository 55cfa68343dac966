"""Turn taking on awkward phone lines: a DC offset on the caller's line (some analog gateways and ATAs
add one), and an end-of-turn answer that comes back after the caller already went on talking.
Real audio through the real (batched) Silero VAD; no timing assertions."""

from __future__ import annotations


import numpy as np
import pytest

from bot.conversation_audio import level_dbfs
from bot.turns import TurnDetector, TurnEvent
from bot.turns_vad import rms_dbfs
from tests.helpers.audio import attenuate, silence, synth
from tests.helpers.turns import PARAMS, bot_voice_pcm, feed_vad, turn_events

def with_dc(pcm: np.ndarray, offset: int) -> np.ndarray:
    return np.clip(pcm.astype(np.int32) + offset, -32768, 32767).astype(np.int16)


@pytest.fixture(scope="module")
def bot_voice() -> np.ndarray:
    return bot_voice_pcm()


def test_window_level_ignores_a_dc_offset() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(256) * 0.01).astype(np.float32)  # -40 dBFS
    assert abs(rms_dbfs(x + np.float32(0.1)) - rms_dbfs(x)) < 0.5
    assert rms_dbfs(np.full(256, 0.1, np.float32)) < -80  # an offset alone is silence (under the -50 dB gate)


async def test_bot_echo_on_a_line_with_dc_offset_does_not_barge_in(bot_voice: np.ndarray) -> None:
    """The echo (-20 dB) plus a DC offset of ~-21 dBFS: the offset used to count as level, lifting the echo
    inside the 12 dB margin, and the bot interrupted itself."""
    echo = with_dc(attenuate(bot_voice, -20), 3000)
    events = await turn_events(echo, level_dbfs(bot_voice))
    assert [e.kind for e in events if e.kind == "barge_in"] == []


async def test_caller_on_a_line_with_dc_offset_still_barges_in_and_ends_turns(bot_voice: np.ndarray) -> None:
    caller = synth("no wait I need to talk to an agent", level_dbfs=-18)
    mix = attenuate(bot_voice, -20).astype(np.int32)
    mix[8000 : 8000 + len(caller)] += caller[: len(mix) - 8000]
    events = await turn_events(with_dc(np.clip(mix, -32768, 32767).astype(np.int16), 3000), level_dbfs(bot_voice))
    assert [e.kind for e in events].count("barge_in") == 1
    turn = with_dc(np.concatenate([silence(500), synth("I want to pay my bill please"), silence(1300)]), 3000)
    assert [e.kind for e in await turn_events(turn, None)] == ["speech_started", "check_eot", "turn_end"]


def _windows(det: TurnDetector, t: float, n: int, prob: float, db: float) -> tuple[float, list[TurnEvent]]:
    evs = []
    for _ in range(n):
        t += 0.032
        if (ev := det.update(prob, db, t)) is not None:
            evs.append(ev)
    return t, evs


def _speech(det: TurnDetector, t: float, windows: int) -> tuple[float, list[TurnEvent]]:
    return _windows(det, t, windows, 0.9, -20)


def _quiet(det: TurnDetector, t: float, windows: int) -> tuple[float, list[TurnEvent]]:
    return _windows(det, t, windows, 0.02, -60)


def test_end_of_turn_answer_after_the_caller_resumed_is_ignored() -> None:
    """"four two ... seven one": the end-of-turn head is asked 250 ms into the pause; under load its answer
    comes back after the caller went on. It scored a pause that is over and must not end the turn (it did:
    the turn was cut mid-word at the resumed speech)."""
    det = TurnDetector(PARAMS)
    t, evs = _speech(det, 0.0, 20)
    assert [e.kind for e in evs] == ["speech_started"]
    t, evs = _quiet(det, t, 8)
    assert [e.kind for e in evs] == ["check_eot"]
    t, evs = _speech(det, t, 2)  # "seven ..." before the answer arrives
    assert evs == []
    assert det.set_eot(0.95) is False
    assert det.in_speech and det.eot_prob is None
    # the next pause is asked again, and its own answer counts
    t, evs = _quiet(det, t, 8)
    assert [e.kind for e in evs] == ["check_eot"]
    assert det.set_eot(0.95) is True
    assert det.eot_prob == 0.95


def test_end_of_turn_answer_after_the_turn_ended_is_ignored() -> None:
    """Max silence ended the turn while the answer was in flight: a late answer must not end a new one."""
    det = TurnDetector(PARAMS)
    t, _ = _speech(det, 0.0, 20)
    t, evs = _quiet(det, t, 40)
    assert [e.kind for e in evs] == ["check_eot", "turn_end"]
    t, evs = _speech(det, t, 5)  # the caller's next turn has begun
    assert [e.kind for e in evs] == ["speech_started"]
    assert det.set_eot(0.99) is False


@pytest.fixture(scope="module")
def model():
    from engine.understanding import UnderstandingModel, default_model_dir

    if not (default_model_dir() / "model.onnx").exists():
        pytest.skip("the shipped understanding model is required")
    return UnderstandingModel.load()


async def _turns_with_engine(pcm: np.ndarray, model) -> list[str]:
    """The live path's end-of-turn loop: at check_eot the engine scores the turn so far (200 ms pre-roll,
    up to now), a high answer ends the turn at once."""
    det = TurnDetector(PARAMS)
    out: list[str] = []

    def on_window(p: float, db: float, t: float) -> None:
        ev = det.update(p, db, t)
        if ev is not None and ev.kind == "check_eot":
            a = max(0, int(det.speech_start_t * 8000) - 1600)
            if det.set_eot(model.end_of_turn_batch([pcm[a : int(t * 8000)]])[0]):
                out.append("turn_end_by_eot")
                det.reset()
        elif ev is not None:
            out.append(ev.kind)

    await feed_vad(pcm, on_window)
    return out


@pytest.mark.parametrize("first,rest", [("four two", "seven one"),
                                        ("my account number is four two", "seven one three five")])
async def test_a_pause_inside_an_account_number_does_not_end_the_turn(model, first: str, rest: str) -> None:
    """The end-of-turn head scored "four two" + 250 ms of pause as finished (0.6-0.8) and the bot answered
    into the middle of the number; the caller's next digits became a barge-in and a second turn."""
    pcm = np.concatenate([silence(500), synth(first), silence(400), synth(rest), silence(1500)])
    kinds = await _turns_with_engine(pcm, model)
    assert kinds.count("speech_started") == 1, kinds
    assert sum(k.startswith("turn_end") for k in kinds) == 1, kinds


async def test_a_finished_request_still_ends_on_the_end_of_turn_head(model) -> None:
    pcm = np.concatenate([silence(500), synth("I want to pay my bill please"), silence(1500)])
    assert await _turns_with_engine(pcm, model) == ["speech_started", "turn_end_by_eot"]


@pytest.mark.parametrize("level", [-42, -46])
async def test_a_quiet_caller_is_one_turn_not_pieces(level: float) -> None:
    """The VAD's -50 dBFS gate is absolute: a caller 20+ dB under the usual level had soft word endings and
    comma pauses gated to "no speech", so the sentence was cut into pieces (its first words discarded as
    too short, an end-of-turn check at the comma). Right after speech the gate now follows the caller."""
    speech = synth("I want to pay my bill please, I think it is a bit too high this month", level_dbfs=level)
    pcm = np.concatenate([silence(500), speech, silence(1500)])
    events = await turn_events(pcm, None)
    assert [e.kind for e in events] == ["speech_started", "check_eot", "turn_end"], [(e.kind, e.t) for e in events]
    assert events[-1].speech_start_t < 1.0  # "I want ..." is part of the turn
