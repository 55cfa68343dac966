"""SIP on a public address: junk from strangers does not page, digest brute force is blocked per source, our
UAC fails fast when nothing listens, and TCP peers cannot hold connections (slowloris) or descriptors forever.
Real sockets throughout; loopback addresses 127.0.0.2/.3 stand in for other internet hosts."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
import re
import time

from ops.metrics import ERRORS, SIP_MESSAGES
from telephony.sip.auth import AuthFailures, DigestAuth, authorization_header, digest_response
from telephony.sip.message import SipMessage, new_branch, parse_message
from telephony.sip.sdp import SdpSession
from telephony.sip.uac import SipCaller, run_sip_call
from tests.conftest import ROOT

from .conftest import CALLER_WAV, RecordingHandler, wait_until

SDP = b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def err(kind: str) -> float:
    return ERRORS.labels("sip", kind)._value.get()


def msgs(method: str, result: str) -> float:
    return SIP_MESSAGES.labels(method, result)._value.get()


class Host:
    """A UDP socket on one loopback address (a distinct 'internet host')."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def request(self, method: str, dst: int, call_id: str, cseq: str = "", extra: str = "", body: bytes = b"",
                to_tag: str = "") -> bytes:
        to = "<sip:bot@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
        return (f"{method} sip:bot@127.0.0.1:{dst} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch={new_branch()}\r\n"
                f"From: <sip:x@{self.ip}>;tag=f1\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
                f"CSeq: {cseq or '1 ' + method}\r\nMax-Forwards: 70\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def send_recv(self, data: bytes, dst: int, timeout: float = 3.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        self.sock.sendto(data, ("127.0.0.1", dst))
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


async def read_msg(reader: asyncio.StreamReader) -> SipMessage:
    """One SIP message off a TCP stream (Content-Length framing)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(m.group(1))), 5) if m and int(m.group(1)) else b""
    return parse_message(head + body, stream=True)


def caller_from(ip: str, port: int, auth: tuple[str, str] | None) -> SipCaller:
    c = SipCaller("127.0.0.1", port, auth=auth)
    c.local_ip = ip  # dial from another loopback address: another internet host
    c.sdp = SdpSession(ip)
    return c


async def test_stranger_junk_does_not_page_but_in_dialog_junk_counts(make_server, sip_settings, prompt_pcm) -> None:
    """With a password the SIP port admits the whole internet. Malformed messages from a source that never had
    a call admitted are counted as `stranger_malformed` (excluded from ErrorRateHigh); the same junk inside a
    live call's dialog, or from a trunk that has had calls, keeps its parse kind (a real phone misbehaving)."""
    settings = dataclasses.replace(sip_settings, allow="0.0.0.0/0", user="trunk", password="s3cret")
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, settings)
    stranger, other = Host("127.0.0.2"), Host("127.0.0.3")
    base = {k: err(k) for k in ("stranger_malformed", "bad_cseq", "missing_from")}
    caller = caller_from("127.0.0.1", srv.port, ("trunk", "s3cret"))
    await caller.open()
    try:
        # internet junk before any dialog: still answered 400 where routable, but not a caller's error
        resp = await stranger.send_recv(stranger.request("OPTIONS", srv.port, "junk-1", cseq="x OPTIONS"), srv.port)
        assert resp is not None and resp.startswith(b"SIP/2.0 400")
        stranger.sock.sendto(b"\x16\x03\x01 binary junk\r\n\r\n", ("127.0.0.1", srv.port))
        await wait_until(lambda: err("stranger_malformed") >= base["stranger_malformed"] + 2, 5)
        assert err("bad_cseq") == base["bad_cseq"]

        assert await caller.invite() == 200
        # a malformed in-dialog request (no From) naming the live call: counted under its parse kind even
        # though it comes from an address that never had a call of its own
        bad = other.request("INFO", srv.port, caller.call_id, to_tag=caller.to_tag).replace(b"From: ", b"Frm: ")
        await other.send_recv(bad, srv.port, 1.0)
        await wait_until(lambda: err("missing_from") >= base["missing_from"] + 1, 5)
        # the caller's own address is now a known trunk: its junk outside a dialog counts too
        raw_known = Host("127.0.0.1")
        try:
            await raw_known.send_recv(raw_known.request("OPTIONS", srv.port, "k-1", cseq="y OPTIONS"), srv.port, 1.0)
        finally:
            raw_known.close()
        await wait_until(lambda: err("bad_cseq") >= base["bad_cseq"] + 1, 5)
        assert err("stranger_malformed") == base["stranger_malformed"] + 2
        assert caller.answered.is_set() and not caller.ended.is_set()  # the call never noticed
        assert await caller.bye() == 200
    finally:
        caller.close()
        stranger.close()
        other.close()


