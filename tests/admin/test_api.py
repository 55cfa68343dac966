"""Admin API over a real redis-server: auth and roles, versions, drafts, validation, publish
conflicts, rollback, uploads, live calls and today's rates."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
import soundfile as sf

from bot.admin.auth import TokenConfigError, TokenRegistry, parse_tokens_file
from bot.state import CallStore
from ops import metrics
from tests.admin.conftest import TOKENS, auth
from tests.helpers.policy_text import LOOSER, STRICTER, accept_line, with_accept


def errors_total(kind: str) -> float:
    return metrics.ERRORS.labels("admin", kind)._value.get()


# ---- auth ------------------------------------------------------------------------------------------
async def test_no_token_401_wrong_token_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/api/policies")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    before = metrics.ERRORS.labels("admin", "bad_token")._value.get()
    r = await client.get("/admin/api/policies", headers={"Authorization": "Bearer nope-nope-nope"})
    assert r.status_code == 401
    assert metrics.ERRORS.labels("admin", "bad_token")._value.get() == before + 1
    r = await client.get("/admin/api/policies", headers={"Authorization": f"Basic {TOKENS['publisher']}"})
    assert r.status_code == 401


async def test_roles(client: httpx.AsyncClient, default_yaml: str) -> None:
    me = (await client.get("/admin/api/me", headers=auth("editor"))).json()
    assert me == {"name": "editor-user", "role": "editor"}
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).status_code == 200
    # viewer cannot write drafts; editor can; only publisher publishes / rolls back
    body = {"yaml": default_yaml, "comment": "x"}
    assert (await client.post("/admin/api/drafts", json=body, headers=auth("viewer"))).status_code == 403
    r = await client.post("/admin/api/drafts", json=body, headers=auth("editor"))
    assert r.status_code == 201
    pub = {"draft_id": r.json()["id"], "expected_version": 1}
    forbidden = errors_total("forbidden")
    r = await client.post("/admin/api/publish", json=pub, headers=auth("editor"))
    assert r.status_code == 403 and "publisher" in r.json()["detail"]
    assert errors_total("forbidden") == forbidden + 1  # counted (and logged with who/where)
    r = await client.post("/admin/api/rollback", json={"version": 1, "expected_version": 1}, headers=auth("viewer"))
    assert r.status_code == 403
    assert (await client.post("/admin/api/publish", json=pub, headers=auth("publisher"))).status_code == 200


def test_token_sources(tmp_path: Path) -> None:
    reg = TokenRegistry.from_env(admin_token="single-admin-token", tokens_file="")
    tok = reg.lookup("single-admin-token")
    assert tok is not None and (tok.role, tok.name) == ("publisher", "admin")
    assert reg.lookup("single-admin-tokeN") is None and reg.lookup("") is None
    js = tmp_path / "t.json"
    js.write_text(json.dumps([{"role": "viewer", "name": "v", "token": "viewer-secret-1"}]))
    reg = TokenRegistry.from_env(admin_token="", tokens_file=str(js))
    assert reg.lookup("viewer-secret-1").role == "viewer"  # type: ignore[union-attr]
    with pytest.raises(TokenConfigError, match="line 2"):
        parse_tokens_file("viewer:a:aaaaaaaaaa\nsuperuser:b:bbbbbbbbbb\n")
    with pytest.raises(TokenConfigError, match="role:name:token"):
        parse_tokens_file("just-a-token\n")
    with pytest.raises(TokenConfigError, match="shorter than 8"):
        parse_tokens_file("editor:e:short\n")
    # a file saved in Latin-1 raised UnicodeDecodeError past the fail-closed handler (500 on every request)
    latin = tmp_path / "latin1"
    latin.write_bytes("viewer:ren\xe9:viewer-secret-1\n".encode("latin-1"))
    with pytest.raises(TokenConfigError, match="not UTF-8"):
        TokenRegistry.from_env(admin_token="", tokens_file=str(latin))
    # one secret for two roles: the role it got depended on the order of the entries
    dup = tmp_path / "dup"
    dup.write_text("viewer:wallboard:shared-secret-1\npublisher:sam:shared-secret-1\n")
    with pytest.raises(TokenConfigError, match="also the token of 'wallboard'"):
        TokenRegistry.from_env(admin_token="", tokens_file=str(dup))
    one = tmp_path / "one"
    one.write_text("viewer:v:shared-secret-1\n")
    with pytest.raises(TokenConfigError, match="also the token of 'admin'"):
        TokenRegistry.from_env(admin_token="shared-secret-1", tokens_file=str(one))


async def test_an_unreadable_tokens_file_locks_the_console_with_401s(app, client: httpx.AsyncClient,
                                                                     tmp_path: Path, monkeypatch) -> None:
    latin = tmp_path / "latin1"
    latin.write_bytes("publisher:ren\xe9:publish-token-789\n".encode("latin-1"))
    monkeypatch.setenv("BOT_ADMIN_TOKENS_FILE", str(latin))
    monkeypatch.setenv("BOT_ADMIN_TOKEN", "")
    del app.state.admin_tokens  # as a `bot serve` reads it on first use
    before = errors_total("token_config")
    r = await client.get("/admin/api/me", headers=auth("publisher"))
    assert r.status_code == 401 and errors_total("token_config") == before + 1


def test_a_bot_without_configured_tokens_makes_one_in_its_data_dir(tmp_path: Path, monkeypatch) -> None:
    """`make run` sets no token: the console's publisher token is made once, kept owner-only, and reused."""
    import os
    import stat

    from bot.admin.auth import ensure_local_token

    monkeypatch.delenv("BOT_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("BOT_ADMIN_TOKENS_FILE", raising=False)
    path = ensure_local_token(tmp_path / "var")
    assert path == tmp_path / "var" / "admin-token"
    token = path.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.environ["BOT_ADMIN_TOKEN"] == token  # what the workers inherit
    assert TokenRegistry.from_env().lookup(token).role == "publisher"  # type: ignore[union-attr]
    monkeypatch.delenv("BOT_ADMIN_TOKEN")
    assert ensure_local_token(tmp_path / "var") == path and path.read_text().strip() == token  # reused
    # configured tokens win, and no file is made
    monkeypatch.setenv("BOT_ADMIN_TOKEN", "configured-token")
    assert ensure_local_token(tmp_path / "other") is None and not (tmp_path / "other").exists()
    monkeypatch.delenv("BOT_ADMIN_TOKEN")
    monkeypatch.setenv("BOT_ADMIN_TOKENS_FILE", str(tmp_path / "tokens"))
    assert ensure_local_token(tmp_path / "other") is None


# ---- versions, drafts, validation -------------------------------------------------------------------
async def test_versions_read_and_diff(client: httpx.AsyncClient, default_yaml: str) -> None:
    r = await client.post("/admin/api/publish", headers=auth("publisher"),
                          json={"yaml": with_accept(default_yaml, STRICTER), "expected_version": 1,
                                "comment": "stricter"})
    assert r.json() == {"version": 2, "current": 2}
    lst = (await client.get("/admin/api/policies", headers=auth("viewer"))).json()
    assert lst["current"] == 2 and [v["version"] for v in lst["versions"]] == [2, 1]
    assert lst["versions"][0]["author"] == "publisher-user" and lst["versions"][0]["comment"] == "stricter"
    v2 = (await client.get("/admin/api/policies/2", headers=auth("viewer"))).json()
    assert f"accept: {STRICTER}" in v2["yaml"]
    assert (await client.get("/admin/api/policies/7", headers=auth("viewer"))).status_code == 404
    d = (await client.get("/admin/api/policies/diff?a=1&b=2", headers=auth("viewer"))).json()
    assert f"+  accept: {STRICTER}" in d["unified"]
    changed = [row for row in d["rows"] if row["op"] != "equal"]
    assert [(c["a_line"], c["b_line"]) for c in changed] == [(accept_line(default_yaml),) * 2]


async def test_validate_line_located(client: httpx.AsyncClient, default_yaml: str) -> None:
    bad = with_accept(default_yaml, "1.5")
    r = (await client.post("/admin/api/validate", json={"yaml": bad}, headers=auth("editor"))).json()
    assert r["valid"] is False
    assert r["errors"][0]["line"] == accept_line(default_yaml) and "thresholds.accept" in r["errors"][0]["path"]
    r = (await client.post("/admin/api/validate", json={"yaml": "name: x\n  bad: [\n"}, headers=auth("editor"))).json()
    assert r["valid"] is False and r["errors"][0]["line"] == 2 and "invalid YAML" in r["errors"][0]["message"]
    r = (await client.post("/admin/api/validate", json={"yaml": default_yaml}, headers=auth("editor"))).json()
    assert r == {"valid": True, "errors": []}


async def test_draft_crud(client: httpx.AsyncClient, default_yaml: str) -> None:
    d = (await client.post("/admin/api/drafts", json={"yaml": default_yaml}, headers=auth("editor"))).json()
    r = await client.put(f"/admin/api/drafts/{d['id']}", json={"yaml": default_yaml + "\n# note\n"}, headers=auth("editor"))
    assert r.status_code == 200 and r.json()["rev"] == 2
    lst = (await client.get("/admin/api/drafts", headers=auth("viewer"))).json()
    assert [x["id"] for x in lst] == [d["id"]] and "yaml" not in lst[0]
    diff = (await client.get(f"/admin/api/policies/diff?a=1&b=draft:{d['id']}", headers=auth("viewer"))).json()
    assert "+# note" in diff["unified"]
    assert (await client.delete(f"/admin/api/drafts/{d['id']}", headers=auth("editor"))).status_code == 204
    assert (await client.get(f"/admin/api/drafts/{d['id']}", headers=auth("viewer"))).status_code == 404


async def test_validate_rejects_duplicate_keys_at_their_line(client: httpx.AsyncClient, default_yaml: str) -> None:
    """YAML keeps the last of two equal keys: an admin who edited the first `accept:` while another one
    sat further down published a policy that ignored the edit, and an out-of-range second value was
    reported at the first (valid) line."""
    line = accept_line(default_yaml)
    lines = default_yaml.splitlines(keepends=True)
    dup = "".join(lines[:line] + ["  accept: 0.3\n"] + lines[line:])
    r = (await client.post("/admin/api/validate", json={"yaml": dup}, headers=auth("editor"))).json()
    assert r["valid"] is False
    assert [(e["line"], e["path"]) for e in r["errors"]] == [(line + 1, "thresholds.accept")]
    assert f"line {line}" in r["errors"][0]["message"] and "duplicate key 'accept'" in r["errors"][0]["message"]
    r = await client.post("/admin/api/publish", json={"yaml": dup, "expected_version": 1}, headers=auth("publisher"))
    assert r.status_code == 422 and r.json()["detail"]["errors"][0]["line"] == line + 1
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).json()["current"] == 1


