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
from engine.textnorm import normalize_text
from engine.understanding import UnderstandingModel


def read_eval_dir(d: str | Path) -> list[dict]:
    d = Path(d)
    mf = d / "manifest.jsonl"
    if not mf.exists():
        raise FileNotFoundError(f"{mf} not found (an eval dir holds WAVs + manifest.jsonl)")
    rows = []
    for n, line in enumerate(mf.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{mf}:{n}: not JSON ({exc})") from None
        if "audio" not in r or "intent" not in r:
            raise ValueError(f"{mf}:{n}: needs 'audio' and 'intent' keys")
        rows.append(r)
    return rows


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
    # truncated clips (callers cut off mid-sentence) are end-of-turn data: `bot engine eval-eot` scores them
    rows = [r for r in read_eval_dir(d) if not r.get("truncated")][:limit]
    model = UnderstandingModel.load(model_dir, threads=1)
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
    ax.bar([c for c, _, n in rel], [a for _, a, n in rel], width=0.08, alpha=0.7)
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