async def test_explicit_allowlist_keeps_parse_kinds(make_server, sip_settings, prompt_pcm) -> None:
    """An admin-listed source is a trunk, not a stranger: its junk counts under the parse kind."""
    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)  # allow=127.0.0.0/8
    host = Host("127.0.0.2")
    before, stranger_before = err("bad_cseq"), err("stranger_malformed")
    try:
        resp = await host.send_recv(host.request("OPTIONS", srv.port, "e-1", cseq="z OPTIONS"), srv.port)
        assert resp is not None and resp.startswith(b"SIP/2.0 400")
        assert err("bad_cseq") == before + 1 and err("stranger_malformed") == stranger_before
    finally:
        host.close()


async def test_digest_brute_force_blocks_only_that_source(make_server, sip_settings, prompt_pcm) -> None:
    """5 wrong answers from one source within the window: its INVITEs are dropped silently (counted, logged
    once); a trunk on another address with the right password is not affected, and a trunk that has had
    calls counts its own wrong password as `auth_failed` (its calls fail: that may page)."""
    settings = dataclasses.replace(sip_settings, allow="0.0.0.0/0", user="trunk", password="s3cret",
                                   auth_fail_limit=5, auth_fail_window_s=120, auth_block_s=300)
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, settings)
    base = {k: err(k) for k in ("stranger_auth_failed", "stranger_auth_blocked", "auth_failed", "auth_blocked")}
    dropped0 = msgs("INVITE", "auth_blocked")
    for _ in range(5):
        guesser = caller_from("127.0.0.2", srv.port, ("trunk", "guess"))
        await guesser.open()
        try:
            assert await guesser.invite(no_response_s=3) == 401
        finally:
            guesser.close()
    assert err("stranger_auth_failed") == base["stranger_auth_failed"] + 5
    assert err("stranger_auth_blocked") == base["stranger_auth_blocked"] + 1
    guesser = caller_from("127.0.0.2", srv.port, ("trunk", "s3cret"))  # even the right password, now
    await guesser.open()
    try:
        assert await guesser.invite(no_response_s=1.5) == 408  # silence: nothing learnt
    finally:
        guesser.close()
    assert msgs("INVITE", "auth_blocked") >= dropped0 + 1
    assert err("stranger_auth_blocked") == base["stranger_auth_blocked"] + 1  # one block, one count

    trunk = caller_from("127.0.0.1", srv.port, ("trunk", "s3cret"))
    await trunk.open()
    try:
        assert await trunk.invite() == 200
        assert await trunk.bye() == 200
    finally:
        trunk.close()
    wrong = caller_from("127.0.0.1", srv.port, ("trunk", "old-password"))
    await wrong.open()
    try:
        assert await wrong.invite() == 401
    finally:
        wrong.close()
    assert err("auth_failed") == base["auth_failed"] + 1  # a known trunk: one per attempt
    assert err("stranger_auth_failed") == base["stranger_auth_failed"] + 5


async def _recv(host: Host, timeout: float = 3.0) -> bytes | None:
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(host.sock, 65536), timeout)
    except asyncio.TimeoutError:
        return None


