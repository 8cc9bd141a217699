"""``tokenrelay models``, ``compare`` and a piped ``chat``, through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

from _harness import closed_port
from _pty import cli_env, tokenrelay
from _upstream import Upstream

# -- models ----------------------------------------------------------------------------


def test_models_lists_the_embedded_model_and_mock() -> None:
    done = tokenrelay("models", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    by_name = {m["name"]: m for m in data["models"]}
    assert data["default"] == "smollm2"
    assert by_name["smollm2"]["default"] is True
    assert by_name["smollm2"]["provider"] == "local"
    assert by_name["mock"]["available"] is True
    assert data["endpoint"] is None

    table = tokenrelay("models")
    assert table.returncode == 0
    assert "smollm2" in table.stdout and "mock" in table.stdout and "default" in table.stdout


def test_models_follows_tokenrelay_model() -> None:
    data = json.loads(tokenrelay("models", "--json",
                                 env=cli_env(TOKENRELAY_MODEL="mock")).stdout)
    assert data["default"] == "mock"
    assert [m["name"] for m in data["models"] if m["default"]] == ["mock"]


def test_models_lists_the_endpoint_models() -> None:
    with Upstream() as server:
        done = tokenrelay("models", "--json", "--base-url", server.url)
    data = json.loads(done.stdout)
    assert data["endpoint"]["reachable"] is True
    assert "test-model" in [m["name"] for m in data["models"]]
    assert {"smollm2", "mock"} <= {m["name"] for m in data["models"]}


def test_an_unreachable_endpoint_is_one_line_and_the_rest_still_lists() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    done = tokenrelay("models", "--base-url", url)
    assert done.returncode == 0
    assert "smollm2" in done.stdout and "mock" in done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert "unreachable" in line and url in line

    data = json.loads(tokenrelay("models", "--json", "--base-url", url).stdout)
    assert data["endpoint"]["reachable"] is False
    assert data["endpoint"]["error"]


# -- compare ---------------------------------------------------------------------------


def test_compare_json_has_both_modes() -> None:
    done = tokenrelay("compare", "-m", "mock:tokens=12,tps=40", "--json", "hi")
    assert done.returncode == 0, done.stderr
    streamed, whole = json.loads(done.stdout)["runs"]
    assert (streamed["mode"], whole["mode"]) == ("streamed", "non-streamed")
    assert streamed["text"] == whole["text"] and streamed["text"]
    # Streamed text shows after the first token; non-streamed only when it is all done.
    assert streamed["first_visible_seconds"] < streamed["total_seconds"] - 0.1
    assert whole["first_visible_seconds"] == whole["total_seconds"]
    assert streamed["usage"]["completion_tokens"] == 12


def test_compare_table_side_by_side() -> None:
    done = tokenrelay("compare", "-m", "mock", "hello")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for needle in ("streamed", "non-streamed", "first visible text", "total time", "tokens/s",
                   "Mock answer to: hello"):
        assert needle in out
    # Both answers on the same lines: two panels side by side.
    assert any(line.count("Mock answer to: hello") == 2 for line in out.splitlines())


def test_compare_errors_like_run() -> None:
    done = tokenrelay("compare", "-m", "mock", "-t", "9", "hi")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


# -- chat without a terminal -------------------------------------------------------------


def test_piped_chat_keeps_history_and_saves_it(tmp_path: Path) -> None:
    saved = tmp_path / "conversation.json"
    script = f"first question\nsecond question\n/save {saved}\n"
    done = tokenrelay("chat", "-m", "mock", "-s", "be brief", input=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("Mock answer to: first question\n"
                           "Mock answer to: second question\n")
    data = json.loads(saved.read_text())
    assert data["model"] == "mock"
    assert [(m["role"], m["content"]) for m in data["messages"]] == [
        ("system", "be brief"),
        ("user", "first question"),
        ("assistant", "Mock answer to: first question"),
        ("user", "second question"),
        ("assistant", "Mock answer to: second question"),
    ]


def test_chat_refuses_bad_options_before_the_first_question() -> None:
    done = tokenrelay("chat", "-m", "nope", input="hi\n")
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown model")


def test_chat_reports_a_failed_answer_and_goes_on(tmp_path: Path) -> None:
    saved = tmp_path / "c.json"
    done = tokenrelay("chat", "-m", "mock:fault=error,after=2", input=f"one two\n/save {saved}\n")
    assert done.returncode == 0
    assert "error: mock error after 2 tokens" in done.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert messages[-1] == {"role": "assistant", "content": "Mock answer"}


def test_help_is_a_command_not_a_prompt() -> None:
    # `tokenrelay help` used to be sent to the model as the prompt "help" (issue 11).
    done = tokenrelay("help", env=cli_env(TOKENRELAY_MODEL="mock"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: tokenrelay [OPTIONS] COMMAND")
    assert "Mock answer" not in done.stdout
    sub = tokenrelay("help", "logs", "show")
    assert sub.returncode == 0 and sub.stdout.startswith("Usage: tokenrelay logs show")
    bad = tokenrelay("help", "nope")
    assert bad.returncode == 2 and "no command 'nope'" in bad.stderr


def test_top_level_help_lists_every_command_uncut_at_80_columns() -> None:
    done = tokenrelay("--help", env=cli_env(COLUMNS="80"))
    assert done.returncode == 0
    listing = done.stdout.split("Commands:", 1)[1]
    assert "..." not in listing
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    from tokenrelay.cli._app import _COMMANDS

    names = [line.split()[0] for line in listing.splitlines()
             if line.startswith("  ") and not line.startswith("   ")]
    assert names == sorted(_COMMANDS)
    flat = " ".join(listing.split())
    assert "List the latest exchanges of the CLI, library and gateway, newest first." in flat
