"""SIP over TLS (telephony/sip/tls.py): real TLS, real baresip, throw-away certificates made per test.

baresip calls the bot's TLS port and hears it, the bot hangs up over the call's connection, junk on the TLS port
is counted without hurting the next call, a TLS call is carried on by another process over a new TLS connection to
the phone (verified against our CA; refused when the phone's certificate is not trusted), REGISTER goes over TLS to
a registrar (an asyncio TLS server answering as one), and bad TLS settings are one clear start-up error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from ops.metrics import ERRORS, SIP_MESSAGES
from telephony.bridge import CallBridge
from telephony.sip.call import SipCall
from telephony.sip.config import SipSettings
from telephony.sip.message import SipMessage, find_message_end, make_response, parse_message
from telephony.sip.server import SipServer

from .baresip import BARESIP, Baresip, voiced_fraction
from .certs import Pki, make_pki
from .conftest import RecordingHandler, hang_up_after_prompt, inbound_pcm, wait_until

needs_baresip = pytest.mark.skipif(BARESIP is None, reason="baresip not installed")


async def _no_calls(bridge: CallBridge) -> None:
    raise AssertionError("no call expected")


def err(kind: str) -> float:
    return ERRORS.labels("sip", kind)._value.get()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_settings(sip_settings: SipSettings, pki: Pki) -> SipSettings:
    return dataclasses.replace(sip_settings, tls_cert=str(pki.cert), tls_key=str(pki.key), tls_ca=str(pki.ca))


@pytest.fixture
def tls_server(make_server: Any) -> Any:
    """A SipServer with a TLS listener on a free port (tls_port 0 in the settings would mean none)."""
    return lambda on_call, settings: make_server(on_call, settings, tls=True)


@pytest.fixture
async def phone(tmp_path: Path, caller_wav: Path, pki: Pki) -> Any:
    """A baresip whose account speaks TLS, presenting a certificate of our test CA on its own TLS listener."""
    peers: list[Baresip] = []

    async def _start(**kw: Any) -> Baresip:
        b = Baresip(tmp_path / f"b{len(peers)}", caller_wav, transport="tls", certificate=pki.combined,
                    cafile=pki.ca, **kw)
        await b.start()
        peers.append(b)
        return b

    yield _start
    for b in peers:
        await b.stop()


async def _dial(ua: Baresip, srv: SipServer, handler: RecordingHandler) -> SipCall:
    # the account's transport is TLS: baresip adds ;transport=tls to the URI itself
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.tls_port}")
    await ua.wait_for(r"Call established", 20)
    await asyncio.wait_for(handler.new_call.wait(), 10)
    call: SipCall = handler.calls[-1]["bridge"]
    assert call.peer.proto == "TLS" and call.peer.conn is not None
    assert call.invite.top_via.startswith("SIP/2.0/TLS")
    return call


def _our_200(srv: SipServer) -> SipMessage:
    sent = [parse_message(e.data) for e in srv._srv_tx.values() if e.data.startswith(b"SIP/2.0 200")]
    return next(m for m in sent if m.cseq[1] == "INVITE")


@needs_baresip
@pytest.mark.parametrize("mediaenc", ["", "srtp-mand"])
async def test_a_call_over_tls_is_answered_heard_both_ways_and_ended_by_the_caller(
        tls_server, tls_settings, prompt_pcm, phone, mediaenc: str) -> None:
    """Also the secure set-up a trunk asks for: TLS signalling carrying the SRTP keys (SDES), audio in SRTP."""
    handler = RecordingHandler(prompt_pcm)
    srv = await tls_server(handler, tls_settings)
    ua = await phone(mediaenc=mediaenc)
    call = await _dial(ua, srv, handler)
    assert (call.media.srtp is not None) == bool(mediaenc)
    contact = _our_200(srv).get("Contact")
    assert contact.endswith(f":{srv.tls_port};transport=tls>"), contact  # in-dialog requests come back over TLS
    rec = handler.calls[0]
    await wait_until(lambda: "prompt" in rec["marks"], 15)
    await wait_until(lambda: len(rec["audio"]) > 100, 15)
    assert call.resume_state()["proto"] == "TLS"  # what a process carrying the call on reads
    await ua.send("/hangup")
    await asyncio.wait_for(handler.call_ended.wait(), 15)
    assert rec["ended"] == "hangup"
    assert voiced_fraction(inbound_pcm(rec)) > 0.15  # caller -> bot
    assert call.media.stats["rx_bad"] == 0
    await ua.stop()
    assert voiced_fraction(ua.recording("dec")) > 0.1, "baresip did not hear the bot's prompt"  # bot -> caller


@needs_baresip
async def test_the_bot_hangs_up_over_the_calls_tls_connection(tls_server, tls_settings, prompt_pcm, phone) -> None:
    handler = RecordingHandler(prompt_pcm, after_prompt=hang_up_after_prompt)
    srv = await tls_server(handler, tls_settings)
    ua = await phone()
    bye_ok = SIP_MESSAGES.labels("BYE", "response_2xx")._value.get()
    await _dial(ua, srv, handler)
    await asyncio.wait_for(handler.call_ended.wait(), 20)
    assert handler.calls[0]["ended"] == "completed"
    await ua.wait_for(r"terminated|closed", 15)
    await wait_until(lambda: SIP_MESSAGES.labels("BYE", "response_2xx")._value.get() > bye_ok, 15)  # baresip's 200


async def _junk(port: int) -> list[asyncio.StreamWriter]:
    """Plain SIP, garbage, a TLS 1.1-only client and a connection that never says anything, to the TLS port."""
    writers = []
    for data in (b"OPTIONS sip:bot@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKx\r\n\r\n",
                 b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff" + os.urandom(200), b""):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        if data:
            w.write(data)
        writers.append(w)
    old = ssl.create_default_context()
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what OpenSSL 3 no longer does by default
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1  # below our TLS 1.2 floor
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=old), 20)
    return writers


@needs_baresip
async def test_junk_on_the_tls_port_is_counted_and_the_next_call_is_served(tls_server, tls_settings, prompt_pcm,
                                                                           phone) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await tls_server(handler, dataclasses.replace(tls_settings, tcp_message_timeout_s=2.0))
    before = err("tls_handshake")
    writers = await _junk(srv.tls_port)
    # the silent one is cut off by the handshake timeout (BOT_SIP_TCP_MESSAGE_TIMEOUT_S), not left open
    await wait_until(lambda: err("tls_handshake") >= before + 4, 20)
    await wait_until(lambda: not srv._tcp_conns, 10)
    for w in writers:
        w.close()
    call = await _dial(await phone(), srv, handler)
    await wait_until(lambda: len(handler.calls[0]["audio"]) > 50, 15)
    await call.hangup("completed")
    assert err("tls_handshake") == before + 4


async def test_a_strangers_failed_handshakes_do_not_page_and_are_logged_once_a_second(tls_server,
                                                                                     tls_settings) -> None:
    """Behind an allowlist open to the internet, a source that never had a call is a stranger (a scanner)."""
    from structlog.testing import capture_logs

    srv = await tls_server(_no_calls, dataclasses.replace(tls_settings, allow="0.0.0.0/0"))
    before, known = err("stranger_tls_handshake"), err("tls_handshake")
    loop = asyncio.get_running_loop()
    started = loop.time()
    writers = []
    with capture_logs() as logs:
        for _ in range(5):
            _, w = await asyncio.open_connection("127.0.0.1", srv.tls_port)
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            writers.append(w)
        await wait_until(lambda: err("stranger_tls_handshake") == before + 5, 15)
    for w in writers:
        w.close()
    lines = [e for e in logs if e["event"] == "sip_tls_handshake_failed"]
    assert 1 <= len(lines) <= 1 + int(loop.time() - started)  # a flood is not a log flood
    assert lines[0]["counted_as"] == "stranger_tls_handshake" and lines[0]["source"] == "127.0.0.1"
    assert lines[0]["reason"] == "HTTP_REQUEST"  # says what came instead of a client hello
    assert err("tls_handshake") == known


async def test_verification_off_is_warned_at_start(tls_server, tls_settings) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        await tls_server(_no_calls, dataclasses.replace(tls_settings, tls_verify=False))
    assert [e for e in logs if e["event"] == "sip_tls_verify_off"]


async def _die(srv: SipServer) -> None:
    """What a killed process leaves: its listeners and connections gone, nobody told (tests/sip/test_resume.py)."""
    from tests.sip.test_resume import _die as die_udp_tcp

    await die_udp_tcp(srv)
    if srv._tls is not None:
        srv._tls.close()
    for conn in list(srv._tcp_conns.values()):
        conn.writer.transport.abort()
    await asyncio.sleep(0.1)


async def _tls_call_lost(tls_server: Any, tls_settings: SipSettings, prompt_pcm: Any, phone: Any
                         ) -> tuple[Baresip, dict[str, Any]]:
    handler = RecordingHandler(prompt_pcm)
    a = await tls_server(handler, tls_settings)
    ua = await phone()
    call = await _dial(ua, a, handler)
    await wait_until(lambda: "prompt" in handler.calls[0]["marks"], 15)
    snap = json.loads(json.dumps(call.resume_state()))
    assert snap["proto"] == "TLS"
    await _die(a)
    return ua, snap


@needs_baresip
async def test_a_tls_call_is_carried_on_by_another_process_over_a_new_tls_connection(
        tls_server, tls_settings, prompt_pcm, phone) -> None:
    """The phone's connection died with the process; the process carrying the call on (bot/sip_recovery.py)
    connects to the phone's Contact over TLS, verifying its certificate against BOT_SIP_TLS_CA."""
    from telephony.sip.resume import resume

    ua, snap = await _tls_call_lost(tls_server, tls_settings, prompt_pcm, phone)
    handler_b = RecordingHandler(prompt_pcm)
    b = await tls_server(handler_b, tls_settings)
    call, result = await resume(b, snap, leg=2, timeout_s=15)
    assert result == "resumed" and call is not None
    await asyncio.wait_for(handler_b.new_call.wait(), 10)
    rec = handler_b.calls[0]
    await wait_until(lambda: len(rec["audio"]) > 50, 15)  # the phone's audio reaches the new process
    await wait_until(lambda: "prompt" in rec["marks"], 15)
    await ua.send("/hangup")  # over the connection the new process opened
    await asyncio.wait_for(handler_b.call_ended.wait(), 15)
    assert rec["ended"] == "hangup"


