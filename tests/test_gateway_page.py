"""The chat page for people who keep using it (issue 11), in headless Chromium against a
real loopback gateway: a phone's width, tables, code blocks, copy / regenerate / edit,
Enter while streaming, the server going away, and the conversation list.

Needs the system Chromium and Playwright for Python (skipped without them). Where a
test needs an answer the scripted mock cannot write (a table, a code block) or a server
that dies mid-answer, the page's ``POST /chat`` is answered by Playwright with a
recorded-style event stream; everything else goes to the gateway.

Screenshots land in /tmp/tokenrelay_page_*.png (desktop and 390 × 844) for a human to
look at.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from _browser import chromium_path, launch_chromium
from _cutproxy import Cut, CutProxy
from _harness import LiveGateway, Processes, poll

pytest.importorskip("playwright.sync_api",
                    reason="needs Playwright for Python: pip install playwright")
pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="needs a system Chromium: apt-get install -y chromium")

from playwright.sync_api import Page, Route, expect

from tokenrelay.errors import ConfigurationError
from tokenrelay.server.config import ServerConfig

SHOTS = Path("/tmp")


def paced(tokens: int, per_second: int) -> str:
    """A scripted mock answer of ``tokens`` tokens at ``per_second`` (the one spelling of
    the mock's options lives here)."""
    return f"mock:tokens={tokens},tps={per_second}"


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}

#: An answer with what a model writes: a wide table, code, a long unbroken URL.
RICH = """Here is a comparison:

| Model | Context | Speed (tok/s) | Notes |
|:------|:-------:|--------------:|-------|
| smollm2 | 8k | 180 | embedded, offline, runs on a laptop without a GPU at all |
| qwen-7b | 32k | 45 | `vllm` upstream |

```python
def greet(name: str) -> str:
    # say hello
    return f"Hello, {name}!" * 2  # a very long line that goes on and on and on and on and on
```

See https://example.com/a/very/long/path/that/does/not/break/anywhere/at/all/really/none
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with launch_chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        yield context


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[LiveGateway]:
    log = {"path": str(tmp_path / "r.db")}
    try:
        live = LiveGateway(ServerConfig.model_validate({"log": log}))
    except ConfigurationError:  # the embedded model is not installed: mock only
        live = LiveGateway(ServerConfig.model_validate({"log": log, "serve_local": False}))
    with live:
        yield live


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    # Each test starts with no saved conversations.
    page.evaluate("() => localStorage.clear()") if page.url.startswith("http") else None
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_chat(page: Page, server: LiveGateway, model: str = "mock") -> None:
    page.goto(f"{server.url}/?model={quote(model)}")
    expect(page.locator("#model")).to_have_value(model)


def ask(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def last_answer(page: Page) -> Any:
    return page.locator(".msg.assistant").last


def sse(frames: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in frames)


def answer_frames(text: str, *, size: int = 12) -> list[tuple[str, dict[str, Any]]]:
    frames: list[tuple[str, dict[str, Any]]] = [
        ("text", {"text": text[i:i + size]}) for i in range(0, len(text), size)]
    frames.append(("done", {"finish_reason": "stop", "usage": {
        "prompt_tokens": 5, "completion_tokens": len(frames), "total_tokens": 5 + len(frames)}}))
    return frames


def fake_chat(page: Page, body: str) -> list[dict[str, Any]]:
    """Answer the page's ``POST /chat`` with ``body`` (an event stream); the requests."""
    seen: list[dict[str, Any]] = []

    def handle(route: Route) -> None:
        seen.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(status=200, body=body, headers={"content-type": "text/event-stream"})

    page.route("**/chat", handle)
    return seen


