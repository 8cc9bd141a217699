"""One provider registry (providers/registry.py) behind the library's ``resolve()`` and the
gateway's routes: a model name and a route's ``api`` find their provider in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from _harness import gateway_config, mock_routes

from tokenrelay.config import Settings, resolve
from tokenrelay.errors import UsageError
from tokenrelay.providers.local import LocalProvider
from tokenrelay.providers.mock import MockProvider
from tokenrelay.providers.openai_compat import OpenAIProvider
from tokenrelay.providers.openai_responses import OpenAIResponsesProvider
from tokenrelay.providers.registry import KINDS, kind_for_api, kind_for_model
from tokenrelay.server.routing import Router


@pytest.mark.parametrize(("name", "cls"), [
    ("mock", MockProvider), ("mock:tokens=3", MockProvider),
    ("smollm2", LocalProvider), ("local", LocalProvider), ("local:{tmp}/x.gguf", LocalProvider),
    ("{tmp}/y.gguf", LocalProvider), ("gpt-4.1-mini", OpenAIProvider),
    ("mockingbird", OpenAIProvider), ("localhost-model", OpenAIProvider),
])
def test_a_model_name_finds_its_kind_and_resolve_uses_it(name: str, cls: type,
                                                         tmp_path: Path) -> None:
    (tmp_path / "x.gguf").touch()
    (tmp_path / "y.gguf").touch()
    name = name.format(tmp=tmp_path)
    assert kind_for_model(name).load() is cls
    settings = Settings(openai_base_url="http://127.0.0.1:9/v1")
    provider, _ = resolve(name, settings=settings)
    assert type(provider) is cls


def test_a_route_api_finds_its_http_provider_in_the_same_registry(tmp_path: Path) -> None:
    assert kind_for_api("chat_completions").load() is OpenAIProvider
    assert kind_for_api("responses").load() is OpenAIResponsesProvider
    with pytest.raises(UsageError, match="no provider speaks the API 'grpc'"):
        kind_for_api("grpc")
    models = mock_routes("http://127.0.0.1:9/v1", chat="tokens=1") + [
        {"name": "resp", "base_url": "http://127.0.0.1:9/v1", "api": "responses"}]
    router = Router(gateway_config(tmp_path, models))
    assert type(router.models["chat"][0]) is OpenAIProvider
    assert type(router.models["resp"][0]) is OpenAIResponsesProvider
    # Every kind is importable and names itself as its instances do.
    for kind in KINDS:
        assert kind.load().name == kind.name