async def test_a_replayed_digest_answer_is_challenged_again(make_server, sip_settings, prompt_pcm) -> None:
    """A captured INVITE's Authorization header sent again (new branch, so not a retransmission) while its nonce
    lives used to place a call: nonce counts were not tracked. It is now challenged again (401, stale=true) and
    counted as `digest_replay` (`stranger_digest_replay` from a source that never had a call, which pages no one);
    the same nonce with the next count (a client reusing its nonce) is accepted."""
    settings = dataclasses.replace(sip_settings, allow="127.0.0.0/8", user="trunk", password="s3cret")
    srv = await make_server(RecordingHandler(prompt_pcm), settings)
    host = Host("127.0.0.3")
    replays = err("digest_replay") + err("stranger_digest_replay")
    uri = f"sip:bot@127.0.0.1:{srv.port}"

    def invite(call_id: str, authorization: str) -> bytes:
        return host.request("INVITE", srv.port, call_id, extra=f"Authorization: {authorization}\r\n"
                            "Content-Type: application/sdp\r\n", body=SDP)

    def answer(challenge: str, nc: str, cnonce: str) -> str:
        p = {k: v for k, v in (x.split("=", 1) for x in re.findall(r'(\w+="[^"]*"|\w+=[^,\s]+)', challenge))}
        nonce = p["nonce"].strip('"')
        resp = digest_response("MD5", "trunk", "voicebot", "s3cret", "INVITE", uri, nonce, "auth", nc, cnonce)
        return (f'Digest username="trunk", realm="voicebot", nonce="{nonce}", uri="{uri}", response="{resp}", '
                f'algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}"')

    async def first_answer(data: bytes, call_id: str) -> bytes:
        """The first response to this call's INVITE (the earlier calls' 180/200 arrive on the same socket)."""
        got = await host.send_recv(data, srv.port)
        while got is not None and f"Call-ID: {call_id}\r\n".encode() not in got:
            got = await _recv(host)
        assert got is not None, f"no answer to {call_id}"
        return got

    try:
        first = await first_answer(host.request("INVITE", srv.port, "replay-0", body=SDP), "replay-0")
        assert first.startswith(b"SIP/2.0 401"), first
        challenge = parse_message(first).get("WWW-Authenticate")
        captured = answer(challenge, "00000001", "c0ffee")
        ok = await first_answer(invite("replay-1", captured), "replay-1")
        assert ok.startswith(b"SIP/2.0 100"), ok
        replayed = await first_answer(invite("replay-2", captured), "replay-2")
        assert replayed.startswith(b"SIP/2.0 401"), replayed
        assert "stale=true" in parse_message(replayed).get("WWW-Authenticate")
        assert err("digest_replay") + err("stranger_digest_replay") == replays + 1
        following = await first_answer(invite("replay-3", answer(challenge, "00000002", "c0ffee")), "replay-3")
        assert following.startswith(b"SIP/2.0 100"), following
    finally:
        host.close()


def test_auth_failures_window_block_expiry_and_bounds() -> None:
    f = AuthFailures(limit=3, window_s=60, block_s=100, max_sources=50)
    assert not f.failed("a", now=0) and not f.failed("a", now=70)
    assert not f.failed("a", now=75)  # the first one fell out of the window: 2 in it
    assert f.failed("a", now=80) and f.blocked("a", now=81) and not f.blocked("b", now=81)
    assert not f.blocked("a", now=181)  # the block ends
    f.failed("c", now=0)
    f.succeeded("c")  # a good answer forgets earlier mistakes
    assert not f.failed("c", now=1) and not f.failed("c", now=2)
    for i in range(500):  # a distributed guesser cannot grow the tables without bound
        f.failed(f"10.0.{i // 250}.{i % 250}", now=200 + i * 0.01)
    assert len(f._fails) <= 51 and len(f._blocked) <= 51
    assert not AuthFailures(limit=0).failed("x")  # 0 disables


def test_right_password_on_a_foreign_nonce_is_stale_not_bad() -> None:
    """A nonce signed by another process (before a restart, another instance behind the proxy) with the right
    password is re-challenged with stale=true (RFC 2617 3.2.1), not counted as a failed login."""
    mine, other = DigestAuth("trunk", "pw"), DigestAuth("trunk", "pw")
    hdr = authorization_header(other.challenge(), "trunk", "pw", "INVITE", "sip:bot@h")
    assert mine.verify(hdr, "INVITE") == "stale"
    assert other.verify(hdr, "INVITE") == "ok"
    assert mine.verify(authorization_header(other.challenge(), "trunk", "nope", "INVITE", "sip:bot@h"),
                       "INVITE") == "bad"
    resp = digest_response("MD5", "trunk", "voicebot", "pw", "INVITE", "sip:bot@h", "garbage")
    forged = (f'Digest username="trunk", realm="voicebot", nonce="garbage", uri="sip:bot@h", '
              f'response="{resp}", algorithm=MD5')
    assert mine.verify(forged, "INVITE") == "stale"  # re-challenged: a fresh nonce is still required


