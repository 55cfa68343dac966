"""Micro-benchmark: CPU per call-second of the Twilio media path, ours vs pipecat's serializer.

    python -m ops.bench.twilio_media_cpu [--seconds 200]

Per call-second a Twilio call carries 50 inbound and (while the bot talks) 50 outbound 20 ms
frames. "ours" = protocol.parse + TwilioCallBridge.feed_media (mu-law table, 20 ms frames into the
call's queue) + draining the queue + the batched-VAD window accumulator, and outbound mu-law
encode + message build. "pipecat" = TwilioFrameSerializer.deserialize/serialize at 8 kHz (no
resampling: its best case) and at 16 kHz (a stock pipeline's rate). Prints p50/p95 per frame over
repeated runs and ms CPU per call-second. Excludes the WebSocket library (same for both).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

import numpy as np


def media_msgs(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [json.dumps({"event": "media", "streamSid": "MZ1", "media": {"track": "inbound", "chunk": str(i),
                        "timestamp": str(i * 20), "payload": base64.b64encode(rng.bytes(160)).decode()}})
            for i in range(n)]


async def ours(msgs: list[str], pcm_out: np.ndarray) -> tuple[float, float]:
    from bot.turns_vad import BatchedVad
    from telephony import g711
    from telephony.bridge import FRAME_SAMPLES
    from telephony.twilio import protocol
    from telephony.twilio.bridge import TwilioCallBridge

    async def send(_t: str) -> None:
        return None

    async def close(_c: int) -> None:
        return None

    start = protocol.StartInfo("MZ1", "CA1", "AC1")
    bridge = TwilioCallBridge(start, send, close, None)
    vad = BatchedVad()
    stream = vad.open(lambda p, db, t: None)
    q = bridge._inbox
    t0 = time.process_time()
    for i, m in enumerate(msgs):
        msg = protocol.parse(m)
        bridge.feed_media(msg.payload, 0.0)
        ev = q.get_nowait()
        stream.push(ev.pcm, i * 0.02)
        stream.pending.clear()  # the model's cost is measured separately (batched VAD)
    t_in = time.process_time() - t0
    t0 = time.process_time()
    data = g711.ulaw_encode(pcm_out)
    for i in range(0, len(data), FRAME_SAMPLES):
        protocol.media_msg("MZ1", data[i : i + FRAME_SAMPLES])
    t_out = time.process_time() - t0
    return t_in, t_out


async def pipecat(msgs: list[str], pcm_out: np.ndarray, rate: int) -> tuple[float, float]:
    from pipecat.frames.frames import OutputAudioRawFrame
    from pipecat.serializers.twilio import TwilioFrameSerializer

    ser = TwilioFrameSerializer("MZ1", params=TwilioFrameSerializer.InputParams(sample_rate=rate, auto_hang_up=False))
    ser._sample_rate = rate  # what setup() sets from the pipeline's StartFrame
    t0 = time.process_time()
    for m in msgs:
        await ser.deserialize(m)
    t_in = time.process_time() - t0
    frames = [OutputAudioRawFrame(audio=pcm_out[i : i + 160 * rate // 8000].tobytes(), sample_rate=rate, num_channels=1)
              for i in range(0, len(pcm_out) - 160 * rate // 8000 + 1, 160 * rate // 8000)]
    t0 = time.process_time()
    for f in frames:
        await ser.serialize(f)
    t_out = time.process_time() - t0
    return t_in, t_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=200, help="call-seconds per run")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    n = args.seconds * 50
    msgs = media_msgs(n)
    out8 = (np.sin(np.arange(n * 160) / 9) * 8000).astype(np.int16)
    out16 = (np.sin(np.arange(n * 320) / 18) * 8000).astype(np.int16)
    rows = {"ours (8 kHz)": [], "pipecat serializer @8k": [], "pipecat serializer @16k": []}
    for _ in range(args.runs):
        rows["ours (8 kHz)"].append(asyncio.run(ours(msgs, out8)))
        rows["pipecat serializer @8k"].append(asyncio.run(pipecat(msgs, out8, 8000)))
        rows["pipecat serializer @16k"].append(asyncio.run(pipecat(msgs, out16, 16000)))
    print(f"{'path':26} {'in us/frame p50/p95':>22} {'out us/frame p50/p95':>22} {'ms CPU per call-second':>24}")
    for name, vals in rows.items():
        ins = np.array([v[0] for v in vals]) / n * 1e6
        outs = np.array([v[1] for v in vals]) / n * 1e6
        per_cs = (np.median(ins) + np.median(outs)) * 50 / 1000
        print(f"{name:26} {np.percentile(ins, 50):10.1f}/{np.percentile(ins, 95):<10.1f} "
              f"{np.percentile(outs, 50):10.1f}/{np.percentile(outs, 95):<10.1f} {per_cs:24.2f}")


if __name__ == "__main__":
    main()
