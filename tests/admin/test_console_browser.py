"""The admin console in real headless Chromium against a live `bot serve`: sign in, edit a
threshold, see the validation error at its line, fix it, publish (confirmed), see the next call
start on the new version, roll back, see the next call on the old one again."""

from __future__ import annotations

import re
from typing import Iterator

import httpx
import pytest

from tests.admin.browser import launch, policy_version_within, shot
from tests.helpers.policy_text import ACCEPT_LINE, STRICTER, accept_line, with_accept
from tests.helpers.server import BotServer, isolated_redis_url

TOKEN = "console-publisher-token"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotServer]:
    url = isolated_redis_url(redis_url)
    with BotServer(url, tmp_path_factory.mktemp("console"), env={"BOT_ADMIN_TOKEN": TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


def test_edit_validate_publish_rollback(bot: BotServer, browser: object) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1360, "height": 860})  # type: ignore[attr-defined]
    page.goto(f"{bot.url}/admin")
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#who")).to_contain_text("publisher")
    expect(page.locator("#live-version")).to_have_text("live: v1")
    shot(page, "01-signed-in")

    # edit the accept threshold to an invalid value: the error shows at its line
    original = page.input_value("#yaml")
    line = accept_line(original)
    page.fill("#yaml", with_accept(original, "1.5"))
    band = page.locator(f'#marks .band[data-line="{line}"]')
    expect(band).to_be_visible(timeout=10_000)
    expect(band).to_contain_text("less than or equal to 1")
    expect(page.locator(f'#gutter span.err[data-line="{line}"]')).to_be_visible()
    expect(page.locator("#errors li").first).to_contain_text(f"Line {line}")
    expect(page.locator("#valid-state")).to_contain_text("1 error")
    page.locator("#errors li .link").first.click()  # jumps to the line
    assert page.evaluate("document.querySelector('#yaml').selectionStart") == sum(
        len(l) + 1 for l in original.splitlines()[: line - 1])
    shot(page, "02-validation-error-at-line")

    # fix it, publish with confirmation
    page.fill("#yaml", with_accept(original, STRICTER))
    expect(page.locator("#valid-state")).to_contain_text("valid", timeout=10_000)
    expect(page.locator("#marks .band")).to_have_count(0)
    page.click("#btn-publish")
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    expect(dialog.locator("td.ins")).to_contain_text(f"accept: {STRICTER}")
    expect(dialog.locator("td.del")).to_contain_text(ACCEPT_LINE.strip())
    page.fill("#confirm-comment", "raise accept threshold")
    shot(page, "03-publish-confirm")
    page.click("#confirm-ok")
    expect(page.locator("#toast")).to_contain_text("Published v2")
    expect(page.locator("#live-version")).to_have_text("live: v2")

    # the running bot serves the next call with v2
    assert policy_version_within(bot.url, bot.redis_url, "2") == "2"

    # another admin publishes v3 while this one edits: publishing from v2 is refused (409), draft kept
    edited = page.input_value("#yaml").replace("  confirm: 0.5 ", "  confirm: 0.6 ", 1)
    page.fill("#yaml", edited)
    other = page.input_value("#yaml").replace("  confirm: 0.6 ", "  confirm: 0.45", 1)
    r = httpx.post(f"{bot.url}/admin/api/publish", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"yaml": other, "expected_version": 2, "comment": "someone else"})
    assert r.status_code == 200 and r.json()["version"] == 3
    page.click("#btn-publish")
    expect(dialog).to_be_visible()
    page.click("#confirm-ok")
    expect(page.locator("#toast")).to_contain_text("Publish conflict: v3 was published")
    expect(page.locator("#live-version")).to_have_text("live: v3")
    assert page.input_value("#yaml") == edited  # nothing lost
    shot(page, "035-publish-conflict")

    # versions tab: diff, then roll back to v1 (confirmed)
    page.click('#tabs button[data-tab="versions"]')
    rows = page.locator("#versions-table tbody tr")
    expect(rows).to_have_count(3)
    page.select_option("#diff-a", "1")
    page.select_option("#diff-b", "2")
    page.click("#btn-diff")
    expect(page.locator("#diff td.ins")).to_contain_text(f"accept: {STRICTER}")
    shot(page, "04-versions-diff")
    page.locator('#versions-table tr[data-version="1"] button.rollback').click()
    expect(dialog).to_be_visible()
    page.fill("#confirm-comment", "back to defaults")
    page.click("#confirm-ok")
    expect(page.locator("#toast")).to_contain_text("v1 is live again")
    expect(page.locator("#live-version")).to_have_text("live: v1")
    assert policy_version_within(bot.url, bot.redis_url, "1") == "1"

    # try-it: typed text is spoken by the bot's voice and understood, decided under the editor's draft
    page.click('#tabs button[data-tab="tryit"]')
    expect(page.locator("#try-policy")).to_have_value("editor")
    page.fill("#try-text", "I want to pay my bill")
    page.click("#try-text-form button[type=submit]")
    page.wait_for_selector("#try-result:not([hidden]), #toast.error:not([hidden])", timeout=60_000)
    assert page.is_visible("#try-result"), page.inner_text("#toast")
    expect(page.locator("#try-source")).to_contain_text("Spoken by the bot's voice")
    expect(page.locator("#r-intent")).to_have_text("pay_bill")
    expect(page.locator("#r-alts tbody tr").first).to_contain_text("pay_bill")
    expect(page.locator("#r-action")).to_have_text(re.compile(r"^(collect|confirm)$"))
    expect(page.locator("#r-reason")).to_contain_text("reason:")
    shot(page, "07-try-it")

    page.click('#tabs button[data-tab="audit"]')
    expect(page.locator("#audit-table tbody tr").first).to_contain_text("rollback")
    expect(page.locator("#audit-table tbody")).to_contain_text("127.0.0.1")
    shot(page, "05-audit")

    page.click('#tabs button[data-tab="live"]')
    # today's calls: the ones policy_version_within placed (two on a quiet box; one more per try when a
    # switch took a moment to reach the worker)
    import redis

    placed = redis.Redis.from_url(bot.redis_url).zcard("calls:recent")
    assert placed >= 2
    expect(page.locator("#s-calls")).to_have_text(str(placed), timeout=10_000)
    shot(page, "06-live")
    page.close()


