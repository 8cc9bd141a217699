"""The gateway's request schema, fuzzed: no generated request may get a 5xx.

schemathesis reads the gateway's own ``/openapi.json`` (built from the pydantic models
that validate requests) and generates bodies against a live gateway on loopback: valid
ones (must be answered, and the answers must match the documented schemas) and invalid
ones (must be refused with a documented 4xx, never a crash). The model is restricted to
the in-process ``mock`` (and ``serve_local=False``), so the embedded model never runs.

Then random bodies, methods, content types and paths, not shaped by any schema
(``test_random_requests_get_an_answer_and_never_a_5xx``). Together: 3 endpoints × 2 modes
× ``MAX_EXAMPLES`` schema cases plus ``RANDOM_REQUESTS``, over 3,000 requests, each of
which must get a complete answer below 500 (issue 9: zero 5xx, zero empty replies).
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from _harness import LiveGateway
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

MAX_EXAMPLES = 200
RANDOM_REQUESTS = 2000
#: Bounds the random run on a loaded machine (it takes ~10 s on a quiet one).
RANDOM_SECONDS = 180
SMALL = 3
#: Response schemas: left as documented (the checks hold answers to them).
RESPONSE_SCHEMAS = ("Usage", "Error", "ErrorObject", "ChatCompletion", "ChatCompletionChunk",
                    "ModelList", "Response")
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
    schemas["ResponsesRequest"]["properties"]["model"] = {"enum": ["mock"]}

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

    for name, schema in schemas.items():
        if name not in RESPONSE_SCHEMAS:
            shrink(schema)
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
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat", "/v1/responses"])
def test_no_generated_request_gets_a_server_error(gateway: LiveGateway, path: str,
                                                  mode: GenerationMode) -> None:
    raw = _for_fuzzing(httpx.get(gateway.url + "/openapi.json", timeout=5).json())
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=gateway.url)
    strategy = schema[path]["POST"].as_strategy(generation_mode=mode)
    session = requests.Session()
    sent = 0

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        nonlocal sent
        sent += 1
        response = case.call(session=session, timeout=10)  # an empty reply raises
        case.validate_response(response, checks=CHECKS)

    try:
        check()
    finally:
        session.close()
    assert sent >= MAX_EXAMPLES // 2, sent  # the search space was not exhausted early


# -- random requests, shaped by no schema ---------------------------------------------------

_PATHS = ["/v1/chat/completions", "/chat/completions", "/v1/responses", "/responses", "/chat",
          "/v1/models", "/healthz", "/metrics", "/openapi.json", "/", "/v1/models/mock",
          "/v1", "/%00", "/v1/chat/completions/../../etc/passwd", "/" + "a" * 3000]
_METHODS = ["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
_CONTENT_TYPES = (["application/json"] * 12
                  + ["application/json; charset=utf-8", "text/plain", "", "application/xml",
                     "multipart/form-data; boundary=z", "application/x-www-form-urlencoded"])
_VALID = [
    {"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    {"model": "mock", "input": "hi", "stream": True},
    {"model": "mock", "prompt": "hi"},
]
_ODD_VALUES: list[Any] = [None, True, 0, -1, 2**64, 1e308, -0.0, "", "x" * 5000, "\u0000",
                          "\ud800", [], {}, [None], {"": None}, "mock:tokens=99999999",
                          "mock:delay=1e9", "../../", "A" * 300]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(_ODD_VALUES)
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return rng.random() * 10 ** rng.randint(-5, 300)
    if kind == 3:
        return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 20)))
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["model", "messages", "role", "content", "stream", "input", "prompt",
                        "max_tokens", "tools", "x"]): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def _random_body(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 2000))
    if kind == 1:
        depth = rng.choice([10, 1000, 100_000])
        return b"[" * depth + b"]" * depth
    if kind == 2:
        return json.dumps(rng.choice(_VALID)).encode()[: rng.randint(0, 60)]  # truncated
    if kind == 3:
        return br'{"model": "mock", "messages": [{"role": "user", "content": "\ud800"}]}'
    if kind == 4:
        return b'{"model": "mock", "model": 1, "messages": NaN}'
    body = dict(rng.choice(_VALID))
    for _ in range(rng.randint(1, 3)):  # mutate a valid body
        key = rng.choice([*body, "temperature", "max_tokens", "stop", "tools", "seed",
                          "stream_options", "response_format", "history", "frobnicate"])
        body[key] = _random_value(rng)
    return json.dumps(body).encode()


def test_random_requests_get_an_answer_and_never_a_5xx(gateway: LiveGateway) -> None:
    rng = random.Random(9)  # reproducible: a failure names its request number
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + RANDOM_SECONDS
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        for n in range(RANDOM_REQUESTS):
            assert time.monotonic() < deadline, f"only {n} requests in {RANDOM_SECONDS}s"
            method, path = rng.choice(_METHODS), rng.choice(_PATHS)
            if method == "POST" and rng.random() < 0.8:  # mostly the model endpoints
                path = rng.choice(_PATHS[:5])
            if rng.random() < 0.2:
                path += "?" + "&".join(f"{rng.randint(0, 9)}={rng.random()}"
                                       for _ in range(rng.randint(1, 4)))
            body = _random_body(rng) if method in ("POST", "PUT", "PATCH") else b""
            headers = {"content-type": rng.choice(_CONTENT_TYPES)} if body else {}
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (http.client.HTTPException, OSError) as exc:  # an empty reply, a reset
                failures.append(f"#{n} {method} {path[:60]} {body[:80]!r}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
                continue
            statuses[response.status] += 1
            if response.status >= 500:
                failures.append(f"#{n} {method} {path[:60]} {body[:80]!r}: {response.status}")
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    finally:
        conn.close()
    assert not failures, failures[:10]
    assert sum(statuses.values()) == RANDOM_REQUESTS
    # The run reached the endpoints, not only the guards: answers and refusals both.
    assert statuses[200] > 50 and statuses[400] > 300 and statuses[415] > 100, statuses
