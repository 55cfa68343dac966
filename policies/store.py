"""Versioned policy store in Redis, and the watcher that keeps each worker on the published version.

Keys (all under the `{policy}` hash tag so the Lua scripts stay single-slot on Redis Cluster):
  {policy}:seq              last version number handed out (INCR)
  {policy}:current          the published version number
  {policy}:version:<n>      hash: yaml, author, comment, created_at, source  (immutable once written)
  {policy}:history          list of JSON {version, action, actor, ts}: every publish / rollback
  {policy}:draft:<id>       hash: yaml, author, comment, base_version, created_at, updated_at, rev
  {policy}:drafts           set of draft ids
  {policy}:audit            stream: who did what, when, from where
Channel `policy:published` carries {"version": n} whenever the current version changes.

Publish and rollback are Lua scripts that compare the caller's expected current version with the
stored one and write everything (version, pointer, history, audit, notification) atomically: two
admins racing each other cannot both win, and the loser gets PublishConflict with nothing lost.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
import yaml
from redis.exceptions import RedisError

from ops import metrics
from ops.logs import get_logger

PREFIX = "{policy}"
CHANNEL = "policy:published"


def _audit_maxlen() -> int:
    try:  # a bad value is refused with a clear line by bot.config at start; importing must not fail on it
        return max(100, int(os.environ.get("BOT_AUDIT_MAXLEN", "10000")))
    except ValueError:
        return 10_000


AUDIT_MAXLEN = _audit_maxlen()  # entries kept (trimmed approximately, oldest first), ~250 bytes each
DEFAULT_POLICY_PATH = Path(__file__).with_name("default.yaml")

Prerender = Callable[[list[str]], Awaitable[None]]

# Policy parsing gets its own thread so a switch never queues behind other executor work, and the
# admins' validations (up to a megabyte of YAML each, on every edit) get theirs: a busy console must
# not delay a worker's switch to a published version.
_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="policy-parse")
_CHECKER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="policy-check")

log = get_logger("policies.store")


def _k(*parts: str | int) -> str:
    return ":".join([PREFIX, *map(str, parts)])


# ---------------------------------------------------------------------------------------------
# Validation: the schema (policies/schema.py) owns the rules; this adapter turns its errors into
# plain line-located dicts the API and console show.


@dataclass(frozen=True)
class Issue:
    message: str
    line: int | None = None  # 1-based line in the YAML text
    column: int | None = None
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "column": self.column, "path": self.path, "message": self.message}


class PolicyInvalid(Exception):
    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("; ".join(f"line {i.line}: {i.message}" if i.line else i.message for i in issues))
        self.issues = issues


class PublishConflict(Exception):
    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"expected current version {expected}, but it is {current}")
        self.expected = expected
        self.current = current


class NotFound(KeyError):
    pass


class DraftConflict(Exception):
    """The draft changed (another tab or admin saved it) since the editor loaded revision `expected`."""

    def __init__(self, draft_id: str, expected: int, current: int) -> None:
        super().__init__(f"draft {draft_id} was saved by someone else since you opened it "
                         f"(you had revision {expected}, it is now {current})")
        self.draft_id = draft_id
        self.expected = expected
        self.current = current


def _issue_from(obj: Any) -> Issue:
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    line = get("line")
    col = get("column", None) or get("col", None)
    path = get("field", None) or get("path", "") or ""
    if isinstance(path, (list, tuple)):
        path = ".".join(map(str, path))
    return Issue(message=str(get("message", None) or obj), line=line, column=col, path=str(path))


def parse_policy(text: str, lenient: bool = False) -> Any:
    """Validate YAML text against the current schema and return the Policy object.

    Raises PolicyInvalid with line-located issues (YAML syntax or schema violations). `lenient`: see
    policies.schema.parse_policy (for versions already published).
    """
    from policies import schema  # imported late: the schema module is optional at import time

    try:
        return schema.parse_policy(text, lenient=lenient)
    except schema.PolicyError as exc:
        raw = getattr(exc, "errors", None) or getattr(exc, "issues", None) or [exc]
        raise PolicyInvalid([_issue_from(e) for e in raw]) from exc
    except Exception as exc:  # noqa: BLE001 - a validator bug must refuse the text, not crash a request or a worker
        metrics.ERRORS.labels("policy_store", "validator_failed").inc()
        log.exception("policy_validator_failed", error=repr(exc))
        raise PolicyInvalid([Issue(f"the policy could not be checked ({type(exc).__name__}); it was not accepted")]) from exc


def load_published(text: str) -> Any:
    """A published version as a worker loads it: the lint-only checks of newer releases do not apply
    (a worker that refused the live version would have no policy for new calls)."""
    return parse_policy(text, lenient=True)


def prompt_texts(policy_yaml: str, policy: Any = None) -> list[str]:
    """Prompt sentences of a policy that can be rendered ahead of time (no {slot} placeholders)."""
    if policy is not None and hasattr(policy, "static_prompts"):
        return list(policy.static_prompts())
    try:
        data = yaml.safe_load(policy_yaml) or {}
    except yaml.YAMLError:
        return []
    prompts = data.get("prompts") if isinstance(data, dict) else None
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v.strip() and "{" not in v:
                out.append(v.strip())
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(prompts or {})
    return list(dict.fromkeys(out))


def _lines(text: str) -> list[str]:
    """Lines as the console's editor and the validator number them: split at "\n" only (str.splitlines also
    splits at \x0c, \x1c, \u2028..., which shifted every line number after one of them)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def unified_diff(a: str, b: str, a_name: str, b_name: str) -> str:
    """A unified diff that `patch` accepts: every line ends with a newline, and a last line without one is
    marked as GNU diff does (it used to run into the next line: "-a: 1+a: 2")."""

    def lines(text: str) -> list[str]:
        out = [x + "\n" for x in _lines(text)]
        if out and not text.endswith("\n"):
            out[-1] += "\\ No newline at end of file\n"
        return out

    return "".join(difflib.unified_diff(lines(a), lines(b), a_name, b_name, n=3))


