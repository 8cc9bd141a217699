"""The chat page (``GET /``) in a real headless Chromium against a real loopback gateway.

Needs the system Chromium and Playwright for Python, and is skipped without them::

    apt-get install -y chromium        # Debian / Ubuntu: the browser
    pip install playwright             # the driver; never `playwright install`

Screenshots land in /tmp/tokenrelay_chat_*.png for a human to look at.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from _browser import chromium_path, launch_chromium
from _harness import LiveGateway, poll

pytest.importorskip("playwright.sync_api",
                    reason="needs Playwright for Python: pip install playwright")
pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="needs a system Chromium: apt-get install -y chromium")

from playwright.sync_api import Page, expect

from tokenrelay.errors import ConfigurationError
from tokenrelay.server.config import ServerConfig

SLOW = "mock:tokens=200,tps=25,delay=0.6"
SHOTS = Path("/tmp")
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, within: float = 2.0,
             what: str = "condition") -> T:
    value = poll(check, within, 0.02)
    if not value:
        raise AssertionError(f"{what} not reached within {within} s (last: {value!r})")
    return value  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with launch_chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
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
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_chat(page: Page, server: LiveGateway, model: str) -> None:
    page.goto(f"{server.url}/?model={quote(model)}")
    expect(page.locator("#model")).to_have_value(model)


def ask(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def rows(server: LiveGateway) -> list[dict[str, Any]]:
    reqlog = server.app.state.gateway.reqlog
    return list(reversed(reqlog.rows()))  # oldest first


def logged(server: LiveGateway, count: int) -> list[dict[str, Any]]:
    """The request-log rows once there are ``count`` (written off the loop, so poll)."""
    return wait_for(lambda: rows(server) if len(rows(server)) >= count else None,
                    what=f"{count} request-log rows")


def cancellations(server: LiveGateway) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as res:
        text = res.read().decode()
    return sum(float(m) for m in re.findall(
        r"^tokenrelay_cancellations_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def test_stream_renders_live_and_stop_aborts_the_server(
        page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway, SLOW)
    options = page.locator("#model option").evaluate_all("os => os.map(o => o.value)")
    assert "mock" in options and SLOW in options  # /v1/models entries plus ?model=
    ask(page, "How does streaming work?")

    answer = page.locator(".msg.assistant").last
    content = answer.locator(".content")
    # Before the first token (0.6 s away): the typing indicator, no text, Stop offered.
    page.wait_for_selector(".msg.assistant .typing", state="visible")
    assert page.evaluate("""() => [!!document.querySelector('.msg.assistant .typing'),
                                   document.querySelector('.msg.assistant .content').textContent]
                         """) == [True, ""]
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    expect(page.locator(".msg.user .bubble")).to_have_text("How does streaming work?")

    # The answer grows in place while it streams.
    samples: list[str] = []
    deadline = time.monotonic() + 6
    while len(samples) < 3 and time.monotonic() < deadline:
        text = content.inner_text().strip()
        if text and (not samples or text != samples[-1]):
            samples.append(text)
            if len(samples) == 2:
                page.screenshot(path=str(SHOTS / "tokenrelay_chat_streaming.png"))
        time.sleep(0.12)
    assert len(samples) >= 3, f"the answer did not grow while streaming: {samples}"
    for before, after in itertools.pairwise(samples):
        assert after.startswith(before) and len(after) > len(before), samples
    expect(answer.locator(".typing")).to_have_count(0)
    live = answer.locator(".stats").inner_text()
    assert re.search(r"\d+ tokens? · TTFT", live), live
    ttft = re.search(r"TTFT (\d+\.\d+) s", live)
    assert ttft and 0.5 <= float(ttft.group(1)) < 5, live  # measured in the page: includes delay=0.6

    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.locator(".stats")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    partial = content.inner_text().strip()
    assert partial.startswith(samples[-1]), (partial, samples)
    counted = re.search(r"(\d+) tokens?", answer.locator(".stats").inner_text())
    assert counted and 0 < int(counted.group(1)) < 200

    # The gateway saw the disconnect and stopped generating, within 2 s.
    gw = gateway.app.state.gateway
    row = wait_for(lambda: next((r for r in rows(gateway) if r["status"] == "cancelled"), None),
                   what="a cancelled request-log row")
    assert row["endpoint"] == "chat" and row["completion_tokens"] < 200
    assert row["answer"] and partial.startswith(row["answer"].strip()[:20])
    wait_for(lambda: gw.limiter.total_active() == 0, what="no active streams")
    assert cancellations(gateway) > 0
    time.sleep(0.3)
    assert content.inner_text().strip() == partial  # nothing arrives after Stop
    page.screenshot(path=str(SHOTS / "tokenrelay_chat_stopped.png"))

    # The stopped partial answer is part of the history sent with the next prompt.
    page.select_option("#model", "mock")
    ask(page, "Go on")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done")
    logged_rows = logged(gateway, 2)
    sent = json.loads(logged_rows[1]["prompt"])
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"].strip() == partial and sent[2]["content"] == "Go on"


def test_full_answer_shows_stats_and_sends_history(page: Page, gateway: LiveGateway) -> None:
    open_chat(page, gateway, "mock")
    ask(page, "First question")
    first = page.locator(".msg.assistant").nth(0)
    expect(first).to_have_attribute("data-state", "done")
    expect(first.locator(".content")).to_have_text("Mock answer to: First question")
    stats = first.locator(".stats")
    expect(stats).to_contain_text("5 tokens")  # "Mock", " answer", " to:", " First", ...
    expect(stats).to_contain_text("TTFT")
    expect(stats).to_contain_text("tok/s")
    expect(stats).to_contain_text("stop")

    # Shift+Enter is a newline, Enter sends; history goes with the next prompt.
    page.fill("#prompt", "Second")
    page.press("#prompt", "Shift+Enter")
    expect(page.locator("#prompt")).to_have_value("Second\n")
    expect(page.locator(".msg.user")).to_have_count(1)
    page.fill("#prompt", "Second question")
    page.press("#prompt", "Enter")
    expect(page.locator(".msg.user")).to_have_count(2)
    second = page.locator(".msg.assistant").nth(1)
    expect(second).to_have_attribute("data-state", "done")
    expect(second.locator(".content")).to_have_text("Mock answer to: Second question")
    page.screenshot(path=str(SHOTS / "tokenrelay_chat_done.png"))

    logged_rows = logged(gateway, 2)
    assert json.loads(logged_rows[1]["prompt"]) == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "Mock answer to: First question"},
        {"role": "user", "content": "Second question"},
    ]

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    ask(page, "Fresh start")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done")
    logged_rows = logged(gateway, 3)
    assert json.loads(logged_rows[2]["prompt"]) == [{"role": "user", "content": "Fresh start"}]


def test_streamed_markdown_is_rendered_safely(page: Page, gateway: LiveGateway) -> None:
    model = "mock:text=Use **bold** and `a<b>` then [docs](https://example.com/x) <img src=x>"
    open_chat(page, gateway, model)
    ask(page, "markdown please")
    content = page.locator(".msg.assistant .content")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "done")
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("code")).to_have_text("a<b>")
    link = content.locator("a")
    expect(link).to_have_attribute("href", "https://example.com/x")
    expect(link).to_have_attribute("rel", re.compile(r"\bnoopener\b"))
    expect(content.locator("img")).to_have_count(0)
    expect(content).to_contain_text("<img src=x>")


def test_errors_show_inline(page: Page, gateway: LiveGateway) -> None:
    # Before the first token: an HTTP error status with an OpenAI error body.
    open_chat(page, gateway, "mock:fault=401")
    ask(page, "hello")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("mock failure 401 before the first token")
    expect(answer.locator(".error")).to_contain_text("HTTP 502")
    expect(answer.locator(".typing")).to_have_count(0)
    page.screenshot(path=str(SHOTS / "tokenrelay_chat_error.png"))

    # After tokens: an SSE error event; the partial answer stays.
    open_chat(page, gateway, "mock:fault=error,after=3")
    ask(page, "one two three four")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".content")).to_have_text("Mock answer to:")
    expect(answer.locator(".error")).to_contain_text("mock error after 3 tokens")


def test_page_sse_parser_handles_split_frames(page: Page, gateway: LiveGateway) -> None:
    page.goto(gateway.url + "/")
    body = (": stream open\r\n\r\nid: 1\r\nevent: text\r\ndata: {\"text\":\"a\"}\r\n\r\n"
            ": ping\n\nevent: text\ndata:{\"text\":\"b\"}\n\nevent: done\ndata: {}\n\n"
            "event: text\ndata: {\"text\":\"incomplete\"}")
    for size in (1, 2, 3, 7, len(body)):
        events = page.evaluate(
            """([body, size]) => {
                const events = [];
                const feed = window.tokenrelayChat.sseParser(
                    (name, data) => events.push([name, data]));
                for (let i = 0; i < body.length; i += size) feed(body.slice(i, i + size));
                return events;
            }""", [body, size])
        assert events == [["text", '{"text":"a"}'], ["text", '{"text":"b"}'], ["done", "{}"]]
