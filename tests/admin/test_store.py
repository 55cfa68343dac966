"""Policy store on a real redis-server: versions, drafts, publish races, rollback, audit, watcher."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from policies.store import (
    Actor,
    NotFound,
    PolicyInvalid,
    PolicyStore,
    PolicyWatcher,
    PublishConflict,
    side_by_side,
    unified_diff,
)
from tests.helpers.policy_text import ACCEPT, ACCEPT_LINE, LOOSER, STRICTER, accept_line, with_accept

ALICE = Actor("alice", "publisher", "198.51.100.1")
BOB = Actor("bob", "publisher", "198.51.100.2")


async def test_seed_once_from_default(store: PolicyStore, default_yaml: str) -> None:
    assert await store.current_version() == 1
    assert await store.ensure_seeded("name: other\n") == 1  # already seeded: untouched
    v1 = await store.get_version(1)
    assert v1.yaml == default_yaml and v1.author == "system" and "default.yaml" in v1.comment


async def test_concurrent_seeding_creates_one_version(redis: aioredis.Redis) -> None:
    stores = [PolicyStore(redis) for _ in range(4)]
    assert await asyncio.gather(*(s.ensure_seeded() for s in stores)) == [1, 1, 1, 1]
    assert [v.version for v in await stores[0].list_versions()] == [1]


async def test_publish_creates_immutable_versions_and_audit(store: PolicyStore, default_yaml: str) -> None:
    rendered: list[list[str]] = []

    async def prerender(texts: list[str]) -> None:
        rendered.append(texts)

    store.prerender = prerender
    v2 = await store.publish(with_accept(default_yaml, STRICTER), 1, ALICE, "stricter")
    assert v2 == 2 and await store.current_version() == 2
    assert rendered and any("help" in t.lower() or t for t in rendered[0])  # prompts went to the voice first
    info = await store.get_version(2)
    assert (info.author, info.comment) == ("alice", "stricter")
    assert f"accept: {STRICTER}" in info.yaml
    assert ACCEPT_LINE in (await store.get_version(1)).yaml  # v1 unchanged
    audit = await store.audit_log()
    assert audit[0]["action"] == "publish" and audit[0]["actor"] == "alice"
    assert audit[0]["ip"] == "198.51.100.1" and audit[0]["version"] == "2"
    assert [h["action"] for h in await store.history()] == ["publish", "seed"]


async def test_publish_invalid_writes_nothing(store: PolicyStore, default_yaml: str) -> None:
    with pytest.raises(PolicyInvalid) as exc:
        await store.publish(with_accept(default_yaml, "1.7"), 1, ALICE)
    issue = exc.value.issues[0]
    line = accept_line(default_yaml)
    assert issue.line == line and "accept" in issue.path
    assert await store.current_version() == 1 and len(await store.list_versions()) == 1


async def test_publish_race_one_winner_nothing_lost(store: PolicyStore, default_yaml: str) -> None:
    a = store.publish(with_accept(default_yaml, STRICTER), 1, ALICE, "alice's")
    b = store.publish(with_accept(default_yaml, LOOSER), 1, BOB, "bob's")
    results = await asyncio.gather(a, b, return_exceptions=True)
    wins = [r for r in results if isinstance(r, int)]
    losses = [r for r in results if isinstance(r, PublishConflict)]
    assert wins == [2] and len(losses) == 1
    assert losses[0].current == 2 and losses[0].expected == 1
    assert [v.version for v in await store.list_versions()] == [2, 1]  # no gap, no half-written version
    # the loser retries against what is live now and gets the next version
    loser_yaml = with_accept(default_yaml, LOOSER if (await store.get_version(2)).author == "alice" else STRICTER)
    assert await store.publish(loser_yaml, 2, BOB) == 3


async def test_drafts_lifecycle(store: PolicyStore, default_yaml: str) -> None:
    d = await store.create_draft(default_yaml, ALICE, "wip")
    assert d["base_version"] == 1 and d["rev"] == 1
    d2 = await store.update_draft(d["id"], with_accept(default_yaml, "0.93"), BOB)
    assert d2["rev"] == 2 and d2["author"] == "bob"
    assert [x["id"] for x in await store.list_drafts()] == [d["id"]]
    v = await store.publish_draft(d["id"], 1, ALICE)
    assert v == 2 and "  accept: 0.93 " in (await store.get_version(2)).yaml
    with pytest.raises(NotFound):
        await store.get_draft(d["id"])


async def test_a_draft_saved_while_it_is_published_keeps_the_new_edits(redis: aioredis.Redis, default_yaml: str) -> None:
    """publish_draft read the draft, published it (validate + pre-render take a while), then deleted it:
    a save landing in between was deleted with it. Now the draft stays when its revision moved on."""
    saved: dict[str, object] = {}

    async def prerender(texts: list[str]) -> None:  # runs mid-publish: another tab saves now
        saved.update(await store.update_draft(d["id"], with_accept(default_yaml, LOOSER), BOB))

    store = PolicyStore(redis, prerender=prerender)
    await store.ensure_seeded(default_yaml)
    d = await store.create_draft(with_accept(default_yaml, STRICTER), ALICE)
    assert await store.publish_draft(d["id"], 1, ALICE) == 2
    assert saved["rev"] == 2
    kept = await store.get_draft(d["id"])
    assert kept["rev"] == 2 and f"  accept: {LOOSER}" in kept["yaml"]
    assert [x["id"] for x in await store.list_drafts()] == [d["id"]]


async def test_rollback_and_diff(store: PolicyStore, default_yaml: str) -> None:
    await store.publish(with_accept(default_yaml, STRICTER), 1, ALICE)
    with pytest.raises(PublishConflict):
        await store.rollback(1, 1, BOB)  # BOB's view is stale
    assert await store.rollback(1, 2, BOB, "too strict") == 1
    assert await store.current_version() == 1
    assert [v.version for v in await store.list_versions()] == [2, 1]  # rollback adds no version
    assert (await store.audit_log())[0]["action"] == "rollback"
    with pytest.raises(NotFound):
        await store.rollback(99, 1, BOB)
    a, b = (await store.get_version(1)).yaml, (await store.get_version(2)).yaml
    diff = unified_diff(a, b, "v1", "v2")
    assert f"-{ACCEPT_LINE}" in diff and f"+  accept: {STRICTER}" in diff
    rows = [r for r in side_by_side(a, b) if r["op"] != "equal"]
    assert len(rows) == 1 and rows[0]["a_line"] == rows[0]["b_line"] and STRICTER in rows[0]["b"]


async def test_rollback_to_version_invalid_under_current_schema(store: PolicyStore, redis: aioredis.Redis,
                                                                 default_yaml: str) -> None:
    # A version written under an older schema (a field today's schema forbids) sits in the store.
    old = default_yaml.replace("thresholds:\n", "thresholds:\n  legacy_floor: 0.3\n", 1)
    await redis.hset("{policy}:version:2", mapping={"yaml": old, "author": "old", "comment": "",
                                                    "created_at": time.time(), "source": "import"})
    await redis.set("{policy}:seq", 2)
    with pytest.raises(PolicyInvalid) as exc:
        await store.rollback(2, 1, ALICE)
    assert exc.value.issues[0].line == old.splitlines().index("  legacy_floor: 0.3") + 1
    assert await store.current_version() == 1


async def test_watcher_follows_publish_within_a_second(store: PolicyStore, redis: aioredis.Redis,
                                                       default_yaml: str) -> None:
    watcher = PolicyWatcher(redis, poll_s=5.0)  # slow poll: the switch must come from pub/sub
    await watcher.start()
    try:
        v1, p1 = watcher.current()
        assert v1 == 1 and p1.thresholds.accept == float(ACCEPT)
        t0 = time.monotonic()
        await store.publish(with_accept(default_yaml, STRICTER), 1, ALICE)
        while watcher.current()[0] != 2:
            assert time.monotonic() - t0 < 1.0, "watcher did not switch within 1 s"
            await asyncio.sleep(0.01)
        assert watcher.current()[1].thresholds.accept == float(STRICTER)
        assert p1.thresholds.accept == float(ACCEPT)  # a call holding v1 keeps v1
    finally:
        await watcher.stop()


async def test_watcher_poll_safety_net_and_bad_version(store: PolicyStore, redis: aioredis.Redis,
                                                       default_yaml: str) -> None:
    watcher = PolicyWatcher(redis, poll_s=0.2)
    await watcher.start()
    try:
        # Pointer moved without a pub/sub message (e.g. the message was missed): the poll catches it.
        await redis.hset("{policy}:version:2", mapping={"yaml": with_accept(default_yaml, "0.91"), "author": "x",
                                                        "comment": "", "created_at": time.time(), "source": "t"})
        await redis.set("{policy}:current", 2)
        for _ in range(50):
            if watcher.version == 2:
                break
            await asyncio.sleep(0.05)
        assert watcher.version == 2
        # A version this worker cannot load keeps the worker on the last good one.
        await redis.hset("{policy}:version:3", mapping={"yaml": "name: [unclosed", "author": "x", "comment": "",
                                                        "created_at": time.time(), "source": "t"})
        await redis.set("{policy}:current", 3)
        await asyncio.sleep(0.6)
        assert watcher.version == 2 and watcher.current()[1].thresholds.accept == 0.91
    finally:
        await watcher.stop()


async def test_a_worker_still_loads_a_version_published_before_stricter_checks(redis: aioredis.Redis,
                                                                               default_yaml: str) -> None:
    """Checks that only catch an admin's slip (unfilled placeholders, overlapping opening spans, `yes` as
    a number) must not leave a newly started worker without the live policy it was published with;
    publishing or rolling back to such a text is refused, at its line."""
    old = (default_yaml
           .replace("  agent_transfer: Sure,", "  agent_transfer: Sure {caller},", 1)
           .replace('sat: ["09:00-17:00"]', 'sat: ["09:00-13:00", "12:00-17:00"]', 1)
           .replace("  context_accept: 0.8 ", "  context_accept: yes ", 1))
    assert old.count("{caller}") == 1 and "12:00-17:00" in old and "context_accept: yes" in old
    await redis.hset("{policy}:version:1", mapping={"yaml": old, "author": "old release", "comment": "",
                                                    "created_at": time.time(), "source": "seed"})
    await redis.set("{policy}:seq", 1)
    await redis.set("{policy}:current", 1)
    watcher = PolicyWatcher(redis, poll_s=5.0)
    await watcher.start()
    try:
        version, policy = watcher.current()
        assert version == 1 and policy.thresholds.context_accept == 1.0
    finally:
        await watcher.stop()
    store = PolicyStore(redis)
    with pytest.raises(PolicyInvalid) as exc:
        await store.publish(old, 1, ALICE)
    assert {i.path for i in exc.value.issues} == {"escalation.agent_request.prompt", "thresholds.context_accept",
                                                   "queues.general.hours.weekly.sat"}  # all three at once
    with pytest.raises(PolicyInvalid):
        await store.rollback(1, 1, ALICE)
    assert await store.current_version() == 1 and await redis.get("{policy}:seq") == "1"