def side_by_side(a: str, b: str) -> list[dict[str, Any]]:
    """Rows for a two-column diff view: {op, a_line, a, b_line, b}; op in equal|replace|delete|insert."""
    al, bl = _lines(a), _lines(b)
    rows: list[dict[str, Any]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, al, bl, autojunk=False).get_opcodes():
        n = max(i2 - i1, j2 - j1)
        for k in range(n):
            ia, jb = i1 + k, j1 + k
            rows.append(
                {
                    "op": op,
                    "a_line": ia + 1 if ia < i2 else None,
                    "a": al[ia] if ia < i2 else None,
                    "b_line": jb + 1 if jb < j2 else None,
                    "b": bl[jb] if jb < j2 else None,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Lua: all-or-nothing writes guarded by the expected current version.

_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local last = redis.call('GET', KEYS[2])
if last then  -- versions exist but the pointer was lost: never overwrite v1, point at the newest
  redis.call('SET', KEYS[1], last)
  return 2
end
redis.call('SET', KEYS[2], 1)
redis.call('HSET', KEYS[3], 'yaml', ARGV[1], 'author', ARGV[2], 'comment', ARGV[3], 'created_at', ARGV[4],
           'source', 'seed')
redis.call('SET', KEYS[1], 1)
redis.call('RPUSH', KEYS[4], cjson.encode({version=1, action='seed', actor=ARGV[2], ts=tonumber(ARGV[4])}))
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'action', 'seed', 'actor', ARGV[2], 'role', 'system',
           'ip', '', 'version', 1, 'detail', ARGV[3], 'ts', ARGV[4])
return 1
"""

# KEYS: current, seq, history, audit ; ARGV: expected, yaml, author, comment, ts, ip, role, maxlen, prefix,
# channel, source
_PUBLISH = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', ARGV[9] .. ':version:' .. v, 'yaml', ARGV[2], 'author', ARGV[3], 'comment', ARGV[4],
           'created_at', ARGV[5], 'source', ARGV[11])
redis.call('SET', KEYS[1], v)
redis.call('RPUSH', KEYS[3], cjson.encode({version=v, action='publish', actor=ARGV[3], ts=tonumber(ARGV[5])}))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'action', 'publish', 'actor', ARGV[3], 'role', ARGV[7],
           'ip', ARGV[6], 'version', v, 'detail', ARGV[4], 'ts', ARGV[5])
redis.call('PUBLISH', ARGV[10], cjson.encode({version=v, action='publish'}))
return {1, v}
"""

# KEYS: current, history, audit, target version hash ; ARGV: expected, target, actor, comment, ts, ip, role,
# maxlen, channel
_ROLLBACK = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {-1, cur} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], cjson.encode({version=tonumber(ARGV[2]), action='rollback', actor=ARGV[3],
           ts=tonumber(ARGV[5]), from=cur}))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'action', 'rollback', 'actor', ARGV[3], 'role', ARGV[7],
           'ip', ARGV[6], 'version', ARGV[2], 'detail', ARGV[4], 'ts', ARGV[5], 'from', cur)
