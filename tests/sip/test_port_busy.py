"""A SIP port someone else holds: worker 0 keeps serving, says so (gauge, /readyz status), and binds
as soon as the port is free, without a restart. Real sockets, the real SipServer."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bot.sip_listener import SipListener
from ops import metrics
from ops.load.spawn import free_port_both
from telephony.sip.server import SipServer

from .conftest import RecordingHandler
from .test_server import RawUdp


def _errors() -> float:
    return metrics.ERRORS.labels("sip", "start_failed")._value.get()


@pytest.mark.parametrize("held", ["udp", "tcp"])
async def test_busy_port_is_retried_until_free(held: str, sip_settings, prompt_pcm) -> None:
    port = free_port_both()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if held == "udp" else socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", port))
    if held == "tcp":
        squatter.listen()
    before = _errors()
    listener = SipListener(lambda: SipServer("127.0.0.1", port, RecordingHandler(prompt_pcm), sip_settings), 0.2)
    raw = RawUdp()
    try:
        await listener.start()  # does not raise: the worker's Twilio side must come up regardless
        assert listener.status == "retrying" and metrics.SIP_LISTENING._value.get() == 0
        await asyncio.sleep(0.7)
        assert listener.status == "retrying" and _errors() - before >= 3  # every attempt counted
        squatter.close()
        for _ in range(50):
            if listener.status == "listening":
                break
            await asyncio.sleep(0.1)
        assert listener.status == "listening" and metrics.SIP_LISTENING._value.get() == 1
        resp = await raw.exchange(raw.request("OPTIONS", port), port)
        assert resp is not None and resp.status == 200  # answering on the port it waited for
    finally:
        raw.close()
        squatter.close()
        await listener.stop()
