"""Admin API (under /admin/api) and the web console (at /admin).

Roles: viewer reads everything; editor also writes drafts, validates, simulates and places
softphone calls; publisher also publishes and rolls back. Every route is in the OpenAPI schema
(/docs) with the bearer scheme. Errors are JSON: 401/403 auth, 404 unknown version/draft/call,
409 publish conflict, 413 oversized upload, 415 not a WAV, 422 invalid policy (line-located).
"""

from __future__ import annotations

import asyncio
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from bot.admin import live, simulate
from bot.admin.auth import Principal, principal, require
from bot.admin.context import MAX_UPLOAD_BYTES, get_call_store, get_engine, get_redis, get_store, log
from ops import metrics
from ops.logs import mask_digits
from policies.store import (Actor, DraftConflict, NotFound, PolicyInvalid, PolicyStore, PublishConflict, side_by_side,
                            unified_diff)

STATIC = Path(__file__).with_name("static")
API = "/api"  # the app mounts this router under /admin


# Everything the console loads comes from this server; no framing (clickjacking), no plugins.
_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
# On every admin answer (errors too, and the console's files however they are reached): the console must not be
# framed (X-Frame-Options for browsers that ignore frame-ancestors), nothing is sniffed into another type, no
# admin URL leaks to another site, and API answers (policies, transcripts) stay out of shared caches.
_SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _CappedRoute(APIRoute):
    """Request bodies over MAX_UPLOAD_BYTES get 413 while they are read: a declared Content-Length is
    refused before a byte is read, and a chunked body (no Content-Length) is cut off at the limit
    instead of being buffered whole and then parsed. Redis out of reach is a JSON 503, not a 500.
    Every refused request (4xx) is logged and counted, and every answer carries the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def capped(request: Request) -> Response:
            try:
                response = await _capped(request)
            except RedisError as exc:
                response = _redis_down(request, exc)
            except RequestValidationError as exc:
                response = _bad_request(request, exc)
            except StarletteHTTPException as exc:
                _log_refused(request, exc)
                response = await http_exception_handler(request, exc)
            for k, v in _SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
            if "/api/" in request.url.path:
                response.headers["Cache-Control"] = "no-store"
            return response

        async def _capped(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                _limit_body(request)
                receive, seen = request.receive, 0

                async def receive_capped() -> Message:
                    nonlocal seen
                    msg = await receive()
                    if msg["type"] == "http.request":
                        seen += len(msg.get("body", b""))
                        if seen > MAX_UPLOAD_BYTES:
                            raise _too_large()
                    return msg

                request = Request(request.scope, receive_capped)
            return await handler(request)

        return capped


def _log_refused(request: Request, exc: StarletteHTTPException) -> None:
    """401/403/429 are logged and counted where they are decided (auth.py), with who; the rest here, with what
    (counted here unless _err already did)."""
    if exc.status_code in (401, 403, 429) or exc.status_code < 400:
        return
    if not getattr(exc, "counted", False):
        metrics.ERRORS.labels("admin", {404: "not_found", 503: "unavailable"}.get(exc.status_code, "refused")).inc()
    detail = exc.detail.get("message", "") if isinstance(exc.detail, dict) else str(exc.detail)
    log.info("admin_request_refused", status=exc.status_code, method=request.method, path=request.url.path,
             reason=str(detail)[:200])


def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A malformed request body or parameter: the documented error shape ({message, errors}), logged and
    counted, instead of FastAPI's bare list (which the console could only show as "HTTP 422")."""
    errors = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = (e.get("ctx") or {}).get("error", "")
            errors.append({"line": None, "column": None, "path": "",
                           "message": f"the body is not valid JSON ({why}, at character {e['loc'][-1]})"})
            continue
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")]
        errors.append({"line": None, "column": None, "path": ".".join(loc), "message": str(e.get("msg", ""))})
    summary = "; ".join(f"{e['path']}: {e['message']}" if e["path"] else e["message"] for e in errors[:3])
    metrics.ERRORS.labels("admin", "bad_request").inc()
    log.info("admin_request_refused", status=422, method=request.method, path=request.url.path, reason=summary[:200])
    return JSONResponse({"detail": {"message": f"invalid request: {summary}", "errors": errors}}, status_code=422)