async def test_unreadable_values_are_line_located_errors_not_500(client: httpx.AsyncClient, default_yaml: str) -> None:
    """A holiday that is no date (2026-13-45) made the YAML loader raise a bare ValueError and a document
    nested a few hundred levels deep a RecursionError: both came back as a 500 (validate and publish)."""
    lines = default_yaml.splitlines(keepends=True)
    tz = next(i for i, line in enumerate(lines) if "timezone: America/New_York" in line)
    bad_date = "".join(lines[:tz + 1] + ["      holidays: [2026-12-25, 2026-13-45]\n"] + lines[tz + 1:])
    r = await client.post("/admin/api/validate", json={"yaml": bad_date}, headers=auth("editor"))
    assert r.status_code == 200
    (e,) = r.json()["errors"]
    assert e["line"] == tz + 2 and "'2026-13-45' is not a date" in e["message"]
    r = await client.post("/admin/api/publish", json={"yaml": bad_date, "expected_version": 1}, headers=auth("publisher"))
    assert r.status_code == 422 and r.json()["detail"]["errors"][0]["line"] == tz + 2
    deep = default_yaml + "x: " + "[" * 3000 + "]" * 3000 + "\n"
    r = await client.post("/admin/api/validate", json={"yaml": deep}, headers=auth("editor"))
    assert r.status_code == 200 and r.json()["valid"] is False
    (e,) = r.json()["errors"]
    assert e["line"] == len(lines) + 1 and "nested too deeply" in e["message"]
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).json()["current"] == 1


