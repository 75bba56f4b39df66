"""The web chat page in headless Chromium (Debian's, driven by Playwright; no browser download). Against the real
server: send a message and see the streamed answer, stop an answer, start a new chat, reasoning in its own block,
API key prompt, an answer's speed and context; images and videos attached by button, paste and drop, shown as
thumbnails (a video by its first frame), sent as image_url / video_url parts, a bad video's 400 shown as its error.
Against canned answers (page.route on /v1/chat/completions, the page being the unit under test): Markdown with
highlighted, copyable code, tables and math; sanitising; incremental rendering; settings, conversations,
regenerate and edit-and-resend, each checked on the requests the page sends."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright
from test_video import write_video

import qwenlite
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.images import ImageProcessor
from qwenlite.io.video import VideoProcessor
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine
from qwenlite.serve.image_urls import MAX_IMAGE_BYTES, MAX_VIDEO_BYTES
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
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept(API_KEY))  # the page asks for the key once
    page.goto(live.url + "/")
    expect(page.locator("#model")).to_have_text("tiny")  # /v1/models answered: the page knows its context size
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
    expect(page.locator(".msg.assistant .stats")).to_have_text("stopped")


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


def test_an_answer_shows_its_speed_and_the_context_it_used(page, live, monkeypatch):
    # The page gives no speed for an answer that arrived in one read (a buffering proxy, say); the tiny model can
    # decode 6 tokens inside one, so each step here takes long enough for the browser to read the deltas apart.
    decode = live.engine.runner.decode

    def paced(*args, **kwargs):
        time.sleep(0.05)
        return decode(*args, **kwargs)

    monkeypatch.setattr(live.engine.runner, "decode", paced)
    page.locator("#settings-open").click()
    page.fill("#max-tokens", "6")  # the server ends the answer: usage comes with its last chunk
    page.locator("#settings-close").click()
    send(page, "Count to ten")
    stats = page.locator(".msg.assistant .stats")
    expect(stats).to_contain_text("tok/s", timeout=20_000)
    text = stats.inner_text()
    pattern = r"(\d+) tokens · ([\d.]+) tok/s · context ([\d,]+) / 4,096( · cut at the token limit)?"
    tokens, tps, used, cut = re.fullmatch(pattern, text).groups()
    assert 2 <= int(tokens) <= 6 and float(tps) > 0  # max_tokens reached the server
    assert (cut is not None) == (int(tokens) == 6)  # finish_reason "length"
    assert int(tokens) < int(used.replace(",", "")) < 100  # the prompt and the answer


@pytest.fixture(scope="module")
def live_mm(tmp_path_factory, qwen35_tokenizer_dir):
    """A server for a checkpoint with a vision tower."""
    path = tmp_path_factory.mktemp("multimodal-web")
    make_multimodal_checkpoint(path, qwen35_tokenizer_dir)
    engine = Engine(load_checkpoint(path, vision=True).model, max_concurrency=2, max_queue=4, ctx=1024)
    app = create_app(engine, Tokenizer.from_dir(path), "mm", images=ImageProcessor.from_dir(path),
                     videos=VideoProcessor.from_dir(path))  # fmt: skip
    server = LiveServer(app, engine)
    yield server
    server.stop()


# A File made in the page from base64 bytes, handed over as a paste into the input or a drop on the page.
HAND_OVER = """([b64, kind, name = "picture.png", type = "image/png"]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
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


def test_videos_attach_show_a_frame_and_go_as_video_url_parts(browser, live_mm, tmp_path):
    """By button: the clip shows its first frame, goes as a video_url data: URL part and the model answers it. By
    paste: over the page's limit (lowered here; the page states the server's), named in the notice, not attached.
    By drop: a corrupt clip's 400 shows as the answer's error and the page is ready again; the next turn goes without
    the refused one. A conversation the
    browser's storage refuses (videos fill it fast) is said to live in this tab only."""
    clip = write_video(tmp_path / "clip.webm", 8, 64, 48, 4, codec="libvpx")  # VP8: every Chromium plays it
    b64 = base64.b64encode(clip.read_bytes()).decode()
    context = browser.new_context()
    page = context.new_page()
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.goto(live_mm.url + "/")
    expect(page.locator("#model")).to_have_text("mm")
    assert page.evaluate("LIMITS") == {"image": MAX_IMAGE_BYTES, "video": MAX_VIDEO_BYTES}
    expect(page.locator("#attach")).to_have_attribute(
        "title", re.compile(r"images \(up to 20 MB\) or videos \(up to 64 MB\)")
    )

    page.set_input_files("#file", str(clip))
    expect(page.locator("#attachments video")).to_have_count(1)
    send(page, "What happens?")
    shown = page.locator(".msg.user .thumbs video")
    expect(shown).to_have_count(1)
    expect(page.locator(".msg.assistant .content")).not_to_be_empty()  # the server took the video part
    expect(page.locator(".msg .error")).to_have_count(0)
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()
    (part, text) = bodies[0]["messages"][-1]["content"]
    assert part == {"type": "video_url", "video_url": {"url": "data:video/webm;base64," + b64}}
    assert text == {"type": "text", "text": "What happens?"}
    wait_until(lambda: shown.evaluate("(v) => v.readyState >= 2 && v.videoWidth === 64"))  # its first frame decoded

    page.evaluate("LIMITS.video = 1000")
    page.evaluate(HAND_OVER, [b64, "paste", "big.webm", "video/webm"])
    expect(page.locator("#notice")).to_have_text(re.compile(r"big\.webm is \d+ KB: videos up to 1 KB are sent"))
    expect(page.locator("#attachments video")).to_have_count(0)
    page.evaluate("LIMITS.video = 64 << 20")

    page.evaluate(HAND_OVER, [base64.b64encode(b"not a video at all").decode(), "drop", "bad.mp4", "video/mp4"])
    expect(page.locator("#attachments video")).to_have_count(1)
    expect(page.locator("#notice")).to_be_empty()
    full = "() => { Storage.prototype.setItem = () => { throw new DOMException('full', 'QuotaExceededError'); }; }"
    page.evaluate(full)
    send(page, "And this one?")
    expect(page.locator(".msg .error")).to_contain_text("messages.2.content.0.video_url is not a video")
    expect(page.locator("#send")).to_be_visible()
    assert len(bodies) == 2
    expect(page.locator("#notice")).to_contain_text("too large for this browser's storage")  # and says so
    send(page, "Then say anything.")  # the refused turn is not sent again: the model answers
    expect(page.locator(".msg.assistant .content").last).not_to_be_empty()
    page.locator("#stop").click()
    expect(page.locator("#send")).to_be_visible()
    asked = [[p.get("text") for p in m["content"]] if isinstance(m["content"], list) else [m["content"]]
             for m in bodies[2]["messages"] if m["role"] == "user"]  # fmt: skip
    assert asked == [[None, "What happens?"], ["Then say anything."]]
    context.close()


# --- canned answers: the page under test --------------------------------------------------------------------


def sse(text: str, reasoning: str = "", usage: dict | None = None, pieces: int = 7) -> str:
    """A streamed chat answer as the server sends it: the text in deltas of `pieces` characters, then usage."""
    deltas = [{"reasoning_content": reasoning[i : i + pieces]} for i in range(0, len(reasoning), pieces)]
    deltas += [{"content": text[i : i + pieces]} for i in range(0, len(text), pieces)]
    chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    if usage:
        chunks.append({"object": "chat.completion.chunk", "choices": [], "usage": usage})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


class Canned:
    """Answers the page's chat requests with `answers` in turn, keeping each request's body."""

    def __init__(self, page: Page, *answers: str):
        self.answers, self.bodies = list(answers), []
        page.route("**/v1/chat/completions", self.fulfill)

    def fulfill(self, route) -> None:
        self.bodies.append(route.request.post_data_json)
        body = self.answers.pop(0)
        route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=body if body.startswith("data: ") else sse(body),
        )

    def messages(self, i: int = -1) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in self.bodies[i]["messages"]]


