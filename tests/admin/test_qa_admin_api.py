"""Hostile and clumsy admin API requests against a real redis-server: security headers on every answer
(the console's files included, however they are reached), no CORS, refused requests counted, bad tokens
throttled per address, a tokens file edited on disk revokes a token without a restart, version references
that are digits to str.isdigit but not to int(), malformed JSON in the documented error shape, bounded
comments, and a unified diff that `patch` can apply."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from bot.admin import auth as admin_auth
from bot.admin.auth import FailureThrottle
from ops import metrics
from policies.store import side_by_side, unified_diff
from tests.admin.conftest import auth


def errors_total(kind: str) -> float:
    return metrics.ERRORS.labels("admin", kind)._value.get()


def client_from(app: FastAPI, ip: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 4444)), base_url="http://admin.test")


# ---- security headers, CORS, CSRF ------------------------------------------------------------------------
async def test_every_admin_answer_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    answers = {
        "console": await client.get("/admin"),
        # the same page by its file name used to come without CSP: framable (clickjacking), no frame-ancestors
        "console file": await client.get("/admin/static/index.html"),
        "script": await client.get("/admin/static/app.js"),
        "api": await client.get("/admin/api/policies", headers=auth("viewer")),
        "401": await client.get("/admin/api/policies"),
        "403": await client.post("/admin/api/rollback", json={"version": 1, "expected_version": 1},
                                 headers=auth("viewer")),
        "404": await client.get("/admin/api/policies/999", headers=auth("viewer")),
        "422": await client.post("/admin/api/validate", content=b"{", headers={**auth("editor"),
                                                                               "Content-Type": "application/json"}),
    }
    for what, r in answers.items():
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), what
        assert r.headers.get("x-frame-options") == "DENY", what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("referrer-policy") == "no-referrer", what
    for what in ("api", "401", "403", "404", "422"):  # policies and transcripts stay out of caches
        assert answers[what].headers.get("cache-control") == "no-store", what
    assert answers["script"].headers["content-type"].startswith("text/javascript")
    # the console's modules are revalidated, so an upgrade never runs an old app.js against a new API
    assert answers["script"].headers.get("cache-control") == "no-cache"


async def test_another_origin_gets_no_cors_and_cannot_act_without_the_token(client: httpx.AsyncClient) -> None:
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}
    pre = await client.options("/admin/api/publish", headers=evil)
    assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400
    # what a form on another site can send: no Authorization header (the token is in sessionStorage, not a cookie)
    r = await client.post("/admin/api/publish", data={"yaml": "x", "expected_version": "1"},
                          headers={"Origin": "https://evil.example"})
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


# ---- auth: refused requests counted, throttled, tokens file reloaded ------------------------------------
async def test_a_request_without_a_token_is_counted(client: httpx.AsyncClient) -> None:
    before = errors_total("no_token")
    r = await client.get("/admin/api/me")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await client.get("/admin/api/me", headers={"Authorization": "Bearer "})
    assert r.status_code == 401
    assert errors_total("no_token") == before + 2


async def test_bad_tokens_from_one_address_are_throttled_and_others_are_not(app: FastAPI) -> None:
    app.state.admin_auth_throttle = FailureThrottle(limit=5, window_s=300.0)
    bad = {"Authorization": "Bearer guess-guess-guess"}
    async with client_from(app, "198.51.100.9") as attacker, client_from(app, "198.51.100.10") as admin:
        failed = errors_total("bad_token")
        for _ in range(5):
            assert (await attacker.get("/admin/api/me", headers=bad)).status_code == 401
        assert errors_total("bad_token") == failed + 5
        throttled = errors_total("auth_throttled")
        r = await attacker.get("/admin/api/me", headers=bad)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "too many invalid tokens" in r.json()["detail"]
        # refused before the token is looked at: a right guess now gains nothing
        assert (await attacker.get("/admin/api/me", headers=auth("viewer"))).status_code == 429
        assert errors_total("auth_throttled") == throttled + 2
        # another address is not locked out by it
        assert (await admin.get("/admin/api/me", headers=auth("viewer"))).status_code == 200
        # and the lockout is not counted against the guesses (bad_token stays where it was)
        assert errors_total("bad_token") == failed + 5


def test_the_throttle_window_ends_and_its_memory_is_bounded() -> None:
    t = FailureThrottle(limit=3, window_s=60.0, max_addresses=100)
    for _ in range(2):
        assert t.fail("a", 1000.0) is False
    assert t.retry_after("a", 1001.0) == 0.0
    assert t.fail("a", 1002.0) is True  # the one that reaches the limit (logged once)
    assert t.retry_after("a", 1010.0) == pytest.approx(50.0)
    assert t.retry_after("a", 1061.0) == 0.0  # a new window
    assert t.fail("a", 1061.0) is False
    for i in range(1000):
        t.fail(f"10.0.{i // 250}.{i % 250}", 2000.0 + i * 0.001)
    assert len(t._seen) <= 100


async def test_editing_the_tokens_file_revokes_a_token_without_a_restart(app: FastAPI, client: httpx.AsyncClient,
                                                                          tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "tokens"
    path.write_text("editor:dana:dana-token-1234\nviewer:wall:wall-token-1234\n")
    monkeypatch.setenv("BOT_ADMIN_TOKENS_FILE", str(path))
    monkeypatch.setenv("BOT_ADMIN_TOKEN", "")
    monkeypatch.setattr(admin_auth, "RELOAD_CHECK_S", 0.0)
    del app.state.admin_tokens  # as `bot serve` builds it on first use
    dana = {"Authorization": "Bearer dana-token-1234"}
    assert (await client.get("/admin/api/me", headers=dana)).json() == {"name": "dana", "role": "editor"}
    # dana's token leaked: the on-call engineer removes it and adds a new one; the workers keep their calls
    path.write_text("editor:dana:dana-token-rotated-5678\nviewer:wall:wall-token-1234\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse-mtime file system
    assert (await client.get("/admin/api/me", headers=dana)).status_code == 401
    rotated = {"Authorization": "Bearer dana-token-rotated-5678"}
    assert (await client.get("/admin/api/me", headers=rotated)).json()["name"] == "dana"
    # a broken edit locks the console (fail closed, counted) until it is fixed
    before = errors_total("token_config")
    path.write_text("editor:dana:short\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert (await client.get("/admin/api/me", headers=rotated)).status_code == 401
    assert errors_total("token_config") == before + 1


# ---- hostile references, bodies and comments ------------------------------------------------------------
@pytest.mark.parametrize("ref", ["²", "١٢", "9" * 5000, "-1", "1.5", "", "draft", "1e3"])
async def test_a_diff_reference_that_is_not_a_version_is_422_not_500(client: httpx.AsyncClient, ref: str) -> None:
    before = errors_total("bad_request")
    r = await client.get("/admin/api/policies/diff", params={"a": ref, "b": "1"}, headers=auth("viewer"))
    assert r.status_code == 422, r.text
    assert "not a version or draft reference" in r.json()["detail"]["message"]
    assert len(r.json()["detail"]["message"]) < 200  # 5000 digits are not echoed back whole
    assert errors_total("bad_request") == before + 1


async def test_malformed_json_gets_the_documented_error_shape_and_is_counted(client: httpx.AsyncClient) -> None:
    before = errors_total("bad_request")
    r = await client.post("/admin/api/publish", content=b'{"draft_id": ', headers={
        **auth("publisher"), "Content-Type": "application/json"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "not valid JSON" in detail["message"] and detail["errors"][0]["line"] is None
    r = await client.post("/admin/api/rollback", json={"version": "three"}, headers=auth("publisher"))
    assert r.status_code == 422
    paths = {e["path"] for e in r.json()["detail"]["errors"]}
    assert {"version", "expected_version"} <= paths
    assert "version" in r.json()["detail"]["message"]
    assert errors_total("bad_request") == before + 2


async def test_a_megabyte_comment_is_refused_before_it_reaches_the_audit_log(client: httpx.AsyncClient,
                                                                             default_yaml: str) -> None:
    huge = "x" * 1_000_000
    r = await client.post("/admin/api/publish", json={"yaml": default_yaml, "expected_version": 1, "comment": huge},
                          headers=auth("publisher"))
    assert r.status_code == 422 and "comment" in r.json()["detail"]["message"]
    r = await client.post("/admin/api/drafts", json={"yaml": default_yaml, "comment": huge}, headers=auth("editor"))
    assert r.status_code == 422
    audit = (await client.get("/admin/api/audit", headers=auth("viewer"))).json()
    assert all(len(e.get("detail", "")) <= 1000 for e in audit)
    assert (await client.get("/admin/api/policies", headers=auth("viewer"))).json()["current"] == 1


async def test_unknown_versions_and_drafts_are_counted(client: httpx.AsyncClient) -> None:
    before = errors_total("not_found")
    assert (await client.get("/admin/api/policies/77", headers=auth("viewer"))).status_code == 404
    assert (await client.get("/admin/api/drafts/version:1", headers=auth("viewer"))).status_code == 404
    assert (await client.get("/admin/static/nothing.js")).status_code == 404
    assert errors_total("not_found") == before + 3
    # traversal out of the draft keys or the static folder matches no route at all
    for path in ("/admin/api/drafts/..%2F..%2Fversion:1", "/admin/static/..%2Fapi.py", "/admin/static/%2E%2E/auth.py"):
        r = await client.get(path, headers=auth("viewer"))
        assert r.status_code == 404 and "import" not in r.text


# ---- diffs ---------------------------------------------------------------------------------------------
def test_the_unified_diff_of_a_text_without_a_final_newline_applies_with_patch(tmp_path: Path) -> None:
    import shutil
    import subprocess

    a, b = "a: 1\nb: 2", "a: 1\nb: 3"
    d = unified_diff(a, b, "a.yaml", "b.yaml")
    assert "-b: 2+b: 3" not in d  # the two lines used to run together
    assert d.count("\\ No newline at end of file") == 2
    if shutil.which("patch"):
        (tmp_path / "a.yaml").write_text(a)
        (tmp_path / "d.diff").write_text(d)
        subprocess.run(["patch", "-s", "-o", "out.yaml", "a.yaml", "d.diff"], cwd=tmp_path, check=True)
        assert (tmp_path / "out.yaml").read_text() == b
    # a newline added at the end is a change, not "no differences" in the unified form
    assert unified_diff("a: 1", "a: 1\n", "x", "y") != ""


def test_diff_line_numbers_match_the_editors_when_a_prompt_holds_a_form_feed_or_line_separator() -> None:
    a = "prompts:\n  hi: \"one\x0ctwo\u2028three\"\nx: 1\n"
    b = a.replace("x: 1", "x: 2")
    changed = [r for r in side_by_side(a, b) if r["op"] != "equal"]
    assert [(r["a_line"], r["b_line"], r["b"]) for r in changed] == [(3, 3, "x: 2")]



async def test_a_pasted_page_is_not_spoken_as_one_try_it_turn(client: httpx.AsyncClient) -> None:
    before = errors_total("bad_request")
    r = await client.post("/admin/api/simulate", data={"text": "pay my bill " * 200}, headers=auth("editor"))
    assert r.status_code == 422 and "500 characters" in r.json()["detail"]["message"]
    assert errors_total("bad_request") == before + 1


async def test_an_unknown_endpoint_or_method_is_refused_counted_and_headed(client: httpx.AsyncClient) -> None:
    before = errors_total("not_found")
    r = await client.get("/admin/api/polices", headers=auth("viewer"))  # a typo
    assert r.status_code == 404 and "no admin API endpoint" in r.json()["detail"]["message"]
    assert r.headers["x-frame-options"] == "DENY"
    assert errors_total("not_found") == before + 1
    refused = errors_total("refused")
    r = await client.delete("/admin/api/policies", headers=auth("publisher"))
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert errors_total("refused") == refused + 1
    # the routes it stands behind still answer
    assert (await client.get("/admin/api/policies/diff?a=1&b=1", headers=auth("viewer"))).status_code == 200
    assert (await client.put("/admin/api/drafts/nope", json={"yaml": "x"}, headers=auth("editor"))).status_code == 404
