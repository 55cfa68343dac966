"""Twilio REST: redirect a live call to new TwiML (transfer). The only Twilio API the bot calls."""

from __future__ import annotations

import httpx

from ops.logs import get_logger
from telephony.twilio import twiml

log = get_logger("telephony.twilio.rest")


class TwilioRest:
    def __init__(self, api_base: str, account_sid: str, auth_token: str, timeout_s: float = 5.0) -> None:
        self.api_base = api_base.rstrip("/")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def update_call(self, call_sid: str, twiml_doc: str, account_sid: str = "") -> tuple[bool, str]:
        """POST .../Calls/{CallSid}.json with Twiml=...; (ok, detail)."""
        sid = account_sid or self.account_sid
        url = f"{self.api_base}/2010-04-01/Accounts/{sid}/Calls/{call_sid}.json"
        try:
            resp = await self._client.post(url, data={"Twiml": twiml_doc}, auth=(sid, self.auth_token))
        except httpx.HTTPError as exc:
            return False, f"http_error:{type(exc).__name__}"
        if resp.status_code >= 300:
            return False, f"status:{resp.status_code}"
        return True, "ok"

    async def transfer(self, call_sid: str, target: str, account_sid: str = "") -> tuple[bool, str]:
        return await self.update_call(call_sid, twiml.transfer(target), account_sid)

    async def aclose(self) -> None:
        await self._client.aclose()
