"""A small authoritative DNS server for tests (UDP, dnspython messages): the records a SIP provider publishes
(NAPTR, SRV, A/AAAA) for telephony/sip/locate.py to find, and a log of the questions it was asked."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: "DnsServer") -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        assert self.transport is not None
        self.transport.sendto(self.server.answer(data), addr)


class DnsServer:
    """records: {("_sip._udp.provider.test", "SRV"): ["10 0 5060 a.provider.test."], ("a.provider.test", "A"):
    ["127.0.0.1"]}; a name with no record of any type is NXDOMAIN, a known name without the type asked NOERROR/empty."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = {(n.rstrip(".").lower(), t.upper()): v for (n, t), v in records.items()}
        self.asked: list[tuple[str, str]] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> "DnsServer":
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), local_addr=("127.0.0.1", 0))
        self.port = self._transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        q = query.question[0]
        name, rdtype = q.name.to_text().rstrip(".").lower(), dns.rdatatype.to_text(q.rdtype)
        self.asked.append((name, rdtype))
        values = self.records.get((name, rdtype))
        if values:
            reply.answer.append(dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN, q.rdtype, values))
        elif not any(n == name for n, _ in self.records):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply.to_wire()
