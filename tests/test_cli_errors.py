"""The CLI's one error boundary and its footer, in-process (the end-to-end checks are in
``test_cli_run.py``)."""

from __future__ import annotations

import click
import pytest

from tokenrelay import Metrics, Result, Usage
from tokenrelay.cli._errors import exit_code, handle_errors, message
from tokenrelay.cli._render import footer_text
from tokenrelay.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionError,
    RateLimitError,
    ServerError,
    StreamError,
    TimeoutError,
    UsageError,
)


@pytest.mark.parametrize(("exc", "code"), [
    (UsageError("bad"), 2),
    (ConfigurationError("no model file"), 1),
    (ConnectionError("refused"), 1),
    (TimeoutError("slow", kind="first_token"), 1),
    (AuthenticationError("401", status_code=401), 1),
    (RateLimitError("429"), 1),
    (ServerError("500", status_code=500), 1),
    (StreamError("broke"), 1),
    (KeyboardInterrupt(), 130),
])
def test_exit_codes(exc: BaseException, code: int) -> None:
    assert exit_code(exc) == code


def test_messages_are_one_line() -> None:
    text = message(ServerError("upstream said:\n<html>\n  <b>oops</b>\n</html>", status_code=502))
    assert text == "error: upstream said: <html> <b>oops</b> </html>"
    assert len(message(StreamError("x" * 5000))) < 500


def test_messages_name_the_flag_to_change() -> None:
    assert "--timeout-first-token" in message(TimeoutError("no token", kind="first_token"))
    assert "--timeout-idle" in message(TimeoutError("stalled", kind="idle"))
    assert "--api-key" in message(AuthenticationError("denied", status_code=401))
    assert "--base-url" in message(ConnectionError("refused"))
    # ...unless the provider's message already says what to do.
    said = message(ConnectionError("could not connect; check the base URL"))
    assert "--base-url" not in said


def test_handle_errors_prints_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(click.exceptions.Exit) as info, handle_errors():
        raise UsageError("invalid temperature: must be at most 2")
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "error: invalid temperature: must be at most 2\n"

    with pytest.raises(click.exceptions.Exit) as info, handle_errors():
        raise KeyboardInterrupt
    assert info.value.exit_code == 130

    with pytest.raises(ValueError), handle_errors():  # a bug stays a traceback
        raise ValueError("bug")


def _result(usage: Usage, reason: str = "stop", tps: float | None = 41.23) -> Result:
    return Result(text="hi", finish_reason=reason, usage=usage,  # type: ignore[arg-type]
                  metrics=Metrics(time_to_first_token=0.0213, tokens_per_second=tps,
                                  total_seconds=1.5), model="mock", provider="mock")


def test_footer() -> None:
    assert footer_text(_result(Usage(5, 12))) == (
        "mock · 5 prompt + 12 completion tokens · first token 21ms · 41.2 tok/s · 1.50s · stop"
    )
    estimated = footer_text(_result(Usage(5, 3, estimated=True), "cancelled", None))
    assert estimated == ("mock · ~5 prompt + ~3 completion tokens · first token 21ms · 1.50s"
                         " · cancelled")


def test_footer_says_why_the_model_and_a_cap() -> None:
    # Issue 11: which rule chose the model, and a length finish at the default cap.
    text = footer_text(_result(Usage(5, 512), "length"), model_note="endpoint's first model",
                       cap=512)
    assert text.startswith("mock (endpoint's first model) · 5 prompt + 512 completion")
    assert text.endswith(" · length: stopped at the 512-token cap (--max-tokens to raise)")