def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
    """The policy store is out of reach. Publish and rollback are one Lua script each, so nothing is
    half-written; the live policy stays what the workers already have."""
    metrics.ERRORS.labels("admin", "redis_unavailable").inc()
    log.warning("admin_redis_unavailable", method=request.method, path=request.url.path, error=repr(exc))
    message = ("the policy store (Redis) is not reachable; nothing was changed by this request, and calls keep the "
               "policy they have. Try again in a moment")
    if request.url.path.endswith(("/publish", "/rollback")):
        message = ("the policy store (Redis) is not reachable, so this could not be confirmed; the live policy is "
                   "either unchanged or fully switched (never half-written). Reload the versions list before retrying")
    return JSONResponse({"detail": {"message": message, "error": type(exc).__name__}}, status_code=503)


router = APIRouter(route_class=_CappedRoute)


# ---- models ----
# Comments land in the audit stream (10 000 entries) and the versions list: a megabyte each is a mistake.
MAX_COMMENT = 1000
MAX_TRY_TEXT = 500  # try-it: one caller turn, spoken by the bot's voice


class DraftIn(BaseModel):
    yaml: str = Field(description="Policy YAML text")
    comment: str = Field("", max_length=MAX_COMMENT)
    base_version: int | None = Field(None, description="Version the draft started from (default: current)")


class DraftUpdate(BaseModel):
    yaml: str
    comment: str | None = Field(None, max_length=MAX_COMMENT)
    rev: int | None = Field(None, description="Revision the editor loaded; 409 if the draft was saved since (no lost edits)")


class YamlIn(BaseModel):
    yaml: str


class PublishIn(BaseModel):
    draft_id: str | None = Field(None, description="Publish this draft (it is removed once published)")
    draft_rev: int | None = Field(None, description="Revision of the draft the publisher reviewed; 409 if it was saved since")
    yaml: str | None = Field(None, description="...or publish this YAML text directly")
    expected_version: int = Field(description="The current version the publisher saw; 409 if it changed")
    comment: str = Field("", max_length=MAX_COMMENT)


class RollbackIn(BaseModel):
    version: int
    expected_version: int
    comment: str = Field("", max_length=MAX_COMMENT)


class OfferIn(BaseModel):
    sdp: str
    type: str = "offer"
    draft_id: str | None = None
    yaml: str | None = None
    version: int | None = None
    # the call id of a softphone call whose worker died: this offer carries it on (leg 2+) instead of a new call
    resume: str | None = Field(default=None, max_length=64)


# ---- helpers ----
_VERSION_REF = re.compile(r"[0-9]{1,15}")


def _actor(p: Principal) -> Actor:
    return Actor(p.name, p.role, p.ip)


def _err(status: int, kind: str, message: str, **extra: Any) -> HTTPException:
    metrics.ERRORS.labels("admin", kind).inc()
    exc = HTTPException(status, {"message": message, **extra})
    exc.counted = True  # type: ignore[attr-defined] - _log_refused must not count it twice
    return exc


def _invalid(exc: PolicyInvalid) -> HTTPException:
    return _err(422, "invalid_policy", "the policy does not validate", errors=[i.to_dict() for i in exc.issues])


def _conflict(exc: PublishConflict) -> HTTPException:
    return _err(409, "publish_conflict", str(exc), expected=exc.expected, current=exc.current)


@contextmanager
def _store_errors() -> Iterator[None]:
    """The policy store's exceptions as JSON answers: 404 unknown, 409 conflict, 422 invalid."""
    try:
        yield
    except PolicyInvalid as exc:
        raise _invalid(exc) from exc
    except PublishConflict as exc:
        raise _conflict(exc) from exc
    except DraftConflict as exc:
        raise _err(409, "draft_conflict", str(exc), draft_id=exc.draft_id, expected_rev=exc.expected,
                   current_rev=exc.current) from exc
    except NotFound as exc:
        raise _err(404, "not_found", str(exc.args[0])) from exc


def _too_large() -> HTTPException:
    return _err(413, "upload_too_large", f"request body is larger than {MAX_UPLOAD_BYTES} bytes (BOT_ADMIN_MAX_UPLOAD_BYTES)")


def _limit_body(request: Request) -> None:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > MAX_UPLOAD_BYTES:
        raise _too_large()