def test_two_tabs_saving_one_draft_lose_nothing(bot: BotServer, browser: object) -> None:
    """Two tabs opened the same draft; the second save silently overwrote the first, and a tab whose
    draft had been published elsewhere could neither save nor publish its text (404 on every try).
    Now the later save becomes a new draft, and the live badge follows a publish from the other tab."""
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1360, "height": 860})  # type: ignore[attr-defined]

    def tab() -> object:
        page = ctx.new_page()
        page.goto(f"{bot.url}/admin")
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#who")).to_contain_text("publisher")
        return page

    a = tab()
    original = a.input_value("#yaml")
    a.fill("#yaml", original + "\n# tab A, first save\n")
    a.click("#btn-save")
    expect(a.locator("#toast")).to_contain_text("saved")
    draft = a.inner_text("#editing").split()[2]
    b = tab()
    b.locator("#drafts-box button", has_text=draft).click()
    expect(b.locator("#editing")).to_contain_text(f"draft {draft}")
    b.fill("#yaml", original + "\n# tab B\n")
    b.click("#btn-save")
    expect(b.locator("#toast")).to_contain_text(f"Draft {draft} saved")

    a.fill("#yaml", original + "\n# tab A, second save\n")
    a.click("#btn-save")
    expect(a.locator("#toast")).to_contain_text("saved by someone else")
    copy = a.inner_text("#editing").split()[2]
    assert copy != draft
    h = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{bot.url}/admin/api/drafts/{draft}", headers=h).json()["yaml"].endswith("# tab B\n")
    assert httpx.get(f"{bot.url}/admin/api/drafts/{copy}", headers=h).json()["yaml"].endswith("# tab A, second save\n")

    # B publishes its draft; A's badge follows without a reload, and A's publish is a clear conflict
    before = int(httpx.get(f"{bot.url}/admin/api/policies", headers=h).json()["current"])
    b.click("#btn-publish")
    b.click("#confirm-ok")
    expect(b.locator("#toast")).to_contain_text("Published")
    expect(a.locator("#live-version")).not_to_have_text(f"live: v{before}", timeout=10_000)
    shot(a, "08-two-tabs-draft-copy")
    ctx.close()
