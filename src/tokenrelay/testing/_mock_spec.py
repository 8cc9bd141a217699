"""The one spelling of the mock's options, for model ``mock:...`` and ``mock-upstream``.

Both mocks read the same ``key=value`` items, separated by ``,`` (``;`` works too, for
model names that must not contain a comma)::

    tokens=N         text tokens to stream
    delay=S          seconds before the first token
    tps=R            tokens per second after the first
    fault=F          error | stall | close | reset | malformed | an HTTP status 400-599
    after=N          tokens sent before a mid-stream fault [1]
    times=K          inject the fault on the first K requests only [every request]
    retry_after=S    the Retry-After of a status fault

    tokenrelay -m mock:tokens=50,tps=20,fault=error,after=5 "hello"
    tokenrelay -m "fault=error,after=5" --base-url http://127.0.0.1:8001/v1 "hello"

Faults: ``error`` an error frame (``StreamError``) after ``after`` tokens; ``stall`` no
more tokens, the stream kept open; ``close`` the stream ends without its finish (a
truncated stream); ``reset`` the connection drops; ``malformed`` a chunk that is not
JSON; a status (``429``, ``500``, ...) a failure before any token.

The model ``mock`` also takes ``text=...``, ``finish_reason=...``, ``report_usage=...``,
``parallel_tools=...`` and ``tool_rounds=...`` (see ``MockProvider``). The spellings of
before 2026-12 (``error_after=5``, ``tokens_per_second=20``, ``fault_after=3``, ...) are
refused with a message naming the new one.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..errors import UsageError

__all__ = ["COMMON", "FAULTS", "PROVIDER_ONLY", "RENAMED", "parse_fault", "parse_items",
           "parse_spec"]

#: Mid-stream faults; any HTTP status 400-599 is a fault too (before the first token).
FAULTS = ("error", "stall", "close", "reset", "malformed")

#: Options both mocks take → how a value is read.
COMMON: dict[str, str] = {
    "tokens": "count", "delay": "seconds", "tps": "rate", "fault": "fault",
    "after": "count", "times": "count", "retry_after": "text",
}
#: Options only the scripted provider (model ``mock:``) takes.
PROVIDER_ONLY: dict[str, str] = {
    "text": "text", "finish_reason": "text", "report_usage": "bool",
    "parallel_tools": "bool", "tool_rounds": "count",
}

#: Old spellings → the new one (refused with this hint).
RENAMED = {
    "error_after": "fault=error,after=N", "stall_after": "fault=stall,after=N",
    "truncate_after": "fault=close,after=N", "reset_after": "fault=reset,after=N",
    "malformed_after": "fault=malformed,after=N", "fail_before_first": "fault=STATUS",
    "fail_times": "times=K", "fault_after": "after=N", "fault_times": "times=K",
    "tokens_per_second": "tps=R", "first_token_delay": "delay=S", "n": "tokens=N",
}


def parse_fault(value: str) -> str:
    """A fault name or an HTTP status 400-599, lower-cased.

    Raises:
        ValueError: anything else.
    """
    fault = value.strip().lower()
    if fault in FAULTS or (fault.isdigit() and 400 <= int(fault) <= 599):
        return fault
    raise ValueError("expected " + " | ".join(FAULTS) + " | an HTTP status 400-599")


def _value(kind: str, raw: str) -> Any:
    raw = raw.strip()
    if kind == "text":
        return raw
    if kind == "fault":
        return parse_fault(raw)
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    number: float
    if kind == "count":
        number = int(raw)
    else:
        number = float(raw)
        if kind == "rate" and number <= 0:
            raise ValueError("must be above 0")
    if number < 0:
        raise ValueError("must not be negative")
    return number


def parse_spec(
    spec: str,
    *,
    known: Collection[str] = tuple(COMMON),
    what: str = "mock",
    names_allowed: bool = False,
) -> dict[str, Any]:
    """``"tokens=50,tps=20,fault=error,after=5"`` → ``{"tokens": 50, "tps": 20.0, ...}``.

    Args:
        known: the option names the caller takes (``COMMON``, plus ``PROVIDER_ONLY``).
        what: the mock's name in messages.
        names_allowed: items without ``=`` are plain names and ignored (mock-upstream
            reads options out of model names such as ``gpt-x;fault=reset``).

    Raises:
        UsageError: an unknown or renamed option, or a bad value.
    """
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.replace(";", ",").split(","))):
        key, sep, raw = part.partition("=")
        if not sep and names_allowed:
            continue
        options.update(parse_items({key: raw}, known=known, what=what, bare=not sep))
    return options


def parse_items(
    items: dict[str, str],
    *,
    known: Collection[str] = tuple(COMMON),
    what: str = "mock",
    bare: bool = False,
) -> dict[str, Any]:
    """Options given as a mapping (e.g. ``x-mock-*`` headers); see :func:`parse_spec`."""
    options: dict[str, Any] = {}
    for key, raw in items.items():
        name = key.strip().lower().replace("-", "_")
        if name in RENAMED:
            raise UsageError(f"{what} option {name!r} is spelled {RENAMED[name]} now")
        if name not in known:
            hint = ""
            if name in PROVIDER_ONLY:
                hint = " (that one is for model mock: only)"
            raise UsageError(f"unknown {what} option {name!r}{hint}; known: "
                             + ", ".join(sorted(known)))
        kind = COMMON.get(name) or PROVIDER_ONLY[name]
        try:
            if bare:
                raise ValueError("expected a value")
            options[name] = _value(kind, raw)
        except ValueError as exc:
            raise UsageError(f"bad {what} option {name}={raw.strip()!r}: {exc}") from exc
    return options
