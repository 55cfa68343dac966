"""`bot engine eval DIR`: the shipped ONNX model on an evaluation manifest -> metrics JSON + markdown report."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from engine.training.calibrate import ece, reliability
from engine.textnorm import DAYS, normalize_text
from engine.understanding import NULL, UnderstandingModel


MAX_SHOWN_ISSUES = 30


class ManifestError(ValueError):
    """A manifest with problems. Every problem is listed (line, field, message), so one pass fixes them all,
    and nothing is evaluated: a run that quietly skipped or mis-scored some rows would report figures for a
    set other than the one the manifest describes."""

    def __init__(self, path: Path, issues: list[tuple[int, str, str]]) -> None:
        self.path, self.issues = path, issues
        shown = [f"  {path}:{n}: {field}: {msg}" for n, field, msg in issues[:MAX_SHOWN_ISSUES]]
        if len(issues) > MAX_SHOWN_ISSUES:
            shown.append(f"  ... and {len(issues) - MAX_SHOWN_ISSUES} more")
        super().__init__(f"{len(issues)} problem(s) in {path}; fix them and run again:\n" + "\n".join(shown))


def _read_lines(mf: Path) -> list[str]:
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first row
        return mf.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ManifestError(mf, [(0, "file", f"not UTF-8 text ({exc})")]) from None


def read_eval_manifest(d: str | Path, intents: list[str] | None = None, slot_types: dict[str, str] | None = None,
                       check_audio: bool = True) -> list[tuple[int, dict]]:
    """(line number, row) for every row of DIR/manifest.jsonl, checked: JSON objects with `audio` (a file
    that exists and can be read as audio, relative to DIR or absolute) and `intent` (a name or null),
    `slots` an object, `text` a string. With the model's `intents` and `slot_types`, gold labels must be
    the model's: an intent it knows, slot names it reads, values that parse (`"$40.00"` -> 40.0,
    `"Tuesday"` -> "tuesday", `"12-34"` -> "1234"; rows are returned with the normalised values).
    Raises ManifestError listing every problem."""
    d = Path(d)
    mf = d / "manifest.jsonl"
    if not mf.exists():
        raise FileNotFoundError(f"{mf} not found (an eval dir holds WAVs + manifest.jsonl)")
    rows: list[tuple[int, dict]] = []
    issues: list[tuple[int, str, str]] = []
    for n, line in enumerate(_read_lines(mf), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            issues.append((n, "line", f"not JSON ({exc})"))
            continue
        if not isinstance(r, dict):
            issues.append((n, "line", f"not a JSON object: {line.strip()[:60]}"))
            continue
        bad = _row_issues(d, r, check_audio)
        if intents is not None and not bad:
            r, bad = _normalise_labels(r, intents, slot_types or {})
        issues += [(n, field, msg) for field, msg in bad]
        rows.append((n, r))
    if issues:
        raise ManifestError(mf, issues)
    return rows


def read_eval_dir(d: str | Path, check_audio: bool = True) -> list[dict]:
    return [r for _, r in read_eval_manifest(d, check_audio=check_audio)]


def _row_issues(d: Path, r: dict, check_audio: bool) -> list[tuple[str, str]]:
    out = []
    if "intent" not in r:
        out.append(("intent", "missing (a name, or null for an answer that only carries slots)"))
    elif r["intent"] is not None and not isinstance(r["intent"], str):
        out.append(("intent", f"{r['intent']!r} is not a name or null"))
    if "slots" in r and r["slots"] is not None and not isinstance(r["slots"], dict):
        out.append(("slots", f"{r['slots']!r} is not an object (e.g. {{\"amount\": 40}})"))
    if "text" in r and r["text"] is not None and not isinstance(r["text"], str):
        out.append(("text", f"{r['text']!r} is not a string"))
    audio = r.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        out.append(("audio", "missing (the clip's path, relative to the manifest's dir or absolute)"))
    elif check_audio:
        path = d / audio
        if not path.is_file():
            out.append(("audio", f"file not found: {path}"))
        else:
            try:
                info = sf.info(str(path))
                if info.frames <= 0 or info.samplerate <= 0:
                    raise RuntimeError("no audio frames")
            except Exception as exc:  # noqa: BLE001 - libsndfile raises several types for unreadable files
                out.append(("audio", f"cannot read {path} as audio: {str(exc).strip()[:120]}"))
    return out


_MONEY = re.compile(r"^\$?\s*(\d+(?:,\d{3})*(?:\.\d+)?)\s*(?:\$|dollars?|usd)?$", re.I)


def normalise_slot_value(kind: str, v: object) -> object:
    """A gold slot value written by hand, in the form the engine reports it; ValueError if it does not parse."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"{v!r} is not a value")
    if kind in ("money", "money_bare"):
        if isinstance(v, (int, float)):
            return float(v)
        m = _MONEY.match(str(v).strip())
        if not m:
            raise ValueError(f"{v!r} is not an amount (write a number, e.g. 40 or 12.5)")
        return float(m.group(1).replace(",", ""))
    if kind == "day":
        s = str(v).strip().lower()
        if s not in DAYS:
            raise ValueError(f"{v!r} is not a day (one of {', '.join(DAYS)})")
        return s
    if kind == "digits":
        s = re.sub(r"[\s\-.]", "", str(v)) if isinstance(v, (str, int)) else ""
        if not s.isdigit():
            raise ValueError(f"{v!r} is not a digit string (e.g. \"40213\")")
        return s
    return v


