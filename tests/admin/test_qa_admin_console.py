"""The console in real headless Chromium as a clumsy and a hostile user: unsaved edits are never dropped without
a question (opening a saved draft, signing out) and survive a token revoked mid-edit; text written by other
people (comments, audit entries, call transcripts, call ids) is shown as text, never run; the live calls table
works from the keyboard; and the console fits a phone's screen.

The admin router runs in-process under uvicorn (no engine needed: nothing here simulates or calls), on a real
redis-server, with the real TokenRegistry."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest
import redis.asyncio as aioredis

from bot.admin.auth import TokenRegistry, _Token
from policies.store import Actor, PolicyStore
from tests.admin.browser import launch, run_async, shot
from tests.conftest import free_port

pytestmark = pytest.mark.slow

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
TOKENS = {"dana": ("editor", "dana-editor-token-1"), "sam": ("publisher", "sam-publisher-token-1")}


class AdminServer:
    """The admin router in a FastAPI app served by uvicorn in a thread (its own event loop)."""

    def __init__(self, redis_url: str) -> None:
        import uvicorn
        from fastapi import FastAPI

        from bot.admin.api import router

        self.redis_url = redis_url
        self.app = FastAPI()
        self.app.include_router(router, prefix="/admin")
        self.app.state.redis = aioredis.from_url(redis_url, decode_responses=True)
        self.app.state.admin_tokens = self.registry(TOKENS)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @staticmethod
    def registry(tokens: dict[str, tuple[str, str]]) -> TokenRegistry:
        return TokenRegistry([_Token(name, role, tok.encode()) for name, (role, tok) in tokens.items()])

    def __enter__(self) -> "AdminServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the admin server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def seed(redis_url: str) -> None:
    """v1 and v2 (v2's comment is hostile), a draft by someone else with a hostile comment, and a live call whose
    transcript is hostile."""

    async def go() -> None:
        from bot.state import LIVE, CallStore

        r = aioredis.from_url(redis_url, decode_responses=True)
        await r.flushdb()
        store = PolicyStore(r)
        await store.ensure_seeded()
        v1 = (await store.get_version(1)).yaml
        mallory = Actor(f"mallory {XSS}", "publisher", "198.51.100.66")
        await store.publish(v1 + "\n# tweak\n", 1, mallory, comment=f"tweak {XSS}")
        await store.create_draft(v1, Actor("lee", "editor"), comment=f"lee's draft {XSS}")
        cs = CallStore(r, worker="w1", ttl_s=600)
        await cs.start()
        cs.start_call("CAqa1", "twilio", "+15551234567", "+15557654321", "v2")
        cs.event("CAqa1", "turn", intent=f"pay_bill{XSS}", confidence=0.9, transcript=f"hello {XSS}",
                 decision={"action": "answer", "reason": f"r{XSS}", "prompt": "ok"})
        await cs.flush()
        await cs.close()
        await r.zadd(LIVE, {"CAqa1": time.time() + 3600})  # stays "live" however slow this box is
        await r.aclose()

    run_async(go())


@pytest.fixture(scope="module")
def admin(redis_url: str) -> Iterator[AdminServer]:
    url = f"{redis_url.rsplit('/', 1)[0]}/7"  # apart from the API tests' DBs 8-15 and bot serve's
    seed(url)
    with AdminServer(url) as srv:
        yield srv
    run_async(_flush(url))


async def _flush(url: str) -> None:
    r = aioredis.from_url(url)
    await r.flushdb()
    await r.aclose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


def sign_in(page: Any, token: str) -> None:
    from playwright.sync_api import expect

    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#who")).to_be_visible()
    expect(page.locator("#valid-state")).to_contain_text("valid", timeout=15_000)


def test_unsaved_edits_are_never_dropped_without_a_question(admin: AdminServer, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 820})
    asked: list[str] = []
    page.on("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.goto(f"{admin.url}/admin")
    sign_in(page, TOKENS["dana"][1])
    mine = page.input_value("#yaml") + "\n# dana's unsaved change\n"
    page.fill("#yaml", mine)

    # opening someone's saved draft used to replace the editor's text without a word
    page.locator("#drafts-box button.link").first.click()
    expect(page.locator("#yaml")).to_have_value(mine)
    assert asked and "unsaved" in asked[-1]

    # signing out with unsaved changes asks too
    n = len(asked)
    page.click("#logout")
    assert len(asked) == n + 1 and "unsaved" in asked[-1]
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#yaml")).to_have_value(mine)

    # dana's token is rotated while she edits: her next request is refused and she is signed out; the text
    # she typed comes back after she signs in with the new token
    admin.app.state.admin_tokens = AdminServer.registry({**TOKENS, "dana": ("editor", "dana-editor-token-2")})
    page.click("#btn-validate")
    expect(page.locator("#login")).to_be_visible(timeout=10_000)
    expect(page.locator("#login-error")).to_contain_text("rejected")
    sign_in(page, "dana-editor-token-2")
    expect(page.locator("#yaml")).to_have_value(mine)
    expect(page.locator("#editing")).to_contain_text("restored")
    shot(page, "qa-unsaved-restored")
    # and it is still "unsaved": leaving asks
    page.locator("#drafts-box button.link").first.click()
    assert "unsaved" in asked[-1]
    page.close()


def test_text_from_other_people_is_shown_as_text_and_live_calls_work_from_the_keyboard(
        admin: AdminServer, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 820})
    page.goto(f"{admin.url}/admin")
    sign_in(page, TOKENS["sam"][1])
    expect(page.locator("#drafts-box")).to_contain_text("lee")

    page.click("#tabs button[data-tab=versions]")
    expect(page.locator("#versions-table")).to_contain_text(f"tweak {XSS}")
    expect(page.locator("#versions-table")).to_contain_text("mallory <img")
    assert page.locator("#versions-table img, #versions-table script").count() == 0
    # every row's buttons say which version they act on (a screen reader hears more than "Open, Open, Open")
    expect(page.get_by_role("button", name="Roll back to v1")).to_be_visible()
    expect(page.get_by_role("button", name="Open v2 in the editor")).to_be_visible()
    expect(page.locator("#tabs button[data-tab=versions]")).to_have_attribute("aria-selected", "true")

    page.click("#tabs button[data-tab=audit]")
    expect(page.locator("#audit-table")).to_contain_text(f"lee's draft {XSS}")
    assert page.locator("#audit-table img, #audit-table script").count() == 0

    page.click("#tabs button[data-tab=live]")
    row = page.locator('#calls-table tr[data-call-id="CAqa1"]')
    expect(row).to_be_visible(timeout=10_000)
    assert row.get_attribute("tabindex") == "0"
    row.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#call-detail")).to_be_visible()
    expect(page.locator("#cd-events")).to_contain_text(f"hello {XSS}")
    assert page.locator("#cd-events img, #cd-events script").count() == 0
    # the table is rebuilt every 2 s; focus stays on the call
    first = page.locator("#live-updated").text_content()
    expect(page.locator("#live-updated")).not_to_have_text(first or "", timeout=10_000)
    assert page.evaluate("document.activeElement && document.activeElement.dataset.callId") == "CAqa1"
    assert page.evaluate("window.__xss === undefined")
    shot(page, "qa-live-keyboard")
    page.close()


@pytest.mark.parametrize("tab", ["policy", "versions", "tryit", "live", "softphone", "audit"])
def test_the_console_fits_a_phone_screen(admin: AdminServer, browser: Any, tab: str) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(f"{admin.url}/admin")
    sign_in(page, TOKENS["sam"][1])
    button = page.locator(f"#tabs button[data-tab={tab}]")
    button.scroll_into_view_if_needed()
    button.click()
    expect(page.locator(f"#tab-{tab}")).to_be_visible()
    if tab == "versions":
        # Compare starts at "previous → live" (it used to be live against itself: "No differences")
        expect(page.locator("#diff-a")).to_have_value("1")
        expect(page.locator("#diff-b")).to_have_value("2")
        page.click("#btn-diff")
        expect(page.locator("#diff table.sbs")).to_be_visible()
        expect(page.locator("#diff-summary")).to_have_text("2 changed lines")  # the blank line and "# tweak"
    if tab == "live":
        expect(page.locator('#calls-table tr[data-call-id="CAqa1"]')).to_be_visible(timeout=10_000)
    if tab == "audit":
        expect(page.locator("#audit-table tbody tr").first).to_be_visible()
    # nothing pushes the page sideways: wide tables scroll inside their own box
    sizes = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1] + 1, f"the {tab} tab is {sizes[0]} px wide on a {sizes[1]} px screen"
    if tab == "policy":
        publish = page.locator("#btn-publish").bounding_box()
        assert publish and publish["x"] + publish["width"] <= 375
    shot(page, f"qa-narrow-{tab}")
    page.close()
