"""The one place where failures become a one-line message and an exit code.

Every command runs inside :func:`handle_errors` (see ``_app.TokenrelayGroup.invoke``), so
no command prints errors or picks exit codes itself::

    UsageError (bad option, unknown model)              → exit 2
    ConfigurationError, ProviderError (and subclasses)  → exit 1
    KeyboardInterrupt (Ctrl-C)                          → exit 130
    BrokenPipeError (``tokenrelay ... | head``)         → exit 1, silently

Click's own parse errors (unknown option, missing argument) keep click's format and
exit 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from ..errors import (
    AuthenticationError,
    ConnectionError,
    RateLimitError,
    TimeoutError,
    TokenrelayError,
    UsageError,
)

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "exit_code",
    "handle_errors",
    "message",
    "report",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_MAX_MESSAGE = 400


def exit_code(exc: BaseException) -> int:
    """The exit code for a failure."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    return EXIT_FAILURE


def _hint(exc: TokenrelayError) -> tuple[str, tuple[str, ...]]:
    """What the CLI user can do next, in the CLI's flags, and the words that show the
    provider's own message already says it."""
    if isinstance(exc, TimeoutError):
        flag = {"first_token": "--timeout-first-token", "idle": "--timeout-idle",
                "total": "--timeout-total"}.get(exc.kind)
        return (f"raise {flag} if the model is just slow", ()) if flag else ("", ())
    if isinstance(exc, ConnectionError):
        return "check --base-url and that the server is running", ("base url", "base_url",
                                                                   "base-url")
    if isinstance(exc, AuthenticationError):
        return "check --api-key / OPENAI_API_KEY", ("api key", "api_key", "api-key")
    if isinstance(exc, RateLimitError) and exc.retry_after is None:
        return "wait a moment, or allow more --retries", ("retries",)
    return "", ()


#: The library's words for its arguments → the CLI's flags. Library messages speak
#: Python (``pass base_url=``); the CLI user reads the flag instead.
_FLAGS = (("base_url=", "--base-url"), ("api_key=", "--api-key"),
          ("max_tokens=", "--max-tokens"))


def message(exc: BaseException) -> str:
    """A one-line ``error: ...`` message for a failure."""
    text = exc.message if isinstance(exc, TokenrelayError) else str(exc) or type(exc).__name__
    if isinstance(exc, UsageError):
        for word, flag in _FLAGS:
            text = text.replace(f"pass {word}", f"pass {flag}")
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 1] + "…"
    if isinstance(exc, TokenrelayError):
        hint, said = _hint(exc)
        if hint and not any(word in text.lower() for word in said):
            text = f"{text} ({hint})"
    return f"error: {text}"


def report(exc: BaseException) -> None:
    """Print the one-line message of ``exc`` on stderr."""
    click.echo(message(exc), err=True)


def _silence_stdout() -> None:
    # The reader went away (``| head``): point stdout at /dev/null so the interpreter's
    # final flush does not raise a second BrokenPipeError at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@contextmanager
def handle_errors() -> Iterator[None]:
    """Turn library failures into a message on stderr and ``click.exceptions.Exit``."""
    try:
        yield
    except TokenrelayError as exc:
        report(exc)
        raise click.exceptions.Exit(exit_code(exc)) from None
    except KeyboardInterrupt:
        # The command already said what it stopped (the run footer says "cancelled").
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        _silence_stdout()
        raise click.exceptions.Exit(EXIT_FAILURE) from None
