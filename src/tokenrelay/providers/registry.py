"""The one registry of provider kinds: which provider serves a model name, and which
provider speaks an upstream API.

The library's :func:`~tokenrelay.config.resolve` asks :func:`kind_for_model` which kind
serves a name (``mock``/``mock:...``, the embedded model and ``.gguf`` paths, else an
OpenAI-compatible endpoint); the gateway's routes (``server/routing.py``) ask
:func:`kind_for_api` which HTTP provider speaks a route's ``api``. A new provider is one
entry in :data:`KINDS`. Classes are imported when first used (``llama_cpp``, aiohttp).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .base import Provider

__all__ = ["KINDS", "LOCAL_ALIASES", "Kind", "kind_for_api", "kind_for_model"]

#: Names of the embedded model (besides ``local:PATH`` and ``*.gguf`` paths).
LOCAL_ALIASES = frozenset({"smollm2", "local", "smollm2-135m-instruct"})


def _is_mock(name: str) -> bool:
    return name == "mock" or name.startswith("mock:")


def _is_local(name: str) -> bool:
    return name in LOCAL_ALIASES or name.startswith("local:") or name.endswith(".gguf")


@dataclass(frozen=True)
class Kind:
    """One kind of provider."""

    #: Its name (``Provider.name`` of its instances).
    name: str
    #: Where its class lives (imported on first use).
    module: str
    attr: str
    #: The model names this kind serves by itself, with no endpoint configured (None:
    #: only the names an endpoint serves).
    claims: Callable[[str], bool] | None = None
    #: The upstream API an HTTP kind speaks (a gateway route's ``api``).
    api: str | None = None

    def load(self) -> type[Provider]:
        cls: type[Provider] = getattr(importlib.import_module(self.module), self.attr)
        return cls

    def create(self, **kwargs: Any) -> Provider:
        return self.load()(**kwargs)


MOCK = Kind("mock", "tokenrelay.providers.mock", "MockProvider", claims=_is_mock)
LOCAL = Kind("local", "tokenrelay.providers.local", "LocalProvider", claims=_is_local)
OPENAI = Kind("openai", "tokenrelay.providers.openai_compat", "OpenAIProvider",
              api="chat_completions")
OPENAI_RESPONSES = Kind("openai-responses", "tokenrelay.providers.openai_responses",
                        "OpenAIResponsesProvider", api="responses")

#: Every kind, in the order a model name is matched against their ``claims``.
KINDS: tuple[Kind, ...] = (MOCK, LOCAL, OPENAI, OPENAI_RESPONSES)
#: The kind serving any name no other kind claims: the configured endpoint.
FALLBACK = OPENAI


def kind_for_model(name: str) -> Kind:
    """The kind that serves model ``name``: the first that claims it, else an
    OpenAI-compatible endpoint."""
    for kind in KINDS:
        if kind.claims is not None and kind.claims(name):
            return kind
    return FALLBACK


def kind_for_api(api: str) -> Kind:
    """The HTTP kind that speaks ``api`` (``chat_completions``, ``responses``)."""
    for kind in KINDS:
        if kind.api == api:
            return kind
    raise UsageError(f"no provider speaks the API {api!r}; known: "
                     + ", ".join(sorted(k.api for k in KINDS if k.api)))