redis.call('PUBLISH', ARGV[9], cjson.encode({version=tonumber(ARGV[2]), action='rollback'}))
return {1, tonumber(ARGV[2])}
"""


# KEYS: draft ; ARGV: expected rev ('' = any), yaml, updated_at, author, has_comment ('1'/'0'), comment
# Never recreates a deleted draft (a bare HSET would leave a half hash behind), never overwrites a newer save.
_UPDATE_DRAFT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '1')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= rev then return {0, rev} end
redis.call('HSET', KEYS[1], 'yaml', ARGV[2], 'updated_at', ARGV[3], 'author', ARGV[4])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'comment', ARGV[6]) end
return {1, redis.call('HINCRBY', KEYS[1], 'rev', 1)}
"""

# KEYS: draft, drafts set ; ARGV: rev that was published, draft id. A save that landed after the publish
# read the draft keeps it (with those newer edits) instead of deleting them.
_DELETE_DRAFT_AT = """
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '-1')
if rev ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Actor:
    """Who is acting, for the audit log."""

    name: str
    role: str = "system"
    ip: str = ""


SYSTEM = Actor("system")


@dataclass
class VersionInfo:
    version: int
    author: str
    comment: str
    created_at: float
    source: str
    yaml: str = field(default="", repr=False)

    def to_dict(self, with_yaml: bool = False) -> dict[str, Any]:
        d = {
            "version": self.version,
            "author": self.author,
            "comment": self.comment,
            "created_at": self.created_at,
            "source": self.source,
        }
        if with_yaml:
            d["yaml"] = self.yaml
        return d


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


class PolicyStore:
    """Policy versions, drafts, publish/rollback and the audit log, in one Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prerender: Prerender | None = None,
        validate: Callable[[str], Any] = parse_policy,
    ) -> None:
        self.r = redis
        self.prerender = prerender
        self.validate = validate
        self._seed = redis.register_script(_SEED)
        self._publish = redis.register_script(_PUBLISH)
        self._rollback = redis.register_script(_ROLLBACK)
        self._update_draft = redis.register_script(_UPDATE_DRAFT)
        self._delete_draft_at = redis.register_script(_DELETE_DRAFT_AT)

    async def check(self, yaml_text: str) -> Any:
        """Validate off the event loop (parsing a policy costs ~25 ms of CPU)."""
        return await asyncio.get_running_loop().run_in_executor(_CHECKER, self.validate, yaml_text)

    # ---- seeding ----
    async def ensure_seeded(self, yaml_text: str | None = None, path: str | Path | None = None) -> int:
        """First start with an empty store: version 1 from BOT_POLICY (or policies/default.yaml).

        Returns the current version. Safe to call from every worker at once (the script is atomic).
        """
        if await self.r.exists(_k("current")):
            return await self.current_version()
        if yaml_text is None:
            yaml_text = Path(path or DEFAULT_POLICY_PATH).read_text(encoding="utf-8")
        await self.check(yaml_text)  # never seed a policy the schema rejects
        src = str(path or DEFAULT_POLICY_PATH)
        created = await self._seed(
            keys=[_k("current"), _k("seq"), _k("version", 1), _k("history"), _k("audit")],
            args=[yaml_text, "system", f"seeded from {src}", repr(time.time()), AUDIT_MAXLEN],
        )
        if created == 1:
            log.info("policy_seeded", version=1, source=src)
        elif created == 2:
            metrics.ERRORS.labels("policy_store", "current_pointer_lost").inc()
            log.warning("policy_pointer_restored", note="current pointer was missing; newest version made current")
        return await self.current_version()

    # ---- versions ----
    async def current_version(self) -> int:
        v = await self.r.get(_k("current"))
        return int(v) if v else 0

    async def get_version(self, version: int) -> VersionInfo:
        h = await self.r.hgetall(_k("version", version))
        if not h:
            raise NotFound(f"policy version {version} does not exist")
        h = {_s(k): _s(v) for k, v in h.items()}
        return VersionInfo(
            version=version,
            author=h.get("author", ""),
            comment=h.get("comment", ""),
            created_at=float(h.get("created_at") or 0),
            source=h.get("source", ""),
            yaml=h.get("yaml", ""),
        )

    async def list_versions(self) -> list[VersionInfo]:
        last = int(await self.r.get(_k("seq")) or 0)
        if not last:
            return []
        pipe = self.r.pipeline(transaction=False)
        for v in range(last, 0, -1):
            pipe.hmget(_k("version", v), "author", "comment", "created_at", "source")
        out = []
        for v, (author, comment, created, source) in zip(range(last, 0, -1), await pipe.execute()):
            if created is None:
                continue
            out.append(VersionInfo(v, _s(author), _s(comment), float(_s(created) or 0), _s(source)))
        return out

    async def history(self, limit: int = 100) -> list[dict[str, Any]]:
        raw = await self.r.lrange(_k("history"), -limit, -1)
        return [json.loads(_s(x)) for x in reversed(raw)]

    # ---- drafts ----
    async def create_draft(self, yaml_text: str, actor: Actor, comment: str = "", base_version: int | None = None) -> dict[str, Any]:
        if base_version is None:
            base_version = await self.current_version()
        draft_id = secrets.token_hex(6)
        now = repr(time.time())
        pipe = self.r.pipeline(transaction=True)  # both or neither: a draft outside the set would never be listed
        pipe.hset(
            _k("draft", draft_id),
            mapping={
                "yaml": yaml_text,
                "author": actor.name,
                "comment": comment,
                "base_version": base_version,
                "created_at": now,
                "updated_at": now,
                "rev": 1,
            },
        )
        pipe.sadd(_k("drafts"), draft_id)
        await pipe.execute()
        await self.audit("draft_create", actor, detail=comment, draft=draft_id)
        return await self.get_draft(draft_id)

    async def get_draft(self, draft_id: str) -> dict[str, Any]:
        h = await self.r.hgetall(_k("draft", draft_id))
        if not h:
            raise NotFound(f"draft {draft_id} does not exist")
        h = {_s(k): _s(v) for k, v in h.items()}
        return {
            "id": draft_id,
            "yaml": h["yaml"],
            "author": h.get("author", ""),
            "comment": h.get("comment", ""),
            "base_version": int(h.get("base_version") or 0),
            "created_at": float(h.get("created_at") or 0),
            "updated_at": float(h.get("updated_at") or 0),
            "rev": int(h.get("rev") or 1),
        }

    async def list_drafts(self) -> list[dict[str, Any]]:
        ids = sorted(_s(x) for x in await self.r.smembers(_k("drafts")))
        out = []
        for i in ids:
            try:
                d = await self.get_draft(i)
            except NotFound:
                continue
            d.pop("yaml")
            out.append(d)
        return sorted(out, key=lambda d: d["updated_at"], reverse=True)

    async def update_draft(self, draft_id: str, yaml_text: str, actor: Actor, comment: str | None = None,
                           expected_rev: int | None = None) -> dict[str, Any]:
        """Save a draft. With `expected_rev` (the revision the editor loaded) a save made meanwhile by
        another tab or admin is not overwritten: DraftConflict, nothing written."""
        ok, rev = await self._update_draft(
            keys=[_k("draft", draft_id)],
            args=["" if expected_rev is None else expected_rev, yaml_text, repr(time.time()), actor.name,
                  "0" if comment is None else "1", comment or ""],
        )
        if ok == -1:
            raise NotFound(f"draft {draft_id} does not exist")
        if ok == 0:
            raise DraftConflict(draft_id, int(expected_rev or 0), int(rev))
        await self.audit("draft_update", actor, draft=draft_id, rev=int(rev))
        return await self.get_draft(draft_id)

    async def delete_draft(self, draft_id: str, actor: Actor) -> None:
        n = await self.r.delete(_k("draft", draft_id))
        await self.r.srem(_k("drafts"), draft_id)
        if not n:
            raise NotFound(f"draft {draft_id} does not exist")
        await self.audit("draft_delete", actor, draft=draft_id)

    # ---- publish / rollback ----
    async def publish(self, yaml_text: str, expected_version: int, actor: Actor, comment: str = "", source: str = "") -> int:
        """Validate, pre-render the prompts, then atomically make this YAML the next current version.

        Raises PolicyInvalid (nothing written) or PublishConflict (someone published first).
        """
        policy = await self.check(yaml_text)
        current = await self.current_version()
        if current != expected_version:  # fail fast before spending time on pre-rendering
            raise PublishConflict(expected_version, current)
        if self.prerender is not None:
            await self.prerender(prompt_texts(yaml_text, policy))
        ok, v = await self._publish(
            keys=[_k("current"), _k("seq"), _k("history"), _k("audit")],
            args=[
                expected_version, yaml_text, actor.name, comment, repr(time.time()), actor.ip, actor.role,
                AUDIT_MAXLEN, PREFIX, CHANNEL, source or "publish",
            ],
        )
        if not ok:
            raise PublishConflict(expected_version, int(v))
        log.info("policy_published", version=int(v), actor=actor.name, ip=actor.ip)
        return int(v)

    async def publish_draft(self, draft_id: str, expected_version: int, actor: Actor, comment: str = "",
                            draft_rev: int | None = None) -> int:
        """Publish a draft's text. With `draft_rev` (the revision the publisher reviewed) a draft saved
        again meanwhile is not published: DraftConflict."""
        d = await self.get_draft(draft_id)
        if draft_rev is not None and d["rev"] != draft_rev:
            raise DraftConflict(draft_id, draft_rev, d["rev"])
        v = await self.publish(d["yaml"], expected_version, actor, comment or d["comment"], source=f"draft:{draft_id}")
        try:
            deleted = await self._delete_draft_at(keys=[_k("draft", draft_id), _k("drafts")], args=[d["rev"], draft_id])
        except RedisError as exc:  # v is live: the admin must hear that, not an error; the draft just stays
            metrics.ERRORS.labels("policy_store", "draft_cleanup_failed").inc()
            log.warning("draft_kept_after_publish", draft=draft_id, version=v, error=repr(exc))
            return v
        if not deleted:
            log.info("draft_kept_after_publish", draft=draft_id, note="saved again while it was being published")
        return v

    async def rollback(self, version: int, expected_version: int, actor: Actor, comment: str = "") -> int:
        """Make an older version current again; it must still validate against today's schema."""
        info = await self.get_version(version)
        policy = await self.check(info.yaml)
        current = await self.current_version()
        if current != expected_version:
            raise PublishConflict(expected_version, current)
        if self.prerender is not None:
            await self.prerender(prompt_texts(info.yaml, policy))
        ok, cur = await self._rollback(
            keys=[_k("current"), _k("history"), _k("audit"), _k("version", version)],
            args=[expected_version, version, actor.name, comment, repr(time.time()), actor.ip, actor.role,
                  AUDIT_MAXLEN, CHANNEL],
        )
        if ok == 0:
            raise PublishConflict(expected_version, int(cur))
        if ok == -1:
            raise NotFound(f"policy version {version} does not exist")
        log.info("policy_rolled_back", version=version, actor=actor.name, ip=actor.ip)
        return version

    # ---- audit ----
    async def audit(self, action: str, actor: Actor, detail: str = "", **extra: Any) -> None:
        fields = {"action": action, "actor": actor.name, "role": actor.role, "ip": actor.ip, "detail": detail,
                  "ts": repr(time.time())}
        fields.update({k: str(v) for k, v in extra.items()})
        await self.r.xadd(_k("audit"), fields, maxlen=AUDIT_MAXLEN, approximate=True)

    async def audit_log(self, count: int = 100) -> list[dict[str, Any]]:
        rows = await self.r.xrevrange(_k("audit"), count=count)
        out = []
        for entry_id, fields in rows:
            d = {_s(k): _s(v) for k, v in fields.items()}
            d["id"] = _s(entry_id)
            d["ts"] = float(d.get("ts") or 0)
            out.append(d)
        return out


