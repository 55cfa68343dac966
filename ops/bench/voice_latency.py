"""Benchmark: the bot's voice as a caller meets it, first audio of dynamic sentences (nothing cached).

    nice -n 10 .venv/bin/python -m ops.bench.voice_latency [--n 24] [--callers 8] [--json] [--out FILE]

Through the real `Engine.speak_stream` (the path every dynamic prompt takes), one sentence at a time, a second
apart (a caller's next sentence comes after this one played and they answered: seconds):
- first audio p50/p95 per kind of sentence (the payment read-back, long sentences, digit read-backs,
  dates and times), and first *sound* (plus the silence the first chunk starts with);
- the whole-sentence time, and the worst gap between chunks: how long the caller would wait
  mid-sentence because a chunk finished rendering after the one before it finished playing (0 when
  streaming keeps up);
- the payment read-back once its words were heard before (the clause cache: only the amount renders);
- `--callers` calls starting a sentence at the same moment (first audio p50/p95 of all of them: the
  speak worker is shared);
- a pre-rendered prompt's duration and leading silence, and the calm style vs neutral.
Target: first audio <= 150 ms p95 on one idle core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS: dict[str, list[str]] = {
    "read_back": [f"That's a payment of {d} dollars, is that right?" for d in (17, 42, 100, 250)],
    "read_back_cents": [f"That's a payment of {d}.{c:02d} dollars, is that right?" for d, c in ((42, 50), (7, 5))],
    "long": ["Your payment of 42 dollars and 50 cents is scheduled for Monday, and you will get a confirmation "
             "by text message.",
             "I can help you pay your bill or report an outage or book a technician visit for any day of the week "
             "that works for you and we will send you a text message with the details when it is booked."],
    "digits": ["Your account number is 12345678, is that right?", "Please call us back at (800) 555-0199."],
    "date_time": ["Your payment is due on 12/05/2026.", "We open tomorrow at 8:30 a.m. Eastern time."],
}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50": round(_pct(xs, 50) * 1000, 1), "p95": round(_pct(xs, 95) * 1000, 1), "n": len(xs)}


def _lead_s(pcm: np.ndarray) -> float:
    """Silence before the first sound (|x| > 300, about -40 dBFS): dead air the caller hears."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    return float(loud[0]) / 8000 if len(loud) else len(pcm) / 8000


async def _one(engine: Any, text: str) -> tuple[float, float, float, float]:
    """(first audio s, whole sentence s, worst underrun s, first sound s): playback starts at first audio, in
    real time; first sound adds the silence the first chunk starts with."""
    t0 = time.perf_counter()
    first = None
    sound = 0.0
    play_end = 0.0  # when the audio received so far will have finished playing
    underrun = 0.0
    async for chunk in engine.speak_stream(text):
        now = time.perf_counter() - t0
        if first is None:
            first, play_end = now, now
            sound = now + _lead_s(chunk)
        underrun = max(underrun, now - play_end)
        play_end = max(play_end, now) + len(chunk) / 8000
    return float(first or 0.0), time.perf_counter() - t0, underrun, sound


