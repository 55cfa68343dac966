"""Fixtures for the SIP bridge tests: real WAV audio, a SipServer on a free port, a recording handler."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import pytest

from telephony.bridge import AudioIn, CallBridge, CallEnded, DtmfIn, MarkIn
from telephony.sip.config import SipSettings
from telephony.sip.server import SipServer
from telephony.sip.uac import read_wav_8k

SOUNDS = Path("/usr/share/asterisk/sounds/en")
PROMPT_WAV = SOUNDS / "hello-world.wav"  # real recorded speech (asterisk-core-sounds-en)
CALLER_WAV = SOUNDS / "agent-loginok.wav"


@pytest.fixture(scope="session")
def prompt_pcm() -> np.ndarray:
    return read_wav_8k(PROMPT_WAV)


@pytest.fixture(scope="session")
def caller_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caller speech padded with silence to 20 s (baresip's aufile ends the call at end of file)."""
    out = tmp_path_factory.mktemp("wav") / "caller.wav"
    subprocess.run([shutil.which("sox") or "sox", str(CALLER_WAV), "-r", "8000", "-c", "1", "-b", "16", str(out),
                    "repeat", "2", "pad", "0", "16"], check=True)
    return out


class RecordingHandler:
    """on_call for tests: speaks a prompt, records everything the caller sends, optional scripted
    actions after the prompt has been heard (hangup / transfer)."""

    def __init__(self, prompt: np.ndarray, after_prompt: Callable[[CallBridge], Any] | None = None) -> None:
        self.prompt = prompt
        self.after_prompt = after_prompt
        self.calls: list[dict[str, Any]] = []
        self.new_call = asyncio.Event()
        self.call_ended = asyncio.Event()

    async def __call__(self, bridge: CallBridge) -> None:
        rec: dict[str, Any] = {"bridge": bridge, "audio": [], "dtmf": [], "marks": [], "ended": None,
                               "action": None}
        self.calls.append(rec)
        self.new_call.set()
        await bridge.send_audio(self.prompt)
        await bridge.mark("prompt")
        async for ev in bridge.events():
            if isinstance(ev, AudioIn):
                rec["audio"].append(ev.pcm)
            elif isinstance(ev, DtmfIn):
                rec["dtmf"].append(ev.digit)
            elif isinstance(ev, MarkIn):
                rec["marks"].append(ev.name)
                if self.after_prompt is not None and ev.name == "prompt":
                    rec["action_task"] = asyncio.get_running_loop().create_task(self._act(bridge, rec))
            elif isinstance(ev, CallEnded):
                rec["ended"] = ev.reason
        self.call_ended.set()

    async def _act(self, bridge: CallBridge, rec: dict[str, Any]) -> None:
        assert self.after_prompt is not None
        rec["action"] = await self.after_prompt(bridge)


async def hang_up_after_prompt(bridge: CallBridge) -> str:
    """A RecordingHandler `after_prompt`: the bot ends the call once its prompt is out."""
    await bridge.hangup("completed")
    return "hung_up"


def inbound_pcm(rec: dict[str, Any]) -> np.ndarray:
    return np.concatenate(rec["audio"]) if rec["audio"] else np.zeros(0, dtype=np.int16)


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def sip_settings() -> SipSettings:
    return SipSettings(allow="127.0.0.0/8", user="", password="", rtp_timeout_s=30.0, ring_s=0.0,
                       queue_uris={}, transfer_fallback="")


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[SipServer] = []

    async def _make(on_call: Any, settings: SipSettings, unknown_dialog_grace_s: float = 0.0,
                    instance: str = "", tls: bool | None = None) -> SipServer:
        # no grace by default: these tests send requests for unknown dialogs right after start and want the 481
        srv = SipServer("127.0.0.1", 0, on_call, settings, unknown_dialog_grace_s=unknown_dialog_grace_s,
                        instance=instance, tls=tls)
        await srv.start()
        servers.append(srv)
        return srv

    yield _make
    for s in servers:
        await s.stop()