async def test_redis_down_is_a_clear_503_and_nothing_is_half_written(app, client: httpx.AsyncClient,
                                                                       default_yaml: str) -> None:
    """Redis out of reach during a publish (or any admin read) was an unhandled 500 with a text body."""
    from policies.store import PolicyStore
    from tests.conftest import free_port

    live = app.state.policy_store
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    app.state.policy_store = PolicyStore(dead)
    before = errors_total("redis_unavailable")
    try:
        r = await client.post("/admin/api/publish", json={"yaml": with_accept(default_yaml, STRICTER),
                                                          "expected_version": 1}, headers=auth("publisher"))
        assert r.status_code == 503
        assert "Redis" in r.json()["detail"]["message"] and "never half-written" in r.json()["detail"]["message"]
        r = await client.get("/admin/api/policies", headers=auth("viewer"))
        assert r.status_code == 503 and "not reachable" in r.json()["detail"]["message"]
        r = await client.post("/admin/api/drafts", json={"yaml": default_yaml}, headers=auth("editor"))
        assert r.status_code == 503
        assert errors_total("redis_unavailable") == before + 3
    finally:
        app.state.policy_store = live
        await dead.aclose()
    lst = (await client.get("/admin/api/policies", headers=auth("viewer"))).json()
    assert lst["current"] == 1 and [v["version"] for v in lst["versions"]] == [1]
    assert (await client.get("/admin/api/drafts", headers=auth("viewer"))).json() == []


