"""A SIP call carried on by another process after the one that answered it died (telephony/sip/resume.py).

Server A answers our UAC and then "dies" (its sockets close, no BYE is sent: what SIGKILL leaves); server B binds
the same SIP port, rebuilds the call from A's `resume_state()` and re-INVITEs the phone. Real UDP, real RTP.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from telephony.sip.call import SipCall
from telephony.sip.resume import resume
from telephony.sip.server import SipServer
from telephony.sip.uac import SipCaller
from tests.sip.conftest import RecordingHandler, inbound_pcm, wait_until
from tests.sip.test_server import voiced_fraction

TONE = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)


async def _die(srv: SipServer) -> None:
    """What a killed process leaves: its sockets gone, its calls silent, nobody told."""
    for call in list(srv.calls.values()):
        srv.clock.discard(call.media)
        call.media.close()
    srv.calls.clear()
    for t in list(srv._tasks):
        t.cancel()
    if srv._janitor:
        srv._janitor.cancel()
    await srv.clock.stop()
    if srv._udp:
        srv._udp.close()
    if srv._tcp:
        srv._tcp.close()
        await srv._tcp.wait_closed()
    await asyncio.sleep(0.05)  # transports close on the loop's next turns


async def _replaced(a: SipServer, sip_settings: Any, prompt_pcm: np.ndarray,
                    grace_s: float = 0.0, instance: str = "") -> tuple[SipServer, RecordingHandler]:
    """A dies; B (a new process, as the restarted worker 0) binds the same SIP port."""
    await _die(a)
    handler = RecordingHandler(prompt_pcm)
    b = SipServer("127.0.0.1", a.port, handler, sip_settings, unknown_dialog_grace_s=grace_s, instance=instance)
    await b.start()
    return b, handler


async def _answered(make_server: Any, sip_settings: Any, prompt_pcm: np.ndarray) -> tuple[SipServer, SipCaller, dict[str, Any]]:
    handler = RecordingHandler(prompt_pcm)
    a = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", a.port, codecs=("PCMA",))
    await caller.open()
    assert await caller.invite() == 200
    await asyncio.wait_for(handler.new_call.wait(), 5)
    call: SipCall = handler.calls[0]["bridge"]
    await wait_until(lambda: call.established, 5)
    snap = call.resume_state()
    assert snap is not None
    return a, caller, json.loads(json.dumps(snap))  # as kept in Redis


async def _listed_calls(callers: list[SipCaller], handler: RecordingHandler, store: Any) -> list[str]:
    """Each caller dials in; its call is recorded in Redis by `store` and listed as resumable, as the bot does."""
    ids: list[str] = []
    for c in callers:
        await c.open()
        assert await c.invite() == 200
        await wait_until(lambda: len(handler.calls) == len(ids) + 1, 5)
        call: SipCall = handler.calls[-1]["bridge"]
        store.start_call(call.call_id, "sip", "caller", "bot", "1")
        store.keep_resumable(call.call_id, call.resume_state() or {})
        ids.append(call.call_id)
    await store.flush()
    return ids


async def test_restarted_process_reinvites_the_phone_and_the_call_goes_on(make_server, sip_settings,
                                                                           prompt_pcm) -> None:
    a, caller, snap = await _answered(make_server, sip_settings, prompt_pcm)
    try:
        await caller.wait_bot_quiet(0.3, 5)
        old_port = caller.media.remote
        old_ssrc = caller.media._remote_ssrc
        heard_before = len(caller.recording)
        b, handler_b = await _replaced(a, sip_settings, prompt_pcm)
        try:
            call, result = await resume(b, snap, leg=2)
            assert result == "resumed" and call is not None
            assert call.info.leg == 2 and call.call_id == caller.call_id
            assert len(caller.reinvites) == 1
            assert caller.media.remote != old_port  # the phone's audio now goes to the new process's port
            await asyncio.wait_for(handler_b.new_call.wait(), 5)
            assert handler_b.calls[0]["bridge"] is call
            await caller.play(TONE, "after")  # the caller is heard by the new process ...
            await caller.wait_bot_quiet(0.5, 8)
            assert voiced_fraction(inbound_pcm(handler_b.calls[0]), 1000) > 0.1
            # ... and hears it (the prompt handler B plays on the resumed call)
            assert voiced_fraction(np.concatenate(caller.recording[heard_before:])) > 0.05
            assert call.state == "confirmed" and call.established and not call.on_hold
            assert caller.media._remote_ssrc == old_ssrc  # the same RTP stream goes on (after a gap)
            assert await caller.bye() == 200  # the phone's BYE ends the call in the new process
            await asyncio.wait_for(handler_b.call_ended.wait(), 5)
            assert handler_b.calls[0]["ended"] == "hangup"
        finally:
            await b.stop()
    finally:
        caller.close()


async def test_a_process_on_another_host_carries_the_call_on_and_the_phone_follows_it(make_server, sip_settings,
                                                                                       prompt_pcm) -> None:
    """The call is re-INVITEd from another address (a peer host's SIP server, bot/sip_recovery.py): the phone takes
    the re-INVITE from there, its audio and its BYE go there (the re-INVITE's Contact is its new remote target)."""
    handler_a = RecordingHandler(prompt_pcm)
    a = await make_server(handler_a, sip_settings)
    caller = SipCaller("127.0.0.1", a.port, codecs=("PCMA",), follow_moves=True)
    await caller.open()
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler_a.new_call.wait(), 5)
        call_a: SipCall = handler_a.calls[0]["bridge"]
        await wait_until(lambda: call_a.established, 5)
        snap = json.loads(json.dumps(call_a.resume_state()))
        await caller.wait_bot_quiet(0.3, 5)
        await _die(a)
        handler_b = RecordingHandler(prompt_pcm)
        b = await make_server(handler_b, sip_settings)
        assert b.port != a.port
        call, result = await resume(b, snap, leg=2)
        assert result == "resumed" and call is not None
        assert caller.remote_target.endswith(f":{b.port}") and len(caller.reinvites) == 1
        await caller.play(TONE, "after")
        await caller.wait_bot_quiet(0.5, 8)
        assert voiced_fraction(inbound_pcm(handler_b.calls[0]), 1000) > 0.1  # heard by the other host
        assert await caller.bye() == 200  # answered by the other host: A is gone
        await asyncio.wait_for(handler_b.call_ended.wait(), 5)
        assert handler_b.calls[0]["ended"] == "hangup"
    finally:
        caller.close()


async def test_a_phone_that_hung_up_answers_481_and_nothing_is_left(make_server, sip_settings, prompt_pcm) -> None:
    a, caller, snap = await _answered(make_server, sip_settings, prompt_pcm)
    try:
        caller.refuse_reinvite = 481
        b, handler_b = await _replaced(a, sip_settings, prompt_pcm)
        try:
            call, result = await resume(b, snap, leg=2)
            assert (call, result) == (None, "gone")
            assert not b.calls and not handler_b.calls
        finally:
            await b.stop()
    finally:
        caller.close()


async def test_no_answer_and_unreadable_snapshots(make_server, sip_settings, prompt_pcm) -> None:
    a, caller, snap = await _answered(make_server, sip_settings, prompt_pcm)
    caller.close()  # the phone is gone without a word
    b, _ = await _replaced(a, sip_settings, prompt_pcm)
    try:
        assert await resume(b, snap, leg=2, timeout_s=1.5) == (None, "no_answer")
        assert not b.calls
        for bad in ({**snap, "v": 99}, {**snap, "invite": "garbage"}, {k: v for k, v in snap.items() if k != "peer"}):
            assert await resume(b, bad, leg=2) == (None, "unreadable")
    finally:
        await b.stop()


async def test_resume_state_follows_a_reinvite(make_server, sip_settings, prompt_pcm) -> None:
    """The phone moves its media (re-INVITE): the kept copy is told, so a takeover offers to the right place."""
    a, caller, _snap = await _answered(make_server, sip_settings, prompt_pcm)
    try:
        call: SipCall = next(iter(a.calls.values()))
        seen: list[dict[str, Any]] = []
        call.on_dialog_change = seen.append
        assert await caller.reinvite(codecs=("PCMU",)) == 200
        assert seen and seen[-1]["codec"] == "PCMU" and seen[-1]["remote_cseq"] == caller.cseq
    finally:
        caller.close()


async def test_a_restarted_worker_takes_over_its_predecessors_sip_calls(make_server, sip_settings, prompt_pcm,
                                                                         redis_url: str) -> None:
    """bot/sip_recovery.py against Redis: of four calls a dead process of worker id w0 left listed, the one still
    `active` is closed `worker_lost` and re-INVITEd (leg 2), the one the bot was hanging up and the one lost too
    long ago get a BYE, the one that ended normally is left alone; the list is emptied."""
    import redis.asyncio as aioredis

    from bot.sip_recovery import resume_lost_calls
    from bot.state import CallStore, call_key, resumable_key
    from tests.helpers.server import isolated_redis_url

    url = isolated_redis_url(redis_url)
    r = aioredis.from_url(url, decode_responses=True)
    await r.flushdb()
    handler_a = RecordingHandler(prompt_pcm)
    a = await make_server(handler_a, sip_settings)
    dead = CallStore(aioredis.from_url(url, decode_responses=True), worker="w0", ttl_s=3600)
    dead.pid = 4_000_000  # the process that "died"
    await dead.start()
    callers = [SipCaller("127.0.0.1", a.port) for _ in range(4)]
    try:
        ids = await _listed_calls(callers, handler_a, dead)
        live, ending, stale, done = ids
        await r.hset(call_key(ending), mapping={"ending": "goodbye"})
        now = float((await r.time())[0])
        await r.hset(call_key(stale), mapping={"status": "ended", "outcome": "worker_lost", "ended_at": now - 600})
        await r.hset(call_key(done), mapping={"status": "ended", "outcome": "caller_hangup", "ended_at": now})
        b, handler_b = await _replaced(a, sip_settings, prompt_pcm)
        store = CallStore(aioredis.from_url(url, decode_responses=True), worker="w0", ttl_s=3600)
        await store.start()
        try:
            got = await resume_lost_calls(store, b, window_s=60, ttl_s=3600)
            assert got == {live: "resumed", ending: "hung_up", stale: "hung_up", done: "ended"}, got
            assert await r.zcard(resumable_key("w0")) == 0
            rec = await r.hgetall(call_key(live))
            assert rec["outcome"] == "worker_lost" and rec["reaped_by"] == "w0-sip-resume", rec
            await asyncio.wait_for(handler_b.new_call.wait(), 5)
            assert [c["bridge"].call_id for c in handler_b.calls] == [live]
            assert handler_b.calls[0]["bridge"].info.leg == 2
            by_id = dict(zip(ids, callers))
            assert by_id[live].reinvites and not by_id[live].ended.is_set()
            for cid in (ending, stale):  # released with a BYE, never re-INVITEd
                await asyncio.wait_for(by_id[cid].ended.wait(), 5)
                assert by_id[cid].hangup_by == "bot" and not by_id[cid].reinvites
            assert not by_id[done].ended.is_set() and not by_id[done].reinvites
            await store.flush()
            events = [e[1]["type"] for e in await r.xrange(f"call:{stale}:events")]
            assert "sip_takeover" in events
        finally:
            await store.close()
            await b.stop()
    finally:
        for c in callers:
            c.close()
        await dead.close()
        await r.aclose()


async def test_a_request_in_the_lost_dialog_before_the_takeover_waits_instead_of_ending_the_call(
        make_server, sip_settings, prompt_pcm) -> None:
    """The phone sends something in its dialog (a key as SIP INFO) after the new process binds the port but before
    the dialog is taken over: a 481 would end the phone's call (RFC 3261 12.2.1.2), so it waits out the new
    server's grace and is answered by the taken-over call. A request for a dialog nobody takes over still gets
    its 481, once the grace is over."""
    from tests.sip.test_server import RawUdp

    a, caller, snap = await _answered(make_server, sip_settings, prompt_pcm)
    raw = RawUdp()
    try:
        b, handler_b = await _replaced(a, sip_settings, prompt_pcm, grace_s=1.5)
        try:
            key = asyncio.ensure_future(caller.info_dtmf("5"))
            stray = raw.request("BYE", b.port, to_tag="nosuchtag")
            assert await raw.exchange(stray, b.port, timeout=0.7) is None  # not answered during the grace ...
            await asyncio.sleep(0.2)
            call, result = await resume(b, snap, leg=2)
            assert result == "resumed" and call is not None
            assert await asyncio.wait_for(key, 10) == 200  # ... the key reaches the taken-over call
            await wait_until(lambda: bool(handler_b.calls) and handler_b.calls[0]["dtmf"] == ["5"], 5)
            resp = await raw.exchange(stray, b.port, timeout=3.0)  # ... and the stray gets its 481 after it
            assert resp is not None and resp.status == 481
            assert call.state == "confirmed"
        finally:
            await b.stop()
    finally:
        raw.close()
        caller.close()


async def test_the_probe_tells_who_answers_sip_at_an_address(make_server, sip_settings, prompt_pcm) -> None:
    """telephony/sip/probe.py: our server names its worker id; another SIP server says nothing; a closed port
    (ICMP unreachable) and a socket that never answers read as nobody."""
    import socket

    from telephony.sip.probe import who_answers

    ours = await make_server(RecordingHandler(prompt_pcm), sip_settings, instance="host-a-w0")
    anonymous = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    assert await who_answers("127.0.0.1", ours.port) == "host-a-w0"
    assert await who_answers("127.0.0.1", anonymous.port) == ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bound, never answers
        s.bind(("127.0.0.1", 0))
        mute = s.getsockname()[1]
        t0 = asyncio.get_running_loop().time()
        assert await who_answers("127.0.0.1", mute, timeout_s=0.6) is None
        assert asyncio.get_running_loop().time() - t0 < 2.0
    closed = mute  # released: nothing listens there now
    assert await who_answers("127.0.0.1", closed, timeout_s=0.6) is None


async def test_a_peer_takes_over_the_sip_calls_of_a_silent_worker_unless_it_still_answers(
        make_server, sip_settings, prompt_pcm, redis_url: str) -> None:
    """bot/sip_recovery.adopt_orphaned_calls: worker old-pod stops writing to Redis with two SIP calls listed.
    While its SIP server still answers as old-pod (cut off from Redis only), a peer leaves its calls alone. Once it
    is gone and the address answers as someone else (its container came back as new-pod), the peer takes them: the
    call still `active` is closed `worker_lost` and re-INVITEd as leg 2, the one the bot was hanging up gets a BYE.
    A worker whose heartbeat is fresh is never looked at."""
    import redis.asyncio as aioredis

    from bot.sip_recovery import adopt_orphaned_calls
    from bot.state import WORKERS, CallStore, call_key, resumable_key
    from tests.helpers.server import isolated_redis_url

    url = isolated_redis_url(redis_url)
    r = aioredis.from_url(url, decode_responses=True)
    await r.flushdb()
    handler_a = RecordingHandler(prompt_pcm)
    a = await make_server(handler_a, sip_settings, instance="old-pod")
    old = CallStore(aioredis.from_url(url, decode_responses=True), worker="old-pod", ttl_s=3600)
    old.pid = 4_000_001
    await old.start()
    callers = [SipCaller("127.0.0.1", a.port) for _ in range(2)]
    stores: list[CallStore] = [old]
    try:
        ids = await _listed_calls(callers, handler_a, old)
        await old.close()  # old-pod writes no more heartbeats
        live, ending = ids
        await r.hset(call_key(ending), mapping={"ending": "goodbye"})
        now = float((await r.time())[0])
        peer_store = CallStore(aioredis.from_url(url, decode_responses=True), worker="peer", ttl_s=3600)
        stores.append(peer_store)
        await peer_store.start()
        peer = await make_server(RecordingHandler(prompt_pcm), sip_settings, instance="peer")

        await r.zadd(WORKERS, {"old-pod": now - 2})
        assert await adopt_orphaned_calls(peer_store, peer, window_s=60, after_s=15) == {}  # not silent long enough
        await r.zadd(WORKERS, {"old-pod": now - 40})
        assert await adopt_orphaned_calls(peer_store, peer, window_s=60, after_s=15) == {}  # still answers as itself
        assert await r.zcard(resumable_key("old-pod")) == 2
        assert not any(c.reinvites or c.ended.is_set() for c in callers)
        assert (await r.hgetall(call_key(live)))["status"] == "active"

        b, handler_b = await _replaced(a, sip_settings, prompt_pcm, instance="new-pod")
        new_store = CallStore(aioredis.from_url(url, decode_responses=True), worker="new-pod", ttl_s=3600)
        stores.append(new_store)
        await new_store.start()
        try:
            got = await adopt_orphaned_calls(new_store, b, window_s=60, after_s=15)
            assert got == {live: "resumed", ending: "hung_up"}, got
            assert await r.zcard(resumable_key("old-pod")) == 0
            rec = await r.hgetall(call_key(live))
            assert rec["outcome"] == "worker_lost" and rec["reaped_by"] == "new-pod-sip-adopt", rec
            await asyncio.wait_for(handler_b.new_call.wait(), 5)
            assert [c["bridge"].call_id for c in handler_b.calls] == [live]
            assert handler_b.calls[0]["bridge"].info.leg == 2
            by_id = dict(zip(ids, callers))
            assert by_id[live].reinvites and not by_id[live].ended.is_set()
            await asyncio.wait_for(by_id[ending].ended.wait(), 5)
            assert by_id[ending].hangup_by == "bot" and not by_id[ending].reinvites
            # a second pass (or another peer) finds nothing left to take
            assert await adopt_orphaned_calls(peer_store, peer, window_s=60, after_s=15) == {}
            await new_store.flush()
            takeover = [e[1] for e in await r.xrange(f"call:{ending}:events") if e[1]["type"] == "sip_takeover"]
            assert takeover and json.loads(takeover[0]["data"])["worker"] == "old-pod", takeover
        finally:
            await b.stop()
    finally:
        for c in callers:
            c.close()
        for st in stores[1:]:
            await st.close()
        await r.aclose()


async def test_a_worker_behind_a_nat_is_probed_at_its_host_address_too(make_server, sip_settings, prompt_pcm,
                                                                        redis_url: str) -> None:
    """A worker that advertises a NAT's public address (BOT_SIP_PUBLIC_IP) in its dialogs may not be reachable
    there from its peers (no hairpin NAT). Probed only there, a worker merely cut off from Redis looked gone and its
    phones got a second bot's re-INVITE. Its dialogs now also keep its host's own address, where the peer finds it
    still answering as itself: its calls are left alone."""
    import redis.asyncio as aioredis

    import bot.sip_recovery as recovery
    from bot.state import WORKERS, CallStore, call_key, resumable_key
    from tests.helpers.server import isolated_redis_url
    from telephony.sip.probe import who_answers

    url = isolated_redis_url(redis_url)
    r = aioredis.from_url(url, decode_responses=True)
    await r.flushdb()
    handler = RecordingHandler(prompt_pcm)
    a = await make_server(handler, sip_settings, instance="nat-pod")
    old = CallStore(aioredis.from_url(url, decode_responses=True), worker="nat-pod", ttl_s=3600)
    old.pid = 4_000_002
    await old.start()
    caller = SipCaller("127.0.0.1", a.port)
    peer_store = CallStore(aioredis.from_url(url, decode_responses=True), worker="peer", ttl_s=3600)
    probed: list[tuple[str, int]] = []

    async def probe(host: str, port: int) -> str | None:
        probed.append((host, port))
        return await who_answers(host, port)

    try:
        await caller.open()
        assert await caller.invite() == 200
        await wait_until(lambda: len(handler.calls) == 1, 5)
        call: SipCall = handler.calls[0]["bridge"]
        old.start_call(call.call_id, "sip", "caller", "bot", "1")
        snap = call.resume_state() or {}
        assert snap.get("host_ip") == "127.0.0.1", snap
        # what the dialog holds when the worker advertises a public address its peers cannot reach (TEST-NET-1)
        old.keep_resumable(call.call_id, {**snap, "local_ip": "192.0.2.10"})
        await old.flush()
        await old.close()  # nat-pod is cut off: no more heartbeats
        await peer_store.start()
        peer = await make_server(RecordingHandler(prompt_pcm), sip_settings, instance="peer")
        await r.zadd(WORKERS, {"nat-pod": float((await r.time())[0]) - 40})
        assert await recovery.adopt_orphaned_calls(peer_store, peer, window_s=60, after_s=15, probe=probe) == {}
        assert probed == [("127.0.0.1", a.port)], probed
        assert await r.zcard(resumable_key("nat-pod")) == 1 and not caller.reinvites
        assert (await r.hgetall(call_key(call.call_id)))["status"] == "active"
        assert await recovery._sip_addresses(r, "nat-pod") == [("127.0.0.1", a.port), ("192.0.2.10", a.port)]
    finally:
        caller.close()
        await peer_store.close()
        await r.aclose()