# ---------------------------------------------------------------------------------------------
# The worker side: which policy new calls start with.


class PolicyWatcher:
    """Holds the published Policy for this worker and follows publishes within about a second.

    A pub/sub message switches at once; a poll of the current-version key every `poll_s` is the
    safety net for missed messages (reconnects). Calls keep the Policy object they took at start,
    so a switch never changes a call in progress.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        validate: Callable[[str], Any] = load_published,
        poll_s: float = 1.0,
        on_change: Callable[[int, Any, str], Awaitable[None]] | None = None,
    ) -> None:
        self.r = redis
        self.validate = validate
        self.poll_s = poll_s
        self.on_change = on_change  # e.g. pre-render the new prompts on this worker's engine
        self._version = 0
        self._policy: Any = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._bad: set[int] = set()  # versions that failed validation here: logged once, not retried
        self.log = get_logger("policies.watcher")

    def current(self) -> tuple[int, Any]:
        if self._policy is None:
            raise RuntimeError("PolicyWatcher has no policy yet: call start() first")
        return self._version, self._policy

    @property
    def version(self) -> int:
        return self._version

    async def start(self) -> None:
        # Subscribe before the first read, so a publish landing in between is never missed.
        pubsub = self.r.pubsub()
        await pubsub.subscribe(CHANNEL)
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(pubsub)), loop.create_task(self._poll())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # Bounded: closing a pub/sub connection cancelled mid-read can wait on the connection for good,
            # and a worker's shutdown (or the next test) must not hang on it.
            _done, stuck = await asyncio.wait(self._tasks, timeout=2.0)
            if stuck:
                metrics.ERRORS.labels("policy_watcher", "stop_timeout").inc()
                self.log.warning("policy_watcher_stop_timeout", tasks=len(stuck))
        self._tasks = []

    async def refresh(self) -> bool:
        """Load the current version if it differs from ours. True when we switched."""
        raw = await self.r.get(_k("current"))
        v = int(raw) if raw else 0
        if not v or v == self._version or v in self._bad:
            return False
        async with self._lock:
            if v == self._version:
                return False
            text = await self.r.hget(_k("version", v), "yaml")
            if text is None:
                return False
            text = _s(text)
            try:
                policy = await asyncio.get_running_loop().run_in_executor(_PARSER, self.validate, text)
            except PolicyInvalid as exc:
                # A version this worker cannot load (e.g. an older schema) must not take it down.
                self._bad.add(v)
                metrics.ERRORS.labels("policy_watcher", "invalid_policy").inc()
                self.log.error("policy_version_invalid", version=v, errors=[i.to_dict() for i in exc.issues])
                return False
            old = self._version
            self._version, self._policy = v, policy
            metrics.POLICY_VERSION.set(v)
            self.log.info("policy_switched", version=v, previous=old)
        if self.on_change is not None:
            try:
                await self.on_change(v, policy, text)
            except Exception as exc:  # noqa: BLE001 - a failed pre-render must not undo the switch
                metrics.ERRORS.labels("policy_watcher", "on_change_failed").inc()
                self.log.warning("policy_on_change_failed", version=v, error=repr(exc))
        return True

    async def _safe_refresh(self) -> None:
        try:
            await self.refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis blips: keep serving the policy we have
            metrics.ERRORS.labels("policy_watcher", "refresh_failed").inc()
            self.log.warning("policy_refresh_failed", error=repr(exc))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._safe_refresh()

    async def _listen(self, pubsub: Any = None) -> None:
        while True:
            if pubsub is None:
                pubsub = self.r.pubsub()
            try:
                if not pubsub.subscribed:
                    await pubsub.subscribe(CHANNEL)
                    await self._safe_refresh()  # whatever was published while we were away
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        await self._safe_refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect; the poll covers the gap
                self.log.info("policy_subscribe_retry", error=repr(exc))
                await asyncio.sleep(self.poll_s)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
                pubsub = None