async def test_draft_saved_from_two_tabs_never_loses_an_edit(client: httpx.AsyncClient, default_yaml: str) -> None:
    """Two tabs (or admins) open draft rev 1; the second save used to overwrite the first silently."""
    d = (await client.post("/admin/api/drafts", json={"yaml": default_yaml}, headers=auth("editor"))).json()
    url = f"/admin/api/drafts/{d['id']}"
    tab_a, tab_b = with_accept(default_yaml, STRICTER), with_accept(default_yaml, LOOSER)
    r = await client.put(url, json={"yaml": tab_a, "rev": d["rev"]}, headers=auth("editor"))
    assert r.status_code == 200 and r.json()["rev"] == 2
    before = errors_total("draft_conflict")
    r = await client.put(url, json={"yaml": tab_b, "rev": d["rev"]}, headers=auth("publisher"))
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert detail["expected_rev"] == 1 and detail["current_rev"] == 2 and "saved by someone else" in detail["message"]
    assert errors_total("draft_conflict") == before + 1
    assert (await client.get(url, headers=auth("viewer"))).json()["yaml"] == tab_a
    # publishing a draft checks the revision the publisher reviewed
    pub = {"draft_id": d["id"], "draft_rev": 1, "expected_version": 1}
    r = await client.post("/admin/api/publish", json=pub, headers=auth("publisher"))
    assert r.status_code == 409 and r.json()["detail"]["current_rev"] == 2
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).json()["current"] == 1
    r = await client.post("/admin/api/publish", json={**pub, "draft_rev": 2}, headers=auth("publisher"))
    assert r.status_code == 200 and r.json()["version"] == 2
    # a save to a draft that is gone (published) is a 404, and does not recreate a half draft
    r = await client.put(url, json={"yaml": tab_b, "rev": 2}, headers=auth("editor"))
    assert r.status_code == 404
    assert (await client.get(url, headers=auth("viewer"))).status_code == 404
    assert (await client.get("/admin/api/drafts", headers=auth("viewer"))).json() == []