@needs_baresip
async def test_a_phone_whose_certificate_is_not_trusted_is_not_reinvited(tls_server, tls_settings, prompt_pcm, phone,
                                                                         tmp_path: Path) -> None:
    from telephony.sip.resume import resume

    ua, snap = await _tls_call_lost(tls_server, tls_settings, prompt_pcm, phone)
    stranger_ca = make_pki(tmp_path / "other").ca
    b = await tls_server(RecordingHandler(prompt_pcm), dataclasses.replace(tls_settings, tls_ca=str(stranger_ca)))
    before = err("tls_verify")
    call, result = await resume(b, snap, leg=2, timeout_s=15)
    assert (call, result) == (None, "no_answer")  # at once, as an unreachable phone: not after the timeout
    assert err("tls_verify") == before + 1


class _TlsPeer:
    """A SIP peer over TLS for the tests (a registrar, a proxy): answers every request 200 (a REGISTER with its
    binding), and keeps what it got."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.got: list[SipMessage] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "localhost", 0, ssl=self.ctx)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        while chunk := await reader.read(65536):
            buf += chunk
            while (found := find_message_end(buf)) is not None:
                msg = parse_message(bytes(buf[:found[1]]), stream=True)
                del buf[:found[1]]
                self.got.append(msg)
                binding = [("Contact", f"{msg.get('Contact')};expires={msg.get('Expires') or '300'}")]
                writer.write(make_response(msg, 200, "", "peer", binding if msg.method == "REGISTER" else []).encode())

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def _register(settings: SipSettings, registrar: _TlsPeer) -> tuple[SipServer, int]:
    port = await registrar.start()
    srv = SipServer("127.0.0.1", 0, _no_calls, tls=True,
                    settings=dataclasses.replace(settings, registrar=f"sips:localhost:{port}", register_user="bot"))
    await srv.start()
    return srv, port


async def test_register_over_tls_names_our_tls_listener(tls_settings, pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.cert), str(pki.key))
    registrar = _TlsPeer(ctx)
    srv, _ = await _register(tls_settings, registrar)
    try:
        await wait_until(lambda: srv.registration.registered, 15)
        req = registrar.got[0]
        assert req.top_via.startswith("SIP/2.0/TLS ") and f":{srv.tls_port};" in req.top_via
        assert req.get("Contact").endswith(f":{srv.tls_port};transport=tls>")
        assert srv.registration.granted_s == 300  # our binding's expires, found by our TLS port
    finally:
        await srv.stop()
        await registrar.stop()
    assert registrar.got[-1].get("Expires") == "0"  # removed on stop, over TLS too


async def test_a_registrar_with_an_untrusted_certificate_is_not_registered_with(tls_settings, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(other.cert), str(other.key))
    registrar = _TlsPeer(ctx)
    before = err("tls_verify")
    srv, _ = await _register(tls_settings, registrar)
    try:
        await wait_until(lambda: err("tls_verify") == before + 1, 15)
        assert not srv.registration.registered and registrar.got == []
    finally:
        await srv.stop()
        await registrar.stop()


# ---- settings: one clear error at start ----

@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("BOT_SIP_TLS_PORT", "BOT_SIP_TLS_CERT", "BOT_SIP_TLS_KEY", "BOT_SIP_TLS_CA", "BOT_SIP_TLS_VERIFY",
                 "BOT_SIP_REGISTRAR", "BOT_SIP_REGISTER_USER", "BOT_SIP_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def test_tls_settings_are_checked_at_start(env: pytest.MonkeyPatch, pki: Pki, tmp_path: Path) -> None:
    from bot.config import ConfigError, validate_environment

    env.setenv("BOT_SIP_TLS_PORT", "5061")
    with pytest.raises(ConfigError, match="BOT_SIP_TLS_PORT=5061: needs BOT_SIP_TLS_CERT and BOT_SIP_TLS_KEY"):
        validate_environment()
    env.setenv("BOT_SIP_TLS_CERT", str(pki.cert))
    env.setenv("BOT_SIP_TLS_KEY", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="BOT_SIP_TLS_KEY=.*not a readable file"):
        validate_environment()
    env.setenv("BOT_SIP_TLS_KEY", str(make_pki(tmp_path / "other").key))  # another certificate's key
    with pytest.raises(ConfigError, match="not a PEM certificate chain and its private key"):
        validate_environment()
    env.setenv("BOT_SIP_TLS_KEY", str(pki.key))
    validate_environment()
    env.setenv("BOT_SIP_TLS_CA", str(pki.key))  # not a CA bundle
    with pytest.raises(ConfigError, match="BOT_SIP_TLS_CA="):
        validate_environment()
    env.setenv("BOT_SIP_TLS_CA", str(pki.ca))
    env.setenv("BOT_SIP_TLS_VERIFY", "sometimes")
    with pytest.raises(ConfigError, match="BOT_SIP_TLS_VERIFY="):
        validate_environment()
    env.setenv("BOT_SIP_TLS_VERIFY", "0")
    env.setenv("BOT_SIP_PORT", "5061")
    with pytest.raises(ConfigError, match="the same as BOT_SIP_PORT"):
        validate_environment()
    env.delenv("BOT_SIP_PORT")
    env.setenv("BOT_SIP_REGISTRAR", "sips:pbx.example.com")
    env.setenv("BOT_SIP_REGISTER_USER", "bot")
    validate_environment()
    env.setenv("BOT_SIP_TLS_PORT", "0")
    with pytest.raises(ConfigError, match="TLS registrar but BOT_SIP_TLS_PORT is 0"):
        validate_environment()


@pytest.mark.parametrize("listener", [True, False])
async def test_a_record_route_over_tls_is_followed(make_server, tls_settings, prompt_pcm, pki: Pki,
                                                   listener: bool) -> None:
    """A proxy that asks for TLS in its Record-Route (;transport=tls) gets the dialog's requests over TLS, though
    the INVITE came over UDP: our BYE goes to it on a verified TLS connection, with our TLS Via (naming our TLS
    listener, or TLS's default port without one: it named port 0)."""
    from tests.sip.test_server import RawUdp

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.cert), str(pki.key))
    proxy_tls = _TlsPeer(ctx)
    tls_port = await proxy_tls.start()
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, tls_settings, tls=listener)
    proxy = RawUdp()
    rr = f"<sip:localhost:{tls_port};transport=tls;lr>"
    sdp = b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    try:
        invite = proxy.request("INVITE", srv.port, f"Content-Type: application/sdp\r\nRecord-Route: {rr}\r\n"
                               "Contact: <sip:alice@192.0.2.55:5070>\r\n", sdp, call_id="rr-tls")
        ok = await proxy.exchange(invite, srv.port)
        assert ok is not None and ok.status == 200
        await asyncio.wait_for(handler.new_call.wait(), 10)
        call: SipCall = handler.calls[0]["bridge"]
        await call.hangup("completed")
        await wait_until(lambda: any(m.method == "BYE" for m in proxy_tls.got), 15)
        bye = next(m for m in proxy_tls.got if m.method == "BYE")
        assert bye.uri == "sip:alice@192.0.2.55:5070" and bye.get("Route") == rr
        assert bye.top_via.startswith(f"SIP/2.0/TLS 127.0.0.1:{srv.tls_port if listener else 5061};"), bye.top_via
    finally:
        proxy.close()
        await proxy_tls.stop()
