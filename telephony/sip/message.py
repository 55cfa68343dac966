"""SIP message parsing and serialization (RFC 3261 section 7), strict enough to reject garbage.

Headers keep their order and repetition (Via, Record-Route); compact forms are expanded so the rest
of the stack looks headers up by one canonical name. Anything malformed raises SipParseError with a
short `kind` used as the metrics label.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Iterable

MAX_MESSAGE_BYTES = 64 * 1024  # far beyond any real INVITE; bounds memory per datagram / TCP frame
MAX_HEADER_COUNT = 200
MAX_HEADER_LINE = 8 * 1024

COMPACT = {
    "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length", "c": "Content-Type",
    "f": "From", "s": "Subject", "k": "Supported", "t": "To", "v": "Via", "r": "Refer-To", "b": "Referred-By",
    "o": "Event", "u": "Allow-Events", "x": "Session-Expires",
}
_CANON = {h.lower(): h for h in (
    "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Max-Forwards", "Content-Type", "Content-Length",
    "User-Agent", "Server", "Allow", "Supported", "Record-Route", "Route", "Authorization", "WWW-Authenticate",
    "Refer-To", "Referred-By", "Event", "Subscription-State", "Allow-Events", "Retry-After", "Reason",
    "Accept", "Expires", "Require", "Unsupported", "Warning", "Subject", "Content-Encoding", "Session-Expires",
    "Min-SE",
)}
_CANON["call-id"] = "Call-ID"
_CANON["cseq"] = "CSeq"
_CANON["www-authenticate"] = "WWW-Authenticate"

REASONS = {
    100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK", 202: "Accepted",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 415: "Unsupported Media Type", 420: "Bad Extension",
    422: "Session Interval Too Small", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 489: "Bad Event", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "Version Not Supported", 603: "Decline",
}

_TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_STATUS = re.compile(r"^SIP/2\.0 (\d{3}) ?(.*)$")
_REQUEST = re.compile(r"^([A-Za-z0-9\-.!%*_+`'~]+) (\S+) SIP/2\.0$")


class SipParseError(ValueError):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def canonical(name: str) -> str:
    low = name.strip().lower()
    if low in COMPACT:
        return COMPACT[low]
    return _CANON.get(low, "-".join(p.capitalize() for p in low.split("-")))


@dataclass
class SipMessage:
    method: str = ""  # requests only
    uri: str = ""
    status: int = 0  # responses only
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str = "") -> str:
        name = canonical(name)
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """All values, with comma-separated lists split (Via, Route, Record-Route)."""
        name = canonical(name)
        out: list[str] = []
        for k, v in self.headers:
            if k == name:
                out.extend(split_commas(v))
        return out

    def set(self, name: str, value: str) -> None:
        name = canonical(name)
        self.headers = [(k, v) for k, v in self.headers if k != name]
        self.headers.append((name, value))

    def add(self, name: str, value: str) -> None:
        self.headers.append((canonical(name), value))

    def remove(self, name: str) -> None:
        name = canonical(name)
        self.headers = [(k, v) for k, v in self.headers if k != name]

    # Frequently used parsed pieces -------------------------------------------------------------
    @property
    def call_id(self) -> str:
        return self.get("Call-ID")

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.get("CSeq"))

    @property
    def top_via(self) -> str:
        vias = self.get_all("Via")
        return vias[0] if vias else ""

    @property
    def branch(self) -> str:
        return header_params(self.top_via).get("branch", "")

    @property
    def from_tag(self) -> str:
        return header_params(self.get("From")).get("tag", "")

    @property
    def to_tag(self) -> str:
        return header_params(self.get("To")).get("tag", "")

    def encode(self) -> bytes:
        if self.is_request:
            first = f"{self.method} {self.uri} SIP/2.0"
        else:
            first = f"SIP/2.0 {self.status} {self.reason or REASONS.get(self.status, '')}"
        lines = [first] + [f"{k}: {v}" for k, v in self.headers if k != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def split_commas(value: str) -> list[str]:
    """Split a header list on commas that are outside quotes and <>."""
    out, cur, quote, angle = [], [], False, False
    for ch in value:
        if ch == '"':
            quote = not quote
        elif ch == "<" and not quote:
            angle = True
        elif ch == ">" and not quote:
            angle = False
        if ch == "," and not quote and not angle:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def header_params(value: str) -> dict[str, str]:
    """;key=value parameters after the address part (outside <> and quotes)."""
    depth_end = value.rfind(">")
    tail = value[depth_end + 1:] if depth_end >= 0 else value
    if depth_end < 0:
        # Via / bare URI: params start at the first ';'
        idx = tail.find(";")
        tail = tail[idx:] if idx >= 0 else ""
    params: dict[str, str] = {}
    for part in tail.split(";")[1:]:
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    return params


def addr_uri(value: str) -> str:
    """The URI in a name-addr (`"Bob" <sip:bob@x>;tag=1`) or addr-spec (`sip:bob@x;tag=1`)."""
    m = re.search(r"<([^>]*)>", value)
    if m:
        return m.group(1).strip()
    return value.split(";", 1)[0].strip()


@dataclass(frozen=True)
class SipUri:
    scheme: str
    user: str
    host: str
    port: int | None
    params: dict[str, str]

    @property
    def transport(self) -> str:
        return self.params.get("transport", "udp").lower()


def hostport(host: str, port: int | None = None) -> str:
    """host[:port] as SIP writes it in a URI or a Via: an IPv6 address in brackets (RFC 3261 25.1)."""
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return h if port is None else f"{h}:{port}"


def parse_uri(uri: str) -> SipUri:
    m = re.match(r"^(sips?):(?:([^@;]*)@)?(\[[0-9a-fA-F:.]+\]|[^:;?>]+)(?::(\d{1,5}))?((?:;[^?]*)?)", uri.strip())
    if not m:
        raise SipParseError("bad_uri", uri[:80])
    params: dict[str, str] = {}
    for part in (m.group(5) or "").split(";")[1:]:
        k, _, v = part.partition("=")
        if k:
            params[k.lower()] = v
    port = int(m.group(4)) if m.group(4) else None
    if port is not None and not 0 < port < 65536:
        raise SipParseError("bad_uri", uri[:80])
    return SipUri(m.group(1).lower(), m.group(2) or "", m.group(3).strip("[]"), port, params)


DEFAULT_PORT = {"UDP": 5060, "TCP": 5060, "TLS": 5061}  # a URI or Via without a port (RFC 3261 19.1.2)


def uri_transport(uri: SipUri, default: str) -> str:
    """The transport a URI asks for (RFC 3261 19.1.2, RFC 5630): sips: and ;transport=tls -> TLS; `default` when it
    names none (or one we do not speak)."""
    if uri.scheme == "sips":
        return "TLS"
    asked = uri.params.get("transport", "").upper()
    return asked if asked in DEFAULT_PORT else default


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 10 or not _TOKEN.match(parts[1]):
        raise SipParseError("bad_cseq", value[:60])
    num = int(parts[0])
    if num >= 2**31:
        raise SipParseError("bad_cseq", value[:60])
    return num, parts[1].upper()


def parse_via(value: str) -> tuple[str, str, int | None, dict[str, str]]:
    """(transport, host, port, params) of one Via value."""
    m = re.match(r"^SIP\s*/\s*2\.0\s*/\s*([A-Za-z]+)\s+(\[[0-9a-fA-F:.]+\]|[^\s:;]+)(?:\s*:\s*(\d{1,5}))?", value)
    if not m:
        raise SipParseError("bad_via", value[:80])
    return m.group(1).upper(), m.group(2).strip("[]"), int(m.group(3)) if m.group(3) else None, header_params(value)


def find_message_end(buf: bytes | bytearray) -> tuple[int, int] | None:
    """For stream transports: (header_end, total_length) of the first complete message, or None."""
    idx = buf.find(b"\r\n\r\n")
    if idx < 0:
        if len(buf) > MAX_MESSAGE_BYTES:
            raise SipParseError("too_large")
        return None
    head = bytes(buf[:idx])
    m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*$", head)
    length = int(m.group(1)) if m else 0
    if length > MAX_MESSAGE_BYTES:
        raise SipParseError("too_large")
    total = idx + 4 + length
    if len(buf) < total:
        return None
    return idx, total


def parse_message(data: bytes, stream: bool = False) -> SipMessage:
    """Parse one SIP message. Over UDP a missing Content-Length means 'rest of datagram' (18.3)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipParseError("too_large")
    data = data.lstrip(b"\r\n")  # keep-alive CRLFs
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        raise SipParseError("truncated", "no end of headers")
    try:
        head = data[:idx].decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("bad_encoding") from None
    body = data[idx + 4:]
    lines = head.split("\r\n")
    msg = SipMessage()
    first = lines[0]
    if first.startswith("SIP/"):
        m = _STATUS.match(first)
        if not m:
            raise SipParseError("bad_status_line", first[:60])
        msg.status, msg.reason = int(m.group(1)), m.group(2)
        if not 100 <= msg.status <= 699:
            raise SipParseError("bad_status_line", first[:60])
    else:
        m = _REQUEST.match(first)
        if not m:
            raise SipParseError("bad_request_line", first[:60])
        msg.method, msg.uri = m.group(1).upper(), m.group(2)
    # Unfold continuation lines (RFC 3261 7.3.1), then split name: value.
    raw: list[str] = []
    for line in lines[1:]:
        if len(line) > MAX_HEADER_LINE:
            raise SipParseError("header_too_long")
        if line[:1] in (" ", "\t") and raw:
            raw[-1] += " " + line.strip()
            if len(raw[-1]) > MAX_HEADER_LINE:  # folding must not build the long line the limit refuses
                raise SipParseError("header_too_long")
        elif line:
            raw.append(line)
    if len(raw) > MAX_HEADER_COUNT:
        raise SipParseError("too_many_headers")
    for line in raw:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name.strip()):
            raise SipParseError("bad_header", line[:60])
        msg.headers.append((canonical(name), value.strip()))
    clen = msg.get("Content-Length")
    if clen:
        if not clen.isdigit():
            raise SipParseError("bad_content_length", clen[:20])
        n = int(clen)
        if n > len(body):
            raise SipParseError("bad_content_length", f"{n} > {len(body)}")
        body = body[:n]
    elif stream:
        body = b""
    msg.body = body
    _validate(msg)
    return msg


