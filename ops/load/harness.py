"""Load harness: N concurrent simulated callers over Twilio Media Streams and SIP against a running
`bot serve`, ramped up, each placing calls back to back with real caller WAVs and human-like pauses.

Measures at the caller: voice-to-voice latency per turn (end of caller speech -> first bot audio),
greeting latency, calls that failed or got no answer; from the server's /metrics: late outbound
frames; from /proc (or psutil): CPU and RSS of every worker. Writes turns.csv, samples.csv,
summary.json and load.png (matplotlib Agg) into the output directory.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ops import metrics
from ops.load.procstat import CpuMeter
from ops.logs import get_logger

log = get_logger("ops.load")

DEFAULT_PHRASES = ("I want to pay my bill", "what is my balance", "I'd like to pay forty dollars",
                   "yes please", "can you tell me my account balance", "I need to talk to someone about my bill")


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8080"  # bot HTTP base (Twilio webhook + stream + /metrics)
    sip: str = ""  # "host:port" of the SIP server; empty: Twilio only
    calls: int = 4  # concurrent callers at full load
    ramp_s: float = 10.0  # time to bring all callers up, linearly
    duration_s: float = 60.0  # how long callers keep placing calls after the ramp starts
    sip_fraction: float = 0.0  # share of callers that dial SIP (needs `sip`)
    turns: int = 2  # caller turns per call
    think_s: tuple[float, float] = (0.4, 1.5)  # pause after the bot answered, before speaking again
    wavs: list[str] = field(default_factory=list)  # caller turns; empty: synthesized with espeak-ng
    auth_token: str = ""  # TWILIO_AUTH_TOKEN of the bot when signatures are checked
    out_dir: str = "var/load"
    reply_timeout_s: float = 12.0
    seed: int = 7
    budget_ms: float = 800.0  # p95 voice-to-voice budget for `held`
    budget_basis: str = "caller"  # "caller": v2v at the caller; "processing": v2v minus end-of-turn wait
    redis_url: str = ""  # the bot's Redis: adds the server-side breakdown (end-of-turn wait, engine time)


@dataclass
class TurnRow:
    t: float  # seconds since the run started
    caller: int
    transport: str
    call_id: str
    turn: int
    v2v_ms: float | None
    error: str = ""


@dataclass
class CallRow:
    t: float
    caller: int
    transport: str
    call_id: str
    ok: bool
    greeting_ms: float | None
    turns_answered: int
    turns: int
    error: str = ""
    rx_lost: int = 0


def synth_wavs(out: Path, phrases: tuple[str, ...] = DEFAULT_PHRASES) -> list[str]:
    """Caller turns as 8 kHz WAVs (espeak-ng, cached): real speech for the bot's VAD and engine."""
    out.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("no caller WAVs given and espeak-ng is not installed (pass --wav FILE ...)")
    paths = []
    for i, text in enumerate(phrases):
        p = out / f"turn{i}.wav"
        if not p.exists():
            with tempfile.TemporaryDirectory() as d:
                raw = Path(d) / "r.wav"
                subprocess.run([exe, "-v", "en-us", "-s", "165", "-w", str(raw), text], check=True, capture_output=True)
                from bot.simulator import load_wav_8k
                import soundfile as sf

                pcm = load_wav_8k(raw)
                pcm = np.concatenate([pcm, np.zeros(8000 * 3 // 4, np.int16)])  # trailing silence ends the turn
                sf.write(str(p), pcm, 8000, subtype="PCM_16")
        paths.append(str(p))
    return paths


def _timed_twilio_caller(url: str, token: str) -> Any:
    """bot.simulator.TwilioCaller that also notes when each voiced bot frame plays at the caller."""
    from bot.simulator import TwilioCaller

    class Timed(TwilioCaller):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.voiced_play: list[float] = []

        def _play_one(self) -> None:
            n = len(self.play.played)
            super()._play_one()
            if len(self.play.played) > n:
                pcm = self.play.played[-1].astype(np.float64)
                if float(np.sqrt(np.mean(pcm * pcm))) > 300.0:
                    self.voiced_play.append(time.monotonic())

    return Timed(url, token)


def call_error(exc: BaseException) -> str:
    """What a failed call says in the report: why the bot did not take it, not just an exception class."""
    if isinstance(exc, httpx.ConnectError):
        return "ConnectError (nothing answers at the bot URL)"
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        hint = " (bad signature: pass the bot's TWILIO_AUTH_TOKEN with --token)" if code == 403 else ""
        return f"http_{code}{hint}"
    text = str(exc)
    if "<Reject" in text:
        return "refused (the bot answered <Reject>: draining or not ready)"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:  # websockets' InvalidStatus: the stream upgrade was refused
        return f"stream_refused_{status}"
    return type(exc).__name__


def trailing_silence_s(pcm: np.ndarray, level: int = 300) -> float:
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
    return (len(pcm) - (loud[-1] + 1)) / 8000 if len(loud) else 0.0


def percentile(xs: list[float], q: float) -> float | None:
    return None if not xs else round(float(np.percentile(np.asarray(xs, dtype=float), q)), 1)


def scrape_counter(text: str, name: str, has: str = "", lacks: str = "") -> float:
    """Sum of a metric's samples, optionally only those whose labels contain `has` / lack `lacks`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, val = line.rpartition(" ")
            if (has and has not in head) or (lacks and lacks in head):
                continue
            if head.split("{")[0] == name:
                try:
                    total += float(val)
                except ValueError:
                    pass
    return total


class LoadRun:
    def __init__(self, cfg: LoadConfig, pids: list[int] | None = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.turns: list[TurnRow] = []
        self.calls: list[CallRow] = []
        self.samples: list[dict[str, Any]] = []
        self.active = 0
        self.peak_active = 0
        self.pids = pids or []
        self._t0 = 0.0
        self._stop = asyncio.Event()
        self.pcms: list[tuple[str, np.ndarray]] = []
        self.server_turns: list[dict[str, Any]] = []

    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    async def _twilio_call(self, idx: int) -> None:
        cfg = self.cfg
        caller = _timed_twilio_caller(cfg.url, cfg.auth_token)
        row = CallRow(self._now(), idx, "twilio", caller.call_sid, False, None, 0, cfg.turns)
        counted = False
        try:
            await caller.connect()
            counted = True
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            await caller.wait_bot_quiet(quiet_s=0.6, timeout_s=cfg.reply_timeout_s)
            row.greeting_ms = None if caller.result.greeting_ms is None else round(caller.result.greeting_ms, 1)
            for n in range(cfg.turns):
                if caller.ended:
                    break
                name, pcm = self.pcms[self.rng.randrange(len(self.pcms))]
                t_say = time.monotonic()
                res = await caller.say(pcm, name, wait_reply_s=cfg.reply_timeout_s)
                # same measure as SIP: first voiced bot frame played after the end of the caller's speech
                done = [caller._t0 + t for t, what in caller.result.events if what == f"turn{n + 1}_end"]
                speech_end = (done[-1] if done else t_say + len(pcm) / 8000) - trailing_silence_s(pcm)
                first = next((x for x in caller.voiced_play if x >= speech_end), None)
                v2v = None if first is None or res.v2v_ms is None else round((first - speech_end) * 1000, 1)
                self.turns.append(TurnRow(self._now(), idx, "twilio", caller.call_sid, n + 1, v2v,
                                          "" if v2v is not None else "no_reply"))
                row.turns_answered += v2v is not None
                await asyncio.sleep(self.rng.uniform(*cfg.think_s))
            # a call the bot ended itself (transfer, goodbye) is fine: every turn spoken got an answer
            spoken = sum(1 for r in self.turns if r.call_id == caller.call_sid)
            row.ok = row.greeting_ms is not None and row.turns_answered == spoken and spoken > 0
            if not row.ok:
                row.error = "no_greeting" if row.greeting_ms is None else "no_reply"
            await caller.hangup()
            await self._server_breakdown(caller.call_sid)
        except Exception as exc:  # noqa: BLE001 - one failed call is a result, not a crash
            row.error = call_error(exc)
            metrics.ERRORS.labels("load", "call_failed").inc()
            log.warning("load_call_failed", transport="twilio", call_id=caller.call_sid, error=repr(exc))
            await caller.close()
        finally:
            # connect() can fail after the socket opened (the bot closed it at once): never counted, never uncounted
            if counted:
                self.active -= 1
        self.calls.append(row)

    async def _sip_call(self, idx: int) -> None:
        """One SIP call with voice-to-voice timed from the end of the caller's speech (not of the
        WAV's trailing silence), like the Twilio caller does."""
        from telephony.sip.uac import SipCaller

        cfg = self.cfg
        host, _, port = cfg.sip.rpartition(":")
        caller = SipCaller(host or "127.0.0.1", int(port or 5060))
        row = CallRow(self._now(), idx, "sip", caller.call_id, False, None, 0, cfg.turns)
        counted = False
        try:
            await caller.open()
            status = await caller.invite(timeout=cfg.reply_timeout_s)
            if status != 200:
                row.error = f"status_{status}"
                return
            counted = True
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            t_answer = time.monotonic()
            await caller.wait_bot_quiet(0.6, cfg.reply_timeout_s)
            rx = caller.stats.voiced_rx
            row.greeting_ms = round((rx[0] - t_answer) * 1000, 1) if rx else None
            spoken = 0
            for n in range(cfg.turns):
                if caller.ended.is_set():
                    break
                name, pcm = self.pcms[self.rng.randrange(len(self.pcms))]
                _, end = await caller.play(pcm, f"turn{n}")
                speech_end = end - trailing_silence_s(pcm)
                await caller.wait_bot_quiet(0.6, cfg.reply_timeout_s)
                first = next((x for x in caller.stats.voiced_rx if x >= speech_end), None)
                v2v = None if first is None else round((first - speech_end) * 1000, 1)
                spoken += 1
                row.turns_answered += v2v is not None
                self.turns.append(TurnRow(self._now(), idx, "sip", caller.call_id, n + 1, v2v,
                                          "" if v2v is not None else "no_reply"))
                await asyncio.sleep(self.rng.uniform(*cfg.think_s))
            row.ok = row.greeting_ms is not None and spoken > 0 and row.turns_answered == spoken
            if not row.ok:
                row.error = "no_greeting" if row.greeting_ms is None else "no_reply"
            if not caller.ended.is_set():
                await caller.bye()
        except Exception as exc:  # noqa: BLE001
            row.error = call_error(exc)
            metrics.ERRORS.labels("load", "call_failed").inc()
            log.warning("load_call_failed", transport="sip", call_id=caller.call_id, error=repr(exc))
        finally:
            caller.close()
            row.rx_lost = caller.stats.rx_seq_gaps
            if counted:
                self.active -= 1
            self.calls.append(row)
        await self._server_breakdown(caller.call_id)

    async def _server_breakdown(self, call_id: str) -> None:
        """Per turn, from the bot's own event stream: end-of-turn wait and turn-end -> first audio."""
        if not self.cfg.redis_url:
            return
        from bot.simulator import fetch_call, turn_decisions

        try:
            rec = await fetch_call(self.cfg.url, call_id, self.cfg.redis_url)
        except Exception as exc:  # noqa: BLE001 - the breakdown is optional
            log.warning("load_breakdown_failed", error=repr(exc))
            return
        for d in turn_decisions(rec):
            self.server_turns.append({"call_id": call_id, "n": d.get("n"), "eot_wait_ms": d.get("eot_wait_ms"),
                                      "understand_ms": d.get("understand_ms"),
                                      "server_latency_ms": d.get("server_latency_ms")})

    def processing_ms(self) -> list[float]:
        """Voice-to-voice minus the silence the bot deliberately waited to be sure the caller had
        finished: the part of the latency that grows with load."""
        eot = {(s["call_id"], s["n"]): s["eot_wait_ms"] for s in self.server_turns if s.get("eot_wait_ms") is not None}
        return [r.v2v_ms - float(eot[(r.call_id, r.turn)]) for r in self.turns
                if r.v2v_ms is not None and (r.call_id, r.turn) in eot]

    async def _caller(self, idx: int, start_at: float, sip: bool) -> None:
        await asyncio.sleep(start_at)
        end = self._t0 + self.cfg.duration_s
        while not self._stop.is_set() and time.monotonic() < end:
            await (self._sip_call(idx) if sip else self._twilio_call(idx))
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # next call on this line

    async def _sampler(self) -> None:
        meter = CpuMeter(self.pids)
        meter.poll()
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            per = meter.poll()
            recent = [r.v2v_ms for r in self.turns if r.v2v_ms is not None and r.t >= self._now() - 10]
            self.samples.append({"t": self._now(), "active_calls": self.active,
                                 "p95_10s_ms": percentile(recent, 95),
                                 **{f"cpu_{pid}": c for pid, (c, _) in per.items()},
                                 **{f"rss_mb_{pid}": round(r / 2**20, 1) for pid, (_, r) in per.items()}})

    async def _metrics_text(self) -> str:
        try:
            async with httpx.AsyncClient(timeout=5) as c:
                return (await c.get(f"{self.cfg.url}/metrics")).text
        except httpx.HTTPError:
            return ""

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        wavs = cfg.wavs or await loop.run_in_executor(None, synth_wavs, Path(cfg.out_dir) / "wavs")
        from bot.simulator import load_wav_8k

        self.pcms = [(Path(w).name, load_wav_8k(w)) for w in wavs]
        before = await self._metrics_text()
        self._t0 = time.monotonic()
        n_sip = round(cfg.calls * cfg.sip_fraction) if cfg.sip else 0
        sampler = loop.create_task(self._sampler())
        callers = [loop.create_task(self._caller(i, cfg.ramp_s * i / max(cfg.calls, 1), i < n_sip))
                   for i in range(cfg.calls)]
        await asyncio.gather(*callers)
        self._stop.set()
        await sampler
        after = await self._metrics_text()
        return self.summary(before, after)

    def summary(self, before: str, after: str) -> dict[str, Any]:
        cfg = self.cfg
        v2v = [r.v2v_ms for r in self.turns if r.v2v_ms is not None]
        # server counters as deltas over the run; None when /metrics could not be read at both ends (bot down)
        def delta(name: str, has: str = "", lacks: str = "") -> int | None:
            if not before or not after:
                return None
            return max(0, int(scrape_counter(after, name, has, lacks) - scrape_counter(before, name, has, lacks)))

        late = delta("voicebot_late_frames_total")
        sent = delta("voicebot_audio_frames_total", 'direction="out"')  # late frames are outbound ones
        rtp_bad = delta("voicebot_rtp_packets_total", 'direction="in"', 'result="ok"')
        workers: dict[str, dict[str, float]] = {}
        for pid in self.pids:
            cpu = [s[f"cpu_{pid}"] for s in self.samples if f"cpu_{pid}" in s]
            rss = [s[f"rss_mb_{pid}"] for s in self.samples if f"rss_mb_{pid}" in s]
            if cpu:
                workers[str(pid)] = {"cpu_mean": round(float(np.mean(cpu)), 3), "cpu_max": round(max(cpu), 3),
                                     "rss_mb_max": max(rss)}
        failed = [c for c in self.calls if not c.ok]
        proc = self.processing_ms()
        p95 = percentile(proc if cfg.budget_basis == "processing" else v2v, 95)
        out = {
            "calls_target": cfg.calls, "peak_concurrent": self.peak_active, "calls_placed": len(self.calls),
            "calls_failed": len(failed), "turns": len(self.turns), "turns_no_reply": sum(r.v2v_ms is None for r in self.turns),
            "v2v_ms": {"p50": percentile(v2v, 50), "p95": percentile(v2v, 95), "p99": percentile(v2v, 99)},
            "processing_ms": {"p50": percentile(proc, 50), "p95": percentile(proc, 95), "p99": percentile(proc, 99)},
            "budget_basis": cfg.budget_basis,
            "greeting_ms_p95": percentile([c.greeting_ms for c in self.calls if c.greeting_ms is not None], 95),
            "late_frames": late, "frames": sent, "rtp_lost_at_caller": sum(c.rx_lost for c in self.calls),
            "rtp_bad_at_bot": rtp_bad, "server_metrics": bool(before and after),
            "errors": sorted({c.error for c in failed if c.error}), "workers": workers,
            "server_ms": {k: {"p50": percentile(xs, 50), "p95": percentile(xs, 95)}
                          for k in ("eot_wait_ms", "understand_ms", "server_latency_ms")
                          if (xs := [float(s[k]) for s in self.server_turns if s.get(k) is not None])},
            "held": p95 is not None and p95 <= cfg.budget_ms and len(failed) <= 0.01 * len(self.calls),
        }
        return out

    def write(self, summary: dict[str, Any]) -> dict[str, str]:
        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"turns": str(out / "turns.csv"), "calls": str(out / "calls.csv"), "samples": str(out / "samples.csv"),
                 "summary": str(out / "summary.json"), "plot": str(out / "load.png")}
        for key, rows in (("turns", [asdict(r) for r in self.turns]), ("calls", [asdict(c) for c in self.calls]),
                          ("samples", self.samples)):
            cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "t", k)) if rows else ["t"]
            with open(paths[key], "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        Path(paths["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
        plot(self.samples, self.turns, paths["plot"], self.cfg.budget_ms)
        return paths


def plot(samples: list[dict[str, Any]], turns: list[TurnRow], path: str, budget_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t = [s["t"] for s in samples]
    a1.plot(t, [s["active_calls"] for s in samples], label="calls in progress")
    a1.set_ylabel("calls")
    a1.legend(loc="upper left")
    pts = [(r.t, r.v2v_ms) for r in turns if r.v2v_ms is not None]
    if pts:
        a2.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, label="turn v2v")
    a2.plot(t, [s["p95_10s_ms"] for s in samples], color="C3", label="p95 (10 s)")
    a2.axhline(budget_ms, color="k", ls="--", lw=0.8, label=f"budget {budget_ms:.0f} ms")
    a2.set_ylabel("voice-to-voice ms")
    a2.legend(loc="upper left")
    for key in sorted({k for s in samples for k in s if k.startswith("cpu_")}):
        a3.plot(t, [s.get(key) for s in samples], label=f"worker {key[4:]} CPU (cores)")
    a3.set_ylabel("CPU cores")
    a3.set_xlabel("seconds")
    if any(k.startswith("cpu_") for s in samples for k in s):
        a3.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(s: dict[str, Any]) -> str:
    v = s["v2v_ms"]
    lines = [f"calls held: {s['peak_concurrent']} concurrent (target {s['calls_target']}), {s['calls_placed']} placed, "
             f"{s['calls_failed']} failed -> {'HELD' if s['held'] else 'NOT HELD'}",
             f"voice-to-voice ms: p50 {v['p50']}  p95 {v['p95']}  p99 {v['p99']}  (turns {s['turns']}, "
             f"no reply {s['turns_no_reply']})",
             f"processing ms (v2v - end-of-turn wait): p50 {s['processing_ms']['p50']}  p95 {s['processing_ms']['p95']}  "
             f"p99 {s['processing_ms']['p99']}   [held judged on {s['budget_basis']}]",
             f"greeting p95 ms: {s['greeting_ms_p95']}   late frames: {s['late_frames']} of {s['frames']} sent   "
             f"RTP lost at caller: {s['rtp_lost_at_caller']}   RTP late/lost/invalid at bot: {s.get('rtp_bad_at_bot', 0)}"
             + ("" if s.get("server_metrics", True) else "   (bot /metrics unreadable: server figures unknown)"),
             f"errors: {', '.join(s['errors']) or 'none'}"]
    for k, v2 in s.get("server_ms", {}).items():
        lines.append(f"server {k}: p50 {v2['p50']}  p95 {v2['p95']}")
    for pid, w in s["workers"].items():
        lines.append(f"worker {pid}: CPU mean {w['cpu_mean']} / max {w['cpu_max']} cores, RSS max {w['rss_mb_max']} MB")
    return "\n".join(lines)