def chat_rows(server: LiveGateway, count: int) -> list[dict[str, Any]]:
    """The gateway's request-log rows of ``POST /chat`` (oldest first), once ``count``."""
    reqlog = server.app.state.gateway.reqlog
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in reversed(reqlog.rows()) if r["endpoint"] == "chat"]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def no_sideways_scroll(page: Page) -> dict[str, int]:
    return page.evaluate("""() => {
        const de = document.documentElement, s = document.getElementById('scroller');
        return {page: de.scrollWidth - de.clientWidth, body: document.body.scrollWidth - de.clientWidth,
                main: s.scrollWidth - s.clientWidth};
    }""")


# -- a phone's width ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_nothing_scrolls_sideways_and_every_header_control_is_visible(
        page: Page, gateway: LiveGateway, size: dict[str, int]) -> None:
    page.set_viewport_size(size)
    open_chat(page, gateway)
    fake_chat(page, sse(answer_frames(RICH)))
    ask(page, "Compare the models in a table, with a code example and a link please")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    expect(last_answer(page).locator("table")).to_be_visible()
    assert no_sideways_scroll(page) == {"page": 0, "body": 0, "main": 0}
    expect(page.get_by_role("combobox", name="Model")).to_be_visible()  # named at any width
    for control in ("#toggle-sidebar", "#model", "#new-chat"):
        box = page.locator(control).bounding_box()
        assert box is not None, control
        expect(page.locator(control)).to_be_visible()
        assert box["x"] >= 0 and box["x"] + box["width"] <= size["width"], (control, box)
    # Wide content scrolls inside its own box, never the page.
    wrap = last_answer(page).locator(".table-wrap")
    assert wrap.evaluate("e => e.getBoundingClientRect().right") <= size["width"]
    name = "phone" if size is PHONE else "desktop"
    page.screenshot(path=str(SHOTS / f"tokenrelay_page_{name}.png"))
    if size is PHONE:
        # The conversation list opens as a drawer and fits too.
        page.click("#toggle-sidebar")
        expect(page.locator("#sidebar")).to_be_visible()
        expect(page.locator("#toggle-sidebar")).to_have_attribute("aria-expanded", "true")
        assert page.locator("#sidebar").bounding_box()["width"] <= size["width"]  # type: ignore[index]
        assert no_sideways_scroll(page) == {"page": 0, "body": 0, "main": 0}
        page.screenshot(path=str(SHOTS / "tokenrelay_page_phone_conversations.png"))
        page.keyboard.press("Escape")
        expect(page.locator("#sidebar")).to_be_hidden()


# -- markdown tables, code blocks ----------------------------------------------------------


def test_markdown_tables_render_as_tables(page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway)
    fake_chat(page, sse(answer_frames(RICH, size=5)))
    ask(page, "table please")
    table = last_answer(page).locator("table")
    expect(table.locator("thead th")).to_have_text(["Model", "Context", "Speed (tok/s)", "Notes"])
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tbody tr").nth(1).locator("td")).to_have_text(
        ["qwen-7b", "32k", "45", "vllm upstream"])
    expect(table.locator("tbody tr").nth(1).locator("td code")).to_have_text("vllm")
    aligns = table.locator("thead th").evaluate_all("ths => ths.map(t => t.style.textAlign)")
    assert aligns == ["left", "center", "right", ""]
    expect(last_answer(page).locator(".content")).not_to_contain_text("|---")
    # Pipes inside a cell (escaped) and a table that is not one (no rule line).
    html = page.evaluate("""() => window.tokenrelayChat.renderMarkdown(
        "| a | b |\\n|---|---|\\n| x \\\\| y | <b> |\\n\\nnot | a table")""")
    assert "<td>x | y</td><td>&lt;b&gt;</td>" in html and html.count("<table>") == 1
    assert "<p>not | a table</p>" in html