def _normalise_labels(r: dict, intents: list[str], slot_types: dict[str, str]) -> tuple[dict, list[tuple[str, str]]]:
    out = []
    known = [i for i in intents if i != NULL]
    if r["intent"] is not None and r["intent"] not in known:
        out.append(("intent", f"{r['intent']!r} is not an intent of the model (null, or one of: {', '.join(known)})"))
    slots = {}
    for k, v in (r.get("slots") or {}).items():
        if slot_types and k not in slot_types:
            out.append((f"slots.{k}", f"not a slot the model reads (one of: {', '.join(slot_types)})"))
            continue
        try:
            slots[k] = normalise_slot_value(slot_types.get(k, ""), v)
        except ValueError as exc:
            out.append((f"slots.{k}", str(exc)))
    if r.get("slots") or "slots" in r:
        r = {**r, "slots": slots}
    return r, out


def load_wav(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="int16", always_2d=False)
    if x.ndim > 1:
        x = x[:, 0]
    if sr != 8000:
        from engine.features import resample

        x = np.clip(resample(x.astype(np.float32), sr, 8000), -32768, 32767).astype(np.int16)
    return x


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    r, h = normalize_text(ref).split(), normalize_text(hyp).split()
    d = np.arange(len(h) + 1)
    for i in range(1, len(r) + 1):
        prev, d = d, np.empty(len(h) + 1, int)
        d[0] = i
        for j in range(1, len(h) + 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r[i - 1] != h[j - 1]))
    return int(d[len(h)]), len(r)


def _slots_equal(ref: dict, hyp: dict) -> bool:
    if set(ref) != set(hyp):
        return False
    for k, v in ref.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                if abs(float(hyp[k]) - float(v)) > 1e-6:
                    return False
            except (TypeError, ValueError):
                return False
        elif str(hyp[k]) != str(v):
            return False
    return True


def evaluate(eval_dir: str | Path, model_dir: str | None = None, report_dir: str | Path | None = None,
             limit: int | None = None, progress: bool = True) -> dict:
    d = Path(eval_dir)
    if not (d / "manifest.jsonl").exists():
        raise FileNotFoundError(f"{d / 'manifest.jsonl'} not found (an eval dir holds WAVs + manifest.jsonl)")
    model = UnderstandingModel.load(model_dir, threads=1)
    # every problem at once, before any clip runs: malformed rows, missing or unreadable clips, gold labels
    # the model cannot produce; slot values normalised ("$40" -> 40.0)
    checked = read_eval_manifest(d, intents=model.intents, slot_types=model.slot_types)
    # truncated clips (callers cut off mid-sentence) are end-of-turn data: `bot engine eval-eot` scores them
    rows = [r for _, r in checked if not r.get("truncated")][:limit]
    preds, lat = [], []
    for r in tqdm(rows, desc="eval", unit="utt", disable=not progress):
        pcm = load_wav(d / r["audio"])
        t = time.perf_counter()
        u = model.understand(pcm)
        lat.append((time.perf_counter() - t) * 1000)
        preds.append(u)
    names = sorted({str(r["intent"]) for r in rows} | {str(p.intent) for p in preds})
    ref = [str(r["intent"]) for r in rows]
    hyp = [str(p.intent) for p in preds]
    correct = np.array([a == b for a, b in zip(ref, hyp)], float)
    conf = np.array([p.confidence for p in preds])
    # per clip: 1/0 where the clip has slots to read, NaN where it has none
    slot_ok = np.array([float(_slots_equal(r["slots"], p.slots)) if r.get("slots") else np.nan
                        for r, p in zip(rows, preds)])
    slot_n = int(np.sum(~np.isnan(slot_ok)))
    noslot = [p.slots for r, p in zip(rows, preds) if not r.get("slots")]
    errs = words = 0
    for r, p in zip(rows, preds):
        if r.get("text"):
            e, n = word_errors(r["text"], p.transcript)
            errs, words = errs + e, words + n
    per = {}
    for name in sorted(set(ref)):
        m = np.array([x == name for x in ref])
        per[name] = round(float(correct[m].mean()), 4)
    result = {
        "n": len(rows),
        "intent_accuracy": round(float(correct.mean()), 4) if rows else 0.0,
        "slot_accuracy": round(float(np.nanmean(slot_ok)), 4) if slot_n else None,
        "slot_n": slot_n,
        "slot_false_positive_rate": round(float(np.mean([bool(s) for s in noslot])), 4) if noslot else None,
        "wer": round(errs / words, 4) if words else None,
        "ece": round(ece(conf, correct), 4),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p95": round(float(np.percentile(lat, 95)), 2)} if lat else {},
        "per_intent": per,
        "errors": sum(1 for p in preds if p.error),
        # the figures depend on the int8 graph this CPU runs (engine/graphs.py): recorded with them
        "model": model.model_dir.name, "graph": model.graph.name,
    }
    if any("frustration" in r for r in rows):
        y = np.array([float(r.get("frustration", 0)) for r in rows])
        s = np.array([p.caller_state.get("frustration", 0.0) for p in preds])
        result["frustration_auc"] = round(_auc(y, s), 4) if 0 < y.sum() < len(y) else None
    groups = _groups(rows)
    if groups:
        result["breakdown"] = {g: {k: _slice(correct, slot_ok, parts[k]) for k in sorted(parts, key=_natural)}
                               for g, parts in groups.items()}
    if report_dir is not None:
        write_report(Path(report_dir), d, result, ref, hyp, names, conf, correct)
    return result