# ---- publish / rollback -----------------------------------------------------------------------------
async def test_publish_invalid_is_422_with_lines(client: httpx.AsyncClient, default_yaml: str) -> None:
    bad = with_accept(default_yaml, "2")
    r = await client.post("/admin/api/publish", json={"yaml": bad, "expected_version": 1}, headers=auth("publisher"))
    assert r.status_code == 422
    assert r.json()["detail"]["errors"][0]["line"] == accept_line(default_yaml)
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).json()["current"] == 1


async def test_publish_race_two_admins_409(client: httpx.AsyncClient, default_yaml: str) -> None:
    before = errors_total("publish_conflict")
    bodies = [{"yaml": with_accept(default_yaml, v), "expected_version": 1} for v in (STRICTER, LOOSER)]
    rs = await asyncio.gather(*(client.post("/admin/api/publish", json=b, headers=auth("publisher")) for b in bodies))
    assert sorted(r.status_code for r in rs) == [200, 409]
    lost = next(r for r in rs if r.status_code == 409).json()["detail"]
    assert lost["expected"] == 1 and lost["current"] == 2
    assert errors_total("publish_conflict") == before + 1
    lst = (await client.get("/admin/api/policies", headers=auth("viewer"))).json()
    assert [v["version"] for v in lst["versions"]] == [2, 1]


async def test_rollback(client: httpx.AsyncClient, default_yaml: str, redis: aioredis.Redis) -> None:
    await client.post("/admin/api/publish", json={"yaml": with_accept(default_yaml, STRICTER),
                                                  "expected_version": 1}, headers=auth("publisher"))
    r = await client.post("/admin/api/rollback", json={"version": 1, "expected_version": 1}, headers=auth("publisher"))
    assert r.status_code == 409
    r = await client.post("/admin/api/rollback", json={"version": 1, "expected_version": 2, "comment": "undo"},
                          headers=auth("publisher"))
    assert r.status_code == 200 and r.json()["current"] == 1
    assert (await client.post("/admin/api/rollback", json={"version": 42, "expected_version": 1},
                              headers=auth("publisher"))).status_code == 404
    # a version stored under an older schema no longer validates: 422, live policy unchanged
    await redis.hset("{policy}:version:3", mapping={"yaml": default_yaml.replace("name: default", "nom: default"),
                                                    "author": "legacy", "comment": "", "created_at": 1, "source": "x"})
    await redis.set("{policy}:seq", 3)
    r = await client.post("/admin/api/rollback", json={"version": 3, "expected_version": 1}, headers=auth("publisher"))
    assert r.status_code == 422 and r.json()["detail"]["errors"]
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).json()["current"] == 1
    audit = (await client.get("/admin/api/audit", headers=auth("viewer"))).json()
    rb = next(a for a in audit if a["action"] == "rollback")
    assert rb["actor"] == "publisher-user" and rb["ip"] == "203.0.113.7" and rb["detail"] == "undo"
    # refused attempts are on record too: the stale one (409), the missing version (404), the invalid one (422)
    refused = [a for a in audit if a["action"] == "rollback_refused"]
    assert sorted(a["status"] for a in refused) == ["404", "409", "422"]
    assert all(a["actor"] == "publisher-user" for a in refused)


