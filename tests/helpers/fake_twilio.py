"""A local HTTP server that speaks Twilio's REST wire format for call updates (transfer):
POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json with form `Twiml`, basic auth
SID:token. It checks the auth, records each request and answers like Twilio (JSON call resource).
The only fake the house rules allow: Twilio REST itself.

Failure modes are scripted the way Twilio shows them: `script` answers the next call updates in order (an
int status, or a dict with `status`, optional `headers` such as Retry-After, `body`, `delay_s` before the
answer, or `drop`: close the connection without one); `completed` holds CallSids whose call is over (400 with
Twilio's 21220 "Call is not in-progress. Cannot redirect."); an unknown AccountSid in the path is 404 (20404).

It also hosts a contact center's escalation receiver at POST /escalations (BOT_ESCALATION_WEBHOOK): no
Twilio auth; each delivery is recorded with its headers and parsed body, its signature checked with
`webhook_secret` when set (a bad one gets 401), and `escalation_statuses` scripts the answers
(e.g. [500] fails the first delivery attempt once, then 200)."""

from __future__ import annotations

import base64
import json
import re
import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

_PATH = re.compile(r"^/2010-04-01/Accounts/(AC\w+)/Calls/(CA\w+)\.json$")


class FakeTwilioApi:
    def __init__(self, account_sid: str, auth_token: str, fail: bool = False) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.fail = fail
        # called with the CallSid of an authenticated call update before it is answered: real Twilio may
        # stop the call's Media Stream (it moved the call) before its HTTP answer reaches the bot
        self.before_update: Callable[[str], None] | None = None
        self.requests: list[dict[str, Any]] = []
        self.script: list[int | dict[str, Any]] = []
        self.completed: set[str] = set()
        self.accounts: set[str] = {account_sid}  # accounts the credentials may act on (subaccounts too)
        self.webhook_secret = ""
        self.escalation_statuses: list[int] = []
        self.escalations: list[dict[str, Any]] = []  # {"headers", "body", "signature_ok", "status"}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/escalations":
                    return self._escalation(raw)
                body = raw.decode()
                form = {k: v[0] for k, v in parse_qs(body).items()}
                m = _PATH.match(self.path)
                auth = self.headers.get("authorization", "")
                expected = "Basic " + base64.b64encode(f"{api.account_sid}:{api.auth_token}".encode()).decode()
                api.requests.append({"path": self.path, "form": form, "auth_ok": auth == expected,
                                     "auth": auth, "t": time.monotonic()})
                if auth != expected:
                    return self._send(401, {"code": 20003, "message": "Authenticate", "status": 401})
                if not m or m.group(1) not in api.accounts:
                    return self._send(404, {"code": 20404, "message": "The requested resource was not found",
                                            "status": 404})
                if api.before_update is not None:
                    api.before_update(m.group(2))
                if api.script:
                    step = api.script.pop(0)
                    step = {"status": step} if isinstance(step, int) else step
                    time.sleep(step.get("delay_s", 0))
                    if step.get("drop"):
                        self.close_connection = True
                        return
                    st = step["status"]
                    if st >= 300:
                        return self._send(st, step.get("body", {"code": 20000 + st, "message": "scripted",
                                                                "status": st}), step.get("headers"))
                if m.group(2) in api.completed:
                    return self._send(400, {"code": 21220, "message": "Call is not in-progress. Cannot redirect.",
                                            "status": 400})
                if api.fail:
                    return self._send(500, {"code": 20500, "message": "Internal Server Error", "status": 500})
                self._send(200, {"sid": m.group(2), "account_sid": m.group(1), "status": "in-progress",
                                 "api_version": "2010-04-01", "uri": self.path})

            def _escalation(self, raw: bytes) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                ts = headers.get("x-voicebot-timestamp", "")
                sig_ok = None
                if api.webhook_secret:  # what a receiver does (docs/twilio.md): HMAC of "<timestamp>.<raw body>"
                    mac = hmac.new(api.webhook_secret.encode(), ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
                    sig_ok = hmac.compare_digest(f"sha256={mac}", headers.get("x-voicebot-signature", ""))
                status = api.escalation_statuses.pop(0) if api.escalation_statuses else 200
                if sig_ok is False:
                    status = 401
                api.requests.append({"path": self.path, "form": {}, "auth_ok": True})
                api.escalations.append({"headers": headers, "body": json.loads(raw or b"null"),
                                        "signature_ok": sig_ok, "status": status})
                self._send(status, {"ok": 200 <= status < 300})

            def _send(self, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeTwilioApi":
        self._thread.start()
        return self

    def __exit__(self, *_a: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
