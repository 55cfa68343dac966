"""The SIP UAS: UDP, TCP and TLS transports, transactions, admission control, and call setup/teardown.

Transactions are kept as small as RFC 3261 allows for a UAS that never forwards:
- server side: the last response per (branch, method) is cached for 32 s and re-sent when the
  request is retransmitted (timers J/H behaviour); a 2xx to INVITE is retransmitted T1..T2 until
  the ACK arrives (13.3.1.4), and the call is torn down if none comes within 64*T1;
- client side (BYE, REFER): retransmitted over UDP T1..T2 until a final response or 64*T1.
Responses go back to the packet's source address (RFC 3581 symmetric response routing), which is
what makes NATed trunks work. TLS (telephony/sip/tls.py) is TCP's stream code under a TLS layer: the same framing,
limits and timeouts, on its own port (BOT_SIP_TLS_PORT).
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ops.logs import get_logger
from ops.metrics import ERRORS, SIP_CALLS_ANSWERED, SIP_MESSAGES
from telephony.sip import session_timer
from telephony.sip import tls as sip_tls
from telephony.sip.auth import Allowlist, AuthFailures, DigestAuth, TokenBucket, is_scanner
from telephony.sip.call import SipCall
from telephony.sip.config import SipSettings
from telephony.sip.clock import MediaClock
from telephony.sip.dtmf import DtmfError, parse_info_body
from telephony.sip.message import (
    DEFAULT_PORT, SipMessage, SipParseError, addr_uri, find_message_end, header_params, hostport, make_response,
    new_branch, new_tag, parse_message, parse_uri, parse_via, uri_transport,
)
from telephony.sip.probe import WORKER_HEADER
from telephony.sip.sdp import SUPPORTED as SUPPORTED_CODECS
from telephony.sip.sdp import (Negotiated, SdpError, SdpSession, SessionDesc, negotiate, negotiate_answer,
                               parse_sdp)

T1, T2 = 0.5, 4.0
TX_LINGER_S = 32.0
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, REFER, NOTIFY, UPDATE, PRACK"
# option tags a caller may Require: replaces (RFC 3891), timer (RFC 4028 session timers), 100rel (RFC 3262 reliable
# provisional responses); anything else gets 420
SUPPORTED = {"replaces", "timer", "100rel"}
KNOWN_NOT_ALLOWED = {"REGISTER", "SUBSCRIBE", "MESSAGE", "PUBLISH"}

_METHODS = {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "INFO", "REFER", "NOTIFY", "UPDATE", "PRACK"} | KNOWN_NOT_ALLOWED

OnCall = Callable[[SipCall], Awaitable[None]]


MAX_SERVER_TX = 20000
MAX_SERVER_TX_BYTES = 32 << 20  # cached responses copy the request's Vias: bound the bytes, not just entries
KNOWN_SOURCE_TTL_S = 24 * 3600.0  # a source that had a call admitted is a trunk, not a stranger, this long
MAX_KNOWN_SOURCES = 10000
# TCP from the internet: a peer must finish a message it started within settings.tcp_message_timeout_s
# (slowloris), a connection carrying no call and no complete message for settings.tcp_idle_s is closed, and
# the number of connections is capped per source and in all (each holds a descriptor calls need for RTP).
# Out-of-dialog OPTIONS (trunk keep-alives, one a few seconds at most) per source: a flood past this is dropped,
# so one host cannot make us spend the event loop that paces every call's media answering it, nor reflect off us
OPTIONS_RATE, OPTIONS_BURST = 10.0, 50.0
TCP_MAX_CONNS = 512
TCP_MAX_WRITE_BUFFER = 512 * 1024  # unsent bytes to one peer that does not read its answers: then it is dropped
TCP_MAX_CONNS_PER_SOURCE = 32
STREAM = ("TCP", "TLS")  # connection-oriented transports: one framing and one set of limits (_read_stream)
# After the server starts listening, a request inside a dialog it does not know waits this long before its 481:
# the dialog may be a dead predecessor's call that this process is about to take over (telephony/sip/resume.py)
UNKNOWN_DIALOG_GRACE_S = 3.0


def tx_key(msg: SipMessage) -> tuple[str, ...]:
    """Server transaction id (17.2.3): RFC 3261 branch + sent-by + method; older (RFC 2543) clients
    without a magic-cookie branch are matched on Call-ID, From tag, CSeq and the top Via."""
    branch = msg.branch
    if branch.startswith("z9hG4bK"):
        return (branch, msg.top_via.split(";", 1)[0], msg.method)
    return (msg.call_id, msg.from_tag, str(msg.cseq[0]), msg.top_via, msg.method)


def _m(method: str) -> str:
    """Metric label for a method: peers choose method names, so unknown ones share one series."""
    return method if method in _METHODS else "other"
log = get_logger("telephony.sip.server")


@dataclass
class Peer:
    proto: str  # UDP | TCP | TLS
    addr: tuple[str, int]
    conn: "_TcpConn | None" = None
    name: str = ""  # TLS: the host name to verify (and send as SNI) when addr holds an address resolved from it


@dataclass
class _TxEntry:
    data: bytes
    peer: Peer
    expires: float


@dataclass
class _ClientTx:
    future: asyncio.Future[SipMessage]
    provisional: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class _TcpConn:
    writer: asyncio.StreamWriter
    addr: tuple[str, int]
    proto: str = "TCP"  # TCP | TLS
    closed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.server.on_data(data, Peer("UDP", (unmapped(addr[0]), addr[1])))

    def error_received(self, exc: Exception) -> None:
        ERRORS.labels("sip", "udp_error").inc()


def unmapped(ip: str) -> str:
    """An IPv4 peer as a server bound to `::` sees it (`::ffff:192.0.2.1`) is an IPv4 peer: our SDP and Contact toward
    it must say IN IP4 and its address, which an IPv4-only phone can parse, and its media goes over IPv4."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def local_ip_for(peer_ip: str) -> str:
    """The address of our interface that routes to `peer_ip` (no packet is sent)."""
    fam = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer_ip, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class SipServer:
    def __init__(self, host: str, port: int, on_call: OnCall, settings: SipSettings | None = None,
                 udp: bool = True, tcp: bool = True, unknown_dialog_grace_s: float = UNKNOWN_DIALOG_GRACE_S,
                 instance: str = "", tls: bool | None = None) -> None:
        self.host, self.port, self.on_call = host, port, on_call
        # our worker id, named in every answer (X-Voicebot-Worker): a peer about to take over the calls of a
        # worker silent in Redis asks its SIP address who is there first (telephony/sip/probe.py)
        self.instance = instance
        self.unknown_dialog_grace_s = unknown_dialog_grace_s
        self._grace_until = 0.0  # time.monotonic() until which unknown dialogs' requests wait (set at start)
        self._deferred: set[tuple[str, ...]] = set()  # transactions of those requests waiting
        self.settings = settings or SipSettings()
        self.udp_enabled, self.tcp_enabled = udp, tcp
        # TLS listener: on settings.tls_port when it is set (tls=None); tls=True with tls_port 0 takes any free port
        self.tls_enabled = self.settings.tls_port > 0 if tls is None else tls
        self.tls_port = self.settings.tls_port
        self._tls_server_ctx = (sip_tls.server_context(self.settings.tls_cert, self.settings.tls_key)
                                if self.tls_enabled else None)
        self._tls_client_ctx: ssl.SSLContext | None = None  # built on first use (telephony/sip/tls.py)
        self.clock = MediaClock()
        self.allow = Allowlist(self.settings.allow)
        self.registration: Any = None  # telephony.sip.register.Registration when BOT_SIP_REGISTRAR is set
        self.auth = (DigestAuth(self.settings.user, self.settings.password, self.settings.realm)
                     if self.settings.password else None)
        self.bucket = TokenBucket(self.settings.invite_rate, self.settings.invite_burst)
        self.options_bucket = TokenBucket(OPTIONS_RATE, OPTIONS_BURST)
        self.calls: dict[tuple[str, str], SipCall] = {}
        self._pending: dict[str, SipCall] = {}  # INVITE branch -> call not yet answered (for CANCEL)
        self._srv_tx: dict[tuple[str, ...], _TxEntry] = {}
        self._cli_tx: dict[str, _ClientTx] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_v6 = False  # the UDP socket is IPv6 (bound to `::`: dual-stack, IPv4 peers at mapped addresses)
        self._tcp: asyncio.base_events.Server | None = None
        self._tls: asyncio.base_events.Server | None = None
        self._tcp_conns: dict[tuple[str, int], _TcpConn] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = False
        self._janitor: asyncio.Task[None] | None = None
        self._bad_logged: dict[str, float] = {}
        self._srv_tx_bytes = 0
        self.auth_failures = AuthFailures(self.settings.auth_fail_limit, self.settings.auth_fail_window_s,
                                          self.settings.auth_block_s)
        self._known_sources: dict[str, float] = {}  # source IP -> last time it had a call admitted
        # ACKs we sent for 2xx answers to our re-INVITEs (telephony/sip/resume.py), by (Call-ID, CSeq): sent
        # again when the phone retransmits its 200 because the first ACK was lost (13.2.2.4)
        self._acks: dict[tuple[str, int], tuple[bytes, Peer, float]] = {}

    def local_ip_toward(self, peer_ip: str) -> str:
        """Our address as a peer at peer_ip sees it (SDP c=, Contact)."""
        return self.settings.public_ip or self.host_ip_toward(peer_ip)

    def host_ip_toward(self, peer_ip: str) -> str:
        """This host's own address toward peer_ip, BOT_SIP_PUBLIC_IP aside: where hosts on the same network reach
        this SIP server when its advertised address is a NAT's public one they may not be able to reach."""
        return self.host if self.host not in ("0.0.0.0", "::", "") else local_ip_for(peer_ip)

    def _udp_dest(self, addr: tuple[str, int]) -> tuple[str, int]:
        """A dual-stack UDP socket (bound to `::`) reaches an IPv4 peer at its IPv4-mapped address."""
        if self._udp_v6 and ":" not in addr[0]:
            return (f"::ffff:{addr[0]}", addr[1])
        return addr

    def media_host(self, peer_ip: str) -> str:
        """The address a call's RTP sockets bind to: the SIP host's, or, for a server on every address, the wildcard
        of the peer's family (our SDP's `c=` is our address toward the peer, so its media must be of that family: a
        server bound to `::` bound RTP on IPv4 only, and an IPv6 phone's audio found no socket)."""
        if self.host not in ("", "::", "0.0.0.0"):
            return self.host
        return "::" if ":" in peer_ip else "0.0.0.0"

    # Lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        want = self.port
        for _ in range(20 if want == 0 else 1):  # port 0 (tests): find a number free for UDP *and* TCP
            self.port = want
            try:
                await self._bind(loop)
                break
            except OSError:
                if self._udp is not None:  # UDP bound, TCP refused: let the port go (a retry rebinds it)
                    self._udp.close()
                    self._udp = None
                if want != 0:
                    raise
        else:
            raise OSError("no port free for both UDP and TCP")
        try:
            await self._bind_tls()
        except OSError:
            self._close_listeners()
            raise
        self._accepting = True
        self._grace_until = time.monotonic() + self.unknown_dialog_grace_s
        self._janitor = loop.create_task(self._expire_loop())
        if self.settings.registrar and self.settings.register_user:
            from telephony.sip.register import Registrar, Registration

            self.registration = Registration(self, Registrar.parse(self.settings.registrar,
                                                                   self.settings.register_domain),
                                             self.settings.register_user, self.settings.register_password,
                                             self.settings.register_expires_s)
            self.registration.start()
        log.info("sip_listening", host=self.host, port=self.port, udp=self.udp_enabled, tcp=self.tcp_enabled,
                 tls_port=self.tls_port if self.tls_enabled else None, srtp=self.settings.srtp, auth=bool(self.auth),
                 allow=self.settings.allow)
        if self.settings.srtp == "required" and not self.tls_enabled:
            # SDES keys travel in the SDP: without TLS anyone who sees the signalling can decrypt the audio
            log.warning("sip_srtp_keys_in_clear", hint="BOT_SIP_SRTP=required without BOT_SIP_TLS_PORT: the SRTP "
                                                       "keys travel in clear SDP; set up SIP over TLS")
        uses_tls = self.tls_enabled or (self.registration is not None and self.registration.registrar.proto == "TLS")
        if uses_tls and not self.settings.tls_verify:
            log.warning("sip_tls_verify_off", hint="BOT_SIP_TLS_VERIFY=0: TLS peers we connect to are not "
                                                   "authenticated (anyone on the path can pose as them); lab use only")

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.udp_enabled:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.host, self.port))
            if self.port == 0:
                self.port = self._udp.get_extra_info("sockname")[1]
            sock = self._udp.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                self._udp_v6 = sock.family == socket.AF_INET6
        if self.tcp_enabled:
            self._tcp = await self._stream_server(self._on_tcp, self.port)
            if self.port == 0:
                self.port = self._tcp.sockets[0].getsockname()[1]

    async def _bind_tls(self) -> None:
        """The TLS listener: plain TCP accepts, the handshake is ours (_on_tls), so that its failures are counted."""
        if self.tls_enabled:
            self._tls = await self._stream_server(self._on_tls_accept, self.tls_port)
            if self.tls_port == 0:
                self.tls_port = self._tls.sockets[0].getsockname()[1]

    async def _stream_server(self, cb: Any, port: int) -> asyncio.base_events.Server:
        """A TCP listener on our host. On `::` one dual-stack socket (asyncio makes IPv6 listeners IPv6-only, so
        IPv4 phones were refused over TCP and TLS while UDP took them); IPv4 peers show as ::ffff: and are
        unmapped where they are admitted."""
        if self.host != "::":
            return await asyncio.start_server(cb, self.host, port)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
            sock.setblocking(False)
            return await asyncio.start_server(cb, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _close_listeners(self) -> None:
        for server in (self._udp, self._tcp, self._tls):
            if server is not None:
                server.close()
        self._udp = self._tcp = self._tls = None

    @property
    def accepting(self) -> bool:
        """Taking new calls (listening and not draining)."""
        return self._accepting

    def refuse_new_calls(self) -> None:
        """Answer new INVITEs 503 + Retry-After from now on (a draining worker): the trunk or proxy fails
        over to another worker instead of getting a 200 OK and an immediate BYE. Live calls carry on."""
        if self._accepting:
            log.info("sip_refusing_new_calls", calls=len(self.calls))
        self._accepting = False

    async def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new calls (503), let calls finish for up to `grace_s`, then BYE the rest."""
        self._accepting = False
        if self.registration is not None:  # the provider stops sending calls here
            await self.registration.stop()
        deadline = time.monotonic() + grace_s
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        byes = [asyncio.ensure_future(c.hangup("disconnected")) for c in list(self.calls.values())]
        if byes:  # wait briefly for the BYEs' answers; a vanished peer must not stall shutdown
            _, pending = await asyncio.wait(byes, timeout=2.0)
            for t in pending:
                t.cancel()
        for call in list(self._pending.values()):
            call._finish("disconnected")
        for t in list(self._tasks):
            t.cancel()
        if self._janitor:
            self._janitor.cancel()
        await self.clock.stop()
        if self._udp:
            self._udp.close()
        for server in (self._tcp, self._tls):
            if server is not None:
                server.close()
        for conn in list(self._tcp_conns.values()):
            conn.writer.close()
        for server in (self._tcp, self._tls):
            if server is not None:
                await server.wait_closed()
        log.info("sip_stopped")

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug in one call, not the server
            ERRORS.labels("sip", "task_failed").inc()
            log.error("sip_task_failed", error=repr(task.exception()))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            for k in [k for k, e in self._srv_tx.items() if e.expires < now]:
                self._srv_tx_bytes -= len(self._srv_tx.pop(k).data)

    # TCP --------------------------------------------------------------------------------------------
    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (conn := self._admit(writer, "TCP")) is not None:
            await self._read_stream(reader, conn)

    def _on_tls_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called inside connection_made: reading stops before a byte is read, or the client hello would land in
        # the plain stream's buffer instead of the TLS layer start_tls puts in between (it resumes reading).
        writer.transport.pause_reading()
        self._spawn(self._on_tls(reader, writer))

    async def _on_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A TLS connection: admitted under TCP's caps before its handshake (a handshake flood is capped too); the
        handshake must finish within BOT_SIP_TCP_MESSAGE_TIMEOUT_S, as a started message must."""
        if (conn := self._admit(writer, "TLS")) is None:
            return
        timeout = self.settings.tcp_message_timeout_s
        try:
            # our own deadline too: the handshake timeout alone does not cover every stall of start_tls
            await asyncio.wait_for(writer.start_tls(self._tls_server_ctx, ssl_handshake_timeout=timeout),
                                   timeout + 1.0)
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._tls_handshake_failed(conn, exc)
            self._drop(conn)
            return
        await self._read_stream(reader, conn)

    def _admit(self, writer: asyncio.StreamWriter, proto: str) -> _TcpConn | None:
        """A new connection within the caps (TCP and TLS together), or None (closed)."""
        peername = writer.get_extra_info("peername")
        addr = (unmapped(peername[0]), peername[1])
        ip = addr[0]
        per_source = sum(1 for a in self._tcp_conns if a[0] == ip)
        if len(self._tcp_conns) >= TCP_MAX_CONNS or per_source >= TCP_MAX_CONNS_PER_SOURCE:
            # Each connection holds a descriptor that calls need for RTP: refuse rather than run out.
            kind = "stranger_tcp_refused" if self.is_stranger(ip) else "tcp_refused"
            ERRORS.labels("sip", kind).inc()
            if self._log_due(f"tcp_refused:{kind}"):
                log.warning("sip_tcp_refused", source=ip, proto=proto, from_source=per_source,
                            total=len(self._tcp_conns))
            writer.close()
            return None
        conn = _TcpConn(writer, (addr[0], addr[1]), proto)
        self._tcp_conns[conn.addr] = conn
        return conn

    def _tls_handshake_failed(self, conn: _TcpConn, exc: BaseException) -> None:
        """Plain text or garbage on the TLS port, a protocol we do not speak, a peer that never finishes: counted,
        logged once a second at most; a stranger's (internet scanners) does not page."""
        kind = "stranger_tls_handshake" if self.is_stranger(conn.addr[0]) else "tls_handshake"
        ERRORS.labels("sip", kind).inc()
        if self._log_due("tls_handshake"):
            log.warning("sip_tls_handshake_failed", source=conn.addr[0], counted_as=kind, reason=sip_tls.reason(exc))

    def _drop(self, conn: _TcpConn) -> None:
        conn.closed = True
        if self._tcp_conns.get(conn.addr) is conn:
            del self._tcp_conns[conn.addr]
        conn.writer.close()

    def _conn_has_call(self, conn: _TcpConn) -> bool:
        return any(c.peer.conn is conn for c in list(self.calls.values()) + list(self._pending.values()))

    async def _read_stream(self, reader: asyncio.StreamReader, conn: _TcpConn) -> None:
        buf = bytearray()
        loop = asyncio.get_running_loop()
        started = last_msg = loop.time()  # first byte of the pending message / last complete message
        try:
            while True:
                now = loop.time()
                if buf:  # a message has begun: it must be complete soon, however slowly the bytes drip
                    wait = started + self.settings.tcp_message_timeout_s - now
                else:
                    wait = last_msg + self.settings.tcp_idle_s - now
                if wait <= 0:
                    if buf:
                        self._bad("tcp_message_timeout", Peer(conn.proto, conn.addr, conn), bytes(buf[:16384]))
                        return
                    if not self._conn_has_call(conn):
                        log.debug("sip_tcp_idle_closed", source=conn.addr[0])
                        return
                    last_msg, wait = now, self.settings.tcp_idle_s  # a live call's connection stays up
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), wait)
                except asyncio.TimeoutError:
                    continue
                if not chunk:
                    break
                if not buf:
                    started = loop.time()
                buf += chunk
                while True:
                    while buf[:2] == b"\r\n":  # CRLF keep-alives (RFC 5626 ping)
                        del buf[:2]
                    try:
                        found = find_message_end(buf)
                    except SipParseError as exc:
                        self._bad(exc.kind, Peer(conn.proto, conn.addr, conn), None)
                        return  # framing is lost: the only safe thing is to drop the connection
                    if found is None:
                        break
                    _, total = found
                    data = bytes(buf[:total])
                    del buf[:total]
                    started = last_msg = loop.time()
                    self.on_data(data, Peer(conn.proto, conn.addr, conn), stream=True)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._drop(conn)

    def client_tls(self) -> ssl.SSLContext:
        """The context of TLS connections we open (verification per BOT_SIP_TLS_VERIFY / BOT_SIP_TLS_CA)."""
        if self._tls_client_ctx is None:
            s = self.settings
            self._tls_client_ctx = sip_tls.client_context(s.tls_ca, s.tls_verify, s.tls_cert, s.tls_key)
        return self._tls_client_ctx

    async def _stream_connect(self, peer: Peer) -> _TcpConn:
        addr = peer.addr
        conn = self._tcp_conns.get(addr)
        if conn and not conn.closed and conn.proto == peer.proto:
            return conn
        if peer.proto == "TLS":
            timeout = self.settings.tcp_message_timeout_s
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(addr[0], addr[1], ssl=self.client_tls(), server_hostname=peer.name or addr[0],
                                        ssl_handshake_timeout=timeout), timeout + 1.0)
        else:
            reader, writer = await asyncio.open_connection(addr[0], addr[1])
        conn = _TcpConn(writer, addr, peer.proto)
        self._tcp_conns[addr] = conn
        self._spawn(self._read_stream(reader, conn))
        return conn

    # Sending ----------------------------------------------------------------------------------------
    def _send(self, data: bytes, peer: Peer, unreachable: Callable[[], None] | None = None) -> None:
        """Send on the peer's connection, or a new one; `unreachable` is told when that cannot be opened."""
        if peer.proto in STREAM:
            if peer.conn is not None and not peer.conn.closed:
                transport = peer.conn.writer.transport
                if transport.get_write_buffer_size() + len(data) > TCP_MAX_WRITE_BUFFER:
                    # The peer sends requests but never reads our answers (each 400/503 copies its Vias):
                    # buffering for it would grow without bound, so the connection goes.
                    kind = "stranger_tcp_not_reading" if self.is_stranger(peer.addr[0]) else "tcp_not_reading"
                    ERRORS.labels("sip", kind).inc()
                    log.warning("sip_tcp_not_reading", source=peer.addr[0], unsent=transport.get_write_buffer_size())
                    peer.conn.closed = True
                    transport.abort()
                    return
                peer.conn.send(data)
            else:
                self._spawn(self._send_stream_new(data, peer, unreachable))
        elif self._udp is not None:
            self._udp.sendto(data, self._udp_dest(peer.addr))

    async def _send_stream_new(self, data: bytes, peer: Peer, unreachable: Callable[[], None] | None) -> None:
        """A new connection for a request (or a response whose connection is gone). One that cannot be made is
        counted, and the request fails at once as one to a peer that does not answer (RFC 3261 8.1.3.1)."""
        try:
            (await self._stream_connect(peer)).send(data)
            return
        except ssl.SSLCertVerificationError as exc:
            ERRORS.labels("sip", "tls_verify").inc()
            if self._log_due("tls_verify"):
                log.warning("sip_tls_verify_failed", dest=f"{peer.addr[0]}:{peer.addr[1]}", name=peer.name or None,
                            reason=sip_tls.reason(exc),
                            hint="the peer's certificate is not trusted for that name: check BOT_SIP_TLS_CA "
                                 "(BOT_SIP_TLS_VERIFY=0 for lab peers only)")
        except (OSError, asyncio.TimeoutError) as exc:
            kind = "tls_connect" if peer.proto == "TLS" else "tcp_connect"
            ERRORS.labels("sip", kind).inc()
            if peer.proto == "TLS" and self._log_due("tls_connect"):
                log.warning("sip_tls_connect_failed", dest=f"{peer.addr[0]}:{peer.addr[1]}",
                            reason=sip_tls.reason(exc))
        if unreachable is not None:
            unreachable()

    def respond(self, req: SipMessage, peer: Peer, status: int, to_tag: str = "", reason: str = "",
                extra: list[tuple[str, str]] | None = None, body: bytes = b"") -> SipMessage:
        resp = make_response(req, status, reason, to_tag, extra or [], body)
        resp.add("Server", self.settings.user_agent)
        if self.instance:
            resp.add(WORKER_HEADER, self.instance)
        vias = [(i, v) for i, (k, v) in enumerate(resp.headers) if k == "Via"]
        if vias and "rport" in header_params(vias[0][1]):  # RFC 3581: tell the client where we saw it
            i, v = vias[0]
            v = v.replace(";rport", f";rport={peer.addr[1]};received={peer.addr[0]}", 1) if ";rport=" not in v else v
            resp.headers[i] = ("Via", v)
        data = resp.encode()
        if req.method != "ACK":
            if not (req.method == "OPTIONS" and not req.to_tag):  # stateless keep-alives: nothing to replay
                key = tx_key(req)
                if (old := self._srv_tx.pop(key, None)) is not None:
                    self._srv_tx_bytes -= len(old.data)
                # bounded under floods (in entries and bytes): forget the oldest
                while self._srv_tx and (len(self._srv_tx) >= MAX_SERVER_TX
                                        or self._srv_tx_bytes + len(data) > MAX_SERVER_TX_BYTES):
                    self._srv_tx_bytes -= len(self._srv_tx.pop(next(iter(self._srv_tx))).data)
                self._srv_tx[key] = _TxEntry(data, peer, time.monotonic() + TX_LINGER_S)
                self._srv_tx_bytes += len(data)
        if peer.proto in STREAM and (peer.conn is None or peer.conn.closed):
            peer = self._via_peer(req, peer)
        self._send(data, peer)
        SIP_MESSAGES.labels(_m(req.method), f"sent_{status}").inc()
        return resp

    @staticmethod
    def _via_peer(req: SipMessage, peer: Peer) -> Peer:
        """The client's connection is gone: open a new one to the Via sent-by (RFC 3261 18.2.2)."""
        try:
            _, _host, port, params = parse_via(req.top_via)
        except SipParseError:
            return peer
        return Peer(peer.proto, (params.get("received") or peer.addr[0], port or DEFAULT_PORT[peer.proto]))

    def port_for(self, proto: str) -> int:
        """Our port for a transport: TLS has its own (BOT_SIP_TLS_PORT), UDP and TCP share BOT_SIP_PORT. A dialog
        routed over TLS (a proxy's `;transport=tls` Record-Route) on a server without a TLS listener names TLS's
        default port (it wrote port 0, which no peer can use): responses still come back on the connection we
        opened, but nothing can connect to us over TLS; warned once a second."""
        if proto != "TLS":
            return self.port
        if self.tls_enabled and self.tls_port:
            return self.tls_port
        if self._log_due("tls_without_listener"):
            log.warning("sip_tls_without_listener", hint="a route or target asks for TLS and BOT_SIP_TLS_PORT is 0: "
                                                         "set up a TLS listener (docs/sip.md, TLS)")
        return DEFAULT_PORT["TLS"]

    def via(self, local_ip: str, proto: str, branch: str) -> str:
        return f"SIP/2.0/{proto} {hostport(local_ip, self.port_for(proto))};branch={branch};rport"

    def contact(self, local_ip: str, proto: str, request_uri: str = "") -> str:
        """Our Contact for a transport; a sips: one when the dialog's request URI was sips: (RFC 5630 4.1)."""
        where = hostport(local_ip, self.port_for(proto))
        if proto == "TLS" and request_uri[:5].lower() == "sips:":
            return f"<sips:bot@{where}>"
        tp = {"TCP": ";transport=tcp", "TLS": ";transport=tls"}.get(proto, "")
        return f"<sip:bot@{where}{tp}>"

    def _call_contact(self, call: SipCall, proto: str) -> str:
        return self.contact(call.local_ip, proto, call.invite.uri)

    async def send_in_dialog(self, call: SipCall, method: str, extra: list[tuple[str, str]] | None = None,
                             body: bytes = b"", content_type: str = "") -> SipMessage | None:
        """Send a request inside the call's dialog and wait for its final response (None on timeout, or at once when
        no connection to the peer can be opened)."""
        call.local_cseq += 1
        branch = new_branch()
        dest = self._dest_for(call)
        req = self._dialog_request(call, method, call.local_cseq, branch, dest.proto)
        req.add("Contact", self._call_contact(call, dest.proto))
        req.add("User-Agent", self.settings.user_agent)
        for k, v in extra or []:
            req.add(k, v)
        if content_type:
            req.add("Content-Type", content_type)
        req.body = body
        return await self._client_tx(req, dest, branch)

    def _dialog_request(self, call: SipCall, method: str, cseq: int, branch: str, proto: str,
                        to: str = "") -> SipMessage:
        """A request inside the call's dialog (12.2.1.1): its Via (for the transport it goes on), From/To with the
        tags, Call-ID, CSeq, route set."""
        req = SipMessage(method=method, uri=call.remote_target)
        req.add("Via", self.via(call.local_ip, proto, branch))
        req.add("Max-Forwards", "70")
        req.add("From", call.local_uri)
        req.add("To", to or call.remote_uri)
        req.add("Call-ID", call.call_id)
        req.add("CSeq", f"{cseq} {method}")
        for r in call.route_set:
            req.add("Route", r)
        return req

    def _dest_for(self, call: SipCall) -> Peer:
        """The call's connection while it is up (TCP, TLS); else loose route -> first Route, or the remote target,
        over the transport that URI asks for (sips: or ;transport=tls -> TLS), the call's own otherwise."""
        if call.peer.proto in STREAM and call.peer.conn is not None and not call.peer.conn.closed:
            return call.peer
        uri_s = addr_uri(call.route_set[0]) if call.route_set else call.remote_target
        try:
            uri = parse_uri(uri_s)
        except SipParseError:
            return Peer(call.peer.proto, call.peer.addr)
        proto = uri_transport(uri, call.peer.proto)
        return Peer(proto, (uri.host, uri.port or DEFAULT_PORT[proto]))

    async def _client_tx(self, req: SipMessage, dest: Peer, branch: str) -> SipMessage | None:
        loop = asyncio.get_running_loop()
        tx = _ClientTx(loop.create_future())
        self._cli_tx[branch] = tx
        data = req.encode()
        SIP_MESSAGES.labels(req.method, "sent_request").inc()

        def unreachable() -> None:
            if not tx.future.done():
                tx.future.set_exception(ConnectionError("no connection to the peer"))

        self._send(data, dest, unreachable)
        deadline = time.monotonic() + 64 * T1
        interval = T1
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    ERRORS.labels("sip", f"{req.method.lower()}_timeout").inc()
                    return None
                try:
                    resp = await asyncio.wait_for(asyncio.shield(tx.future), min(interval, remaining))
                    if req.method == "INVITE" and resp.status >= 300:
                        self._ack_non_2xx(req, resp, dest)
                    return resp
                except ConnectionError:  # counted where the connection failed
                    return None
                except asyncio.TimeoutError:
                    # an INVITE is not retransmitted once the far end said it is working on it (17.1.1.2)
                    if dest.proto == "UDP" and not (req.method == "INVITE" and tx.provisional):
                        self._send(data, dest)
                    interval = T2 if tx.provisional else min(interval * 2, T2)
        finally:
            self._cli_tx.pop(branch, None)

    def ack_2xx(self, call: SipCall, resp: SipMessage) -> None:
        """ACK a 2xx answer to our in-dialog INVITE (a transaction of its own, new branch, 13.2.2.4); kept
        32 s to answer retransmissions of that 200."""
        dest = self._dest_for(call)
        ack = self._dialog_request(call, "ACK", resp.cseq[0], new_branch(), dest.proto, to=resp.get("To"))
        data = ack.encode()
        now = time.monotonic()
        for k in [k for k, (_, _, t) in self._acks.items() if t < now]:
            del self._acks[k]
        self._acks[(call.call_id, resp.cseq[0])] = (data, dest, now + TX_LINGER_S)
        self._send(data, dest)

    def _ack_non_2xx(self, req: SipMessage, resp: SipMessage, dest: Peer) -> None:
        """The INVITE client transaction ACKs a failure itself: same branch, the response's To (17.1.1.3)."""
        ack = SipMessage(method="ACK", uri=req.uri)
        ack.add("Via", req.top_via)
        ack.add("Max-Forwards", "70")
        for name in ("From", "Call-ID"):
            ack.add(name, req.get(name))
        ack.add("To", resp.get("To"))
        ack.add("CSeq", f"{req.cseq[0]} ACK")
        for r in req.get_all("Route"):
            ack.add("Route", r)
        self._send(ack.encode(), dest)

    # Receiving --------------------------------------------------------------------------------------
    def on_data(self, data: bytes, peer: Peer, stream: bool = False) -> None:
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            msg = parse_message(data, stream=stream)
        except SipParseError as exc:
            self._bad(exc.kind, peer, data)
            return
        try:
            if msg.is_request:
                self._on_request(msg, peer)
            else:
                self._on_response(msg)
        except Exception as exc:  # a bug on one message must not take the listener down
            ERRORS.labels("sip", "handler_exception").inc()
            log.error("sip_handler_exception", error=repr(exc), method=msg.method or msg.status)

    def _log_due(self, key: str) -> bool:
        """At most one log line per key per second: a flood must not become a log flood."""
        now = time.monotonic()
        if now - self._bad_logged.get(key, -10.0) < 1.0:
            return False
        self._bad_logged[key] = now
        return True

    def note_known_source(self, ip: str) -> None:
        """`ip` had a call admitted: from now on its failures are a trunk's problems, not internet noise."""
        self._known_sources.pop(ip, None)
        self._known_sources[ip] = time.monotonic()
        while len(self._known_sources) > MAX_KNOWN_SOURCES:
            del self._known_sources[next(iter(self._known_sources))]

    def is_stranger(self, ip: str) -> bool:
        """A source we have no reason to think is a trunk: outside the allowlist, or (the allowlist admitting
        the whole internet) one that has not had a call admitted in the last KNOWN_SOURCE_TTL_S."""
        if not self.allow.allows(ip):
            return True
        if not self.allow.is_open:
            return False  # the admin listed it: its junk is a real trunk's or phone's
        seen = self._known_sources.get(ip)
        return seen is None or time.monotonic() - seen > KNOWN_SOURCE_TTL_S

    def _in_live_dialog(self, call_id: str, peer: Peer) -> bool:
        if peer.conn is not None and any(c.peer.conn is peer.conn for c in self.calls.values()):
            return True
        return bool(call_id) and (any(k[0] == call_id for k in self.calls)
                                  or any(c.call_id == call_id for c in self._pending.values()))

    def _bad(self, kind: str, peer: Peer, data: bytes | None) -> None:
        """Count and log; answer 400 when the request is intact enough to route a response (8.2).

        Junk from strangers outside any dialog (internet probes, fuzzers) is counted as
        `stranger_malformed`, which does not page; a malformed message in a live call's dialog or from a
        known trunk keeps its parse kind, since a real caller's phone or trunk is misbehaving."""
        head = (data or b"").split(b"\r\n\r\n", 1)[0][:16384].decode("utf-8", errors="replace")
        lines = head.split("\r\n")
        req = SipMessage(method=(lines[0].split(" ", 1)[0] or "X")[:20], uri="sip:x")
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep and name.strip():
                try:
                    req.add(name.strip(), value.strip())
                except Exception:
                    continue
        call_id = req.get("Call-ID")[:200]
        in_dialog = self._in_live_dialog(call_id, peer)
        counted = kind if in_dialog or not self.is_stranger(peer.addr[0]) else "stranger_malformed"
        ERRORS.labels("sip", counted).inc()
        SIP_MESSAGES.labels("invalid", "bad_request").inc()
        if self._log_due(f"bad:{counted}:{kind}"):
            log.warning("sip_bad_message", kind=kind, counted_as=counted, in_dialog=in_dialog, source=peer.addr[0],
                        call_id=call_id[:80] or None, size=len(data) if data else None)
        if not data or data.startswith(b"SIP/"):
            return
        try:
            parse_via(req.top_via)
        except SipParseError:
            return
        if not all(req.get(h) for h in ("From", "To", "Call-ID", "CSeq")) or req.method == "ACK":
            return
        if not self.allow.allows(peer.addr[0]) or is_scanner(req.get("User-Agent"), req.get("From")):
            return
        resp = make_response(req, 400, f"Bad Request ({kind})")
        resp.add("Server", self.settings.user_agent)
        if self.instance:
            resp.add(WORKER_HEADER, self.instance)
        self._send(resp.encode(), peer)
        SIP_MESSAGES.labels("invalid", "sent_400").inc()

    def _refused(self, msg: SipMessage, peer: Peer, status: int, kind: str) -> None:
        """Log why a call was refused (the metric alone does not tell on-call which trunk, which call or what
        to fix); throttled like bad messages, one line per kind per second."""
        if self._log_due(f"refused:{kind}"):
            log.warning("sip_invite_refused", status=status, kind=kind, source=peer.addr[0], call_id=msg.call_id,
                        user_agent=msg.get("User-Agent")[:80], in_dialog=bool(msg.to_tag))

    def _on_response(self, msg: SipMessage) -> None:
        SIP_MESSAGES.labels(_m(msg.cseq[1]), f"response_{msg.status // 100}xx").inc()
        tx = self._cli_tx.get(msg.branch)
        if tx is None:
            acked = self._acks.get((msg.call_id, msg.cseq[0])) if msg.cseq[1] == "INVITE" else None
            if acked is not None and 200 <= msg.status < 300:  # our ACK was lost: the phone repeats its 200
                self._send(acked[0], acked[1])
            return  # stray or retransmitted response
        if msg.status < 200:
            tx.provisional = True
        elif not tx.future.done():
            tx.future.set_result(msg)

    def _on_request(self, msg: SipMessage, peer: Peer) -> None:
        method = msg.method
        if is_scanner(msg.get("User-Agent"), msg.get("From")):
            SIP_MESSAGES.labels(_m(method), "scanner").inc()
            ERRORS.labels("sip", "scanner").inc()
            if self.settings.scanner_reply == "403" and method != "ACK":
                self.respond(msg, peer, 403)
            return
        if not self.allow.allows(peer.addr[0]):
            SIP_MESSAGES.labels(_m(method), "forbidden_source").inc()
            ERRORS.labels("sip", "forbidden_source").inc()
            return  # silence: don't confirm to a prober that something listens here
        SIP_MESSAGES.labels(_m(method), "received").inc()
        cached = self._srv_tx.get(tx_key(msg))
        if cached is not None and method != "ACK":
            self._send(cached.data, peer)  # retransmitted request: repeat our last answer
            return
        if method == "ACK":
            self._on_ack(msg)
        elif method == "CANCEL":
            self._on_cancel(msg, peer)
        elif method == "OPTIONS" and not msg.to_tag:
            if not self.options_bucket.allow(peer.addr[0]):
                SIP_MESSAGES.labels("OPTIONS", "rate_limited").inc()
                if self._log_due("options_flood"):
                    log.warning("sip_options_flood", source=peer.addr[0], rate=OPTIONS_RATE, burst=OPTIONS_BURST)
                return
            self.respond(msg, peer, 200, to_tag=new_tag(), extra=self._caps())
        elif method == "INVITE" and not msg.to_tag:
            self._spawn(self._on_invite(msg, peer))
        elif method == "PRACK":
            self._on_prack(msg, peer)
        elif method in ("INVITE", "BYE", "INFO", "NOTIFY", "OPTIONS", "REFER", "UPDATE"):
            self._in_dialog(msg, peer)
        elif method in KNOWN_NOT_ALLOWED:
            self.respond(msg, peer, 405, extra=[("Allow", ALLOW)])
        else:
            self.respond(msg, peer, 501, extra=[("Allow", ALLOW)])

    def _caps(self) -> list[tuple[str, str]]:
        return [("Allow", ALLOW), ("Accept", "application/sdp, application/dtmf-relay, application/dtmf"),
                ("Supported", ", ".join(sorted(SUPPORTED)))]

    # INVITE -----------------------------------------------------------------------------------------
    def _auth_failed(self, msg: SipMessage, peer: Peer) -> None:
        """One wrong digest answer. A known trunk's failures count as `auth_failed` (its calls fail: page);
        a stranger's as `stranger_auth_failed` (password guessing hurts no caller). Too many in a row
        blocks the source (AuthFailures), logged once per block."""
        ip = peer.addr[0]
        stranger = self.is_stranger(ip)
        kind = "stranger_auth_failed" if stranger else "auth_failed"
        ERRORS.labels("sip", kind).inc()
        self._refused(msg, peer, 401, kind)
        if self.auth_failures.failed(ip):
            ERRORS.labels("sip", "stranger_auth_blocked" if stranger else "auth_blocked").inc()
            log.warning("sip_source_blocked", source=ip, known_trunk=not stranger, call_id=msg.call_id,
                        failures=self.auth_failures.limit, window_s=self.auth_failures.window_s,
                        block_s=self.auth_failures.block_s, user_agent=msg.get("User-Agent")[:80],
                        hint="wrong digest answers; its INVITEs are dropped until the block ends "
                             "(BOT_SIP_AUTH_FAIL_LIMIT / _WINDOW_S / BOT_SIP_AUTH_BLOCK_S)")

    async def _on_invite(self, msg: SipMessage, peer: Peer) -> None:
        if self.auth is not None and self.auth_failures.blocked(peer.addr[0]):
            SIP_MESSAGES.labels("INVITE", "auth_blocked").inc()
            return  # silently: a password guesser learns nothing more and costs us nothing
        if not self._accepting:
            self._refused(msg, peer, 503, "shutting_down")
            self.respond(msg, peer, 503, extra=[("Retry-After", "5")])
            return
        if not self.bucket.allow(peer.addr[0]):
            # a stranger's INVITE flood (before any credentials) hurts no caller: not a paging error
            kind = "stranger_rate_limited" if self.is_stranger(peer.addr[0]) else "rate_limited"
            ERRORS.labels("sip", kind).inc()
            self._refused(msg, peer, 503, kind)
            self.respond(msg, peer, 503, reason="Rate Limited", extra=[("Retry-After", "2")])
            return
        if self.auth is not None:
            verdict = self.auth.verify(msg.get("Authorization"), "INVITE")
            if verdict == "ok":
                self.auth_failures.succeeded(peer.addr[0])
            else:
                if verdict == "bad":
                    self._auth_failed(msg, peer)
                elif verdict == "replay":
                    # the right answer to an old challenge, sent again with a new branch: a captured INVITE
                    # replayed (a client's own retransmissions are answered from the transaction cache)
                    # from a source that never had a call: no caller is hurt, no page (as stranger_auth_failed)
                    kind = "stranger_digest_replay" if self.is_stranger(peer.addr[0]) else "digest_replay"
                    ERRORS.labels("sip", kind).inc()
                    self._refused(msg, peer, 401, kind)
                self.respond(msg, peer, 401, to_tag=new_tag(),
                             extra=[("WWW-Authenticate", self.auth.challenge(stale=verdict in ("stale", "replay")))])
                return
        required = [x.strip() for x in msg.get("Require").split(",")]
        unsupported = [o for o in required if o and o.lower() not in SUPPORTED]
        if unsupported:
            self._refused(msg, peer, 420, "unsupported_require")
            self.respond(msg, peer, 420, extra=[("Unsupported", ", ".join(unsupported))])
            return
        try:
            terms = session_timer.requested(msg)
        except session_timer.IntervalTooSmall:
            self._too_small(msg, peer)
            return
        replaced: SipCall | None = None
        if msg.get("Replaces"):
            replaced, status = self._replaced_call(msg.get("Replaces"))
            if replaced is None:  # RFC 3891 3: no confirmed dialog of ours matches (481) / early-only (486)
                kind = "replaces_no_dialog" if status == 481 else "replaces_early_only"
                ERRORS.labels("sip", kind).inc()
                self._refused(msg, peer, status, kind)
                self.respond(msg, peer, status)
                return
        if len(self.calls) + len(self._pending) >= self.settings.max_calls:
            ERRORS.labels("sip", "busy").inc()
            self._refused(msg, peer, 486, "busy")
            self.respond(msg, peer, 486)
            return
        ctype = msg.get("Content-Type").split(";")[0].strip().lower()
        late = not msg.body  # late offer (RFC 3261 13.2.1): we offer in the 200, the answer comes in the ACK
        if not late and ctype != "application/sdp":
            ERRORS.labels("sip", "unsupported_media_type").inc()
            self._refused(msg, peer, 415, "unsupported_media_type")
            self.respond(msg, peer, 415, extra=[("Accept", "application/sdp")])
            return
        offer, neg, idx = None, None, 0
        if not late:
            if (answered := self._negotiate_or_488(msg, peer)) is None:
                return
            offer, neg, idx = answered
        local_ip = self.local_ip_toward(peer.addr[0])
        tag = new_tag()
        call = SipCall(self, msg, peer, tag, local_ip)
        if replaced is not None:
            call.info.resumes = replaced.call_id  # the conversation carries on on the new leg
        self.respond(msg, peer, 100)
        self._pending[msg.branch] = call
        try:
            await call.media.open(self.media_host(peer.addr[0]), self.settings.rtp_port_min,
                                  self.settings.rtp_port_max)
        except OSError:
            ERRORS.labels("sip", "no_rtp_port").inc()
            self._refused(msg, peer, 503, "no_rtp_port")
            self._pending.pop(msg.branch, None)
            self.respond(msg, peer, 503, to_tag=tag, extra=[("Retry-After", "5")])
            return
        if call.state != "terminated":
            ringing = [("Contact", self.contact(local_ip, peer.proto, msg.uri))]
            if any(o.lower() == "100rel" for o in required):
                self._spawn(self._ring_reliably(call, msg, peer, ringing))
            else:
                self.respond(msg, peer, 180, to_tag=tag, extra=ringing)
            if self.settings.ring_s > 0:
                await asyncio.sleep(self.settings.ring_s)
        if self._pending.pop(msg.branch, None) is None or call.state == "terminated":
            call.media.close()
            return  # CANCELled while ringing
        call.sdp_session = SdpSession(local_ip)
        if neg is not None and offer is not None:
            call.media.apply(neg)
            body = call.sdp_answer(offer, neg, idx)
        else:
            body = call.sdp_offer()
            call.awaiting_answer = True
        self.calls[(call.call_id, tag)] = call
        self.note_known_source(peer.addr[0])
        call.state = "confirmed"
        ok = self.respond(msg, peer, 200, to_tag=tag, body=body,
                          extra=[("Contact", self.contact(local_ip, peer.proto, msg.uri)), ("Allow", ALLOW),
                                 ("Content-Type", "application/sdp"), *self._timer_headers(msg, terms)])
        self._spawn(self._retransmit_2xx(call, ok.encode(), peer, msg.branch))
        call.session_refreshed(terms)
        if replaced is not None and replaced.state != "terminated":
            # The new leg takes the old one's place (attended transfer, call pickup): end the old dialog.
            replaced.log.info("call_replaced", by_call_id=call.call_id, source=peer.addr[0])
            call.log.info("call_replaces", replaced_call_id=replaced.call_id)
            self._spawn(replaced.hangup("replaced"))
        if neg is not None:
            self.media_up(call)

    def _replaced_call(self, value: str) -> tuple[SipCall | None, int]:
        """The confirmed dialog a Replaces header names (RFC 3891: to-tag is our tag, from-tag the peer's),
        or None and the status to refuse with."""
        call_id, _, rest = value.partition(";")
        params = header_params(";" + rest) if rest else {}
        call = self.calls.get((call_id.strip(), params.get("to-tag", "")))
        if call is None or call.remote_tag != params.get("from-tag") or call.state != "confirmed":
            return None, 481
        if "early-only" in params:  # only an early dialog may be replaced, and ours is answered
            return None, 486
        return call, 200

    def media_up(self, call: SipCall) -> None:
        """Negotiation complete: start the call's media on the clock and hand the call to on_call."""
        neg = call.media.neg
        assert neg is not None
        self.clock.add(call.media)
        call.info.params["signalling"] = call.peer.proto.lower()  # for the call's record (`bot calls show`)
        call.info.params["media"] = "srtp" if neg.crypto is not None else "rtp"
        if call.info.leg <= 1:  # a call carried on by another process was counted when it was answered
            SIP_CALLS_ANSWERED.labels(call.peer.proto.lower(), "srtp" if neg.crypto is not None else "rtp").inc()
        call.log.info("call_answered", codec=neg.codec, dtmf_pt=neg.dtmf_pt, proto=call.peer.proto,
                      srtp=neg.crypto.suite if neg.crypto is not None else None,
                      remote=f"{neg.remote_ip}:{neg.remote_port}")
        if call.handler_task is None:
            call.handler_task = self._spawn(self._run_handler(call))

    async def _ring_reliably(self, call: SipCall, msg: SipMessage, peer: Peer, extra: list[tuple[str, str]]) -> None:
        """A caller that Requires 100rel (RFC 3262; IMS and some carriers' SBCs) gets its 180 as a reliable
        provisional response: RSeq numbered, sent again at T1, 2T1, 4T1... until its PRACK comes, the call is
        answered or ends, or 64*T1 pass. The 180 carries no SDP, so the 200 need not wait for the PRACK (3)."""
        rseq = random.randint(1, 2**31 - 1)
        call.reliable_provisional = (rseq, msg.cseq[0])
        data = self.respond(msg, peer, 180, to_tag=call.local_tag,
                            extra=[*extra, ("Require", "100rel"), ("RSeq", str(rseq))]).encode()
        # answered (the 200 supersedes it) or cancelled: no more copies; the interval doubles without a cap (3)
        if await self._resend_until(call.prack_received, data, peer, lambda: call.state != "early",
                                    SIP_MESSAGES.labels("INVITE", "retransmit_180"), cap_s=None) == "timeout":
            call.log.warning("prack_missing", waited_s=64 * T1, rseq=rseq)

    def _on_prack(self, msg: SipMessage, peer: Peer) -> None:
        """The PRACK of our reliable 180 (RFC 3262 7.2): 200, retransmissions stop; one matching no reliable
        provisional response we sent gets 481."""
        key = (msg.call_id, msg.to_tag)
        call = self.calls.get(key) or next((c for c in self._pending.values()
                                            if (c.call_id, c.local_tag) == key), None)
        rack = msg.get("RAck").split()
        pending = call.reliable_provisional if call is not None else None
        if (pending is None or len(rack) != 3 or rack[2].upper() != "INVITE"
                or (rack[0], rack[1]) != (str(pending[0]), str(pending[1]))):
            SIP_MESSAGES.labels("PRACK", "no_match").inc()
            self.respond(msg, peer, 481)
            return
        assert call is not None
        call.remote_cseq = max(call.remote_cseq, msg.cseq[0])
        call.prack_received.set()
        self.respond(msg, peer, 200)

    async def _resend_until(self, done: asyncio.Event, data: bytes, peer: Peer, over: Callable[[], bool],
                            counter: Any, cap_s: float | None = T2, udp_only: bool = False) -> str:
        """Send `data` again at T1, 2T1, 4T1... (capped at cap_s) until `done` is set ("done"), `over()` says the
        exchange no longer matters ("over"), or 64*T1 pass ("timeout")."""
        interval, waited = T1, 0.0
        while waited < 64 * T1:
            try:
                await asyncio.wait_for(done.wait(), interval)
                return "done"
            except asyncio.TimeoutError:
                waited += interval
                if over():
                    return "over"
                if not udp_only or peer.proto == "UDP":
                    self._send(data, peer)
                    counter.inc()
                interval = interval * 2 if cap_s is None else min(interval * 2, cap_s)
        return "timeout"

    async def _retransmit_2xx(self, call: SipCall, data: bytes, peer: Peer, branch: str) -> None:
        if await self._resend_until(call.acked, data, peer, lambda: call.state == "terminated",
                                    SIP_MESSAGES.labels("INVITE", "retransmit_200"), udp_only=True) != "timeout":
            return
        ERRORS.labels("sip", "no_ack").inc()
        if not call.established:
            # The caller never confirmed our 200 OK: a failed call setup, not a caller who went quiet.
            call.log.warning("call_setup_failed", reason="no_ack", waited_s=64 * T1, proto=peer.proto,
                             source=f"{peer.addr[0]}:{peer.addr[1]}", contact=self._call_contact(call, peer.proto),
                             rtp_rx=call.media.stats["rx"],
                             hint="the caller's ACK never reached us: check that our Contact address "
                                  "(BOT_SIP_PUBLIC_IP) is reachable from the trunk and no firewall/NAT drops it")
        else:
            call.log.warning("reinvite_no_ack", waited_s=64 * T1)
        await call.hangup("error:no_ack")

    async def _run_handler(self, call: SipCall) -> None:
        try:
            await self.on_call(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ERRORS.labels("sip", "handler_failed").inc()
            call.log.error("on_call_failed", error=repr(exc))
        if call.state != "terminated":
            await call.hangup("completed")

    def _on_ack(self, msg: SipMessage) -> None:
        call = self.calls.get((msg.call_id, msg.to_tag))
        if call is None:
            return
        call.acked.set()
        call.confirm()
        if call.awaiting_answer:  # late offer: the ACK carries the answer
            call.awaiting_answer = False
            try:
                neg, _ = negotiate(parse_sdp(msg.body), srtp=self._srtp_mode(call))
            except SdpError as exc:
                ERRORS.labels("sip", f"sdp_{exc.kind}").inc()
                self._spawn(call.hangup("error:bad_answer"))  # 13.3.1.4: unacceptable answer -> BYE
                return
            first = call.media.neg is None
            call.media.apply(neg)
            if first:
                self.media_up(call)
        # ACK for a non-2xx final response: absorbed (the transaction cache already answered).

    def _on_cancel(self, msg: SipMessage, peer: Peer) -> None:
        call = self._pending.pop(msg.branch, None)
        if call is None:
            answered = any(c.invite.branch == msg.branch for c in self.calls.values())
            self.respond(msg, peer, 200 if answered else 481)
            return
        self.respond(msg, peer, 200)
        self.respond(call.invite, peer, 487, to_tag=call.local_tag)
        call._finish("cancelled")

    def forget(self, call: SipCall) -> None:
        self.calls.pop((call.call_id, call.local_tag), None)

    # In-dialog requests -----------------------------------------------------------------------------
    def _in_dialog(self, msg: SipMessage, peer: Peer) -> None:
        call = self.calls.get((msg.call_id, msg.to_tag))
        if call is None and (wait := self._grace_until - time.monotonic()) > 0:
            # Just started: the dialog may be one a dead predecessor left, about to be taken over (bot/sip_recovery.py,
            # a few ms away). A 481 would end the phone's call (RFC 3261 12.2.1.2), so the request waits out the
            # grace once and is answered then; its retransmissions meanwhile are dropped.
            key = tx_key(msg)
            if key not in self._deferred:
                self._deferred.add(key)
                asyncio.get_running_loop().call_later(wait, self._undefer, key, msg, peer)
            return
        if call is None:
            SIP_MESSAGES.labels(_m(msg.method), "no_dialog").inc()
            self.respond(msg, peer, 481)
            return
        cseq = msg.cseq[0]
        if cseq <= call.remote_cseq and msg.method != "ACK":
            ERRORS.labels("sip", "cseq_out_of_order").inc()
            self.respond(msg, peer, 500, reason="CSeq Out of Order")
            return
        call.remote_cseq = cseq
        if msg.method == "BYE":
            self.respond(msg, peer, 200)
            call._finish("hangup")
        elif msg.method == "INVITE":
            self._reinvite(call, msg, peer)
        elif msg.method == "UPDATE":
            self._update(call, msg, peer)
        elif msg.method == "INFO":
            self._info(call, msg, peer)
        elif msg.method == "NOTIFY":
            self.respond(msg, peer, 200)
            call.on_notify(msg)
        elif msg.method == "OPTIONS":
            self.respond(msg, peer, 200, extra=self._caps())
        else:  # REFER from the trunk: we are the one who transfers, not the transferee
            self.respond(msg, peer, 405, extra=[("Allow", ALLOW)])

    def _undefer(self, key: tuple[str, ...], msg: SipMessage, peer: Peer) -> None:
        self._deferred.discard(key)
        try:
            self._in_dialog(msg, peer)
        except Exception as exc:  # a bug on one message must not take the listener down
            ERRORS.labels("sip", "handler_exception").inc()
            log.error("sip_handler_exception", error=repr(exc), method=msg.method)

    def _srtp_mode(self, call: SipCall | None) -> str:
        """What an offer or answer may be: BOT_SIP_SRTP, except that a call carried over SRTP stays on it (a plain
        re-offer in an encrypted call would be a downgrade anyone on the signalling path could ask for)."""
        if call is not None and call.media.srtp is not None:
            return "required"
        return self.settings.srtp

    def _negotiate_or_488(self, msg: SipMessage, peer: Peer,
                          call: SipCall | None = None) -> tuple[SessionDesc, Negotiated, int] | None:
        """Parse and negotiate the SDP offer in msg; on failure answer 488 with the reason and return None."""
        try:
            offer = parse_sdp(msg.body)
            neg, idx = negotiate(offer, srtp=self._srtp_mode(call))
        except SdpError as exc:
            ERRORS.labels("sip", f"sdp_{exc.kind}").inc()
            self._refused(msg, peer, 488, f"sdp_{exc.kind}")
            self.respond(msg, peer, 488, extra=[("Warning", f'304 voicebot "{exc.kind}"')])
            return None
        return offer, neg, idx

    def _too_small(self, msg: SipMessage, peer: Peer) -> None:
        """A Session-Expires under our minimum (RFC 4028 6): 422 with the smallest we take; the phone asks again."""
        ERRORS.labels("sip", "session_interval_too_small").inc()
        self._refused(msg, peer, 422, "session_interval_too_small")
        self.respond(msg, peer, 422, to_tag=msg.to_tag or new_tag(),
                     extra=[("Min-SE", str(session_timer.MIN_SE_S))])

    @staticmethod
    def _timer_headers(msg: SipMessage, terms: session_timer.Terms | None) -> list[tuple[str, str]]:
        """Our 2xx's part of a session timer (RFC 4028 9): the terms, and Require: timer when the phone refreshes."""
        if terms is None:
            return []
        extra = [("Session-Expires", terms.header())]
        if terms.refresher == "uac":
            extra.append(("Require", "timer"))
        return extra

    def _refresh_terms(self, call: SipCall, msg: SipMessage, peer: Peer) -> tuple[bool, session_timer.Terms | None]:
        """A re-INVITE or UPDATE is also a session refresh: (False, _) when its interval is refused (422 sent)."""
        try:
            return True, session_timer.requested(msg, default_refresher=call.session_terms.refresher
                                                 if call.session_terms else "uac")
        except session_timer.IntervalTooSmall:
            self._too_small(msg, peer)
            return False, None

    def _take_offer(self, call: SipCall, msg: SipMessage, peer: Peer) -> tuple[Negotiated, bytes] | None:
        """A new offer inside the dialog (re-INVITE or UPDATE): applied, and our answer; None when refused (488
        sent: a rejected offer leaves the old session in force, RFC 3264 8.1)."""
        if (answered := self._negotiate_or_488(msg, peer, call)) is None:
            return None
        offer, neg, idx = answered
        contact = msg.get("Contact")
        if contact:
            call.remote_target = addr_uri(contact)
        call.media.apply(neg)
        return neg, call.sdp_answer(offer, neg, idx)

    def _reinvite(self, call: SipCall, msg: SipMessage, peer: Peer) -> None:
        """Hold/resume/codec change: a new offer on the existing dialog (RFC 3264 section 8); a session refresh."""
        ok_terms, terms = self._refresh_terms(call, msg, peer)
        if not ok_terms:
            return
        timer = self._timer_headers(msg, terms)
        if not msg.body:  # offerless re-INVITE: offer again in the 200, answer in the ACK
            call.acked.clear()
            call.awaiting_answer = True
            ok = self.respond(msg, peer, 200, to_tag=call.local_tag,
                              body=call.sdp_offer(),
                              extra=[("Contact", self._call_contact(call, peer.proto)),
                                     ("Content-Type", "application/sdp"), *timer])
            self._spawn(self._retransmit_2xx(call, ok.encode(), peer, msg.branch))
            call.session_refreshed(terms)
            return
        if (got := self._take_offer(call, msg, peer)) is None:
            return
        neg, answer = got
        call.acked.clear()
        ok = self.respond(msg, peer, 200, to_tag=call.local_tag, body=answer,
                          extra=[("Contact", self._call_contact(call, peer.proto)),
                                 ("Content-Type", "application/sdp"), *timer])
        self._spawn(self._retransmit_2xx(call, ok.encode(), peer, msg.branch))
        call.session_refreshed(terms)
        call.log.info("reinvite", direction=neg.direction, codec=neg.codec)
        call.dialog_changed()

    def _update(self, call: SipCall, msg: SipMessage, peer: Peer) -> None:
        """UPDATE (RFC 3311): a session refresh without a body (what SBCs send for session timers), or a new offer
        answered at once in the 200 (no ACK: UPDATE is not an INVITE)."""
        ok_terms, terms = self._refresh_terms(call, msg, peer)
        if not ok_terms:
            return
        timer = self._timer_headers(msg, terms)
        if not msg.body:
            self.respond(msg, peer, 200, extra=[("Contact", self._call_contact(call, peer.proto)), *timer])
            call.session_refreshed(terms)
            return
        if (got := self._take_offer(call, msg, peer)) is None:
            return
        neg, answer = got
        self.respond(msg, peer, 200, body=answer, extra=[("Contact", self._call_contact(call, peer.proto)),
                                                         ("Content-Type", "application/sdp"), *timer])
        call.session_refreshed(terms)
        call.log.info("update_offer", direction=neg.direction, codec=neg.codec)
        call.dialog_changed()

    async def refresh_session(self, call: SipCall) -> bool:
        """We are the refresher (RFC 4028 10): an UPDATE without a body when the phone allows UPDATE, otherwise a
        re-INVITE offering the session as it is. True when the phone took it (the clock then restarts)."""
        terms = call.session_terms
        if terms is None:
            return True
        extra = [("Session-Expires", terms.header()), ("Supported", "timer")]
        allowed = {m.strip().upper() for m in call.invite.get("Allow").split(",")}
        for attempt in range(2):
            if call.state == "terminated":
                return True
            if "UPDATE" in allowed:
                resp = await self.send_in_dialog(call, "UPDATE", extra=extra)
            else:
                neg = call.media.neg
                offer = call.sdp_offer((neg.codec,) if neg else SUPPORTED_CODECS)
                resp = await self.send_in_dialog(call, "INVITE", extra=[*extra, ("Allow", ALLOW)], body=offer,
                                                 content_type="application/sdp")
                if resp is not None and 200 <= resp.status < 300:
                    try:
                        call.media.apply(negotiate_answer(parse_sdp(resp.body)))
                    except SdpError:
                        pass  # the session as it was goes on; the refresh itself was taken
                    self.ack_2xx(call, resp)
            if resp is not None and resp.status == 491 and attempt == 0:
                await asyncio.sleep(random.uniform(2.1, 4.0))  # glare with the phone's own request (RFC 3261 14.1)
                continue
            break
        if resp is None or resp.status >= 300:
            return False
        try:
            got = session_timer.requested(resp, default_refresher=terms.refresher)
        except session_timer.IntervalTooSmall:
            got = None
        call.session_refreshed(got or terms)
        return True

    def _info(self, call: SipCall, msg: SipMessage, peer: Peer) -> None:
        if not msg.body:
            self.respond(msg, peer, 200)  # INFO keep-alive
            return
        try:
            digit = parse_info_body(msg.get("Content-Type"), msg.body)
        except DtmfError as exc:
            ERRORS.labels("sip", exc.kind).inc()
            self.respond(msg, peer, 415, extra=[("Accept", "application/dtmf-relay, application/dtmf")])
            return
        self.respond(msg, peer, 200)  # a duplicate is still acknowledged, or the phone retransmits it
        call.info_digit(digit)
