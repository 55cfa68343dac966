"""Locating a SIP server by name (RFC 3263): NAPTR, then SRV (RFC 2782), then A/AAAA.

Providers publish their registrars and proxies as DNS records rather than one address: `sip:provider.example`
names a NAPTR record choosing the transport, SRV records listing servers by priority (the next one when the first
does not answer) and weight (load sharing), and their addresses. A URI with a port is looked up by address only,
one with a transport (or `sips:`) skips NAPTR, an IP literal is not looked up at all (RFC 3263 4.1, 4.2).

NAPTR and SRV queries go through dnspython's asyncio resolver (never blocking the event loop that carries every
call), to the system's DNS servers or BOT_SIP_DNS_SERVERS. Addresses come from the system's resolver (so
/etc/hosts and container DNS work as everywhere else), or from those servers when they are set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from dataclasses import dataclass
from typing import Any, Iterable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from telephony.sip.message import DEFAULT_PORT

# our transport -> (its NAPTR service, its SRV prefix)
SERVICES = {"UDP": ("SIP+D2U", "_sip._udp"), "TCP": ("SIP+D2T", "_sip._tcp"), "TLS": ("SIPS+D2T", "_sips._tcp")}
TIMEOUT_S = 4.0  # one lookup, all its retries: a registration attempt must not wait on DNS for long


class LocateError(Exception):
    """The name has no usable record (kind: nxdomain, no_address, dns_timeout, dns_error)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Target:
    ip: str
    port: int
    proto: str  # UDP | TCP | TLS
    name: str  # the host name it came from (logs)


def parse_servers(spec: str) -> list[tuple[str, int]]:
    """'10.0.0.2, 10.0.0.3:5353, [fd00::53]:53' -> [(ip, port)]; ValueError naming the bad entry."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        host, port = part, "53"
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or "53"
        elif part.count(":") == 1:
            host, port = part.split(":")
        try:
            ipaddress.ip_address(host)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(f"BOT_SIP_DNS_SERVERS={spec!r}: {part!r} is not IP[:PORT] ([IPv6]:PORT)") from None
        out.append((host, int(port)))
    return out


class Locator:
    def __init__(self, servers: str = "", timeout_s: float = TIMEOUT_S) -> None:
        self.servers = parse_servers(servers)
        self.timeout_s = timeout_s
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _dns(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.servers:
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in self.servers]
            else:
                try:
                    r = dns.asyncresolver.Resolver()  # /etc/resolv.conf
                except dns.resolver.NoResolverConfiguration as exc:
                    raise LocateError("dns_error", "no DNS servers configured (/etc/resolv.conf)") from exc
            r.lifetime = self.timeout_s
            self._resolver = r
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        """The records of one type; [] when the name has none of that type (or does not exist: the caller falls
        back to the next step, RFC 3263 4.1)."""
        try:
            answer = await self._dns().resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout as exc:
            raise LocateError("dns_timeout", f"{rdtype} {name}: no DNS answer in {self.timeout_s:g} s") from exc
        except dns.exception.DNSException as exc:
            raise LocateError("dns_error", f"{rdtype} {name}: {exc}"[:200]) from exc
        return list(answer)

    async def addresses(self, name: str) -> list[str]:
        if self.servers:
            ips = [r.address for t in ("A", "AAAA") for r in await self._query(name, t)]
            if not ips:
                raise LocateError("no_address", f"{name} has no A/AAAA record")
            return ips
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise LocateError("no_address", f"{name}: {exc}") from exc
        return list(dict.fromkeys(str(i[4][0]) for i in infos))

    async def locate(self, host: str, port: int | None = None, proto: str | None = None,
                     transports: Iterable[str] = ("UDP", "TCP", "TLS")) -> list[Target]:
        """The servers to try, in order, for sip:host[:port][;transport=proto]. LocateError when there are none."""
        try:
            ipaddress.ip_address(host)
            p = proto or "UDP"
            return [Target(host, port or DEFAULT_PORT[p], p, host)]
        except ValueError:
            pass
        if port is not None:
            p = proto or "UDP"
            return [Target(ip, port, p, host) for ip in await self.addresses(host)]
        wanted = [proto] if proto else [t for t in transports if t in SERVICES]
        for p, srv_name in await self._srv_names(host, wanted):
            targets: list[Target] = []
            for rec in srv_order(await self._query(srv_name, "SRV")):
                target = rec.target.to_text().rstrip(".")
                try:
                    targets += [Target(ip, int(rec.port), p, target) for ip in await self.addresses(target)]
                except LocateError:
                    continue  # one dead name in the list: the others still serve
            if targets:
                return targets
        p = proto or "UDP"
        return [Target(ip, DEFAULT_PORT[p], p, host) for ip in await self.addresses(host)]

    async def _srv_names(self, host: str, wanted: list[str]) -> list[tuple[str, str]]:
        """(transport, SRV name) to query in order: what the domain's NAPTR records prefer among the transports we
        speak, else each transport's usual SRV name (RFC 3263 4.1)."""
        if len(wanted) > 1:
            by_service = {SERVICES[p][0]: p for p in wanted}
            naptr = sorted(await self._query(host, "NAPTR"), key=lambda r: (r.order, r.preference))
            chosen = [(by_service[svc], r.replacement.to_text().rstrip("."))
                      for r in naptr
                      if r.flags.decode().lower() == "s" and (svc := r.service.decode().upper()) in by_service]
            if chosen:
                return chosen
        return [(p, f"{SERVICES[p][1]}.{host}") for p in wanted]


def srv_order(records: list[Any], rng: random.Random | None = None) -> list[Any]:
    """RFC 2782: lowest priority first; within a priority, a weighted random order (weight-0 records sorted first,
    so they are picked only when the draw is 0). A record with target "." says the service is not offered."""
    draw = (rng or random).randint
    out: list[Any] = []
    for prio in sorted({r.priority for r in records}):
        group = sorted((r for r in records if r.priority == prio and r.target.to_text() != "."), key=lambda r: r.weight)
        while group:
            pick, acc = draw(0, sum(r.weight for r in group)), 0
            for r in group:
                acc += r.weight
                if acc >= pick:
                    out.append(r)
                    group.remove(r)
                    break
    return out
