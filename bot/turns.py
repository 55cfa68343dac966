"""Turn taking for one call: VAD scores in, speech start / barge-in / end-of-turn decisions out.

Pure logic over (prob, level, time) per 32 ms window, so it is tested without a network or model.
- Caller speech starts after `start_ms` of VAD speech (bot silent).
- While the bot speaks, barge-in needs `barge_ms` of sustained speech whose level is within
  `echo_margin_db` of the bot's own level: the bot's echo (~-20 dB), a cough or a 200 ms noise
  burst never qualifies.
- After caller speech, `min_silence_ms` of silence asks the engine's end-of-turn head; a high
  probability ends the turn at once, a low one waits for more silence, up to `max_silence_ms`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bot.turns_vad import WINDOW_S


def _f(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class TurnParams:
    threshold: float = field(default_factory=lambda: _f("BOT_VAD_THRESHOLD", 0.5))
    start_ms: float = field(default_factory=lambda: _f("BOT_SPEECH_START_MS", 96))
    barge_ms: float = field(default_factory=lambda: _f("BOT_BARGE_IN_MS", 288))
    echo_margin_db: float = field(default_factory=lambda: _f("BOT_ECHO_MARGIN_DB", 12))
    min_speech_ms: float = field(default_factory=lambda: _f("BOT_MIN_TURN_SPEECH_MS", 200))
    min_silence_ms: float = field(default_factory=lambda: _f("BOT_EOT_MIN_SILENCE_MS", 250))
    max_silence_ms: float = field(default_factory=lambda: _f("BOT_EOT_MAX_SILENCE_MS", 1000))
    eot_threshold: float = field(default_factory=lambda: _f("BOT_EOT_THRESHOLD", 0.5))
    max_turn_s: float = field(default_factory=lambda: _f("BOT_MAX_TURN_S", 15))


@dataclass(frozen=True)
class TurnEvent:
    kind: str  # speech_started | barge_in | check_eot | turn_end | speech_discarded
    t: float  # time of the window that triggered it
    speech_start_t: float = 0.0
    speech_end_t: float = 0.0  # last window with speech
    silence_ms: float = 0.0
    forced: bool = False  # a turn_end at max_turn_s while the caller was still talking


class TurnDetector:
    def __init__(self, params: TurnParams | None = None) -> None:
        self.p = params or TurnParams()
        self.bot_level_db: float | None = None  # set while the bot's audio is playing at the caller
        self.in_speech = False
        self._run = 0
        self._gap = 0
        self._run_start_t = 0.0
        self.speech_start_t = 0.0
        self.last_speech_t = 0.0
        self._speech_windows = 0
        self._silence_windows = 0
        self._eot_asked = False
        self.eot_prob: float | None = None

    def _qualifies(self, prob: float, level_db: float) -> bool:
        if prob < self.p.threshold:
            return False
        if self.bot_level_db is not None and level_db < self.bot_level_db - self.p.echo_margin_db:
            return False  # too quiet relative to the bot: its own echo
        return True

    def reset(self) -> None:
        self.in_speech = False
        self._run = self._gap = self._speech_windows = self._silence_windows = 0
        self._eot_asked = False
        self.eot_prob = None

    def set_eot(self, prob: float) -> bool:
        """The engine's end-of-turn probability for the current silence; True: end the turn now.

        The answer comes back asynchronously (tens to hundreds of ms under load). If the caller has
        started talking again since it was asked, it scored a pause that is over: ignored, else a
        caller resuming after a 250-400 ms pause ("four two ... seven one") was cut off mid-word."""
        if not (self.in_speech and self._eot_asked):
            return False
        self.eot_prob = prob
        return prob >= self.p.eot_threshold

    def update(self, prob: float, level_db: float, t: float) -> TurnEvent | None:
        w_ms = WINDOW_S * 1000
        if not self.in_speech:
            if self._qualifies(prob, level_db):
                if self._run == 0:
                    self._run_start_t = t - WINDOW_S
                self._run += 1
                self._gap = 0
            elif self._run:
                self._gap += 1
                if self._gap > 1:  # one dip inside a word is fine, two end the run
                    self._run = self._gap = 0
            barging = self.bot_level_db is not None
            need = (self.p.barge_ms if barging else self.p.start_ms) / w_ms
            if self._run >= need:
                self.in_speech = True
                self.speech_start_t = self._run_start_t
                self.last_speech_t = t
                self._speech_windows = self._run
                self._silence_windows = 0
                self._eot_asked = False
                self.eot_prob = None
                self._run = self._gap = 0
                return TurnEvent("barge_in" if barging else "speech_started", t, self.speech_start_t)
            return None
        # in caller speech: hysteresis keeps soft word endings in the turn
        if prob >= self.p.threshold - 0.15:
            self.last_speech_t = t
            self._speech_windows += 1
            self._silence_windows = 0
            self._eot_asked = False
            self.eot_prob = None
            if t - self.speech_start_t >= self.p.max_turn_s:
                return self._end("turn_end", t, forced=True)
            return None
        self._silence_windows += 1
        silence_ms = self._silence_windows * w_ms
        if silence_ms >= self.p.max_silence_ms:
            return self._end("turn_end", t)
        if silence_ms >= self.p.min_silence_ms and not self._eot_asked:
            self._eot_asked = True
            if self._speech_windows * w_ms < self.p.min_speech_ms:
                return self._end("speech_discarded", t)
            return TurnEvent("check_eot", t, self.speech_start_t, self.last_speech_t, silence_ms)
        return None

    def _end(self, kind: str, t: float, forced: bool = False) -> TurnEvent:
        ev = TurnEvent(kind, t, self.speech_start_t, self.last_speech_t, self._silence_windows * WINDOW_S * 1000,
                       forced)
        if kind == "turn_end" and self._speech_windows * WINDOW_S * 1000 < self.p.min_speech_ms:
            ev = TurnEvent("speech_discarded", t, self.speech_start_t, self.last_speech_t, ev.silence_ms)
        self.reset()
        return ev