def test_code_blocks_have_colouring_and_a_copy_button(page: Page, gateway: LiveGateway
                                                      ) -> None:
    open_chat(page, gateway)
    fake_chat(page, sse(answer_frames(RICH)))
    ask(page, "code please")
    block = last_answer(page).locator(".codeblock")
    expect(block.locator(".lang")).to_contain_text("python")
    code = block.locator("code")
    expect(code.locator(".tok-kw").first).to_have_text("def")
    expect(code.locator(".tok-fn")).to_have_text(["greet"])
    expect(code.locator(".tok-com").first).to_have_text("# say hello")
    expect(code.locator(".tok-str")).to_have_text(['f"Hello, {name}!"'])
    expect(code.locator(".tok-num")).to_have_text(["2"])
    colours = code.locator(".tok-kw, .tok-str").evaluate_all(
        "els => els.map(e => getComputedStyle(e).color)")
    plain = code.evaluate("e => getComputedStyle(e).color")
    assert len(set(colours)) == 2 and plain not in colours  # coloured, and differently
    copy = block.get_by_role("button", name="Copy code")
    copy.click()
    expect(block.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()") == (
        'def greet(name: str) -> str:\n    # say hello\n    return f"Hello, {name}!" * 2'
        "  # a very long line that goes on and on and on and on and on")
    # The colouring escapes what it colours.
    html = page.evaluate("""() => window.tokenrelayChat.highlight(
        'x = "<img src=x onerror=alert(1)>"  # <b>', 'python')""")
    assert "<img" not in html and "<b>" not in html and "&lt;img" in html
    for lang, snippet, kind, text in [
            ("js", "const a = `t` // c", "kw", "const"), ("bash", "echo $HOME # c", "kw", "echo"),
            ("json", '{"k": true}', "key", '"k"'), ("sql", "SELECT 1 FROM t", "kw", "SELECT"),
            ("html", '<a href="x">y</a>', "tag", "a"), ("rust", "fn main() {}", "kw", "fn"),
            ("go", "func f() {}", "kw", "func"), ("yaml", "key: yes", "key", "key")]:
        html = page.evaluate("([c, l]) => window.tokenrelayChat.highlight(c, l)", [snippet, lang])
        assert f'<span class="tok-{kind}">' + text.replace('"', "&quot;") + "</span>" in html, \
            (lang, html)


# -- copy, regenerate, edit; labels --------------------------------------------------------


def test_each_answer_can_be_copied_and_regenerated(page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway)
    ask(page, "First question")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    ask(page, "Second question")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(last_answer(page)).to_have_attribute("data-state", "done")

    last_answer(page).get_by_role("button", name="Copy answer").click()
    expect(last_answer(page).get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()") == \
        "Mock answer to: Second question"

    last_answer(page).get_by_role("button", name="Regenerate answer").click()
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    rows = chat_rows(gateway, 3)
    assert len(rows) == 3
    # The same prompt again, with the history before it (not the answer it replaces).
    assert json.loads(rows[2]["prompt"]) == json.loads(rows[1]["prompt"])

    # Regenerating an earlier answer drops what came after it (after a confirmation).
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(".msg.assistant").first.get_by_role("button", name="Regenerate answer").click()
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    rows = chat_rows(gateway, 4)
    assert json.loads(rows[3]["prompt"]) == [{"role": "user", "content": "First question"}]


def test_editing_and_resending_the_last_prompt(page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway)
    ask(page, "First question")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    ask(page, "Secnod qeustion")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    users = page.locator(".msg.user")
    # Only the last prompt offers editing.
    expect(users.first.get_by_role("button", name="Edit message")).to_be_hidden()
    users.last.get_by_role("button", name="Edit message").click()
    expect(page.locator("#prompt")).to_have_value("Secnod qeustion")
    expect(page.locator("#editing")).to_be_visible()
    page.screenshot(path=str(SHOTS / "tokenrelay_page_editing.png"))
    page.fill("#prompt", "Second question")
    page.press("#prompt", "Enter")
    expect(page.locator("#editing")).to_be_hidden()
    expect(users).to_have_count(2)
    expect(users.last.locator(".bubble")).to_have_text("Second question")
    expect(last_answer(page).locator(".content")).to_have_text("Mock answer to: Second question")
    rows = chat_rows(gateway, 3)
    assert json.loads(rows[2]["prompt"]) == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "Mock answer to: First question"},
        {"role": "user", "content": "Second question"}]


