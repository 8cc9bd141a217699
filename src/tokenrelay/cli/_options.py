"""The model and sampling options shared by ``run``, ``chat`` and ``compare``.

Values are not range-checked here: the core validates them (``Request``) and raises
``UsageError`` with the field name, so the CLI and the library say the same thing.
Only the CLI's own knobs (timeouts, retries) are checked by click.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import UsageError
from ..request import RetryPolicy, Timeouts

__all__ = ["ModelOptions", "load_object", "load_schema", "model_options", "tool_options"]

F = TypeVar("F", bound=Callable[..., Any])

_POSITIVE = click.FloatRange(min=0, min_open=True)


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """Everything the CLI passes to ``tokenrelay.stream()`` besides the prompt."""

    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeouts: Timeouts | None = None
    retry: RetryPolicy | None = None
    #: --schema, --tool, --max-tool-rounds (``run`` only).
    response_format: Any = None
    tools: tuple[Any, ...] = ()
    max_tool_rounds: int | None = None

    def stream_kwargs(self, *, system: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``tokenrelay.stream()``; ``system`` overrides ``--system``."""
        extra: dict[str, Any] = {}
        if self.response_format is not None:
            extra["response_format"] = self.response_format
        if self.tools:
            extra["tools"] = list(self.tools)
        if self.max_tool_rounds is not None:
            extra["max_tool_rounds"] = self.max_tool_rounds
        return extra | {
            "model": self.model,
            "base_url": self.base_url,
            "api_key": self.api_key,
            "system": system if system is not None else self.system,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop) or None,
            "timeouts": self.timeouts,
            "retry": self.retry,
        }


_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("-m", "--model", metavar="MODEL",
                 help="smollm2 (embedded), mock[:opts], or a model of the endpoint."),
    click.option("--base-url", metavar="URL",
                 help="An OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)."),
    click.option("--api-key", metavar="KEY", help="API key (default: $OPENAI_API_KEY)."),
    click.option("-s", "--system", metavar="TEXT", help="System prompt."),
    click.option("-t", "--temperature", type=float, help="Sampling temperature (0-2)."),
    click.option("--max-tokens", type=int, help="Stop after this many tokens."),
    click.option("--top-p", type=float, help="Nucleus sampling (0-1]."),
    click.option("--seed", type=int, help="Sampling seed, where the provider supports it."),
    click.option("--stop", multiple=True, metavar="TEXT",
                 help="Stop when this text is generated (repeatable)."),
    click.option("--timeout-connect", type=_POSITIVE, metavar="SECONDS",
                 help="Deadline to open the connection [10]."),
    click.option("--timeout-first-token", type=_POSITIVE, metavar="SECONDS",
                 help="Deadline for the first token [120]."),
    click.option("--timeout-idle", type=_POSITIVE, metavar="SECONDS",
                 help="Longest pause between tokens [60]."),
    click.option("--timeout-total", type=_POSITIVE, metavar="SECONDS",
                 help="Deadline for the whole answer [none]."),
    click.option("--retries", type=click.IntRange(0, 20), metavar="N",
                 help="Retries before the first token [2]."),
]

_TIMEOUTS = {
    "timeout_connect": "connect",
    "timeout_first_token": "first_token",
    "timeout_idle": "idle",
    "timeout_total": "total",
}
_FIELDS = ("model", "base_url", "api_key", "system", "temperature", "max_tokens", "top_p",
           "seed", "stop")


def _build(values: dict[str, Any]) -> ModelOptions:
    timeouts = {_TIMEOUTS[k]: values[k] for k in _TIMEOUTS if values[k] is not None}
    retries = values["retries"]
    return ModelOptions(
        **{k: values[k] for k in _FIELDS},
        timeouts=Timeouts(**timeouts) if timeouts else None,
        retry=RetryPolicy.model_validate({"max_retries": retries}) if retries is not None
        else None,
    )


def model_options(func: F) -> F:
    """Add the model options to a command; it receives them as ``options: ModelOptions``."""
    names = (*_FIELDS, *_TIMEOUTS, "retries")

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names}
        return func(*args, options=_build(values), **kwargs)

    decorated: Any = wrapper
    for option in reversed(_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def load_object(spec: str, *, what: str) -> Any:
    """``module:name`` or ``path/to/file.py:name``: the object it names.

    The current directory is importable, as with ``python -m``, so ``--tool tools:get``
    finds ``./tools.py``.

    Raises:
        UsageError: no such module or attribute.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r}: expected module:name (or file.py:name)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"{what} {spec!r}: no file {module_name}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            assert loaded is not None and loaded.loader is not None
            module = importlib.util.module_from_spec(loaded)
            sys.modules.setdefault(path.stem, module)
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:  # any failure importing the user's code is theirs to fix
        raise UsageError(f"{what} {spec!r}: cannot import {module_name}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{what} {spec!r}: {module_name} has no {attr!r}") from None
    return obj


def load_schema(spec: str) -> Any:
    """``--schema``: a JSON-schema file, or ``module:Model`` (a Pydantic model or a dict).

    Raises:
        UsageError: unreadable file, bad JSON, or nothing importable by that name.
    """
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"--schema {spec}: cannot read it: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise UsageError(f"--schema {spec}: not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise UsageError(f"--schema {spec}: a JSON schema is an object")
        return schema
    return load_object(spec, what="--schema")


def tool_options(func: F) -> F:
    """``--schema``, ``--tool`` and ``--max-tool-rounds``, folded into ``options``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        schema, tools, rounds = (kwargs.pop("schema"), kwargs.pop("tool"),
                                 kwargs.pop("max_tool_rounds"))
        options: ModelOptions = kwargs["options"]
        kwargs["options"] = replace(
            options,
            response_format=None if schema is None else load_schema(schema),
            tools=tuple(load_object(t, what="--tool") for t in tools),
            max_tool_rounds=rounds,
        )
        return func(*args, **kwargs)

    decorated: Any = wrapper
    decorated = click.option(
        "--max-tool-rounds", type=click.IntRange(0, 100), metavar="N",
        help="Rounds of tool calls to run before stopping [5].")(decorated)
    decorated = click.option(
        "--tool", multiple=True, metavar="MODULE:FUNCTION",
        help="A Python function the model may call; the tool loop runs it (repeatable).",
    )(decorated)
    decorated = click.option(
        "--schema", metavar="FILE.json|MODULE:MODEL",
        help="Structured output: JSON matching this schema (a JSON-schema file or a"
             " Pydantic model), shown filling in live.")(decorated)
    return decorated  # type: ignore[no-any-return]
