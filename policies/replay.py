"""Engine outputs on an evaluation set, for tuning and simulation: run the understanding model once
over EVAL_DIR (manifest.jsonl + 8 kHz WAVs), cache the Understandings as JSON lines, reuse them.

Outputs file format (also what `bot policy tune --outputs` reads), one JSON object per line:
    {"audio": "x.wav", "gold": "pay_bill" | null, "gold_slots": {...}, "understanding": {Understanding.to_dict()}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engine.types import Understanding
from ops.logs import get_logger

log = get_logger("policies.replay")
CACHE_DIR_ENV = "BOT_TUNE_CACHE_DIR"  # where engine outputs are cached (default ./var/tune-cache)


class ReplayError(ValueError):
    """Bad evaluation input: a missing manifest, an unreadable WAV, a malformed outputs line."""


@dataclass(frozen=True)
class Record:
    audio: str
    gold: str | None
    understanding: Understanding
    gold_slots: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"audio": self.audio, "gold": self.gold, "gold_slots": self.gold_slots,
                "understanding": self.understanding.to_dict()}


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ReplayError(f"{where} must be a number, got {v!r}"[:200])
    try:
        return float(v)
    except ValueError:
        raise ReplayError(f"{where} must be a number, got {v!r}"[:200]) from None


def _mapping(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ReplayError(f"{where} must be a mapping, got {v!r}"[:200])
    return dict(v)


def _label(v: Any, where: str) -> str | None:
    if v is not None and not isinstance(v, str):  # a list or a number here would reach decide() as a label
        raise ReplayError(f"{where} must be an intent name or null, got {v!r}"[:200])
    return v


def understanding_from_dict(d: dict[str, Any]) -> Understanding:
    """Inverse of Understanding.to_dict(); unknown keys are ignored so newer engines stay readable. A
    malformed field (a hand-written simulation script, a damaged outputs file) is a ReplayError naming it."""
    if not isinstance(d, dict) or "confidence" not in d:
        raise ReplayError(f"not an understanding: {str(d)[:120]}")
    alts = d.get("alternatives") or []
    if not isinstance(alts, list):
        raise ReplayError(f"alternatives must be a list of [intent, probability] pairs, got {alts!r}"[:200])
    pairs: list[tuple[str | None, float]] = []
    for i, a in enumerate(alts):
        if not isinstance(a, (list, tuple)) or len(a) != 2:
            raise ReplayError(f"alternatives[{i}] must be an [intent, probability] pair, got {a!r}"[:200])
        pairs.append((_label(a[0], f"alternatives[{i}] intent"), _number(a[1], f"alternatives[{i}] probability")))
    error = d.get("error")
    return Understanding(
        intent=_label(d.get("intent"), "intent"),
        confidence=_number(d["confidence"], "confidence"),
        alternatives=pairs,
        slots=_mapping(d.get("slots"), "slots"),
        transcript=str(d.get("transcript") or ""),
        caller_state={str(k): _number(v, f"caller_state.{k}")
                      for k, v in _mapping(d.get("caller_state"), "caller_state").items()},
        end_of_turn=_number(d.get("end_of_turn", 1.0), "end_of_turn"),
        timings={str(k): _number(v, f"timings.{k}") for k, v in _mapping(d.get("timings"), "timings").items()},
        error=None if error is None else str(error),
        slot_candidates={str(k): _values(v, f"slot_candidates.{k}")
                         for k, v in _mapping(d.get("slot_candidates"), "slot_candidates").items()},
    )


def _values(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise ReplayError(f"{where} must be a list of the values heard, got {v!r}"[:200])
    return list(v)


def read_outputs(path: str | Path) -> list[Record]:
    out: list[Record] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"cannot read outputs {path}: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Record(str(d.get("audio", f"line{n}")), d.get("gold"), understanding_from_dict(d["understanding"]),
                              dict(d.get("gold_slots") or {})))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ReplayError(f"{path}:{n}: bad outputs line: {exc}") from None
    return out


def write_outputs(path: str | Path, records: Iterable[Record]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
    os.replace(tmp, p)  # a crash mid-write never leaves a truncated cache


def read_manifest(eval_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of EVAL_DIR/manifest.jsonl (the engine's evaluation format, read by the engine's reader: a
    byte-order mark is fine, and every malformed row or missing/unreadable clip is reported at once, with its
    line), less the truncated ones."""
    from engine.training.evaluate import read_eval_manifest

    try:
        rows = [r for _, r in read_eval_manifest(eval_dir)]
    except (OSError, ValueError) as exc:
        raise ReplayError(str(exc)) from None
    # a caller cut off mid-sentence (end-of-turn training data) is not a turn to decide on
    return [r for r in rows if not r.get("truncated")]