def test_every_icon_button_has_an_accessible_label(page: Page, gateway: LiveGateway
                                                   ) -> None:
    open_chat(page, gateway)
    fake_chat(page, sse(answer_frames(RICH)))
    ask(page, "everything")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    page.click("#toggle-sidebar") if not page.locator("#sidebar").is_visible() else None
    expect(page.locator('[data-testid="conversation"]')).to_have_count(1)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => !b.textContent.trim())  // icon only
        .filter(b => !(b.getAttribute('aria-label') || '').trim())
        .map(b => b.outerHTML.slice(0, 120))""")
    assert unlabelled == []
    icon_only = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => !b.textContent.trim()).length""")
    assert icon_only >= 6  # sidebar, copy code, copy/edit prompt, copy/retry answer, delete


# -- Enter while an answer streams -----------------------------------------------------------


def test_enter_while_streaming_queues_the_prompt(page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway, paced(30, 30))
    ask(page, "First question")
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    ask(page, "Then this")
    queued = page.locator("#queued")
    expect(queued).to_be_visible()
    expect(queued).to_contain_text("Then this")
    expect(page.locator("#prompt")).to_have_value("")
    page.screenshot(path=str(SHOTS / "tokenrelay_page_queued.png"))
    expect(page.locator(".msg.user")).to_have_count(1)  # not sent yet
    # Sent by itself when the first answer is done, with that answer in its history.
    expect(page.locator(".msg.user")).to_have_count(2, timeout=10_000)
    expect(queued).to_be_hidden()
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=10_000)
    rows = chat_rows(gateway, 2)
    sent = json.loads(rows[1]["prompt"])
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[2]["content"] == "Then this" and sent[1]["content"]

    # A queued prompt can be taken back: it returns to the composer.
    ask(page, "Third question")
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    ask(page, "Never mind")
    page.click("#queued-cancel")
    expect(queued).to_be_hidden()
    expect(page.locator("#prompt")).to_have_value("Never mind")
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=10_000)
    expect(page.locator(".msg.user")).to_have_count(3)


# -- the server going away -----------------------------------------------------------------


def test_server_gone_says_so_and_offers_to_retry(page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway)
    gateway.__exit__(None, None, None)  # the server stops
    ask(page, "Are you there?")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "error")
    error = answer.locator(".error")
    expect(error).to_contain_text("Can't reach the tokenrelay server")
    expect(error).to_contain_text("stopped or restarted")
    expect(error).not_to_contain_text("Failed to fetch")  # no browser jargon
    page.screenshot(path=str(SHOTS / "tokenrelay_page_server_gone.png"))
    # It comes back: "Try again" asks again, in place.
    seen = fake_chat(page, sse(answer_frames("Yes, back again.")))
    error.get_by_role("button", name="Try again: regenerate this answer").click()
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer.locator(".content")).to_have_text("Yes, back again.")
    expect(answer.locator(".error")).to_have_count(0)
    assert seen[0]["prompt"] == "Are you there?"


def test_server_shutdown_mid_answer_says_so_and_keeps_the_text(page: Page,
                                                               gateway: LiveGateway) -> None:
    open_chat(page, gateway)
    frames = answer_frames("The first half of an answer")[:-1]
    frames.append(("error", {"message": "the server is shutting down", "type": "server_error",
                             "code": "server_shutdown"}))
    fake_chat(page, sse(frames))
    ask(page, "Tell me a story")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".content")).to_have_text("The first half of an answer")
    expect(answer.locator(".error")).to_contain_text("The server shut down while answering")
    expect(answer.locator(".error").get_by_role("button", name="Try again: regenerate this answer")
           ).to_be_visible()
    # Shutting down before the first token: a 503 with the same code.
    page.unroute("**/chat")
    page.route("**/chat", lambda route: route.fulfill(
        status=503, content_type="application/json", body=json.dumps({"error": {
            "message": "the server is shutting down", "type": "server_error",
            "code": "server_shutdown"}})))
    ask(page, "Once more")
    expect(last_answer(page).locator(".error")).to_contain_text(
        "The server shut down while answering")
    # A proxy answering for a gateway that is gone (no OpenAI error body).
    page.unroute("**/chat")
    page.route("**/chat", lambda route: route.fulfill(status=502, body="Bad Gateway"))
    ask(page, "Hello?")
    expect(last_answer(page).locator(".error")).to_contain_text("Can't reach the tokenrelay server")
    # A stream that just stops (no done, no error) is a lost connection, not a success.
    page.unroute("**/chat")
    fake_chat(page, sse(answer_frames("Cut off")[:-1]))
    ask(page, "Again")
    expect(last_answer(page).locator(".error")).to_contain_text("connection to the server was lost")


