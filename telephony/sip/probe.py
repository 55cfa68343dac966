"""Who answers SIP at an address: one OPTIONS over UDP (RFC 3261 11), as a proxy's keep-alive would send.

Before a worker takes over the SIP calls of another that stopped writing to Redis (bot/sip_recovery.py), it asks
that worker's SIP address who is there. Our SIP server names its worker id in every answer (`X-Voicebot-Worker`),
so a worker that lost Redis but still serves its phones is told apart from a dead one (no answer) and from a
different process listening there now (another worker id, or not ours at all).
"""

from __future__ import annotations

import asyncio

from telephony.sip.message import (
    SipMessage, SipParseError, hostport, new_branch, new_call_id, new_tag, parse_message,
)

WORKER_HEADER = "X-Voicebot-Worker"
PROBE_TIMEOUT_S = 1.0
_RETRANSMIT_S = 0.25  # a lost datagram must not read as a dead worker: sent again until the timeout


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.answer: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse_message(data)
        except SipParseError:
            return
        if not msg.is_request and msg.call_id == self.call_id and not self.answer.done():
            self.answer.set_result(msg)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nothing listens there (the host is up, the process is gone)
        if not self.answer.done():
            self.answer.set_exception(exc)


async def who_answers(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """The worker id that answers SIP at host:port ("" for a SIP server that is not one of ours, or that does not
    say), or None when nothing answers within timeout_s."""
    loop = asyncio.get_running_loop()
    call_id = new_call_id("probe")
    try:
        transport, proto = await loop.create_datagram_endpoint(lambda: _Probe(call_id), remote_addr=(host, port))
    except OSError:
        return None
    try:
        local_ip, local_port = transport.get_extra_info("sockname")[:2]
        req = SipMessage(method="OPTIONS", uri=f"sip:{hostport(host, port)}")
        req.add("Via", f"SIP/2.0/UDP {hostport(local_ip, local_port)};branch={new_branch()};rport")
        req.add("Max-Forwards", "70")
        req.add("From", f"<sip:probe@{hostport(local_ip)}>;tag={new_tag()}")
        req.add("To", f"<sip:{hostport(host, port)}>")
        req.add("Call-ID", call_id)
        req.add("CSeq", "1 OPTIONS")
        req.add("Accept", "application/sdp")
        data = req.encode()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            transport.sendto(data)
            try:
                resp = await asyncio.wait_for(asyncio.shield(proto.answer), min(_RETRANSMIT_S, left))
            except asyncio.TimeoutError:
                continue
            except OSError:
                return None
            return resp.get(WORKER_HEADER)
        return None
    finally:
        transport.close()
        if proto.answer.done() and not proto.answer.cancelled():
            proto.answer.exception()  # an ICMP error after the timeout: seen, not an unretrieved exception
