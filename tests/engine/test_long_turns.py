"""Turns longer than the model's 8 s window: cut at pauses, every piece read for slots."""

import numpy as np
import pytest

from engine.long_turns import SR, WINDOW_S, pause_centres, split_even, split_turn


def _bursts(spec: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """(speech seconds, pause seconds) pairs -> noise bursts with quiet gaps under faint hiss."""
    rng = np.random.default_rng(seed)
    parts = []
    for talk, gap in spec:
        parts += [rng.standard_normal(int(talk * SR)) * 0.2, np.zeros(int(gap * SR))]
    x = np.concatenate(parts)
    return (x + rng.standard_normal(len(x)) * 1e-3).astype(np.float32)


def test_short_turns_stay_whole() -> None:
    x = _bursts([(1.0, 0.3)] * 5)
    assert len(split_turn(x)) == 1 and split_turn(x)[0] is x


def test_long_turns_are_cut_inside_pauses_into_window_sized_pieces() -> None:
    spec = [(0.9, 0.4)] * 12  # 15.6 s: a long read-out in groups
    x = _bursts(spec)
    pieces = split_turn(x)
    assert len(pieces) == 2
    assert np.array_equal(np.concatenate(pieces), x)  # nothing lost, nothing repeated, in order
    assert all(len(p) <= WINDOW_S * SR for p in pieces)
    assert len(pieces[-1]) > 7 * SR  # the last piece (intent, end of turn) is nearly the whole window
    # every cut sits in a gap: the samples around it are quiet
    cut = len(pieces[0])
    assert np.abs(x[cut - 400 : cut + 400]).max() < 0.01
    assert len(pause_centres(x)) == 12


def test_speech_without_pauses_is_cut_at_the_window() -> None:
    x = _bursts([(20.0, 0.0)])
    pieces = split_turn(x)
    assert [len(p) for p in pieces] == [4 * SR, 8 * SR, 8 * SR]


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/asterisk/sounds/en/digits/1.wav").exists(),
                    reason="asterisk-core-sounds-en-wav not installed")
def test_long_account_number_read_out_by_a_real_voice_keeps_its_first_digits() -> None:
    from engine.training.asterisk import long_readout
    from engine.understanding import UnderstandingModel

    model = UnderstandingModel.load()
    rng = np.random.default_rng(3)
    clips = [long_readout(rng) for _ in range(12)]
    assert all(len(x) > WINDOW_S * SR for x, _ in clips)
    got = [model.understand(np.round(x / np.abs(x).max() * 16000).astype(np.int16)).slots.get("account_number", "")
           for x, _ in clips]
    # the window alone keeps at most ~8 s of a 9-14 digit read-out; every piece read gives nearly all digits
    close = sum(len(str(g)) >= len(d) - 2 for g, (_, d) in zip(got, clips))
    exact = sum(str(g) == d for g, (_, d) in zip(got, clips))
    assert close >= 9 and exact >= 3, list(zip(got, [d for _, d in clips]))


def test_even_pieces_for_reading_cut_in_pauses_near_equal_shares() -> None:
    x = _bursts([(0.9, 0.4)] * 8)  # 10.4 s: split_turn leaves ~8 s + ~2.4 s
    assert [round(len(p) / SR, 1) for p in split_turn(x)] == [2.4, 8.0]  # a short remainder first
    pieces = split_even(x)
    assert len(pieces) == 2 and np.array_equal(np.concatenate(pieces), x)
    assert abs(len(pieces[0]) - len(pieces[1])) < 1.4 * SR  # about half each, at the pause nearest the middle
    cut = len(pieces[0])
    assert np.abs(x[cut - 400 : cut + 400]).max() < 0.01
    assert split_even(x[: 5 * SR])[0] is not None and len(split_even(x[: 5 * SR])) == 1
    long = _bursts([(0.9, 0.4)] * 18)  # 23.4 s -> 3 pieces, each within the window
    assert len(split_even(long)) == 3 and all(len(p) <= WINDOW_S * SR for p in split_even(long))


def test_even_pieces_without_pauses_cut_at_the_shares() -> None:
    pieces = split_even(_bursts([(20.0, 0.0)]))
    assert [len(p) for p in pieces] == [int(20 * SR / 3), int(40 * SR / 3) - int(20 * SR / 3), 20 * SR - int(40 * SR / 3)]


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/asterisk/sounds/en/digits/1.wav").exists(),
                    reason="asterisk-core-sounds-en-wav not installed")
def test_a_long_turn_reads_slots_from_even_pieces_and_intent_from_its_last_window() -> None:
    from engine.training.asterisk import long_readout
    from engine.understanding import UnderstandingModel

    model = UnderstandingModel.load()
    x, _digits = long_readout(np.random.default_rng(5))
    pcm = np.round(x / np.abs(x).max() * 16000).astype(np.int16)
    u = model.understand(pcm)
    assert u.timings["pieces"] == len(split_even(pcm.astype(np.float32) / 32768))
    last = model.understand(np.round(split_turn(pcm.astype(np.float32) / 32768)[-1] * 32768).astype(np.int16))
    assert u.intent == last.intent and abs(u.confidence - last.confidence) < 1e-4
