"""``tokenrelay logs``: every exchange of the CLI is in the SQLite log, unless --no-log."""

from __future__ import annotations

import json
import os
from pathlib import Path

from _pty import tokenrelay


def _entries(*args: str) -> list[dict[str, object]]:
    done = tokenrelay("logs", "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_log_lives_under_tokenrelay_home() -> None:
    done = tokenrelay("logs", "path")
    assert Path(done.stdout.strip()) == Path(os.environ["TOKENRELAY_HOME"]) / "logs.db"


def test_exchanges_are_recorded_newest_first() -> None:
    assert tokenrelay("-m", "mock", "first").returncode == 0
    assert tokenrelay("-m", "mock:fault=error,after=2", "-s", "be brief", "second").returncode == 1
    assert tokenrelay("-m", "mock", "--no-log", "not logged").returncode == 0

    second, first = _entries()
    assert first["prompt"] == "first"
    assert first["answer"] == "Mock answer to: first"
    assert first["finish_reason"] == "stop"
    assert first["source"] == "cli"
    assert (first["prompt_tokens"], first["completion_tokens"]) == (1, 4)
    assert first["error"] is None
    assert first["time_to_first_token"] is not None

    assert second["finish_reason"] == "error"
    assert second["answer"] == "Mock answer"  # partial
    assert second["error"] == "mock_error: mock error after 2 tokens"
    assert second["messages"] == [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "second"}]

    assert [e["prompt"] for e in _entries("-n", "1")] == ["second"]


def test_list_and_show_for_people() -> None:
    tokenrelay("-m", "mock", "a question to look up")
    (entry,) = _entries()
    listing = tokenrelay("logs")
    assert listing.returncode == 0
    assert "a question to look up" in listing.stdout
    assert "mock" in listing.stdout and "stop" in listing.stdout

    shown = tokenrelay("logs", "show", str(entry["id"]))
    assert shown.returncode == 0
    assert "Mock answer to: a question to look up" in shown.stdout
    assert "first token" in shown.stdout

    for args in (("logs", "show", str(entry["id"]), "--json"),
                 ("logs", "--json", "show", str(entry["id"]))):
        as_json = json.loads(tokenrelay(*args).stdout)
        assert as_json == entry


def test_unknown_id_and_empty_log() -> None:
    empty = tokenrelay("logs")
    assert empty.returncode == 0 and empty.stdout == ""
    assert "no exchanges" in empty.stderr
    missing = tokenrelay("logs", "show", "42")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: no exchange 42")
