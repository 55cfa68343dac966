"""Registration with a provider's registrar (telephony/sip/register.py) against a real Kamailio acting as the
provider: registrar + location service with digest authentication. The bot registers (answering the challenge),
a caller dials the provider's number for the bot, the provider looks the bot up and relays the call to the
registered address, where it is answered; a wrong password leaves the bot unregistered (counted, retried); on
stop the binding is removed and the provider has nowhere to send calls."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ops import metrics
from ops.load.spawn import free_port_both
from telephony.sip.register import Registrar
from telephony.sip.uac import SipCaller

from .conftest import RecordingHandler, wait_until
from .dns_server import DnsServer

pytestmark = pytest.mark.skipif(shutil.which("kamailio") is None, reason="needs kamailio")

_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
fork=yes
children=2
auto_aliases=no
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
dns=no
rev_dns=no
use_dns_cache=off
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
modparam("usrloc", "db_mode", 0)
modparam("auth", "secret", "provider-secret")

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        # in dialog: along the route set, or (our test caller keeps none) straight to the request URI
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} else {{ forward(); }} exit; }}
        t_relay();
        exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    if (is_method("REGISTER")) {{
        if (!pv_www_authenticate("$td", "s3cret", "0") || $au != "bot") {{ www_challenge("$td", "1"); exit; }}
        save("location");
        exit;
    }}
    if (is_method("INVITE")) {{ record_route(); }}
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"""


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[int]:
    port = free_port_both()
    cfg = tmp_path / "provider.cfg"
    cfg.write_text(_CFG.format(port=port))
    run = tmp_path / "run"
    run.mkdir()
    log = open(tmp_path / "kamailio.log", "wb")
    proc = subprocess.Popen(["kamailio", "-DD", "-E", "-f", str(cfg), "-Y", str(run)], stdout=log,
                            stderr=subprocess.STDOUT)
    time.sleep(1.0)
    assert proc.poll() is None, (tmp_path / "kamailio.log").read_text()[-3000:]
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _count(result: str) -> float:
    return metrics.SIP_REGISTRATIONS.labels(result)._value.get()


def test_registrar_spec() -> None:
    assert Registrar.parse("pbx.example.com") == Registrar("pbx.example.com", 5060, "UDP", "pbx.example.com",
                                                           port_given=False, proto_given=False)
    assert Registrar.parse("sip:10.0.0.5:5080;transport=tcp", "example.com") == \
        Registrar("10.0.0.5", 5080, "TCP", "example.com")
    assert Registrar.parse("sip:pbx;transport=tls") == Registrar("pbx", 5061, "TLS", "pbx", port_given=False)
    assert Registrar.parse("sips:pbx.example.com:5062") == Registrar("pbx.example.com", 5062, "TLS", "pbx.example.com")
    with pytest.raises(ValueError, match="only udp, tcp and tls"):
        Registrar.parse("sip:pbx;transport=sctp")


async def test_the_bot_registers_and_the_provider_s_calls_reach_it(make_server, sip_settings, prompt_pcm,
                                                                   provider: int) -> None:
    settings = dataclasses.replace(sip_settings, registrar=f"127.0.0.1:{provider}", register_user="bot",
                                   register_password="s3cret", register_expires_s=60)
    handler = RecordingHandler(prompt_pcm)
    ok0 = _count("ok")
    srv = await make_server(handler, settings)
    await wait_until(lambda: srv.registration.registered, 10)
    assert metrics.SIP_REGISTERED._value.get() == 1 and _count("ok") == ok0 + 1
    assert 30 <= srv.registration.granted_s <= 60, srv.registration.granted_s
    caller = SipCaller("127.0.0.1", provider)  # the caller dials the provider, not the bot
    await caller.open()
    try:
        assert await caller.invite() == 200, caller.error
        await asyncio.wait_for(handler.new_call.wait(), 5)
        await wait_until(lambda: handler.calls[0]["bridge"].established, 5)  # our 200's ACK came through too
        await caller.wait_bot_quiet(0.5, 6)
        assert caller.recorded().size > 0
        assert await caller.bye() == 200  # through the provider (it record-routed)
        await asyncio.wait_for(handler.call_ended.wait(), 5)
    finally:
        caller.close()
    await srv.registration.stop()  # the binding is removed: the provider has no address for the bot any more
    assert metrics.SIP_REGISTERED._value.get() == 0
    late = SipCaller("127.0.0.1", provider)
    await late.open()
    try:
        assert await late.invite() == 404
    finally:
        late.close()