async def _policy_text(store: PolicyStore, draft_id: str | None, yaml_text: str | None, version: int | None) -> tuple[str, str]:
    """(yaml, label) for a simulation or softphone call: explicit YAML, a draft, a version, or current."""
    with _store_errors():
        if yaml_text:
            return yaml_text, "unsaved draft"
        if draft_id:
            return (await store.get_draft(draft_id))["yaml"], f"draft:{draft_id}"
        v = version or await store.current_version()
        return (await store.get_version(v)).yaml, f"v{v}"


# ---- console ----


@router.get("", include_in_schema=False)
async def console() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})


@router.get("/", include_in_schema=False)
async def console_slash() -> FileResponse:
    return await console()


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        raise HTTPException(404, "no such file")
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
    # no-cache: without it browsers cached the modules heuristically (by Last-Modified), so after an upgrade
    # the console could run yesterday's app.js against today's API (a few dozen KB per load is nothing here).
    return FileResponse(path, media_type=types.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "no-cache"})


# ---- who am I ----
@router.get(f"{API}/me", tags=["admin"], summary="The caller's name and role")
async def me(p: Principal = Depends(principal)) -> dict[str, str]:
    return {"name": p.name, "role": p.role}


# ---- versions ----
@router.get(f"{API}/policies", tags=["policies"], summary="List policy versions (newest first) and the current one")
async def list_policies(request: Request, _: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    store = get_store(request)
    return {
        "current": await store.current_version(),
        "versions": [v.to_dict() for v in await store.list_versions()],
        "history": await store.history(50),
    }


@router.get(f"{API}/policies/diff", tags=["policies"], summary="Diff two versions (or a version and a draft)")
async def diff(
    request: Request,
    a: str = Query(description="version number, or draft:<id>"),
    b: str = Query(description="version number, or draft:<id>"),
    _: Principal = Depends(require("viewer")),
) -> dict[str, Any]:
    store = get_store(request)

    async def text(ref: str) -> str:
        with _store_errors():
            if ref.startswith("draft:"):
                return (await store.get_draft(ref[6:]))["yaml"]
            if not _VERSION_REF.fullmatch(ref):  # not str.isdigit: '²' or 5000 digits made int() raise (500)
                raise _err(422, "bad_request", f"not a version or draft reference: {ref[:40]!r}")
            return (await store.get_version(int(ref))).yaml

    ta, tb = await text(a), await text(b)
    return {"a": a, "b": b, "unified": unified_diff(ta, tb, a, b), "rows": side_by_side(ta, tb)}


@router.get(f"{API}/policies/{{version}}", tags=["policies"], summary="Read one version with its YAML")
async def get_policy(version: int, request: Request, _: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    with _store_errors():
        info = await get_store(request).get_version(version)
    return info.to_dict(with_yaml=True)


# ---- drafts ----
@router.get(f"{API}/drafts", tags=["drafts"], summary="List drafts")
async def list_drafts(request: Request, _: Principal = Depends(require("viewer"))) -> list[dict[str, Any]]:
    return await get_store(request).list_drafts()


@router.post(f"{API}/drafts", tags=["drafts"], status_code=201, summary="Create a draft", dependencies=[Depends(_limit_body)])
async def create_draft(body: DraftIn, request: Request, p: Principal = Depends(require("editor"))) -> dict[str, Any]:
    return await get_store(request).create_draft(body.yaml, _actor(p), body.comment, body.base_version)


@router.get(f"{API}/drafts/{{draft_id}}", tags=["drafts"], summary="Read a draft")
async def get_draft(draft_id: str, request: Request, _: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    with _store_errors():
        return await get_store(request).get_draft(draft_id)


@router.put(f"{API}/drafts/{{draft_id}}", tags=["drafts"], summary="Update a draft", dependencies=[Depends(_limit_body)])
async def update_draft(draft_id: str, body: DraftUpdate, request: Request, p: Principal = Depends(require("editor"))) -> dict[str, Any]:
    with _store_errors():
        return await get_store(request).update_draft(draft_id, body.yaml, _actor(p), body.comment, body.rev)


@router.delete(f"{API}/drafts/{{draft_id}}", tags=["drafts"], status_code=204, summary="Delete a draft")
async def delete_draft(draft_id: str, request: Request, p: Principal = Depends(require("editor"))) -> None:
    with _store_errors():
        await get_store(request).delete_draft(draft_id, _actor(p))


# ---- validate / publish / rollback ----
@router.post(f"{API}/validate", tags=["policies"], summary="Validate YAML: line-located errors", dependencies=[Depends(_limit_body)])
async def validate(body: YamlIn, request: Request, _: Principal = Depends(require("editor"))) -> dict[str, Any]:
    try:
        await get_store(request).check(body.yaml)
    except PolicyInvalid as exc:  # an answer, not an error: the console validates as the admin types
        return {"valid": False, "errors": [i.to_dict() for i in exc.issues]}
    return {"valid": True, "errors": []}


@router.post(f"{API}/publish", tags=["policies"], summary="Publish a draft or YAML as the next version", dependencies=[Depends(_limit_body)])
async def publish(body: PublishIn, request: Request, p: Principal = Depends(require("publisher"))) -> dict[str, Any]:
    store = get_store(request)
    if not (body.draft_id or body.yaml):
        raise _err(422, "bad_request", "give draft_id or yaml")
    try:
        with _store_errors():
            if body.draft_id:
                v = await store.publish_draft(body.draft_id, body.expected_version, _actor(p), body.comment,
                                              body.draft_rev)
            else:
                v = await store.publish(body.yaml, body.expected_version, _actor(p), body.comment)
    except HTTPException as exc:
        await _audit_refused(store, "publish_refused", p, exc, draft=body.draft_id or "")
        raise
    return {"version": v, "current": v}


async def _audit_refused(store: PolicyStore, action: str, p: Principal, exc: HTTPException, **extra: Any) -> None:
    """A refused publish or rollback (invalid, stale, conflicting) in the audit log too: who tried what."""
    detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
    try:
        await store.audit(action, _actor(p), str(detail.get("message", ""))[:200], status=exc.status_code, **extra)
    except Exception as audit_exc:  # noqa: BLE001 - the admin's answer must not depend on the audit write
        log.warning("audit_failed", action=action, error=repr(audit_exc))


@router.post(f"{API}/rollback", tags=["policies"], summary="Make an earlier version current again")
async def rollback(body: RollbackIn, request: Request, p: Principal = Depends(require("publisher"))) -> dict[str, Any]:
    store = get_store(request)
    try:
        with _store_errors():
            try:
                v = await store.rollback(body.version, body.expected_version, _actor(p), body.comment)
            except PolicyInvalid as exc:  # not the usual 422: the admin sent no YAML, an old version went stale
                raise _err(422, "rollback_invalid",
                           f"version {body.version} no longer validates against the current schema",
                           errors=[i.to_dict() for i in exc.issues]) from exc
    except HTTPException as exc:
        await _audit_refused(store, "rollback_refused", p, exc, version=body.version)
        raise
    return {"version": v, "current": v}


@router.get(f"{API}/audit", tags=["policies"], summary="Audit log: who did what, when, from where")
async def audit(request: Request, count: int = Query(100, ge=1, le=1000), _: Principal = Depends(require("viewer"))) -> list[dict[str, Any]]:
    return await get_store(request).audit_log(count)


# ---- try it ----
@router.post(f"{API}/simulate", tags=["try-it"], summary="Run an utterance (text spoken by the bot's voice, or a WAV) through engine + decide")
async def simulate_turn(
    request: Request,
    text: str | None = Form(None, description="Utterance; synthesized with the bot's own voice, then understood"),
    audio: UploadFile | None = File(None, description="A WAV file (any rate, mono or stereo)"),
    yaml: str | None = Form(None, description="Policy YAML to decide with (an unsaved draft)"),
    draft_id: str | None = Form(None),
    version: int | None = Form(None),
    p: Principal = Depends(require("editor")),
) -> dict[str, Any]:
    _limit_body(request)
    store = get_store(request)
    policy_yaml, label = await _policy_text(store, draft_id, yaml, version)
    with _store_errors():
        policy = await store.check(policy_yaml)
    if audio is not None and audio.filename:
        data = await audio.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise _err(413, "upload_too_large", f"upload is larger than {MAX_UPLOAD_BYTES} bytes")
        try:
            pcm = await asyncio.get_running_loop().run_in_executor(None, simulate.wav_to_pcm8k, data)
        except simulate.NotWav as exc:
            raise _err(415, "not_wav", str(exc)) from exc
        source = "audio"
    elif text and text.strip():
        if len(text) > MAX_TRY_TEXT:  # one caller turn; a pasted page would hold the engine for minutes
            raise _err(422, "bad_request", f"the utterance is longer than {MAX_TRY_TEXT} characters; "
                       "type what a caller says in one turn")
        pcm, source = None, "text"
    else:
        raise _err(422, "bad_request", "give an utterance text or a WAV file")
    engine = await get_engine(request)
    try:
        result = await simulate.run(engine, policy, pcm=pcm, text=text if source == "text" else None)
    except simulate.EngineProblem as exc:
        raise _err(exc.status, exc.kind, str(exc)) from exc
    result["policy"] = label
    result["input"] = source
    log.info("admin_simulate", actor=p.name, policy=label, input=source)
    return result


# ---- live view ----
@router.get(f"{API}/calls", tags=["live"], summary="Calls in progress on every worker (from Redis)")
async def calls(request: Request, _: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    return {"calls": await live.live_calls(get_call_store(request))}


@router.get(f"{API}/calls/{{call_id}}", tags=["live"], summary="A call's record and event stream")
async def call_detail(call_id: str, request: Request, _: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    got = await get_call_store(request).get_call(call_id)
    if got is None:
        raise _err(404, "not_found", f"call {call_id} not found")
    return _without_caller_number(got)


def _without_caller_number(got: dict[str, Any]) -> dict[str, Any]:
    """The console shows the caller masked, as logs and `bot calls show` do: a viewer watching calls has no need
    of the raw number (the record keeps it for the callback team, which gets it through the webhook)."""
    import json

    rec = dict(got["record"])
    if rec.get("caller"):
        rec["caller"] = rec.get("caller_masked") or mask_digits(rec["caller"])
    if isinstance(rec.get("handoff"), str):
        try:
            handoff = json.loads(rec["handoff"])
        except ValueError:
            handoff = None
        if isinstance(handoff, dict) and handoff.get("caller"):
            handoff["caller"] = mask_digits(str(handoff["caller"]))
            rec["handoff"] = json.dumps(handoff)
    events = []
    for e in got["events"]:
        ctx = e.get("context")
        if isinstance(ctx, dict) and ctx.get("caller"):
            e = {**e, "context": {**ctx, "caller": mask_digits(str(ctx["caller"]))}}
        events.append(e)
    return {"record": rec, "events": events}


@router.get(f"{API}/stats/today", tags=["live"], summary="Today's (UTC) automation, clarification and escalation rates")
async def stats_today(request: Request, _: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    return await live.today_stats(get_redis(request))


# ---- softphone ----
@router.get(f"{API}/softphone/config", tags=["softphone"], summary="STUN/TURN servers for the browser's peer connection")
async def softphone_config(_: Principal = Depends(require("editor"))) -> dict[str, Any]:
    from bot.admin import softphone

    try:
        return softphone.browser_config()
    except softphone.SoftphoneError as exc:
        raise _err(exc.status, exc.kind, str(exc)) from exc


@router.post(f"{API}/softphone/offer", tags=["softphone"], summary="WebRTC offer -> answer; the call runs the normal conversation")
async def softphone_offer(body: OfferIn, request: Request, p: Principal = Depends(require("editor"))) -> JSONResponse:
    from bot.admin import softphone

    store = get_store(request)
    policy_yaml, label = await _policy_text(store, body.draft_id, body.yaml, body.version)
    with _store_errors():
        policy = await store.check(policy_yaml)
    try:
        answer = await softphone.start_call(request.app, body.sdp, body.type, policy, label, p, resume=body.resume)
    except softphone.SoftphoneError as exc:
        err = _err(exc.status, exc.kind, str(exc))
        err.detail["kind"] = exc.kind  # the console tells call_live (try again) from call_over
        raise err from exc
    return JSONResponse(answer)



# ---- anything else under /admin/api ----
# Registered last: a path no route above serves (a typo, a scanner) is refused like every other request here:
# logged, counted and with the security headers. A known path with the wrong method is a 405 that says which.
@router.api_route(f"{API}/{{rest:path}}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_endpoint(rest: str, request: Request) -> Response:
    path, ours = request.url.path, f"{API}/{rest}"  # the path as this router's own routes spell it (no mount prefix)
    methods = sorted({m for r in router.routes
                      if isinstance(r, APIRoute) and r.endpoint is not unknown_endpoint and r.path_regex.fullmatch(ours)
                      for m in (r.methods or ())})
    if methods:
        raise HTTPException(405, {"message": f"{request.method} is not allowed here; use {', '.join(methods)}"},
                            headers={"Allow": ", ".join(methods)})
    raise _err(404, "not_found", f"no admin API endpoint {request.method} {path[:120]}")