# -- the conversation list ---------------------------------------------------------------------


def test_conversations_are_kept_browsable_and_deletable(page: Page, gateway: LiveGateway
                                                        ) -> None:
    page.set_viewport_size(DESKTOP)
    open_chat(page, gateway)
    ask(page, "About cats")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    ask(page, "About dogs")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    ask(page, "More dogs")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(last_answer(page)).to_have_attribute("data-state", "done")

    # What a hand-edited or older page's storage may hold is skipped, not a broken page.
    page.evaluate("""() => {
        localStorage.setItem("tokenrelay.conversation.bad", "{not json");
        localStorage.setItem("tokenrelay.conversation.odd", JSON.stringify(
            {id: "odd", title: "Odd", updated: 1, turns: [{prompt: 5}, null]}));
    }""")
    page.reload()  # kept across reloads; the open conversation stays open
    items = page.locator('[data-testid="conversation"]')
    expect(items).to_have_count(2)
    expect(items.locator(".conv-title")).to_have_text(["About dogs", "About cats"])
    expect(page.locator(".msg.user .bubble")).to_have_text(["About dogs", "More dogs"])
    expect(last_answer(page).locator(".stats")).to_contain_text("TTFT")
    page.screenshot(path=str(SHOTS / "tokenrelay_page_conversations.png"))

    items.nth(1).locator(".conv-open").click()  # browse
    expect(page.locator(".msg.user .bubble")).to_have_text(["About cats"])
    expect(last_answer(page).locator(".content")).to_have_text("Mock answer to: About cats")
    expect(items.nth(1)).to_have_attribute("aria-current", "true")
    ask(page, "And kittens")  # continues with its history
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    rows = chat_rows(gateway, 4)
    assert json.loads(rows[3]["prompt"])[0] == {"role": "user", "content": "About cats"}

    items.first.get_by_role("button", name="Delete conversation: About cats").click()
    expect(items).to_have_count(1)
    expect(page.locator(".msg")).to_have_count(0)  # the open one was deleted
    page.reload()
    expect(items).to_have_count(1)
    expect(items.locator(".conv-title")).to_have_text(["About dogs"])


def wait_for(check: Any, *, within: float = 5.0, what: str = "condition") -> None:
    if not poll(check, within, 0.02):
        raise AssertionError(f"{what}: not within {within} s")


def answer_text(page: Page) -> str:
    """The text of the last answer, as the page keeps it."""
    return str(page.evaluate("() => tokenrelayChat.conversation().turns.at(-1).answer.text"))


def test_a_reload_mid_answer_resumes_it_where_it_stood(page: Page, gateway: LiveGateway) -> None:
    """The page saves the answer's text with the id of its last event; after a reload it
    reads the rest from the gateway (GET /chat/{id}/stream, Last-Event-ID) into the same
    answer: the text ends up exactly the request log's answer, nothing lost or repeated."""
    open_chat(page, gateway, paced(60, 30))
    ask(page, "A long one")
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    wait_for(lambda: len(answer_text(page)) > 20, what="some text before the reload")
    before = answer_text(page)
    page.reload()
    expect(page.locator(".msg.user .bubble")).to_have_text(["A long one"])
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=10_000)
    text = answer_text(page)
    (row,) = chat_rows(gateway, 1)
    assert row["status"] == "ok" and row["resumes"] == 1, row
    assert text == row["answer"] and text.startswith(before) and len(text) > len(before)
    expect(last_answer(page).locator(".content")).to_contain_text(text.split()[-1])
    expect(last_answer(page).locator(".stats")).to_contain_text("stop")
    page.reload()  # and it stays done
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    assert answer_text(page) == row["answer"]


