"""Locating SIP servers by name (RFC 3263, telephony/sip/locate.py) against a real DNS server on localhost that
publishes what providers publish: NAPTR choosing a transport, SRV listing servers by priority and weight, addresses.
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from telephony.sip.locate import LocateError, Locator, Target, parse_servers, srv_order

from .dns_server import DnsServer

ZONE = {
    # a provider preferring TCP (NAPTR order), with UDP as well
    ("provider.test", "NAPTR"): ['10 50 "s" "SIP+D2T" "" _sip._tcp.provider.test.',
                                 '20 50 "s" "SIP+D2U" "" _sip._udp.provider.test.',
                                 '5 50 "s" "SIP+D2X" "" _sip._xyz.provider.test.'],  # a service we do not speak
    ("_sip._tcp.provider.test", "SRV"): ["20 0 5082 b.provider.test.", "10 0 5081 a.provider.test."],
    ("_sip._udp.provider.test", "SRV"): ["10 0 5070 a.provider.test."],
    ("a.provider.test", "A"): ["127.0.0.1"],
    ("b.provider.test", "A"): ["127.0.0.2"],
    # SRV only, no NAPTR: the UDP SRV name is tried first; one target's name does not resolve
    ("srv-only.test", "SOA"): ["ns.test. admin.test. 1 60 60 60 60"],
    ("_sip._udp.srv-only.test", "SRV"): ["10 0 5090 gone.srv-only.test.", "20 0 5091 a.provider.test."],
    # no SIP records at all: its address, the default port
    ("plain.test", "A"): ["127.0.0.3"],
    ("v6.test", "AAAA"): ["::1"],
}


@pytest.fixture
async def dns_server() -> Any:
    server = await DnsServer(ZONE).start()
    yield server
    server.close()


def _asked_types(server: DnsServer) -> set[str]:
    return {t for _, t in server.asked}


async def test_naptr_chooses_the_transport_and_srv_orders_the_servers(dns_server: DnsServer) -> None:
    targets = await Locator(dns_server.spec).locate("provider.test")
    assert targets == [Target("127.0.0.1", 5081, "TCP", "a.provider.test"),
                       Target("127.0.0.2", 5082, "TCP", "b.provider.test")]
    # only the transports we speak: without TCP the NAPTR's UDP entry is taken
    assert await Locator(dns_server.spec).locate("provider.test", transports=("UDP",)) == [
        Target("127.0.0.1", 5070, "UDP", "a.provider.test")]


async def test_a_transport_skips_naptr_and_a_port_skips_srv(dns_server: DnsServer) -> None:
    loc = Locator(dns_server.spec)
    assert await loc.locate("provider.test", proto="UDP") == [Target("127.0.0.1", 5070, "UDP", "a.provider.test")]
    assert "NAPTR" not in _asked_types(dns_server)
    dns_server.asked.clear()
    assert await loc.locate("a.provider.test", port=5999, proto="TCP") == [
        Target("127.0.0.1", 5999, "TCP", "a.provider.test")]
    assert _asked_types(dns_server) <= {"A", "AAAA"}
    dns_server.asked.clear()
    assert await loc.locate("10.0.0.5") == [Target("10.0.0.5", 5060, "UDP", "10.0.0.5")]  # an address: no DNS
    assert dns_server.asked == []


async def test_srv_without_naptr_a_dead_target_skipped_and_plain_names_fall_back_to_addresses(
        dns_server: DnsServer) -> None:
    loc = Locator(dns_server.spec)
    assert await loc.locate("srv-only.test") == [Target("127.0.0.1", 5091, "UDP", "a.provider.test")]
    assert await loc.locate("plain.test") == [Target("127.0.0.3", 5060, "UDP", "plain.test")]
    assert await loc.locate("plain.test", proto="TLS") == [Target("127.0.0.3", 5061, "TLS", "plain.test")]
    assert await loc.locate("v6.test") == [Target("::1", 5060, "UDP", "v6.test")]
    with pytest.raises(LocateError) as exc:
        await loc.locate("nowhere.test")
    assert exc.value.kind == "no_address"


async def test_a_dns_server_that_does_not_answer_is_a_clear_error_in_bounded_time() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read: queries go unanswered
        silent.bind(("127.0.0.1", 0))
        loc = Locator(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(LocateError) as exc:
            await loc.locate("provider.test")
        assert exc.value.kind == "dns_timeout" and time.monotonic() - started < 5


def _srv(text: str) -> Any:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SRV, text)


def test_srv_order_priority_first_then_by_weight() -> None:
    records = [_srv("20 0 1 backup."), _srv("10 60 1 big."), _srv("10 30 1 small."), _srv("10 0 1 zero."),
               _srv("30 0 1 .")]
    rng = random.Random(7)
    firsts = Counter(srv_order(records, rng)[0].target.to_text() for _ in range(3000))
    assert set(firsts) <= {"big.", "small.", "zero."}
    assert 0.60 < firsts["big."] / 3000 < 0.73 and 0.26 < firsts["small."] / 3000 < 0.39  # 60:30 of 91
    assert firsts["zero."] < 60  # weight 0: only when the draw is 0
    for _ in range(50):
        order = [r.target.to_text() for r in srv_order(records, rng)]
        assert order[-1] == "backup." and sorted(order[:3]) == ["big.", "small.", "zero."]  # "." is no server


@pytest.mark.parametrize("spec,ok", [
    ("10.0.0.2", [("10.0.0.2", 53)]), ("10.0.0.2:5353, [fd00::53]:54", [("10.0.0.2", 5353), ("fd00::53", 54)]),
    ("fd00::53", [("fd00::53", 53)]), ("", []), ("dns.example:53", None), ("10.0.0.2:0", None), ("10.0.0.2:x", None),
])
def test_dns_servers_setting(spec: str, ok: list[tuple[str, int]] | None) -> None:
    if ok is None:
        with pytest.raises(ValueError, match="BOT_SIP_DNS_SERVERS"):
            parse_servers(spec)
    else:
        assert parse_servers(spec) == ok
