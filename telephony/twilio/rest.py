"""Twilio REST: redirect a live call to new TwiML (transfer). The only Twilio API the bot calls.

Every failure is classified (`UpdateResult.result`) so the bridge can log and count why a caller was not
moved. A call update is not idempotent (a second redirect re-enqueues the caller and loses their place), so
it is retried only when Twilio cannot have acted on it (connection refused, 429, 503) or, for answers that
leave it open (500/502/504, a read timeout), only while the call's media stream is still up: a redirect that
took effect stops the stream. Nothing is retried once the caller is gone, and all attempts together stay
within `budget_s` (under the conversation's own 10 s cap on a transfer).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote, urlsplit

import httpx

from ops.logs import get_logger
from telephony.twilio import twiml

log = get_logger("telephony.twilio.rest")

# Twilio's answer for a call that is no longer in progress ("Call is not in-progress. Cannot redirect.")
CALL_NOT_IN_PROGRESS = 21220
_CALL_GONE_CODES = {CALL_NOT_IN_PROGRESS, 20404}
_SAFE_STATUSES = {429, 503}  # refused before anything happened to the call
_AMBIGUOUS_STATUSES = {500, 502, 504}  # may or may not have moved the call
# kinds of result; `ok` is the only success
RESULTS = ("ok", "auth_failed", "call_gone", "rate_limited", "server_error", "timeout", "unreachable", "dropped",
           "rejected", "unconfigured")


class TwilioConfigError(ValueError):
    """Twilio REST settings that can never work (caught at start, not on a caller's transfer)."""


@dataclass(frozen=True)
class UpdateResult:
    result: str  # one of RESULTS
    status: int = 0  # HTTP status of the last attempt (0: no answer)
    code: int | None = None  # Twilio's error code from the body, when it gave one
    message: str = ""  # Twilio's error message / the exception, short
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    @property
    def detail(self) -> str:
        parts = [self.result]
        if self.status:
            parts.append(f"status:{self.status}")
        if self.code is not None:
            parts.append(f"code:{self.code}")
        if self.message:
            parts.append(self.message)
        return " ".join(parts)


def check_api_base(api_base: str) -> str:
    """TWILIO_API_BASE: an http(s) URL with a host (regions/edges: https://api.dublin.ie1.twilio.com)."""
    parts = urlsplit(api_base.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TwilioConfigError(f"TWILIO_API_BASE={api_base!r}: expected an http(s) URL such as https://api.twilio.com")
    return api_base.strip().rstrip("/")


def _retry_after_s(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:  # an HTTP date: not worth parsing for a call that cannot wait long anyway
        return None


def _twilio_error(resp: httpx.Response) -> tuple[int | None, str]:
    try:
        body = resp.json()
    except ValueError:
        return None, ""
    if not isinstance(body, dict):
        return None, ""
    code = body.get("code")
    return (code if isinstance(code, int) else None), str(body.get("message") or "")[:120]


class TwilioRest:
    def __init__(self, api_base: str, account_sid: str, auth_token: str, timeout_s: float = 5.0,
                 api_key: str = "", api_secret: str = "", budget_s: float = 8.0, max_attempts: int = 3,
                 backoff_s: float = 0.5) -> None:
        """Basic auth is `api_key:api_secret` when both are set (an API key of the account), else
        `account_sid:auth_token` (`account_sid` empty: the SID of the call's own account)."""
        if bool(api_key) != bool(api_secret):
            raise TwilioConfigError("TWILIO_API_KEY and TWILIO_API_SECRET go together: set both or neither")
        if not (auth_token or api_key):
            raise TwilioConfigError("Twilio REST needs TWILIO_AUTH_TOKEN or TWILIO_API_KEY + TWILIO_API_SECRET")
        self.api_base = check_api_base(api_base)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._key = (api_key, api_secret) if api_key else None
        self.budget_s = budget_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s)

    def _auth(self, call_account: str) -> tuple[str, str]:
        if self._key is not None:
            return self._key
        # the configured (parent) account's token also works for its subaccounts' calls
        return (self.account_sid or call_account, self.auth_token)

    async def _attempt(self, url: str, data: dict[str, str], auth: tuple[str, str], timeout_s: float) \
            -> tuple[UpdateResult, str, float | None]:
        """One POST: (result, may_retry: "safe" | "ambiguous" | "", retry_after_s)."""
        try:
            resp = await self._client.post(url, data=data, auth=auth, timeout=timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return UpdateResult("unreachable", message=type(exc).__name__), "safe", None
        except httpx.TimeoutException as exc:  # sent, no answer in time: it may have taken effect
            return UpdateResult("timeout", message=type(exc).__name__), "ambiguous", None
        except httpx.HTTPError as exc:  # sent, then the connection dropped without an answer
            return UpdateResult("dropped", message=type(exc).__name__), "ambiguous", None
        if resp.status_code < 300:
            return UpdateResult("ok", status=resp.status_code), "", None
        code, message = _twilio_error(resp)
        st = resp.status_code
        if st in (401, 403):
            kind, retry = "auth_failed", ""
        elif st == 404 or code in _CALL_GONE_CODES:
            kind, retry = "call_gone", ""
        elif st == 429:
            kind, retry = "rate_limited", "safe"
        elif st in _SAFE_STATUSES:
            kind, retry = "server_error", "safe"
        elif st in _AMBIGUOUS_STATUSES:
            kind, retry = "server_error", "ambiguous"
        elif st >= 500:
            kind, retry = "server_error", ""
        else:
            kind, retry = "rejected", ""
        return UpdateResult(kind, status=st, code=code, message=message), retry, _retry_after_s(resp)

    async def update_call(self, call_sid: str, twiml_doc: str, account_sid: str = "",
                          still_live: Callable[[], bool] | None = None) -> UpdateResult:
        """POST .../Calls/{CallSid}.json with Twiml=..., retried as the module docstring says.
        `still_live()` is False once the call's stream has ended (caller gone, or the call moved)."""
        sid = account_sid or self.account_sid
        if not sid or not call_sid:
            return UpdateResult("unconfigured", message="no account SID (TWILIO_ACCOUNT_SID) or call SID")
        url = f"{self.api_base}/2010-04-01/Accounts/{quote(sid, safe='')}/Calls/{quote(call_sid, safe='')}.json"
        auth = self._auth(sid)
        t0 = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            left = self.budget_s - (time.monotonic() - t0)
            res, retry, retry_after = await self._attempt(url, {"Twiml": twiml_doc}, auth,
                                                          max(0.1, min(self._timeout_s, left)))
            res = UpdateResult(res.result, res.status, res.code, res.message, attempt)
            if res.ok or not retry or attempt >= self.max_attempts:
                return res
            if retry == "ambiguous" and still_live is None:
                return res  # no way to tell whether it moved the call: never redirect twice
            delay = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
            left = self.budget_s - (time.monotonic() - t0)
            if delay + 0.5 > left:  # no time for the wait and a useful attempt after it
                return res
            log.info("twilio_update_retry", call_id=call_sid, result=res.result, status=res.status,
                     attempt=attempt, delay_s=round(delay, 2), ambiguous=retry == "ambiguous")
            await asyncio.sleep(delay)
            if still_live is not None and not still_live():
                return res  # the caller hung up (or an ambiguous attempt did move the call): don't touch it

    async def transfer(self, call_sid: str, target: str, account_sid: str = "",
                       still_live: Callable[[], bool] | None = None, dial: twiml.DialOptions | None = None) \
            -> UpdateResult:
        try:
            doc = twiml.transfer(target, dial)
        except ValueError as exc:
            return UpdateResult("rejected", message=str(exc)[:120])
        return await self.update_call(call_sid, doc, account_sid, still_live)

    async def aclose(self) -> None:
        await self._client.aclose()
