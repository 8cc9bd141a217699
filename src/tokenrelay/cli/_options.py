"""The model and sampling options shared by ``run``, ``chat`` and ``compare``.

Values are not range-checked here: the core validates them (``Request``) and raises
``UsageError`` with the field name, so the CLI and the library say the same thing.
Only the CLI's own knobs (timeouts, retries) are checked by click.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..request import RetryPolicy, Timeouts

__all__ = ["ModelOptions", "model_options"]

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

    def stream_kwargs(self, *, system: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``tokenrelay.stream()``; ``system`` overrides ``--system``."""
        return {
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