async def test_uac_fails_fast_when_nothing_listens() -> None:
    """ICMP port unreachable -> 503 at once with a reason, not 408 after 32 s of retransmissions."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    summary = await run_sip_call("127.0.0.1", port, [], None)
    assert time.monotonic() - t0 < 5
    assert summary["status"] == 503 and not summary["answered"]
    assert "nothing is listening" in summary["error"] and str(port) in summary["error"]


async def test_uac_gives_up_on_a_silent_server() -> None:
    """A port that swallows everything (firewall drop): 408 after no_response_s, with a reason."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    caller = SipCaller("127.0.0.1", silent.getsockname()[1])
    await caller.open()
    try:
        t0 = time.monotonic()
        assert await caller.invite(no_response_s=1.5) == 408
        assert time.monotonic() - t0 < 10
        assert "no answer" in caller.error and "100 Trying" in caller.error
    finally:
        caller.close()
        silent.close()


async def test_bot_call_sip_cli_nothing_listening() -> None:
    """`bot call --sip sip:bot@127.0.0.1:PORT` with nothing there: exit 1 within seconds, a clear message."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "call", "--sip", f"sip:bot@127.0.0.1:{port}", str(CALLER_WAV),
        cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "nothing is listening" in stderr.decode()
    assert time.monotonic() - t0 < 30  # interpreter start-up on a busy box; the call itself fails at once


async def test_tcp_slowloris_is_cut_off_and_others_served(make_server, sip_settings, prompt_pcm) -> None:
    """A peer dripping one byte at a time never completes a message: the connection is closed after
    tcp_message_timeout_s and counted; a normal TCP peer meanwhile gets its answers."""
    settings = dataclasses.replace(sip_settings, tcp_message_timeout_s=1.5)
    srv = await make_server(RecordingHandler(prompt_pcm), settings)
    before = err("tcp_message_timeout")
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    host = Host("127.0.0.1")
    closed_after = None
    t0 = time.monotonic()
    try:
        payload = host.request("OPTIONS", srv.port, "slow-1").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
        for i in range(len(payload)):
            try:
                writer.write(payload[i:i + 1])
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof():
                break
            try:
                if await asyncio.wait_for(reader.read(4096), 0.25) == b"":
                    break
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - t0 > 20:
                break
        closed_after = time.monotonic() - t0
        assert closed_after < 20, "the slow connection was never cut off"
        assert err("tcp_message_timeout") == before + 1
        assert not srv._tcp_conns
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            w2.write(host.request("OPTIONS", srv.port, "fast-1").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
            resp = await read_msg(r2)
            assert resp.status == 200 and resp.call_id == "fast-1"
        finally:
            w2.close()
    finally:
        writer.close()
        host.close()


async def test_tcp_idle_closed_unless_it_carries_a_call(make_server, sip_settings, prompt_pcm) -> None:
    """An idle connection without a call is closed after tcp_idle_s; one that carries a call stays open
    (the bot must be able to send the BYE on it) and the caller's BYE on it is answered."""
    settings = dataclasses.replace(sip_settings, tcp_idle_s=1.0)
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, settings)
    host = Host("127.0.0.1")
    r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
    w1 = None
    try:
        invite = host.request("INVITE", srv.port, "tcp-call", extra="Content-Type: application/sdp\r\n"
                              "Contact: <sip:x@127.0.0.1;transport=tcp>\r\n", body=SDP)
        w2.write(invite.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
        ok = await read_msg(r2)
        while ok.status < 200:
            ok = await read_msg(r2)
        assert ok.status == 200
        ack = host.request("ACK", srv.port, "tcp-call", to_tag=ok.to_tag)
        w2.write(ack.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
        await wait_until(lambda: bool(handler.calls), 5)
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await asyncio.wait_for(r1.read(100), 10) == b""  # idle, no call: closed by the server
        await asyncio.sleep(2.0)  # three idle periods: the call's connection must survive them
        assert srv.calls
        bye = host.request("BYE", srv.port, "tcp-call", cseq="2 BYE", to_tag=ok.to_tag)
        w2.write(bye.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
        resp = await read_msg(r2)
        while resp.cseq[1] != "BYE":  # skip any 200 OK retransmission
            resp = await read_msg(r2)
        assert resp.status == 200
        await asyncio.wait_for(handler.call_ended.wait(), 5)
    finally:
        if w1 is not None:
            w1.close()
        w2.close()
        host.close()


async def test_tcp_connections_capped_per_source(make_server, sip_settings, prompt_pcm) -> None:
    """One source cannot take every descriptor: past the per-source cap new connections are closed at once
    and counted; another source still connects and is served."""
    from telephony.sip.server import TCP_MAX_CONNS_PER_SOURCE

    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    before = err("tcp_refused")
    conns = []
    try:
        for _ in range(TCP_MAX_CONNS_PER_SOURCE):
            conns.append(await asyncio.open_connection("127.0.0.1", srv.port))
        await wait_until(lambda: len(srv._tcp_conns) == TCP_MAX_CONNS_PER_SOURCE, 5)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        conns.append((r, w))
        assert await asyncio.wait_for(r.read(100), 5) == b""
        assert err("tcp_refused") == before + 1
        r3, w3 = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=("127.0.0.2", 0))
        conns.append((r3, w3))
        host = Host("127.0.0.2")
        try:
            w3.write(host.request("OPTIONS", srv.port, "cap-1").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
            resp = await read_msg(r3)
            assert resp.status == 200
        finally:
            host.close()
    finally:
        for _, w in conns:
            w.close()


async def test_invite_flood_many_call_ids_stays_bounded(make_server, sip_settings, prompt_pcm) -> None:
    """Hundreds of INVITEs with distinct Call-IDs and 150 Vias each (refused 488: G.729 only): every refusal is
    cached for retransmissions with all its Vias, so the cache's byte count must be exact and bounded, no call
    is left behind, and a legitimate call still gets through."""
    from telephony.sip.server import MAX_SERVER_TX_BYTES

    settings = dataclasses.replace(sip_settings, invite_rate=1000, invite_burst=1000)
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, settings)
    host = Host("127.0.0.2")
    vias = "".join(f"Via: SIP/2.0/UDP 10.0.{i // 200}.{i % 200}:5060;branch=z9hG4bK{i:08d}\r\n" for i in range(150))
    try:
        for i in range(300):
            data = host.request("INVITE", srv.port, f"flood-{i}", extra=f"Content-Type: application/sdp\r\n{vias}",
                                body=SDP.replace(b"RTP/AVP 0", b"RTP/AVP 18"))
            host.sock.sendto(data, ("127.0.0.1", srv.port))
            if i % 10 == 0:
                await asyncio.sleep(0.05)  # the kernel drops what the socket buffer cannot hold
        await wait_until(lambda: len(srv._srv_tx) >= 100, 10)
        await asyncio.sleep(0.5)
        assert not srv.calls and not srv._pending
        assert len(srv._srv_tx) * 8000 < srv._srv_tx_bytes == sum(len(e.data) for e in srv._srv_tx.values()) <= MAX_SERVER_TX_BYTES
    finally:
        host.close()
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        assert await caller.bye() == 200
    finally:
        caller.close()


async def test_options_flood_is_limited_per_source(make_server, sip_settings, prompt_pcm) -> None:
    """Hundreds of OPTIONS from one host: past the per-source burst they are dropped (counted), a live call
    keeps its media, and another host's keep-alive is still answered."""
    from telephony.sip.server import OPTIONS_BURST

    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    flooder, trunk = Host("127.0.0.2"), Host("127.0.0.3")
    dropped0 = msgs("OPTIONS", "rate_limited")
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        for i in range(300):
            flooder.sock.sendto(flooder.request("OPTIONS", srv.port, f"o-{i}"), ("127.0.0.1", srv.port))
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        await wait_until(lambda: msgs("OPTIONS", "rate_limited") >= dropped0 + 100, 10)
        answered = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(loop.sock_recv(flooder.sock, 65536), 0.5)
                answered += 1
            except asyncio.TimeoutError:
                break
        assert answered <= OPTIONS_BURST + 40  # the burst plus what the rate refilled while we sent
        resp = await trunk.send_recv(trunk.request("OPTIONS", srv.port, "keepalive"), srv.port)
        assert resp is not None and parse_message(resp).status == 200
        rx0 = caller.stats.rx_packets
        await asyncio.sleep(1.0)
        assert caller.stats.rx_packets - rx0 >= 25  # the bot's media kept flowing (50 packets/s)
        assert await caller.bye() == 200
    finally:
        caller.close()
        flooder.close()
        trunk.close()


async def test_stranger_invite_flood_rate_limited_without_paging(make_server, sip_settings, prompt_pcm) -> None:
    """An unauthenticated INVITE flood from a stranger gets 503s past the bucket, counted as
    `stranger_rate_limited` (excluded from the page), not `rate_limited`."""
    settings = dataclasses.replace(sip_settings, allow="0.0.0.0/0", user="trunk", password="s3cret",
                                   invite_rate=0.01, invite_burst=2)
    srv = await make_server(RecordingHandler(prompt_pcm), settings)
    host = Host("127.0.0.2")
    before, paging_before = err("stranger_rate_limited"), err("rate_limited")
    try:
        codes = []
        for i in range(4):
            resp = await host.send_recv(host.request("INVITE", srv.port, f"fl-{i}"), srv.port)
            assert resp is not None
            codes.append(parse_message(resp).status)
        assert codes == [401, 401, 503, 503]
        assert err("stranger_rate_limited") == before + 2 and err("rate_limited") == paging_before
    finally:
        host.close()


def test_folded_header_cannot_exceed_the_line_limit() -> None:
    """Thousands of short continuation lines used to unfold into one 48 KB header the per-line limit refuses."""
    import pytest

    from telephony.sip.message import SipParseError

    base = (b"OPTIONS sip:bot@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n"
            b"From: <sip:a@b>;tag=1\r\nTo: <sip:bot@c>\r\nCall-ID: f1\r\nCSeq: 1 OPTIONS\r\n")
    with pytest.raises(SipParseError) as exc:
        parse_message(base + b"Subject: x\r\n" + b" y\r\n" * 12000 + b"\r\n")
    assert exc.value.kind == "header_too_long"
    ok = parse_message(base + b"Subject: x\r\n" + b" y\r\n" * 100 + b"\r\n")  # ordinary folding still works
    assert ok.get("Subject").startswith("x y y")


async def test_tcp_peer_that_never_reads_is_dropped(make_server, sip_settings, prompt_pcm) -> None:
    """A TCP peer streams malformed requests with long Via lists (each answered 400 with all its Vias) and
    never reads: the unsent answers must not pile up in our memory; the connection is dropped and counted."""
    from telephony.sip.server import TCP_MAX_WRITE_BUFFER

    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    before = err("tcp_not_reading")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffer fills
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", srv.port))
    vias = "".join(f"Via: SIP/2.0/TCP 10.0.0.{i}:5060;branch=z9hG4bK{i:06d}\r\n" for i in range(150))
    host = Host("127.0.0.1")
    req = host.request("OPTIONS", srv.port, "nr-1", cseq="x OPTIONS", extra=vias).replace(b"SIP/2.0/UDP",
                                                                                         b"SIP/2.0/TCP")
    sent = 0
    try:
        while err("tcp_not_reading") == before and sent < 40 * TCP_MAX_WRITE_BUFFER:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, req * 10), 5)
            except (ConnectionError, asyncio.TimeoutError):
                break  # the server dropped us (or stopped reading from us)
            sent += 10 * len(req)
        await wait_until(lambda: err("tcp_not_reading") == before + 1, 10)
        await wait_until(lambda: not srv._tcp_conns, 5)
        for conn in srv._tcp_conns.values():
            assert conn.writer.transport.get_write_buffer_size() <= TCP_MAX_WRITE_BUFFER
    finally:
        sock.close()
        host.close()
