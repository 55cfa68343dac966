"""espeak-ng IPA phonemes from one long-lived espeak-ng process per voice (the Piper voice's front end).

Spawning `espeak-ng --ipa` for every clause cost ~15-20 ms of the caller's wait for first audio (process
start and voice data load), about an eighth of it. espeak-ng reading stdin synthesises each line on its own
(the same as passing that line as an argument) and prints its phonemes as soon as the line ends, so one
process serves every clause: after the text we send a sentinel line whose phonemes we know, and read up to
them. Anything unexpected (the process died, a timeout, a fork) kills it and falls back to a one-shot
subprocess for that clause; the next clause starts a fresh process. The process stays outside this one
(espeak-ng is GPL-3.0: we run it, we do not link it).
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from typing import Any

from ops.logs import get_logger
from ops.metrics import ERRORS

_SENTINEL = "qxzv"  # spelled out letter by letter: no prompt or read-back says it
_MAX_LINE_BYTES = 1 << 20


def log() -> Any:
    return get_logger("engine.phonemizer")


class PhonemizerError(RuntimeError):
    pass


class Phonemizer:
    """Thread-safe: concurrent clauses take turns (each takes ~1-3 ms once the process is up)."""

    def __init__(self, exe: str, voice: str = "en-us", timeout_s: float = 5.0) -> None:
        self.exe, self.voice, self.timeout_s = exe, voice, timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0  # the process that started it: a forked worker must start its own
        self._buf = b""
        self._sentinel = ""

    def phonemes(self, text: str) -> str:
        """espeak-ng's IPA for `text` (one output line per clause, joined with spaces)."""
        line = " ".join(text.split())  # a newline would end the line (the clause) early
        if not line:
            return ""
        with self._lock:
            try:
                if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                    self._start()
                return " ".join(self._ask(line))
            except (OSError, PhonemizerError) as exc:
                ERRORS.labels("voice", "phonemizer_restarted").inc()
                log().warning("phonemizer_restarted", error=repr(exc), hint="one clause phonemized by a one-shot "
                              "espeak-ng; the next starts a new process")
                self._kill()
        return self._one_shot(line)

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _one_shot(self, line: str) -> str:
        try:
            out = subprocess.run([self.exe, "-q", "--ipa", "-v", self.voice, "--", line], capture_output=True,
                                 timeout=10, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise PhonemizerError(f"espeak-ng phonemizer failed: {exc}") from exc
        return " ".join(out.stdout.decode("utf-8", "replace").split())

    def _start(self) -> None:
        self._kill()
        self._proc = subprocess.Popen([self.exe, "-q", "--ipa", "-v", self.voice], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                      # not the terminal's Ctrl-C: a draining worker still speaks; it exits when
                                      # our end of its stdin closes (also when this process is killed)
                                      process_group=0)
        self._pid, self._buf = os.getpid(), b""
        self._write(_SENTINEL)
        got = self._read_line(time.monotonic() + self.timeout_s)
        if not got:
            raise PhonemizerError("espeak-ng printed no phonemes for the sentinel")
        self._sentinel = got

    def _ask(self, line: str) -> list[str]:
        self._write(f"{line}\n{_SENTINEL}")
        deadline = time.monotonic() + self.timeout_s
        lines: list[str] = []
        while (got := self._read_line(deadline)) != self._sentinel:
            lines.append(got)
            if len(lines) > 1000:
                raise PhonemizerError("no sentinel after 1000 lines")
        return [ln for ln in lines if ln]

    def _write(self, text: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text.encode("utf-8") + b"\n")

    def _read_line(self, deadline: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise PhonemizerError(f"espeak-ng gave no answer in {self.timeout_s} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PhonemizerError("espeak-ng exited")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE_BYTES:
                raise PhonemizerError("espeak-ng output line too long")
        raw, self._buf = self._buf.split(b"\n", 1)
        return " ".join(raw.decode("utf-8", "replace").split())

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or self._pid != os.getpid():
            return  # a forked child must not kill its parent's process
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            proc.kill()
            proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass


_shared: dict[tuple[str, str], Phonemizer] = {}
_shared_lock = threading.Lock()


def shared(exe: str, voice: str) -> Phonemizer:
    """One process per voice for this worker."""
    with _shared_lock:
        return _shared.setdefault((exe, voice), Phonemizer(exe, voice))