def answered(page: Page, count: int) -> None:
    """Wait for the `count`-th answer to have ended."""
    expect(page.locator(".msg.assistant")).to_have_count(count)
    expect(page.locator("#send")).to_be_visible()


CODE = "def add(a, b):\n    return a + b"


def test_a_code_block_is_highlighted_and_its_button_copies_it(page):
    Canned(page, f"Here it is:\n\n```python\n{CODE}\n```\n\nCall it with `add(1, 2)`.")
    send(page, "Write add in Python")
    answered(page, 1)
    code = page.locator(".msg.assistant pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b"))
    expect(code.locator(".hljs-keyword").first).to_have_text("def")  # highlight.js's python grammar ran
    expect(page.locator(".msg.assistant p code")).to_have_text("add(1, 2)")
    page.locator(".msg.assistant pre .copy").click()
    expect(page.locator(".msg.assistant pre .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").rstrip("\n") == CODE


def test_tables_and_math_render(page):
    answer = (
        "| n | square |\n|---|---|\n| 2 | 4 |\n| 3 | 9 |\n\n"
        "Inline $x^2$ and \\(\\alpha\\), and displayed:\n\n$$\n\\frac{a}{b}\n$$\n\n\\[\\sqrt{2}\\]\n"
    )
    Canned(page, answer)
    send(page, "Squares and maths")
    answered(page, 1)
    content = page.locator(".msg.assistant .content")
    expect(content.locator("table tbody tr")).to_have_count(2)
    expect(content.locator("table td").nth(3)).to_have_text("9")
    expect(content.locator("math")).to_have_count(4)  # MathML, drawn by the browser
    expect(content.locator("math mfrac")).to_have_count(1)
    expect(content.locator("math msqrt")).to_have_count(1)
    assert "frac" not in content.inner_text() and "$" not in content.inner_text()  # no TeX left showing


ATTACKS = """<img src=x onerror="(window.pwned ||= []).push('img')">
<img src="data:image/png;base64,AAAA" onerror="(window.pwned ||= []).push('data img')">
<svg><animate onbegin="(window.pwned ||= []).push('svg')" attributeName="x" dur="1s"/></svg>
<iframe srcdoc="<script>(parent.pwned ||= []).push('iframe')</script>"></iframe>
<script>(window.pwned ||= []).push('script')</script>

[a link](javascript:void((window.pwned||=[]).push('link'))) and ![a tracker](TRACKER)
and **still here**
"""


def test_an_answer_cannot_run_script_or_load_from_elsewhere(page, live):
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    tracker = live.url + "/tracker.png"  # a URL that would load if the page let it
    Canned(page, ATTACKS.replace("TRACKER", tracker))
    send(page, "Say something nasty")
    answered(page, 1)
    content = page.locator(".msg.assistant .content")
    expect(content.locator("strong")).to_have_text("still here")  # the Markdown around the attacks renders
    page.wait_for_timeout(300)  # time for an error event, an animation or a frame to run
    assert page.evaluate("window.pwned") is None
    content.locator("a").click()
    assert page.evaluate("window.pwned") is None
    assert content.locator("[onerror], [onbegin], iframe, script").count() == 0
    assert tracker not in requests


def test_a_streamed_answer_renders_as_the_whole_text_does(page):
    """markdown.js keeps the blocks whose source did not change: rendered a few characters at a time, an answer
    ends as the same DOM as when rendered at once (a reference link defined after its use included), and a
    finished block stays the same element."""
    text = (
        "# Title\n\nSome *text* with a [reference][r].\n\n- one\n- two\n\n```js\nlet x = 1;\n```\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n$$\nx^2\n$$\n\nSetext\n===\n\n[r]: http://example.invalid/\n"
    )
    same, kept = page.evaluate(
        """(text) => {
      const streamed = document.createElement("div"), whole = document.createElement("div");
      let heading = null, kept = true;
      for (let i = 1; i <= text.length; i += 3) {
        Markdown.render(streamed, text.slice(0, i));
        const h1 = streamed.querySelector("h1");  // the same element until the reference's definition arrives
        if (i > 20 && i < text.indexOf("[r]:")) kept = kept && h1 === (heading = heading || h1);
      }
      Markdown.render(streamed, text);
      Markdown.render(whole, text);
      return [streamed.innerHTML === whole.innerHTML, kept];
    }""",
        text,
    )
    assert same and kept


def test_settings_apply_to_every_request_and_survive_a_reload(page):
    canned = Canned(page, "One.", "Two.", "Three.")
    send(page, "Before settings")
    answered(page, 1)
    first = canned.bodies[0]
    assert first["stream_options"] == {"include_usage": True}
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    assert "temperature" not in first and "max_tokens" not in first  # the server's defaults
    assert canned.messages(0) == [("user", "Before settings")]

    page.locator("#settings-open").click()
    page.fill("#system", "Answer in one word.")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "42")
    page.locator("#settings-close").click()
    page.locator("#think").check()
    send(page, "After settings")
    answered(page, 2)
    body = canned.bodies[1]
    assert (body["temperature"], body["max_tokens"], body["chat_template_kwargs"]) == (
        0.3,
        42,
        {"enable_thinking": True},
    )
    assert canned.messages(1) == [("system", "Answer in one word."), ("user", "Before settings"),
                                  ("assistant", "One."), ("user", "After settings")]  # fmt: skip

    page.reload()
    expect(page.locator("#think")).to_be_checked()
    expect(page.locator("#system")).to_have_value("Answer in one word.")
    send(page, "After a reload")
    answered(page, 3)
    assert (canned.bodies[2]["temperature"], canned.bodies[2]["max_tokens"]) == (0.3, 42)
    assert canned.messages(2)[0] == ("system", "Answer in one word.")


