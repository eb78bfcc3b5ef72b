"""The chat page at `/` end to end in a real headless Chromium (Debian's package, driven by Playwright):
API key entry, persona picker with a card's picture, description and first message, streamed replies over
several turns, stop and regenerate. Saves a screenshot and prints its path."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import time
import zlib

import pytest

from gigafactory.serve.api import ServerOptions, build_state, create_app
from gigafactory.serve.engine import EngineConfig
from gigafactory.serve.limits import ApiKeys
from serve_helpers import running, trained_run

CHROMIUM = "/usr/bin/chromium"
KEY = "sk-page-test-123456"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def card_png(card: dict, size: int = 24) -> bytes:
    """A real picture (a brass-coloured gradient) carrying a V2 card in its 'chara' chunk."""
    rows = b"".join(b"\0" + bytes(c for x in range(size) for c in (180, 84 + 4 * x, 30 + 6 * y)) for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    text = b"chara\0" + base64.b64encode(json.dumps(card).encode())
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"tEXt", text)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    cards = tmp_path_factory.mktemp("page_cards")
    card = {
        "spec": "chara_card_v2",
        "data": {
            "name": "Ada",
            "description": "{{char}} builds engines of brass and steam.",
            "first_mes": "Welcome to the workshop, {{user}}.",
        },
    }
    (cards / "ada.png").write_bytes(card_png(card))
    state = build_state(trained_run(tmp_path_factory), cards, EngineConfig(max_batch=4, kv_cache_mb=2.0))
    real_step = state.engine.step

    def paced() -> None:  # a few ms per token, so "Stop" has a reply in flight to stop
        time.sleep(0.01)
        real_step()

    state.engine.step = paced  # type: ignore[method-assign]
    with running(create_app(state, ServerOptions(api_keys=ApiKeys([KEY])))) as url:
        yield url


def test_chat_page_in_headless_chromium(page_url, tmp_path_factory):
    from playwright.sync_api import expect, sync_playwright

    profile = tmp_path_factory.mktemp("chromium_profile")
    shot = tmp_path_factory.getbasetemp() / "serve_page.png"
    posted: list[dict] = []
    with sync_playwright() as pw:
        # A fresh profile directory (Playwright passes it as --user-data-dir).
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=FLAGS, viewport={"width": 1100, "height": 720}
        )
        try:
            page = browser.new_page()
            page.on(
                "request",
                lambda r: posted.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None,
            )
            page.goto(page_url + "/")
            # The server needs a key: the page asks once, then lists the personas.
            expect(page.locator("#key-dialog")).to_be_visible()
            page.fill("#key-input", KEY)
            page.click("#key-save")
            ada = page.locator('.persona[data-id="Ada"]')
            expect(ada).to_be_visible()
            expect(page.locator('.persona[data-id="ROMEO"]')).to_be_visible()
            ada.click()
            card = page.locator("#persona-card")
            expect(card.locator("h2")).to_have_text("Ada")
            expect(card.locator(".description")).to_have_text("Ada builds engines of brass and steam.")
            assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 24  # the card's picture
            expect(page.locator(".msg.assistant").first).to_contain_text("Welcome to the workshop, Stranger.")

            # Two turns, each streamed into the page; the second request carries the whole conversation.
            for turn, text in enumerate(["Hello there", "What do you build?"]):
                page.fill("#input", text)
                with page.expect_response(lambda r: r.url.endswith("/chat/completions")) as streamed:
                    page.click("#send")
                expect(page.locator("#status")).to_have_text("done", timeout=60_000)
                # The bubble shows every streamed piece, in order.
                events = [line[6:] for line in streamed.value.text().splitlines() if line.startswith("data: {")]
                sent = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events)
                assert page.locator(".msg.assistant .text").last.text_content() == sent
                expect(page.locator(".msg.user")).to_have_count(turn + 1)
                expect(page.locator(".msg.assistant")).to_have_count(turn + 2)
            assert [m["role"] for m in posted[-1]["messages"]] == ["assistant", "user", "assistant", "user"]
            assert posted[-1]["stream"] is True and posted[-1]["model"] == "Ada"

            # Regenerate replaces the last reply (same number of messages, the same history sent again).
            page.click("#regenerate")
            expect(page.locator("#status")).to_have_text("done", timeout=60_000)
            expect(page.locator(".msg.assistant")).to_have_count(3)
            assert posted[-1]["messages"] == posted[-2]["messages"]

            # Stop ends a reply in flight.
            page.fill("#input", "Tell me a long story about engines")
            page.click("#send")
            expect(page.locator("#stop")).to_be_enabled()
            page.click("#stop")
            expect(page.locator("#status")).to_have_text("stopped", timeout=10_000)
            expect(page.locator("#send")).to_be_enabled()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\nchat page screenshot: {shot}")
    assert shot.stat().st_size > 10_000