def _natural(key: str) -> list:
    """'babble 5 dB' before 'babble 10 dB': numbers in a group name sort as numbers."""
    return [float(t) if re.fullmatch(r"-?\d+(\.\d+)?", t) else t for t in re.split(r"(-?\d+(?:\.\d+)?)", key)]


def _slice(correct: np.ndarray, slot_ok: np.ndarray, idx: np.ndarray) -> dict:
    out: dict = {"n": int(len(idx)), "intent_accuracy": round(float(correct[idx].mean()), 4)}
    s = slot_ok[idx]
    s = s[~np.isnan(s)]
    if len(s):
        out["slot_n"], out["slot_accuracy"] = int(len(s)), round(float(s.mean()), 4)
    return out


def _groups(rows: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Optional slices of a synthesized set: by TTS engine, by phrasing kind (carrier x core
    compositions share content words with training; standalone sentences are lexically novel), and by the
    noise or codec a robustness set put the clip through."""
    from engine.training.templates import composed_set

    out: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        if "voice" in r:
            out.setdefault("voice_engine", {}).setdefault(str(r["voice"]).split(":")[0], []).append(i)
        for key in ("noise", "codec"):  # robustness sets: `bot engine add-noise` / `bot engine transcode`
            if r.get(key):
                out.setdefault(key, {}).setdefault(str(r[key]), []).append(i)
        if "template" in r:
            kind = "slot_only" if r["intent"] is None else (
                "composed" if r["template"] in composed_set(str(r["intent"])) else "standalone")
            out.setdefault("phrasing", {}).setdefault(kind, []).append(i)
    return {g: {k: np.array(v) for k, v in parts.items()} for g, parts in out.items()}


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y > 0.5], s[y <= 0.5]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def write_report(out: Path, eval_dir: Path, res: dict, ref: list[str], hyp: list[str], names: list[str],
                 conf: np.ndarray, correct: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = eval_dir.name
    rel = reliability(conf, correct)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    # one bar per non-empty bin, drawn over its bin (bars at the bins' mean confidence overlapped), the mean
    # confidence marked in it, the clip count above it
    edges = np.linspace(0, 1, len(rel) + 1)
    full = [(lo, c, a, n) for lo, (c, a, n) in zip(edges[:-1], rel) if n]
    ax.bar([lo for lo, *_ in full], [a for _, _, a, _ in full], width=1 / len(rel), align="edge", alpha=0.7,
           edgecolor="white")
    ax.plot([c for _, c, *_ in full], [a for _, _, a, _ in full], "k.", ms=4)
    for lo, _, a, n in full:
        ax.text(lo + 0.5 / len(rel), min(a, 0.97) + 0.01, str(n), ha="center", va="bottom", fontsize=6)
    ax.set_xlabel("confidence"); ax.set_ylabel("accuracy"); ax.set_title(f"reliability ({stem}), ECE={res['ece']:.3f}")
    fig.tight_layout(); fig.savefig(out / f"reliability_{stem}.png", dpi=90); plt.close(fig)
    cm = Counter(zip(ref, hyp))
    short = [n[:10] for n in names]
    lines = [f"# Evaluation: {stem}", "", "```json", json.dumps(res, indent=1), "```", "",
             f"![reliability](reliability_{stem}.png)", "", "## Confusion matrix (rows: reference, columns: predicted)", "",
             "| ref \\ hyp | " + " | ".join(short) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(str(cm.get((a, b), "")) for b in names) + " |")
    (out / f"REPORT_{stem}.md").write_text("\n".join(lines) + "\n")