def test_a_connection_dropped_mid_answer_is_picked_up_again(page: Page,
                                                             gateway: LiveGateway) -> None:
    """A network blip (here a proxy resetting the answer's connection): the page reads the
    rest from the gateway into the same answer, no error shown."""
    plan = Cut(400, "reset", marker=b"event: text")
    with CutProxy(("127.0.0.1", gateway.port), plan=lambda n: plan, max_cuts=1) as proxy:
        page.goto(f"http://127.0.0.1:{proxy.port}/?model={quote(paced(60, 30))}")
        ask(page, "Through a bad network")
        expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=10_000)
        assert proxy.cuts
    (row,) = chat_rows(gateway, 1)
    assert row["status"] == "ok" and row["resumes"] == 1, row
    assert answer_text(page) == row["answer"]
    expect(last_answer(page).locator(".error")).to_have_count(0)


def test_stop_after_a_reload_stops_the_answer_on_the_gateway(page: Page,
                                                             gateway: LiveGateway) -> None:
    open_chat(page, gateway, paced(400, 40))  # 10 s if nothing stops it
    ask(page, "Stop me later")
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    page.reload()
    wait_for(lambda: page.evaluate(
        "() => tokenrelayChat.conversation().turns[0].answer.state") == "streaming",
        what="the resumed answer streaming")
    started = time.monotonic()
    page.click("#stop")
    expect(last_answer(page)).to_have_attribute("data-state", "stopped")
    (row,) = chat_rows(gateway, 1)
    assert row["status"] == "cancelled", row  # the gateway stopped: not the client gone
    assert time.monotonic() - started < 3.0 and row["completion_tokens"] < 300, row
    assert row["resumes"] == 1


def test_stop_stops_the_answer_on_the_gateway_at_once(page: Page, gateway: LiveGateway) -> None:
    """The page asks the gateway to keep answers through a reload; Stop still means stop."""
    open_chat(page, gateway, paced(400, 40))
    ask(page, "Stop me")
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    page.click("#stop")
    expect(last_answer(page)).to_have_attribute("data-state", "stopped")
    (row,) = chat_rows(gateway, 1)
    assert row["status"] == "cancelled" and row["completion_tokens"] < 300, row


def test_stop_before_the_first_token_still_stops_the_gateway(page: Page,
                                                             gateway: LiveGateway) -> None:
    """Stopped before the answer's headers came (so before its id is known): the page is
    done at once, and cancels the answer by its id when the headers come."""
    open_chat(page, gateway, "mock:tokens=200,tps=40,delay=1")
    ask(page, "Never mind")
    expect(last_answer(page)).to_have_attribute("data-state", "waiting")
    page.click("#stop")
    expect(last_answer(page)).to_have_attribute("data-state", "stopped")
    expect(page.locator("#send")).to_be_visible()
    (row,) = chat_rows(gateway, 1)
    assert row["status"] == "cancelled" and row["completion_tokens"] < 100, row


def test_a_reload_after_the_gateway_forgot_the_answer_says_it_was_interrupted(
        page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway)
    page.evaluate("""() => localStorage.setItem("tokenrelay.conversation.c1", JSON.stringify({
        id: "c1", title: "Lost", created: 1, updated: 1, turns: [{prompt: "Lost", answer: {
            model: "mock", text: "Half an", state: "streaming", error: null,
            stream_id: "chat-00000000000000000000000000000000", last_event: 3}}]}))""")
    page.evaluate("() => sessionStorage.setItem('tokenrelay.current', 'c1')")
    page.reload()
    expect(last_answer(page)).to_have_attribute("data-state", "interrupted")
    expect(last_answer(page).locator(".error")).to_contain_text("no longer has the rest")
    expect(last_answer(page).locator(".content")).to_have_text("Half an")