async def run(n: int, callers: int, voice_kind: str) -> dict[str, Any]:
    from engine.runtime import Engine
    from engine.types import SpeechStyle
    from engine.voice import Voice, load_renderer

    t_load = time.perf_counter()
    renderer = load_renderer(voice_kind, int(os.environ.get("BOT_VOICE_THREADS", "1")),
                             int(os.environ.get("BOT_VOICE_BURST_THREADS", "2")))
    burst = getattr(renderer, "burst_threads", 0)
    load_s = time.perf_counter() - t_load
    voice = Voice(renderer, cache_size=4, cache_dir=None)  # tiny cache: every sentence is rendered
    engine = Engine(None, voice)
    out: dict[str, Any] = {"voice": renderer.name, "load_s": round(load_s, 2), "loadavg": os.getloadavg()[0],
                           "threads": int(os.environ.get("BOT_VOICE_THREADS", "1")), "burst_threads": burst}
    try:
        await engine.speak("Warm up, please.")
        per_kind: dict[str, dict[str, list[float]]] = {}
        rounds = max(1, n // sum(len(v) for v in KINDS.values()))
        for r in range(rounds):
            for kind, texts in KINDS.items():
                for text in texts:
                    text = text.replace("?", "?" if r % 2 == 0 else " today?")  # never a cached repeat
                    engine.clear_clause_cache()  # a sentence whose clauses no caller has heard yet
                    await asyncio.sleep(1.0)  # one caller's sentences are seconds apart (it plays, they answer)
                    first, total, gap, sound = await _one(engine, text)
                    k = per_kind.setdefault(kind, {"first": [], "total": [], "gap": [], "sound": []})
                    k["first"].append(first)
                    k["sound"].append(sound)
                    k["total"].append(total)
                    k["gap"].append(gap)
        all_first = [x for k in per_kind.values() for x in k["first"]]
        out["first_audio_ms"] = _ms(all_first)
        out["first_sound_ms"] = _ms([x for k in per_kind.values() for x in k["sound"]])
        out["by_kind"] = {kind: {"first_audio_ms": _ms(v["first"]), "sentence_ms": _ms(v["total"]),
                                 "worst_gap_ms": round(max(v["gap"]) * 1000, 1)} for kind, v in per_kind.items()}
        # the read-back as callers meet it all day: its words heard before, only the amount is new
        engine.clear_clause_cache()
        await _one(engine, "That's a payment of 9 dollars, is that right?")
        warm = [(await _one(engine, f"That's a payment of {d} dollars, is that right?"))[0] for d in range(11, 35)]
        out["read_back_heard_before_first_audio_ms"] = _ms(warm)
        engine.clear_clause_cache()
        together = await asyncio.gather(*[_one(engine, f"That's a payment of {300 + i} dollars, is that right?")
                                          for i in range(callers)])
        out["concurrent"] = {"callers": callers, "first_audio_ms": _ms([r[0] for r in together]),
                             "worst_gap_ms": round(max(r[2] for r in together) * 1000, 1)}
        greeting = "Thanks for calling. How can I help you today?"
        neutral = await engine.speak(greeting)
        calm = await engine.speak(greeting, SpeechStyle.named("calm"))
        lead = int(np.flatnonzero(np.abs(neutral.astype(np.int32)) > 300)[0]) / 8.0
        out["prompt"] = {"seconds": round(len(neutral) / 8000, 2), "lead_ms": lead,
                         "calm_vs_neutral_duration": round(len(calm) / len(neutral), 3),
                         "peak": int(np.abs(neutral.astype(np.int32)).max())}
    finally:
        await engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="sentences in the one-at-a-time part (rounded to whole rounds)")
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--voice", default="piper", choices=["piper", "espeak"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = asyncio.run(run(args.n, args.callers, args.voice))
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
        return
    print(f"voice {res['voice']} (loaded in {res['load_s']} s, load avg {res['loadavg']:.2f})")
    fa = res["first_audio_ms"]
    print(f"first audio, all dynamic sentences: p50 {fa['p50']} / p95 {fa['p95']} ms"
          f" (first sound, after the chunk's leading silence: p50 {res['first_sound_ms']['p50']} / p95 "
          f"{res['first_sound_ms']['p95']} ms)")
    for kind, v in res["by_kind"].items():
        print(f"  {kind:16s} first {v['first_audio_ms']['p50']:7.1f} / {v['first_audio_ms']['p95']:7.1f} ms   "
              f"sentence {v['sentence_ms']['p50']:7.1f} ms   worst mid-sentence gap {v['worst_gap_ms']} ms")
    w = res["read_back_heard_before_first_audio_ms"]
    print(f"read-back whose words were heard before (only the amount new): first audio p50 {w['p50']} / p95 "
          f"{w['p95']} ms")
    c = res["concurrent"]
    print(f"{c['callers']} callers at once: first audio p50 {c['first_audio_ms']['p50']} / p95 "
          f"{c['first_audio_ms']['p95']} ms, worst gap {c['worst_gap_ms']} ms")
    print(f"prompt: {res['prompt']}")


if __name__ == "__main__":
    main()
