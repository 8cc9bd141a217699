"""``tokenrelay logs``: every exchange of the CLI is in the SQLite log, unless --no-log."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from _pty import cli_env, tokenrelay
from _pty import tokenrelay as run_cli


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


# -- one log: CLI, library and gateway (issue 11) ----------------------------------------

def _gateway_rows(*rows: dict[str, object]) -> Path:
    from tokenrelay.server.reqlog import RequestLog

    path = Path(os.environ["TOKENRELAY_HOME"]) / "requests.db"
    log = RequestLog(path)
    for row in rows:
        log.record(**{"key_id": "-", "endpoint": "/v1/chat/completions", "status": "ok",
                      "http_status": 200, "prompt_tokens": 9, "completion_tokens": 3,
                      "usage_estimated": 0, "time_to_first_token": 0.1, "duration": 0.5,
                      "answer": "from the gateway", "error": None, **row})
    log.close()
    return path


def test_gateway_requests_are_listed_with_the_cli_and_library_ones() -> None:
    import tokenrelay as lib

    assert run_cli("-m", "mock", "asked on the command line").returncode == 0
    _gateway_rows({"model": "smollm2", "prompt": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "asked through the gateway"}]})

    lib.complete("asked from python", model="mock", log=True)

    entries = _entries()
    assert [(e["source"], e["prompt"]) for e in entries] == [
        ("library", "asked from python"), ("gateway", "asked through the gateway"),
        ("cli", "asked on the command line")]
    gateway = entries[1]
    assert gateway["ref"] == "g1" and gateway["answer"] == "from the gateway"
    assert gateway["messages"][0] == {"role": "system", "content": "be brief"}
    assert [e["source"] for e in _entries("-s", "gateway")] == ["gateway"]

    shown = run_cli("logs", "show", "g1")
    assert shown.returncode == 0 and "asked through the gateway" in shown.stdout
    listing = run_cli("logs").stdout.splitlines()
    assert [line.split()[0] for line in listing[1:]] == ["2", "g1", "1"]
    assert [line.split()[3] for line in listing[1:]] == ["lib", "gw", "cli"]


def test_refused_gateway_requests_only_on_demand() -> None:
    _gateway_rows({"model": "m", "prompt": "hi"},
                  {"model": "-", "prompt": None, "answer": None, "status": "refused",
                   "http_status": 401})
    assert [e["finish_reason"] for e in _entries()] == ["ok"]
    assert [e["finish_reason"] for e in _entries("--refused")] == ["refused", "ok"]


def test_the_gateway_log_is_only_read() -> None:
    path = _gateway_rows({"model": "m", "prompt": "hi"})
    before = path.stat().st_mtime_ns
    assert run_cli("logs").returncode == 0
    assert path.stat().st_mtime_ns == before
    # No requests.db at all: nothing is created.
    path.unlink()
    assert run_cli("logs").returncode == 0 and not path.exists()


def test_the_table_stays_one_line_per_exchange_at_80_columns() -> None:
    long_prompt = "Explain " + " ".join(f"word{i}" for i in range(60))
    assert run_cli("-m", "mock", long_prompt).returncode == 0
    assert run_cli("-m", "mock", "short one").returncode == 0
    _gateway_rows({"model": "a-remarkably-long-upstream-model-name-v2-instruct",
                   "prompt": long_prompt})
    for columns in ("80", "60"):
        done = run_cli("logs", env=cli_env(COLUMNS=columns))
        lines = done.stdout.rstrip("\n").split("\n")
        assert len(lines) == 4, done.stdout  # header + 3 exchanges: nothing wrapped
        assert all(len(line) <= int(columns) for line in lines), done.stdout
        for line in lines[1:]:
            assert re.search(r"\d\d-\d\d \d\d:\d\d", line), line  # the date is whole
        # The prompt starts, then is cut with …
        assert ("Explain word0 word1" if columns == "80" else "Explain w") in done.stdout
        assert "…" in done.stdout


def test_search_with_q() -> None:
    assert run_cli("-m", "mock", "the colour of the sky").returncode == 0
    assert run_cli("-m", "mock", "100% sure about_this").returncode == 0
    _gateway_rows({"model": "m", "prompt": [{"role": "user", "content": "sky at night"}]})
    assert [e["prompt"] for e in _entries("-q", "SKY")] == ["sky at night",
                                                            "the colour of the sky"]
    assert [e["prompt"] for e in _entries("-q", "0% s")] == ["100% sure about_this"]
    assert _entries("-q", "%") == _entries("-q", "100%")  # % is text, not a wildcard
    assert _entries("-q", "_") == _entries("-q", "about_")
    none = run_cli("logs", "-q", "nothing like this")
    assert none.returncode == 0 and "no exchanges match" in none.stderr


def test_continue_the_latest_conversation() -> None:
    assert run_cli("-m", "mock", "-s", "be brief", "first question").returncode == 0
    done = run_cli("-c", "and then?")  # no -m: the logged conversation's model
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Mock answer to: and then?\n"
    latest = _entries("-n", "1")[0]
    assert latest["model"] == "mock"
    assert latest["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Mock answer to: first question"},
        {"role": "user", "content": "and then?"}]
    # --continue again goes on from there; --cid picks an older one.
    assert run_cli("--continue", "third").returncode == 0
    assert len(_entries("-n", "1")[0]["messages"]) == 6
    assert run_cli("--cid", "1", "-m", "mock", "branch").returncode == 0
    assert len(_entries("-n", "1")[0]["messages"]) == 4


def test_continue_with_an_empty_log_says_so() -> None:
    done = run_cli("-c", "hello")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: nothing to continue: the log has no exchange yet"


def test_chat_continue_starts_from_the_logged_history(tmp_path: Path) -> None:
    assert run_cli("-m", "mock", "-s", "be brief", "first question").returncode == 0
    saved = tmp_path / "chat.json"
    done = run_cli("chat", "-c", input=f"second\n/save {saved}\n")
    assert done.returncode == 0, done.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "be brief"), ("user", "first question"),
        ("assistant", "Mock answer to: first question"), ("user", "second"),
        ("assistant", "Mock answer to: second")]