def test_usage_gives_the_answer_its_tokens_and_context(page):
    usage = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
             "prompt_tokens_details": {"cached_tokens": 64}}  # fmt: skip
    Canned(page, sse("Twenty tokens, give or take.", usage=usage))
    send(page, "How many?")
    answered(page, 1)
    stats = page.locator(".msg.assistant .stats")
    expect(stats).to_contain_text("20 tokens")
    expect(stats).to_contain_text("context 120 / 4,096")  # max_model_len from /v1/models
    expect(stats).to_have_attribute("title", re.compile(r"prompt 100 tokens \(64 cached\)"))


def titles(page: Page) -> list[str]:
    return page.locator("#chats .title").all_inner_texts()


def test_conversations_are_listed_switched_deleted_and_kept(page):
    Canned(page, "Answer one.", "Answer two.")
    send(page, "First conversation")
    answered(page, 1)
    page.locator("#new").click()
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "Second conversation")
    answered(page, 1)
    assert titles(page) == ["Second conversation", "First conversation"]  # the most recent first
    page.reload()
    assert titles(page) == ["Second conversation", "First conversation"]
    expect(page.locator(".msg.user .content")).to_have_text("Second conversation")  # the one that was open
    page.locator("#chats .title", has_text="First").click()
    expect(page.locator(".msg.user .content")).to_have_text("First conversation")
    expect(page.locator(".msg.assistant .content")).to_have_text("Answer one.")
    second = page.locator("#chats li", has_text="Second")
    second.hover()  # its delete button shows
    second.locator(".delete").click()
    assert titles(page) == ["First conversation"]
    page.reload()
    assert titles(page) == ["First conversation"]
    expect(page.locator(".msg.user .content")).to_have_text("First conversation")


