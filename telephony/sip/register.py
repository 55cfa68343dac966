"""Registration with a SIP provider (RFC 3261 10): for trunks that send calls to a registered address instead of
a fixed one. The SIP server registers its own address (Contact) under BOT_SIP_REGISTER_USER at BOT_SIP_REGISTRAR,
answers the provider's digest challenge, refreshes before the binding expires, retries with backoff while the
registrar refuses or does not answer, and removes the binding (Expires: 0) when the server stops. The
registrar's address is added to the server's allowlist: the provider's calls come from there.

One REGISTER dialog per server: the same Call-ID and From tag for every refresh, the CSeq growing (10.2.4).
The registrar is host[:port] or a sip:/sips: URI with `;transport=tcp|tls`; a name is located as RFC 3263 says
(telephony/sip/locate.py: NAPTR, SRV, A/AAAA): a registrar that does not answer is replaced by the next server its
SRV records list, and the list is looked up again once all have failed. Every address found joins the allowlist.
Over TLS the registrar's certificate is verified for the domain's name (BOT_SIP_TLS_CA / _VERIFY, RFC 5922) and our
Contact names our TLS listener (BOT_SIP_TLS_PORT), where the provider's calls then come.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ops import metrics
from ops.logs import get_logger
from telephony.sip.auth import authorization_header
from telephony.sip.locate import LocateError, Locator, Target
from telephony.sip.message import (
    DEFAULT_PORT, SipMessage, SipParseError, header_params, hostport, new_branch, new_call_id, new_tag, parse_uri,
    uri_transport,
)

if TYPE_CHECKING:
    from telephony.sip.server import SipServer

log = get_logger("telephony.sip.register")

RETRY_S = (5.0, 10.0, 20.0, 40.0, 60.0)  # after a failed registration, then every 60 s
REFRESH_SHARE = 0.8  # refresh when this share of the granted time has passed (at least 10 s before it ends)
UNREGISTER_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Registrar:
    host: str
    port: int
    proto: str  # "UDP" | "TCP" | "TLS"
    domain: str  # the address-of-record's host: sip:user@domain
    # what the spec said itself (RFC 3263: a port means no SRV lookup, a transport no NAPTR); else the defaults above
    port_given: bool = True
    proto_given: bool = True

    @staticmethod
    def parse(spec: str, domain: str = "") -> "Registrar":
        """'pbx.example.com', '10.0.0.5:5080', 'sip:pbx.example.com:5060;transport=tcp', 'sip:pbx;transport=tls' or
        'sips:pbx.example.com' (TLS); ValueError otherwise."""
        text = spec.strip()
        try:
            uri = parse_uri(text if text.lower().startswith(("sip:", "sips:")) else f"sip:{text}")
        except SipParseError as exc:
            raise ValueError(f"BOT_SIP_REGISTRAR {spec!r} is not host[:port] or a sip:/sips: URI") from exc
        asked = uri.params.get("transport", "udp")
        proto = uri_transport(uri, asked.upper())
        if proto not in DEFAULT_PORT:
            raise ValueError(f"BOT_SIP_REGISTRAR transport {asked.lower()!r}: only udp, tcp and tls")
        return Registrar(uri.host, uri.port or DEFAULT_PORT[proto], proto, domain or uri.host, port_given=bool(uri.port),
                         proto_given="transport" in uri.params or uri.scheme == "sips")


class Registration:
    def __init__(self, server: "SipServer", registrar: Registrar, user: str, password: str,
                 expires_s: int = 300) -> None:
        self.server = server
        self.registrar = registrar
        self.user = user
        self.password = password
        self.expires_s = max(30, expires_s)
        self.call_id = new_call_id("register")
        self.tag = new_tag()
        self.cseq = random.randint(1, 1000)
        self.registered = False
        self.granted_s = 0
        self.locator = Locator(server.settings.dns_servers)
        self._targets: list[Target] = []  # where the registrar's name led (RFC 3263), tried in order
        self.target: Target | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.SIP_REGISTERED.set(0)

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{hostport(self.registrar.domain)}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sip-register")

    async def stop(self) -> None:
        """Remove our binding (the provider stops sending calls here), briefly: a gone registrar must not stall
        shutdown; the binding then just expires."""
        if self._task is not None:
            self._task.cancel()
        if self.registered:
            try:
                await asyncio.wait_for(self._register(0), UNREGISTER_TIMEOUT_S)
            except (asyncio.TimeoutError, OSError):
                pass
            self.registered = False
            metrics.SIP_REGISTERED.set(0)
            log.info("sip_unregistered", registrar=self._where())

    @property
    def proto(self) -> str:
        """The transport in use: the one asked for, or the one the provider's DNS records chose."""
        return self.target.proto if self.target is not None else self.registrar.proto

    def _where(self) -> str:
        r = self.registrar
        where = f"{self.proto.lower()}:{hostport(r.host, r.port if r.port_given else None)}"
        if self.target is not None and self.target.ip != r.host:
            where += f" ({hostport(self.target.ip, self.target.port)})"
        return where

    async def _resolve(self) -> Target:
        """The server to register with: the current one, else the next the registrar's name leads to."""
        if self.target is None:
            if not self._targets:
                r = self.registrar
                transports = [p for p in ("UDP", "TCP", "TLS") if p != "TLS" or self.server.tls_enabled]
                self._targets = await self.locator.locate(r.host, r.port if r.port_given else None,
                                                          r.proto if r.proto_given else None, transports)
                for t in self._targets:  # the provider's calls come from its servers
                    if not self.server.allow.allows(t.ip):
                        self.server.allow.nets.append(ipaddress.ip_network(t.ip))
                        log.info("sip_registrar_allowed", source=t.ip)
                if len(self._targets) > 1 or self._targets[0].name != r.host:
                    log.info("sip_registrar_located", registrar=r.host,
                             targets=[f"{t.proto.lower()}:{hostport(t.ip, t.port)} ({t.name})" for t in self._targets])
            self.target = self._targets.pop(0)
        return self.target

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                status, granted = await self._register(self.expires_s)
            except asyncio.CancelledError:
                raise
            except LocateError as exc:  # the name leads nowhere (yet): looked up again on the next try
                status, granted = -1, 0
                log.warning("sip_registrar_unresolved", registrar=self.registrar.host, kind=exc.kind,
                            error=str(exc)[:200])
            except Exception as exc:  # noqa: BLE001 - socket error, a bug: retried, never fatal
                status, granted = 0, 0
                log.warning("sip_register_error", registrar=self._where(), error=repr(exc)[:200])
            result = ("ok" if 200 <= status < 300 else "no_answer" if status == 0 else "unresolved" if status < 0
                      else "auth_failed" if status in (401, 403, 407) else "refused")
            metrics.SIP_REGISTRATIONS.labels(result).inc()
            if result == "ok":
                granted = granted if granted > 0 else self.expires_s  # a 200 granting nothing: ask again as planned
                if not self.registered or failures:
                    log.info("sip_registered", registrar=self._where(), aor=self.aor, expires_s=granted)
                failures, self.registered, self.granted_s = 0, True, granted
                metrics.SIP_REGISTERED.set(1)
                await asyncio.sleep(max(1.0, min(granted * REFRESH_SHARE, granted - 10)))
                continue
            if result == "no_answer":
                # the next server the name led to; once all have failed, the name is looked up again (moved?)
                self.target = None
                if self._targets:
                    log.warning("sip_registrar_failover", registrar=self.registrar.host, next=self._targets[0].ip)
                    continue
            # the binding we had may still run a while, but nothing refreshes it: calls will stop coming
            was = self.registered
            self.registered = False
            metrics.SIP_REGISTERED.set(0)
            delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
            failures += 1
            if was or failures in (1, 3) or failures % 10 == 0:
                log.warning("sip_register_failed", registrar=self._where(), aor=self.aor, status=status,
                            result=result, attempts=failures, retry_s=delay,
                            hint="no calls reach this bot through that provider until it registers: check "
                                 + ("the name in BOT_SIP_REGISTRAR and the DNS (BOT_SIP_DNS_SERVERS)"
                                    if result == "unresolved" else
                                    "BOT_SIP_REGISTRAR / BOT_SIP_REGISTER_USER / _PASSWORD and the network path"))
            await asyncio.sleep(delay)

    def _request(self, expires: int, auth: tuple[str, str] | None = None) -> tuple[SipMessage, str]:
        from telephony.sip.server import ALLOW

        self.cseq += 1
        branch = new_branch()
        host = self.target.ip if self.target is not None else self.registrar.host
        local_ip = self.server.local_ip_toward(host)
        req = SipMessage(method="REGISTER", uri=f"sip:{hostport(self.registrar.domain)}")
        req.add("Via", self.server.via(local_ip, self.proto, branch))
        req.add("Max-Forwards", "70")
        req.add("From", f"<{self.aor}>;tag={self.tag}")
        req.add("To", f"<{self.aor}>")
        req.add("Call-ID", self.call_id)
        req.add("CSeq", f"{self.cseq} REGISTER")
        tp = {"TCP": ";transport=tcp", "TLS": ";transport=tls"}.get(self.proto, "")
        req.add("Contact", f"<sip:{self.user}@{hostport(local_ip, self.server.port_for(self.proto))}{tp}>")
        req.add("Expires", str(expires))
        req.add("Allow", ALLOW)
        req.add("User-Agent", self.server.settings.user_agent)
        if auth is not None:
            req.add(*auth)
        return req, branch

    async def _register(self, expires: int) -> tuple[int, int]:
        """One REGISTER (answering one digest challenge): (final status, seconds granted); (0, 0) without answer."""
        from telephony.sip.server import Peer

        # over TLS the certificate is checked for the registrar's name, not the address it resolved to (RFC 5922)
        target = await self._resolve()
        dest = Peer(target.proto, (target.ip, target.port), name=self.registrar.host)
        auth: tuple[str, str] | None = None
        for _ in range(3):
            req, branch = self._request(expires, auth)
            resp = await self.server._client_tx(req, dest, branch)
            if resp is None:
                return 0, 0
            challenge = resp.get("WWW-Authenticate") or resp.get("Proxy-Authenticate")
            if resp.status in (401, 407) and challenge and auth is None and self.password:
                name = "Authorization" if resp.status == 401 else "Proxy-Authorization"
                auth = (name, authorization_header(challenge, self.user, self.password, "REGISTER", req.uri))
                continue
            if resp.status == 423 and expires and resp.get("Min-Expires").strip().isdigit():
                self.expires_s = expires = int(resp.get("Min-Expires"))  # the registrar's floor (10.2.8)
                auth = None
                continue
            mine = hostport(self.server.local_ip_toward(dest.addr[0]), self.server.port_for(dest.proto))
            return resp.status, _granted(resp, expires, mine) if resp.status < 300 else 0
        return resp.status, 0


def _granted(resp: SipMessage, asked: int, mine: str) -> int:
    """The binding's lifetime the registrar granted: the expires of our Contact (the 200 lists every binding of
    the address-of-record: other hosts' too), else Expires, else what we asked."""
    for contact in resp.get_all("Contact"):
        value = header_params(contact).get("expires", "")
        if f"@{mine}" in contact and value.isdigit():
            return int(value)
    value = resp.get("Expires").strip()
    return int(value) if value.isdigit() else asked
