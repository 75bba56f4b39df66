"""The web chat page in headless Chromium (Debian's, driven by Playwright; no browser download): send a message
and see the streamed answer, stop an answer, start a new chat, reasoning in its own block, API key prompt; images
attached by button, paste and drop, shown as thumbnails."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.images import ImageProcessor
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine
from qwenlite.text.tokenizer import Tokenizer

from helpers import LiveServer, make_multimodal_checkpoint, tiny_checkpoint, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a sandboxed machine without network: no background connections, no GPU, no first-run UI.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
API_KEY = "sk-web-test"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory)
    engine = Engine(load_checkpoint(path).model, max_concurrency=2, max_queue=4, ctx=4096)
    server = LiveServer(create_app(engine, Tokenizer.from_dir(path), "tiny", api_key=API_KEY), engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: `apt-get install chromium` (.ci/run does it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live) -> Page:
    context = browser.new_context()
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept(API_KEY))  # the page asks for the key once
    page.goto(live.url + "/")
    yield page
    context.close()


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_message_streams_an_answer(page, tmp_path):
    expect(page.locator("#model")).to_have_text("tiny")
    send(page, "Hello there")
    expect(page.locator(".msg.user .content")).to_have_text("Hello there")
    # Streaming: the answer grows while the Stop button is shown, then Send comes back.
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".msg.assistant .content")).not_to_be_empty()
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()
    page.screenshot(path=tmp_path / "chat.png")
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_stop_ends_the_answer_and_frees_the_slot(page, live):
    send(page, "Tell me a long story")
    content = page.locator(".msg.assistant .content")
    expect(content).not_to_be_empty()
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()
    wait_until(lambda: live.engine.active == 0)
    stopped = content.inner_text()
    page.wait_for_timeout(300)
    assert content.inner_text() == stopped  # nothing arrives after Stop


def test_new_chat_clears_the_conversation_and_it_survives_a_reload(page):
    send(page, "First message")
    expect(page.locator(".msg.assistant .content")).not_to_be_empty()
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()
    page.reload()
    expect(page.locator(".msg.user")).to_have_count(1)  # kept in the browser
    page.locator("#new").click()
    expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    expect(page.locator(".msg")).to_have_count(0)


def test_thinking_toggle_shows_reasoning_in_its_own_block(page):
    page.locator("#think").check()
    send(page, "Think about it")
    reasoning = page.locator(".msg.assistant details")
    expect(reasoning).to_be_visible()  # a random model thinks until stopped: all of it is reasoning
    expect(reasoning.locator("div")).not_to_be_empty()
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()


@pytest.fixture(scope="module")
def live_mm(tmp_path_factory, qwen35_tokenizer_dir):
    """A server for a checkpoint with a vision tower."""
    path = tmp_path_factory.mktemp("multimodal-web")
    make_multimodal_checkpoint(path, qwen35_tokenizer_dir)
    engine = Engine(load_checkpoint(path, vision=True).model, max_concurrency=2, max_queue=4, ctx=1024)
    app = create_app(engine, Tokenizer.from_dir(path), "mm", images=ImageProcessor.from_dir(path))
    server = LiveServer(app, engine)
    yield server
    server.stop()


# A File made in the page from base64 bytes, handed over as a paste into the input or a drop on the page.
HAND_OVER = """([b64, kind]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], "picture.png", { type: "image/png" }));
  if (kind === "paste") {
    document.getElementById("input").dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
  } else {
    document.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
  }
}"""


def test_images_attach_by_button_paste_and_drop_and_show_as_thumbnails(browser, live_mm, tmp_path):
    png = tmp_path / "picture.png"
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(png)
    page = browser.new_context().new_page()
    page.goto(live_mm.url + "/")
    expect(page.locator("#model")).to_have_text("mm")
    page.set_input_files("#file", str(png))
    expect(page.locator("#attachments img")).to_have_count(1)
    b64 = base64.b64encode(png.read_bytes()).decode()
    page.evaluate(HAND_OVER, [b64, "paste"])
    expect(page.locator("#attachments img")).to_have_count(2)
    page.evaluate(HAND_OVER, [b64, "drop"])
    expect(page.locator("#attachments img")).to_have_count(3)
    page.locator("#attachments img").nth(2).click()  # a click takes one back
    expect(page.locator("#attachments img")).to_have_count(2)
    send(page, "What are these?")
    expect(page.locator(".msg.user .thumbs img")).to_have_count(2)
    expect(page.locator("#attachments img")).to_have_count(0)
    expect(page.locator(".msg.assistant .content")).not_to_be_empty()  # the server took the image parts
    expect(page.locator(".msg .error")).to_have_count(0)
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()
    page.reload()  # the conversation, images included, is kept in the browser
    expect(page.locator(".msg.user .thumbs img")).to_have_count(2)