def test_the_conversation_of_the_page_before_conversations_is_kept(page):
    old = {"messages": [{"role": "user", "content": "Old question"}, {"role": "assistant", "content": "Old *answer*"}],
           "think": True}  # fmt: skip
    page.evaluate("(old) => localStorage.setItem('qwenlite-chat', JSON.stringify(old))", old)
    page.reload()
    expect(page.locator(".msg .content")).to_have_text(["Old question", "Old answer"])
    expect(page.locator(".msg.assistant em")).to_have_text("answer")
    expect(page.locator("#think")).to_be_checked()
    assert titles(page) == ["Old question"]
    page.reload()  # moved once, not again
    assert titles(page) == ["Old question"]


def test_regenerate_and_edit_and_resend_send_the_conversation_cut_where_expected(page):
    canned = Canned(page, "A1", "A2", "A2 again", "A1 anew")
    send(page, "Q1")
    answered(page, 1)
    a1 = page.locator(".msg.assistant .md-block").first.element_handle()
    send(page, "Q2")
    answered(page, 2)
    assert page.evaluate("(block) => block.isConnected", a1)  # a finished answer is not drawn again
    regenerate = page.locator(".msg.assistant .regenerate:visible")
    expect(regenerate).to_have_count(1)  # the last answer's only
    regenerate.click()
    expect(page.locator(".msg.assistant .content").last).to_have_text("A2 again")
    assert canned.messages() == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]
    expect(page.locator(".msg")).to_have_count(4)

    page.locator(".msg.user .edit").last.click()
    page.locator(".msg.user .editor textarea").fill("never sent")
    page.keyboard.press("Escape")  # cancels: the message as it was
    expect(page.locator(".msg.user .content")).to_have_text(["Q1", "Q2"])
    page.locator(".msg.user .edit").first.click()
    page.locator(".msg.user .editor textarea").fill("Q1, edited")
    page.locator(".msg.user .editor .resend").click()
    expect(page.locator(".msg.assistant .content")).to_have_text("A1 anew")
    assert canned.messages() == [("user", "Q1, edited")]  # the conversation was cut after the edited message
    page.reload()
    expect(page.locator(".msg .content")).to_have_text(["Q1, edited", "A1 anew"])


def test_static_serves_the_page_files_and_nothing_else(live):
    script = httpx.get(live.url + "/static/markdown.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "DOMPurify.sanitize" in script.text
    assert script.headers["cache-control"] == "no-cache"  # revalidated: an upgrade's scripts are seen at once
    again = httpx.get(live.url + "/static/markdown.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304
    for path in ["/static/missing.js", "/static/../serve/app.py", "/static/%2e%2e/chat.html"]:
        r = httpx.get(live.url + path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", path


def test_the_page_and_its_libraries_ship_in_the_wheel():
    """Every file under qwenlite/data (the page, its scripts, the vendored libraries and their licences) is
    matched by pyproject.toml's package-data globs."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    package = Path(qwenlite.__file__).parent
    shipped = {p for g in pyproject["tool"]["setuptools"]["package-data"]["qwenlite"] for p in package.glob(g)}
    files = [p for p in (package / "data").rglob("*") if p.is_file()]
    assert (package / "data" / "web" / "marked.LICENSE.txt") in files
    assert [p for p in files if p not in shipped] == []