def test_deleting_the_conversation_that_streams_stops_it_for_good(page: Page,
                                                                  gateway: LiveGateway) -> None:
    page.set_viewport_size(DESKTOP)
    open_chat(page, gateway, paced(60, 30))
    ask(page, "Doomed")
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    items = page.locator('[data-testid="conversation"]')
    expect(items).to_have_count(1)
    items.first.get_by_role("button", name="Delete conversation: Doomed").click()
    expect(items).to_have_count(0)
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#send")).to_be_visible()  # the stream was stopped
    time.sleep(0.3)  # its late ending must not bring the conversation back
    page.reload()
    expect(page.locator("#no-conversations")).to_be_visible()
    expect(items).to_have_count(0)


def test_server_dying_mid_answer_says_so_and_keeps_the_text(page: Page, processes: Processes,
                                                            tmp_path: Path) -> None:
    # `tokenrelay serve` as users run it, killed mid-answer: its connections just drop.
    serve = processes.serve({"serve_local": False, "log": {"path": str(tmp_path / "r.db")}})
    model = paced(400, 40)
    page.goto(f"{serve.url}/?model={quote(model)}")
    expect(page.locator("#model")).to_have_value(model)
    ask(page, "A long story")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "streaming")
    time.sleep(0.3)
    processes.stop(serve, signal.SIGKILL)
    expect(answer).to_have_attribute("data-state", "error")
    error = answer.locator(".error")
    expect(error).to_contain_text("connection to the server was lost")
    expect(error).to_contain_text("What arrived is kept above")
    assert answer.locator(".content").inner_text().strip()
    expect(error.get_by_role("button", name="Try again: regenerate this answer")).to_be_visible()


def test_the_key_bar_fits_a_phone_too(page: Page, tmp_path: Path) -> None:
    from tokenrelay.server.config import hash_key

    key = "page-test-key-0123456789"
    config = ServerConfig.model_validate({
        "serve_local": False, "serve_mock": True, "log": {"path": str(tmp_path / "r.db")},
        "keys": [{"id": "k", "sha256": hash_key(key)}]})
    with LiveGateway(config) as gateway:
        page.set_viewport_size(PHONE)
        page.goto(gateway.url + "/")
        keybar = page.locator("#keybar")
        expect(keybar).to_be_visible()
        assert no_sideways_scroll(page) == {"page": 0, "body": 0, "main": 0}
        box = page.get_by_role("button", name="Use key").bounding_box()
        assert box is not None and box["x"] + box["width"] <= PHONE["width"]
        page.screenshot(path=str(SHOTS / "tokenrelay_page_phone_key.png"))
        page.get_by_role("textbox", name="API key").fill(key)
        page.get_by_role("button", name="Use key").click()
        expect(keybar).to_be_hidden()
        expect(page.locator("#model option[value=mock]")).to_have_count(1)


def test_a_real_shutdown_mid_answer_reads_as_one(page: Page, processes: Processes,
                                                 tmp_path: Path) -> None:
    # SIGTERM with an answer streaming: after drain_timeout_s the gateway sends one
    # "server_shutdown" error frame; the page says so in words.
    serve = processes.serve({"serve_local": False, "drain_timeout_s": 0.5,
                             "log": {"path": str(tmp_path / "r.db")}})
    model = paced(400, 40)
    page.goto(f"{serve.url}/?model={quote(model)}")
    expect(page.locator("#model")).to_have_value(model)
    ask(page, "A long story")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "streaming")
    processes.stop(serve)  # SIGTERM
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("The server shut down while answering")
    expect(answer.locator(".error")).to_contain_text("What arrived is kept above")
    page.screenshot(path=str(SHOTS / "tokenrelay_page_server_shutdown.png"))
