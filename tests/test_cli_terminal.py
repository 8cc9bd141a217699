"""The CLI in a real terminal (a pty): indicator, footer, Ctrl-C, and the chat REPL.

Keys are sent as a terminal sends them: ``\\x03`` becomes SIGINT through the line
discipline, ``\\x04`` is end-of-file at an empty prompt.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pty import PtyProcess, cli_env, tokenrelay, tokenrelay_argv
from _upstream import Upstream

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="not applicable here: needs a POSIX pty")

SLOW = "mock:tokens=200,tps=20"  # ten seconds of text unless stopped
FOOTER = r"mock · ~?\d+ prompt \+ ~?\d+ completion tokens · first token \d+(ms|\.\d+s) · "


@pytest.fixture
def terminal() -> Iterator[list[PtyProcess]]:
    opened: list[PtyProcess] = []
    yield opened
    for process in opened:
        process.close()


def _start(opened: list[PtyProcess], *args: str, stdout_pipe: bool = False) -> PtyProcess:
    process = PtyProcess(tokenrelay_argv(*args), env=cli_env(), stdout_pipe=stdout_pipe)
    opened.append(process)
    return process


def _last_log_entry() -> dict[str, object]:
    done = tokenrelay("logs", "--json", "-n", "1")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# -- run ---------------------------------------------------------------------------------


def test_indicator_until_the_first_token_then_text_then_footer(terminal: list[PtyProcess]) -> None:
    tty = _start(terminal, "-m", "mock:delay=0.6", "hello")
    tty.expect("thinking…")
    tty.expect("Mock answer to: hello\n")
    tty.expect(FOOTER + r".* · stop")
    assert tty.wait() == 0


def test_live_count_on_stderr_keeps_stdout_clean(terminal: list[PtyProcess]) -> None:
    model = "mock:tokens=30,tps=30"
    tty = _start(terminal, "-m", model, "hi", stdout_pipe=True)
    tty.expect(r"\d+ tokens · [\d.]+ tok/s")  # the live count, while it streams
    tty.expect(FOOTER + r".* · stop")
    assert tty.wait() == 0
    assert tty.stdout == tokenrelay("-m", model, "hi").stdout  # the answer, and only it
    assert "Streaming" not in tty.text  # the answer did not go to the terminal


def test_ctrl_c_stops_run_keeps_the_partial_answer_and_exits_130(
    terminal: list[PtyProcess],
) -> None:
    tty = _start(terminal, "-m", SLOW, "hello")
    tty.expect("Streaming shows each")
    tty.ctrl_c()
    tty.expect(FOOTER + r".* · cancelled")
    assert tty.wait() == 130
    assert "Traceback" not in tty.text and "Aborted" not in tty.text

    entry = _last_log_entry()
    assert entry["finish_reason"] == "cancelled"
    partial = str(entry["answer"])
    assert partial.startswith("Streaming shows each")
    assert partial in tty.text
    assert len(partial.split()) < 150  # stopped early, not run to the end


def test_ctrl_c_in_json_mode_still_ends_with_done(terminal: list[PtyProcess]) -> None:
    tty = _start(terminal, "-m", SLOW, "--json", "hi", stdout_pipe=True)
    tty.expect(r"[2-9] tokens")  # the live count on the terminal; JSON goes to the pipe
    tty.ctrl_c()
    tty.expect(FOOTER + r".* · cancelled")
    assert tty.wait() == 130
    lines = [json.loads(line) for line in tty.stdout.splitlines()]
    assert lines[0]["type"] == "text_delta"
    assert lines[-1]["type"] == "done" and lines[-1]["finish_reason"] == "cancelled"


def test_ctrl_c_aborts_the_upstream_request(terminal: list[PtyProcess]) -> None:
    with Upstream() as server:
        tty = _start(terminal, "--base-url", server.url, "-m", "slow", "hi")
        tty.expect("t3 ")
        tty.ctrl_c()
        assert tty.wait() == 130
        # The server saw the client go: generation upstream stopped with the terminal.
        assert server.wait_disconnect(timeout=5) is not None
    assert "t199" not in tty.text


def test_markdown_renders_live_on_stdout(terminal: list[PtyProcess]) -> None:
    answer = "# Title\n\nSome **bold** text:\n\n- one\n- two\n"
    tty = _start(terminal, "--markdown", "-m", f"mock:text={answer},tps=50", "hi")
    tty.expect(FOOTER + r".* · stop")
    assert tty.wait() == 0
    assert "Some bold text" in tty.text  # rendered: no ** left
    assert "**" not in tty.text and "# Title" not in tty.text
    assert "• one" in tty.text


# -- chat --------------------------------------------------------------------------------


def _saved(tty: PtyProcess, path: Path) -> list[tuple[str, str]]:
    tty.sendline(f"/save {path}")
    tty.expect("saved")
    tty.expect("> ")
    return [(m["role"], m["content"]) for m in json.loads(path.read_text())["messages"]]


def test_chat_session(terminal: list[PtyProcess], tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    tty = _start(terminal, "chat", "-m", "mock:tps=20")
    tty.expect("Ctrl-D to leave")
    tty.expect("> ")

    # Two questions: the history keeps both turns.
    tty.sendline("first question")
    tty.expect("Mock answer to: first question\n")
    tty.expect(FOOTER)
    tty.expect("> ")
    tty.sendline("second question")
    tty.expect("Mock answer to: second question\n")
    tty.expect("> ")
    assert _saved(tty, saved) == [
        ("user", "first question"), ("assistant", "Mock answer to: first question"),
        ("user", "second question"), ("assistant", "Mock answer to: second question"),
    ]

    # Ctrl-C at the prompt drops the line and prompts again. Give readline a moment to
    # reach its select(): a SIGINT between the prompt being drawn and that select() (a
    # window no typist hits) is only noticed on the next key, and the tty discards the
    # pending input on ^C, so a driver that types instantly can wait forever.
    time.sleep(0.5)
    tty.send("half a thought")
    tty.ctrl_c()
    tty.expect("> ")
    assert len(_saved(tty, saved)) == 4

    # /reset clears the history; /system sets the system prompt.
    tty.sendline("/reset")
    tty.expect("history cleared")
    tty.expect("> ")
    tty.sendline("/system You answer briefly.")
    tty.expect("system prompt set")
    tty.expect("> ")
    assert _saved(tty, saved) == [("system", "You answer briefly.")]

    tty.sendline("/help")
    tty.expect("/save FILE")
    tty.expect("> ")
    tty.ctrl_d()
    assert tty.wait() == 0


def test_chat_ctrl_c_stops_the_answer_and_keeps_it_in_history(
    terminal: list[PtyProcess], tmp_path: Path,
) -> None:
    saved = tmp_path / "chat.json"
    tty = _start(terminal, "chat", "-m", SLOW)
    tty.expect("> ")
    tty.sendline("tell me a long story")
    tty.expect("Streaming shows each")
    tty.ctrl_c()
    tty.expect(FOOTER + r".* · cancelled")
    tty.expect("> ")  # back at the prompt, not out of the program

    history = _saved(tty, saved)
    assert history[0] == ("user", "tell me a long story")
    role, partial = history[1]
    assert role == "assistant"
    assert partial.startswith("Streaming shows each") and len(partial.split()) < 150

    # /exit leaves cleanly; the stopped answer is in the log as cancelled.
    tty.sendline("/exit")
    assert tty.wait() == 0
    assert _last_log_entry()["finish_reason"] == "cancelled"


def test_compare_shows_the_streamed_text_while_it_streams(terminal: list[PtyProcess]) -> None:
    # It showed only a token count until both runs were over (issue 11).
    tty = _start(terminal, "compare", "-m", "mock:tokens=40,tps=10", "hi")
    tty.expect("Streaming shows each token", timeout=3)  # ~4 s of streaming in all
    assert "streamed vs non-streamed" not in tty.text
    tty.expect("streamed vs non-streamed", timeout=20)
    assert tty.wait(timeout=20) == 0


def test_chat_continue_in_a_terminal(terminal: list[PtyProcess], tmp_path: Path) -> None:
    assert tokenrelay("-m", "mock", "what was the question").returncode == 0
    saved = tmp_path / "chat.json"
    tty = _start(terminal, "chat", "-c")
    tty.expect("continuing a conversation of 1 turn")
    tty.expect("Chatting with mock")  # the logged conversation's model
    tty.expect("> ")
    tty.sendline("and the answer?")
    tty.expect("Mock answer to: and the answer\\?\n")
    tty.expect("> ")
    assert _saved(tty, saved) == [
        ("user", "what was the question"), ("assistant", "Mock answer to: what was the question"),
        ("user", "and the answer?"), ("assistant", "Mock answer to: and the answer?")]
    tty.ctrl_d()
    assert tty.wait() == 0
