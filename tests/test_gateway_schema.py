"""The gateway's request schema, fuzzed: no generated request may get a 5xx.

schemathesis reads the gateway's own ``/openapi.json`` (built from the pydantic models
that validate requests) and generates bodies against a live gateway on loopback: valid
ones (must be answered, and the answers must match the documented schemas) and invalid
ones (must be refused with a documented 4xx, never a crash). The model is restricted to
the in-process ``mock`` (and ``serve_local=False``), so the embedded model never runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from _live import LiveGateway
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tokenrelay.server.config import LogConfig, ServerConfig
from tokenrelay.server.openapi import openapi_document

MAX_EXAMPLES = 150
SMALL = 3
REQUEST_SCHEMAS = ("ChatCompletionRequest", "ChatMessageIn", "_Part", "StreamOptions",
                   "SimpleChatRequest")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    log = LogConfig(path=str(tmp_path_factory.mktemp("schema") / "requests.db"))
    with LiveGateway(ServerConfig(serve_local=False, log=log)) as gw:
        yield gw


def _for_fuzzing(raw: dict[str, Any]) -> dict[str, Any]:
    """The served document with ``model`` narrowed to the scripted mock and collections
    kept small (arbitrary nested JSON makes generation, not the gateway, the slow part)."""
    schemas = raw["components"]["schemas"]
    schemas["ChatCompletionRequest"]["properties"]["model"] = {"enum": ["mock"]}
    schemas["SimpleChatRequest"]["properties"]["model"] = {"enum": ["mock", None]}

    def shrink(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "array":
                node["maxItems"] = min(node.get("maxItems", SMALL), SMALL)
            if node.get("type") == "object" and node.get("additionalProperties") is not False:
                node["maxProperties"] = len(node.get("properties", {})) + SMALL
            for value in node.values():
                shrink(value)
        elif isinstance(node, list):
            for value in node:
                shrink(value)

    for name in REQUEST_SCHEMAS:
        shrink(schemas[name])
    return raw


def test_openapi_document_is_served_and_built_from_the_models(gateway: LiveGateway) -> None:
    response = httpx.get(gateway.url + "/openapi.json", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    raw = response.json()
    assert raw == openapi_document(auth=False)
    assert raw["openapi"].startswith("3.1")
    body = raw["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    request = raw["components"]["schemas"]["ChatCompletionRequest"]
    assert request["additionalProperties"] is False
    assert {"model", "messages"} <= set(request["required"])
    assert "securitySchemes" not in raw["components"]  # no keys configured
    secured = openapi_document(auth=True)
    assert {"bearer", "apiKey", "xApiKey"} == set(secured["components"]["securitySchemes"])
    # schemathesis validates the document as it loads it.
    schemathesis.openapi.from_dict(raw)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat"])
def test_no_generated_request_gets_a_server_error(gateway: LiveGateway, path: str,
                                                  mode: GenerationMode) -> None:
    raw = _for_fuzzing(httpx.get(gateway.url + "/openapi.json", timeout=5).json())
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=gateway.url)
    strategy = schema[path]["POST"].as_strategy(generation_mode=mode)
    session = requests.Session()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(session=session, timeout=10)
        case.validate_response(response, checks=CHECKS)

    try:
        check()
    finally:
        session.close()
