"""The gateway's routes: which provider answers a model name (from config, never from the
request), and the models list that describes them.

A name is one of three kinds: a configured upstream route (``[[models]]``: an
OpenAI-compatible Chat Completions or Responses API), the embedded model (``smollm2``),
or the scripted mock (``mock``, and ``mock:...`` options on a loopback-only gateway).
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlsplit

from ..config import resolve
from ..errors import UsageError
from ..providers.base import Provider
from ..providers.registry import kind_for_api
from .config import ModelRoute, ServerConfig
from .security import GatewayHTTPError

__all__ = ["MAX_MOCK_TOKENS", "Router", "label"]

log = logging.getLogger("tokenrelay.server")

#: The largest scripted answer (``mock:tokens=N``) a client may ask for.
MAX_MOCK_TOKENS = 10_000


def label(model: str) -> str:
    """The model as a metrics/log label: scripted mock options would explode cardinality."""
    return "mock" if model.startswith("mock:") else model


class Router:
    """Model name → (provider, upstream model name), for one gateway."""

    def __init__(self, config: ServerConfig) -> None:
        #: The served names: each one's provider and the model name it is asked for.
        self.models: dict[str, tuple[Provider, str]] = {}
        #: The configured upstream route of each routed model name.
        self.route_of: dict[str, ModelRoute] = {}
        #: OpenAI parameters already warned about as ignored (one line each, not one
        #: per request).
        self._warned: set[str] = set()
        # The scripted mock lets callers choose stalls and delays: by default only on a
        # loopback-only gateway.
        self.serve_mock = (config.loopback_only if config.serve_mock is None
                           else config.serve_mock)
        #: The providers made for this gateway's routes (the shared local and mock
        #: providers are not ours to close).
        self._routes: list[Provider] = []
        for route in config.models:
            key = route.api_key or (os.environ.get(route.api_key_env)
                                    if route.api_key_env else None)
            # The provider that speaks the route's API, from the registry resolve() uses.
            options = {} if route.continue_prefix is None else {
                "continue_prefix": route.continue_prefix}
            provider = kind_for_api(route.api).create(
                base_url=route.base_url, api_key=key, max_connections=route.max_connections,
                **options)
            self._routes.append(provider)
            self.models[route.name] = (provider, route.upstream_model or route.name)
            self.route_of[route.name] = route
        self._route_names = frozenset(route.name for route in config.models)
        if self._routes:
            # Load the token estimator's encoding now (cl100k_base: 0.26 s, ~40 MiB): an
            # upstream route's usage is estimated for every stream that ends without
            # upstream usage (a client that left early, an upstream without
            # stream_options), and loading it lazily stalled the event loop, every stream
            # on it, at the first such stream. (The local and mock models count their own.)
            from ..usage import estimate_tokens

            estimate_tokens("warm-up")
        if config.serve_local and "smollm2" not in self.models:
            self.models["smollm2"] = resolve("smollm2")
        if self.serve_mock and "mock" not in self.models:
            self.models["mock"] = resolve("mock")

    def route(self, model: str) -> str | None:
        """``model`` if it is one of the config's upstream routes (whose errors clients
        see only in general terms), else None (the embedded model, the mock)."""
        return model if model in self._route_names else None

    def default_model(self) -> str | None:
        """The model of a request that names none (``/chat``): the embedded one if served."""
        return "smollm2" if "smollm2" in self.models else next(iter(self.models), None)

    def lookup(self, model: str) -> tuple[Provider, str]:
        """The provider serving ``model`` and the name to ask it for (404 if none)."""
        found = self.models.get(model)
        if found is not None:
            return found
        if model.startswith("mock:") and self.serve_mock:
            # Scripted behaviour chosen by the client: only ever the in-process mock.
            from ..providers.mock import parse_mock_options

            try:
                tokens = parse_mock_options(model[5:]).get("tokens") or 0
                if tokens > MAX_MOCK_TOKENS:
                    # The mock builds its whole answer at once, on the event loop:
                    # tokens=10**7 would freeze the gateway for everyone for seconds.
                    raise UsageError(f"mock tokens above {MAX_MOCK_TOKENS} are refused here")
                return resolve(model)
            except UsageError as exc:
                raise GatewayHTTPError(400, exc.message, param="model") from exc
        raise GatewayHTTPError(404, f"model {model!r} not found; GET /v1/models lists them",
                               param="model", code="model_not_found")

    def unused_parameters(self, model: str, params: dict[str, Any], *,
                          api: str = "chat_completions") -> dict[str, Any]:
        """What to do with OpenAI parameters the gateway itself does not act on
        (``reasoning_effort``, ``store``, ``user``, ...): the ``extra`` to pass to an
        OpenAI-compatible upstream speaking the same ``api``, or ``{}`` and one warning
        line per parameter (per gateway, not per request) for a model that cannot use
        them."""
        if not params:
            return {}
        route = self.route_of.get(model)
        if route is not None and route.api == api:
            return params
        new = sorted(set(params) - self._warned)
        if new:
            self._warned.update(new)
            log.warning("ignoring OpenAI parameter%s %s: model %r does not use %s"
                        " (warned once)", "s" if len(new) > 1 else "", ", ".join(new),
                        label(model), "them" if len(new) > 1 else "it")
        return {}

    def model_object(self, name: str, created: int) -> dict[str, Any]:
        """The OpenAI model object of a served name; a routed model's ``owned_by`` is its
        route (the upstream host and model; never the key or the URL's path)."""
        route = self.route_of.get(name)
        if route is None:
            provider = self.models[name][0] if name in self.models else resolve(name)[0]
            owner = {"local": "tokenrelay (embedded)", "mock": "tokenrelay (mock)"}.get(
                provider.name, provider.name)
            return {"id": name, "object": "model", "created": created, "owned_by": owner}
        upstream = route.upstream_model or route.name
        return {"id": name, "object": "model", "created": created,
                "owned_by": f"{urlsplit(route.base_url).netloc} ({upstream})",
                "route": {"upstream_model": upstream,
                          "host": urlsplit(route.base_url).netloc, "api": route.api}}

    def model_list(self, created: int) -> dict[str, Any]:
        """``GET /v1/models``'s body."""
        return {"object": "list",
                "data": [self.model_object(name, created) for name in self.models]}

    async def aclose(self) -> None:
        for provider in self._routes:
            await provider.aclose()  # this loop's upstream connections
