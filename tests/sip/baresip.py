"""A real baresip process as a SIP peer for tests: headless (aufile source, aubridge sink, sndfile dump),
driven through its stdio menu interface (`/dial`, `/hangup`, `/hold`, `/resume`, `/sndcode`).

transport="tls": baresip's SIP account speaks TLS (`;transport=tls`); `certificate` (cert + key in one PEM) is what
its own TLS listener presents (sip_listen's port + 1, where a server re-connects to send it requests) and `cafile`
the CA it loads. baresip 1.0 accepts any server certificate (libre's verify handler trusts the peer)."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

BARESIP = shutil.which("baresip")
MODULES = Path("/usr/lib/baresip/modules")


class Baresip:
    def __init__(self, workdir: Path, wav: Path, sip_port: int = 0, transport: str = "udp",
                 auto_answer: bool = False, user: str = "caller", password: str = "",
                 certificate: Path | None = None, cafile: Path | None = None, mediaenc: str = "") -> None:
        self.dir = workdir
        self.rec = workdir / "rec"
        self.rec.mkdir(parents=True, exist_ok=True)
        self.wav = wav
        self.sip_port = sip_port
        self.transport = transport
        self.auto_answer = auto_answer
        self.user, self.password = user, password
        self.certificate, self.cafile = certificate, cafile
        self.mediaenc = mediaenc  # "srtp" (offer SRTP, take RTP) | "srtp-mand" (SRTP only): SDES, RFC 4568
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Event()

    def _write_config(self) -> None:
        (self.dir / "config").write_text(f"""module_path {MODULES}
poll_method epoll
sip_listen 127.0.0.1:{self.sip_port}
call_local_timeout 120
audio_buffer 20
audio_player aubridge,nil
audio_source aufile,{self.wav}
audio_alert aubridge,nil
ausrc_srate 8000
auplay_srate 8000
ausrc_channels 1
auplay_channels 1
rtp_ports 41000-42000
jitter_buffer_delay 1-5
module stdio.so
module g711.so
module aufile.so
module aubridge.so
module sndfile.so
{"module srtp.so" if self.mediaenc else ""}
module_tmp account.so
module_app menu.so
snd_path {self.rec}
""" + (f"sip_certificate {self.certificate}\n" if self.certificate else "")
            + (f"sip_cafile {self.cafile}\n" if self.cafile else ""))
        extra = ";answermode=auto" if self.auto_answer else ""
        if self.password:
            extra += f";auth_pass={self.password}"
        if self.mediaenc:
            extra += f";mediaenc={self.mediaenc}"
        (self.dir / "accounts").write_text(
            f"<sip:{self.user}@127.0.0.1;transport={self.transport}>;regint=0{extra}\n")

    async def start(self) -> None:
        assert BARESIP, "baresip is required (apt-get install baresip)"
        self._write_config()
        self.proc = await asyncio.create_subprocess_exec(
            BARESIP, "-f", str(self.dir), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, cwd=str(self.dir))
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.wait_for(r"baresip is ready", 10)

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        buf = b""
        while True:
            chunk = await self.proc.stdout.read(4096)
            if not chunk:
                return
            buf += chunk
            # The status line redraws with \r; split on both so log lines come through as lines.
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            self.lines.extend(p.decode("utf-8", "replace") for p in parts if p.strip())
            self._new_line.set()

    async def send(self, cmd: str) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write((cmd + "\n").encode())
        await self.proc.stdin.drain()

    async def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        rx = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        idx = start
        while True:
            while idx < len(self.lines):
                if rx.search(self.lines[idx]):
                    return self.lines[idx]
                idx += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"baresip never printed {pattern!r}; last lines: {self.lines[-15:]}")
            self._new_line.clear()
            try:
                await asyncio.wait_for(self._new_line.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            try:
                await self.send("/quit")
                await asyncio.wait_for(self.proc.wait(), 5)
            except (asyncio.TimeoutError, BrokenPipeError, ConnectionResetError):
                self.proc.kill()
                await self.proc.wait()
        if self._reader:
            self._reader.cancel()

    def recording(self, kind: str = "dec", index: int = 0) -> np.ndarray:
        """What baresip heard (`dec`) or sent (`enc`) in its `index`-th call, as int16 8 kHz samples."""
        files = sorted(self.rec.glob(f"dump-*-{kind}.wav"))
        assert files, f"no {kind} recording in {self.rec}"
        data, rate = sf.read(str(files[index]), dtype="int16")
        assert rate == 8000
        return np.asarray(data).reshape(-1)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if pcm.size else 0.0


def voiced_fraction(pcm: np.ndarray, threshold: float = 300.0) -> float:
    """Share of 20 ms frames whose RMS exceeds `threshold` (speech-like energy)."""
    n = pcm.size // 160
    if n == 0:
        return 0.0
    frames = pcm[: n * 160].reshape(n, 160).astype(np.float64)
    return float(np.mean(np.sqrt(np.mean(frames**2, axis=1)) > threshold))