def read_wav(path: str | Path) -> np.ndarray:
    """A clip as 8 kHz mono int16 PCM, read as `bot engine eval` reads it (other rates resampled, the first
    channel of a multi-channel file), so both commands score the same audio."""
    import soundfile as sf

    from engine.training.evaluate import load_wav

    if not Path(path).is_file():
        raise ReplayError(f"cannot read WAV {path}: file not found")
    try:
        return load_wav(Path(path))
    except (OSError, RuntimeError, ValueError, sf.LibsndfileError) as exc:
        raise ReplayError(f"cannot read WAV {path}: {exc}") from None


def load_model(model_dir: str | None = None) -> Any:
    """The engine's UnderstandingModel (anything with understand_batch)."""
    try:
        from engine.understanding import UnderstandingModel
    except ImportError as exc:
        raise ReplayError(f"the engine's understanding model is not available: {exc}") from None
    try:
        return UnderstandingModel.load(model_dir) if model_dir else UnderstandingModel.load()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReplayError(f"understanding model failed to load: {exc}") from None


def _model_fingerprint(model_dir: str | None) -> str:
    """Changes whenever the model files change, so a retrained model never reuses stale outputs."""
    root = Path(model_dir or os.environ.get("BOT_ENGINE_MODEL_DIR") or Path(__file__).parents[1] / "engine" / "models")
    parts = []
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                parts.append(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    try:  # which int8 graph runs depends on the CPU and BOT_ENGINE_INT8_GRAPH, not only on the files
        from engine.graphs import cpu_has_vnni, graph_choice

        parts.append(f"graph:{graph_choice()}:{cpu_has_vnni()}")
    except (ImportError, ValueError):
        pass
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def cache_path(eval_dir: str | Path, model_dir: str | None = None) -> Path:
    manifest = (Path(eval_dir) / "manifest.jsonl").read_bytes()
    key = hashlib.sha1(str(Path(eval_dir).resolve()).encode() + manifest).hexdigest()[:12]
    base = Path(os.environ.get(CACHE_DIR_ENV, "./var/tune-cache"))
    return base / f"{Path(eval_dir).name}-{key}-{_model_fingerprint(model_dir)}.jsonl"


def run_engine(eval_dir: str | Path, model: Any = None, model_dir: str | None = None, batch: int = 32,
               limit: int | None = None, cache: str | Path | None = None) -> tuple[list[Record], Path | None]:
    """Engine outputs for every manifest row, from the cache when fresh; returns (records, cache path)."""
    rows = read_manifest(eval_dir)[:limit] if limit else read_manifest(eval_dir)
    cpath = Path(cache) if cache else (cache_path(eval_dir, model_dir) if not limit else None)
    if cpath is not None and cpath.exists():
        cached = read_outputs(cpath)
        if len(cached) == len(rows):
            log.info("tune_cache_hit", path=str(cpath), n=len(cached))
            return cached, cpath
    model = model or load_model(model_dir)
    records: list[Record] = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        pcms = [read_wav(Path(eval_dir) / r["audio"]) for r in chunk]
        outs = model.understand_batch(pcms)
        records += [Record(r["audio"], r.get("intent"), u, dict(r.get("slots") or {})) for r, u in zip(chunk, outs)]
    if cpath is not None:
        write_outputs(cpath, records)
        log.info("tune_cache_written", path=str(cpath), n=len(records))
    return records, cpath