async def test_a_wrong_password_leaves_the_bot_unregistered_and_retrying(make_server, sip_settings, prompt_pcm,
                                                                         provider: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import telephony.sip.register as register

    monkeypatch.setattr(register, "RETRY_S", (0.5,))
    settings = dataclasses.replace(sip_settings, registrar=f"127.0.0.1:{provider}", register_user="bot",
                                   register_password="wrong")
    failed0 = _count("auth_failed")
    srv: Any = await make_server(RecordingHandler(prompt_pcm), settings)
    await wait_until(lambda: _count("auth_failed") >= failed0 + 2, 10)  # refused, then tried again
    assert not srv.registration.registered and metrics.SIP_REGISTERED._value.get() == 0
    caller = SipCaller("127.0.0.1", provider)
    await caller.open()
    try:
        assert await caller.invite() == 404  # the provider has nowhere to send the call
    finally:
        caller.close()


async def test_a_registrar_found_through_srv_records_with_failover(make_server, sip_settings, prompt_pcm,
                                                                   provider: int) -> None:
    """BOT_SIP_REGISTRAR names the provider's domain; its DNS (a real DNS server, BOT_SIP_DNS_SERVERS) lists two
    registrars by SRV priority. The first refuses connections: the bot moves on to the second at once, registers
    there, and a caller dialing the provider reaches the bot over the transport the records chose (TCP)."""
    dead = free_port_both()  # nothing listens: a TCP connect is refused
    dns = await DnsServer({
        ("_sip._tcp.provider.test", "SRV"): [f"10 0 {dead} sip1.provider.test.", f"20 0 {provider} sip2.provider.test."],
        ("sip1.provider.test", "A"): ["127.0.0.1"], ("sip2.provider.test", "A"): ["127.0.0.1"],
    }).start()
    settings = dataclasses.replace(sip_settings, registrar="sip:provider.test;transport=tcp", register_user="bot",
                                   register_password="s3cret", register_expires_s=60, dns_servers=dns.spec)
    handler = RecordingHandler(prompt_pcm)
    ok0, no_answer0 = _count("ok"), _count("no_answer")
    try:
        srv: Any = await make_server(handler, settings)
        await wait_until(lambda: srv.registration.registered, 15)
        assert srv.registration.target.port == provider and srv.registration.target.proto == "TCP"
        assert _count("no_answer") == no_answer0 + 1 and _count("ok") == ok0 + 1  # the first, then the second
        assert ("_sip._tcp.provider.test", "SRV") in dns.asked
        caller = SipCaller("127.0.0.1", provider)
        await caller.open()
        try:
            assert await caller.invite() == 200, caller.error
            await asyncio.wait_for(handler.new_call.wait(), 5)
            assert handler.calls[0]["bridge"].peer.proto == "TCP"  # relayed to the Contact we registered
            assert await caller.bye() == 200
        finally:
            caller.close()
    finally:
        dns.close()


async def test_a_registrar_name_that_does_not_resolve_is_counted_and_looked_up_again(
        make_server, sip_settings, prompt_pcm, monkeypatch: pytest.MonkeyPatch) -> None:
    import telephony.sip.register as register

    monkeypatch.setattr(register, "RETRY_S", (0.3,))
    dns = await DnsServer({("other.test", "A"): ["127.0.0.1"]}).start()
    settings = dataclasses.replace(sip_settings, registrar="sip:missing.test", register_user="bot",
                                   dns_servers=dns.spec)
    before = _count("unresolved")
    try:
        srv: Any = await make_server(RecordingHandler(prompt_pcm), settings)
        await wait_until(lambda: _count("unresolved") >= before + 2, 10)  # tried again, never fatal
        assert not srv.registration.registered and srv.accepting
        assert [q for q in dns.asked if q[0] == "missing.test"]
    finally:
        dns.close()