async def test_refused_publish_is_audited(client: httpx.AsyncClient, default_yaml: str) -> None:
    r = await client.post("/admin/api/publish", json={"yaml": with_accept(default_yaml, "1.5"), "expected_version": 1},
                          headers=auth("publisher"))
    assert r.status_code == 422
    audit = (await client.get("/admin/api/audit", headers=auth("viewer"))).json()
    (a,) = [a for a in audit if a["action"] == "publish_refused"]
    assert a["status"] == "422" and a["actor"] == "publisher-user" and "validate" in a["detail"]


# ---- uploads ----------------------------------------------------------------------------------------
def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def test_upload_not_wav_415(client: httpx.AsyncClient) -> None:
    files = {"audio": ("notes.wav", b"ID3\x03\x00\x00 this is an mp3, honest" * 10, "audio/wav")}
    r = await client.post("/admin/api/simulate", files=files, headers=auth("editor"))
    assert r.status_code == 415 and "not a WAV" in r.json()["detail"]["message"]
    for cut in (30, 60):  # a broken header; a header with 8 samples behind it
        r = await client.post("/admin/api/simulate", files={"audio": ("t.wav", wav_bytes()[:cut], "audio/wav")},
                              headers=auth("editor"))
        assert r.status_code == 415, r.text


async def test_upload_too_large_413(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.admin import api, context

    monkeypatch.setattr(api, "MAX_UPLOAD_BYTES", 20_000)
    monkeypatch.setattr(context, "MAX_UPLOAD_BYTES", 20_000)
    big = wav_bytes(seconds=2.0)  # 64 kB
    r = await client.post("/admin/api/simulate", files={"audio": ("big.wav", big, "audio/wav")}, headers=auth("editor"))
    assert r.status_code == 413
    r = await client.post("/admin/api/drafts", json={"yaml": "x" * 30_000}, headers=auth("editor"))
    assert r.status_code == 413

    # a chunked body has no Content-Length: it used to be read whole (any size) and then parsed
    async def chunks():
        yield b'{"yaml": "'
        for _ in range(10):
            yield b"x" * 10_000
        yield b'"}'

    for path in ("/admin/api/validate", "/admin/api/drafts"):
        r = await client.post(path, content=chunks(), headers={**auth("editor"), "Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert "BOT_ADMIN_MAX_UPLOAD_BYTES" in r.json()["detail"]["message"]
    assert (await client.get("/admin/api/drafts", headers=auth("viewer"))).json() == []
    r = await client.post("/admin/api/validate", json={"yaml": "x" * 10_000}, headers=auth("editor"))
    assert r.status_code == 200  # under the limit still works


async def test_simulate_needs_input_and_valid_policy(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/api/simulate", data={"text": "  "}, headers=auth("editor"))
    assert r.status_code == 422
    r = await client.post("/admin/api/simulate", data={"text": "hello", "yaml": "name: [x"}, headers=auth("editor"))
    assert r.status_code == 422 and r.json()["detail"]["errors"][0]["line"] == 1
    r = await client.post("/admin/api/simulate", data={"text": "hello"}, headers=auth("viewer"))
    assert r.status_code == 403


# ---- live view --------------------------------------------------------------------------------------
async def test_live_calls_and_today_rates(client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    cs = CallStore(redis, "worker-a", ttl_s=600)
    await cs.start()
    turn = lambda action: {"decision": {"action": action, "reason": "r"}}  # noqa: E731
    cs.start_call("CA-live", "twilio", "+14155550123", "+1800", "2")
    cs.event("CA-live", "turn", **turn("confirm"))
    cs.start_call("CA-done", "sip", "+14155550100", "+1800", "1")
    cs.event("CA-done", "turn", **turn("answer"))
    cs.end_call("CA-done", "completed")
    cs.start_call("CA-xfer", "webrtc", "softphone:x", "softphone", "1")
    cs.event("CA-xfer", "turn", **turn("transfer"))
    cs.event("CA-xfer", "transfer", target="general", ok=True)
    cs.end_call("CA-xfer", "transferred")
    assert await cs.flush()
    try:
        calls = (await client.get("/admin/api/calls", headers=auth("viewer"))).json()["calls"]
        assert [c["call_id"] for c in calls] == ["CA-live"]
        assert calls[0]["policy_version"] == "2" and calls[0]["caller"].endswith("23") and "4155550123" not in calls[0]["caller"]
        ev = (await client.get("/admin/api/calls/CA-live", headers=auth("viewer"))).json()
        assert [e["type"] for e in ev["events"]] == ["call_started", "turn"]
        # the console shows the caller masked, as the logs do; a garbled event is shown, not a 500
        assert "4155550123" not in json.dumps(ev) and ev["record"]["caller"].endswith("23")
        await redis.xadd("call:CA-live:events", {"type": "odd", "t": "not-a-time", "data": "[1, 2]"})
        ev = (await client.get("/admin/api/calls/CA-live", headers=auth("viewer"))).json()
        assert ev["events"][-1] == {"id": ev["events"][-1]["id"], "type": "odd", "t": None, "raw": [1, 2]}
        assert (await client.get("/admin/api/calls/nope", headers=auth("viewer"))).status_code == 404
        s = (await client.get("/admin/api/stats/today", headers=auth("viewer"))).json()
        assert (s["calls"], s["ended"], s["in_progress"], s["turns"]) == (3, 2, 1, 3)
        assert s["automation_rate"] == 0.5 and s["escalation_rate"] == 0.5
        assert s["clarification_rate"] == round(1 / 3, 4)
    finally:
        await cs.close()


async def test_softphone_offer_needs_editor_and_a_conversation_runner(client: httpx.AsyncClient) -> None:
    offer = {"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer"}
    assert (await client.post("/admin/api/softphone/offer", json=offer, headers=auth("viewer"))).status_code == 403
    r = await client.post("/admin/api/softphone/offer", json=offer, headers=auth("editor"))
    assert r.status_code == 503 and "bot serve" in r.json()["detail"]["message"]  # this app runs no calls
    r = await client.post("/admin/api/softphone/offer", json={**offer, "draft_id": "nope"}, headers=auth("editor"))
    assert r.status_code == 404


async def test_softphone_config_gives_the_browser_the_bots_ice_servers(client: httpx.AsyncClient,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url = "/admin/api/softphone/config"
    assert (await client.get(url, headers=auth("viewer"))).status_code == 403
    monkeypatch.delenv("BOT_WEBRTC_ICE_SERVERS", raising=False)
    assert (await client.get(url, headers=auth("editor"))).json() == {"iceServers": []}  # LAN only, no public STUN
    turn = [{"urls": "stun:stun.example.org:3478"},
            {"urls": ["turn:turn.example.org:3478?transport=udp"], "username": "bot", "credential": "s3cret"}]
    monkeypatch.setenv("BOT_WEBRTC_ICE_SERVERS", json.dumps(turn))
    assert (await client.get(url, headers=auth("editor"))).json() == {"iceServers": turn}
    before = errors_total("softphone_misconfigured")
    monkeypatch.setenv("BOT_WEBRTC_ICE_SERVERS", '[{"urls": "http://not-ice"}]')
    r = await client.get(url, headers=auth("editor"))
    assert r.status_code == 503 and "BOT_WEBRTC_ICE_SERVERS" in r.json()["detail"]["message"]
    assert errors_total("softphone_misconfigured") == before + 1


async def test_console_is_served_locally_with_a_strict_csp(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin")
    assert r.status_code == 200 and "<title>Voicebot admin</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in r.text.replace("http-equiv", "")  # no CDN: every asset is under /admin/static
    for name in ("app.js", "api.js", "editor.js", "diff.js", "media.js", "style.css"):
        assert (await client.get(f"/admin/static/{name}")).status_code == 200
    assert (await client.get("/admin/static/..%2Fapi.py")).status_code == 404