def _validate(msg: SipMessage) -> None:
    """The mandatory headers (RFC 3261 8.1.1) — without them no response can even be routed."""
    if not msg.get_all("Via"):
        raise SipParseError("missing_via")
    parse_via(msg.top_via)
    for h in ("From", "To", "Call-ID", "CSeq"):
        if not msg.get(h):
            raise SipParseError(f"missing_{h.lower().replace('-', '_')}")
    num, method = msg.cseq
    if msg.is_request and method != msg.method:
        raise SipParseError("cseq_method_mismatch", f"{method} != {msg.method}")
    if msg.is_request:
        if not msg.uri.lower().startswith(("sip:", "sips:", "tel:")):
            raise SipParseError("bad_request_uri", msg.uri[:60])
        if msg.uri.lower().startswith("sip"):
            parse_uri(msg.uri)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(10)}@{host}"


def make_response(req: SipMessage, status: int, reason: str = "", to_tag: str = "",
                  extra: Iterable[tuple[str, str]] = (), body: bytes = b"") -> SipMessage:
    """A response copying Via/From/To/Call-ID/CSeq (RFC 3261 8.2.6.2); adds our To tag if none."""
    resp = SipMessage(status=status, reason=reason or REASONS.get(status, ""))
    for k, v in req.headers:
        if k in ("Via", "From", "Call-ID", "CSeq") or (k == "Record-Route" and 100 < status < 300):
            resp.headers.append((k, v))
        elif k == "To":
            if to_tag and "tag=" not in v.lower().split(">")[-1] and status != 100:
                v = f"{v};tag={to_tag}"
            resp.headers.append((k, v))
    for k, v in extra:
        resp.add(k, v)
    resp.body = body
    return resp
