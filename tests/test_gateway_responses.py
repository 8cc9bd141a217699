"""Structured output, tool calls and the Responses API through a live gateway, checked
with the official ``openai`` SDK, unchanged.

What the providers produce is scripted (``_scripted.ScriptedProvider`` served as extra
models) so that these tests pin the gateway's side — request mapping, encoders — whatever
the scripted ``mock`` does; the same flows against the ``mock`` and the mock upstream run
then run end to end against the ``mock`` and a route to the mock upstream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
import schemathesis
from _harness import LiveGateway, gateway_config, mock_routes, poll, sse_events, sse_payloads
from _scripted import ScriptedProvider, text_chunks, tool_call_chunks
from hypothesis import HealthCheck, Phase, given, settings
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tokenrelay.providers.base import Chunk
from tokenrelay.request import Request, ResponseFormat, ToolSpec
from tokenrelay.server.config import hash_key
from tokenrelay.testing.mock_upstream import MockUpstream, sample_json

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


class Weather(BaseModel):
    city: str
    temperature: int
    conditions: list[str]


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str


WEATHER = Weather(city="Paris", temperature=21, conditions=["sunny", "light wind"])
WEATHER_TOOL: Any = {"type": "function", "name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False},
                "strict": True}

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", *["response.output_text.delta"] * 4,
               "response.output_text.done", "response.content_part.done",
               "response.output_item.done", "response.completed"]


def _json_pieces(value: BaseModel) -> list[str]:
    text = value.model_dump_json()
    return [text[i:i + 7] for i in range(0, len(text), 7)]


def _weather_calls(request: Request) -> list[Any]:
    # Named after the request's first tool, as a model would call it.
    assert request.tools
    name = request.tools[0].name
    return tool_call_chunks(("call_1", name, {"city": "Paris"}),
                            ("call_2", name, {"city": "Tokyo"}))


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, upstream: MockUpstream
         ) -> Iterator[LiveGateway]:
    tmp: Path = tmp_path_factory.mktemp("responses")
    models = mock_routes(upstream.url, up="tokens=6", up_slow="tokens=1000,tps=50")
    with LiveGateway(gateway_config(tmp, models)) as gateway:
        models = gateway.gateway.models
        models["tool"] = (ScriptedProvider(_weather_calls), "tool")
        models["json"] = (ScriptedProvider(text_chunks(*_json_pieces(WEATHER))), "json")
        models["cut"] = (ScriptedProvider(text_chunks("a", "b", finish="length")), "cut")
        models["mixed"] = (ScriptedProvider(lambda r: [Chunk(text="Let me "), Chunk(text="look.")]
                                            + _weather_calls(r)), "mixed")
        yield gateway


@pytest.fixture
def recorder(live: LiveGateway) -> ScriptedProvider:
    """A fresh ``recorder`` model: answers "ok", keeps the core requests it got."""
    provider = ScriptedProvider(text_chunks("ok"))
    live.gateway.models["recorder"] = (provider, "recorder")
    return provider


@pytest.fixture
def client(live: LiveGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                       timeout=10) as sdk:
        yield sdk


# -- /v1/responses, streamed --------------------------------------------------------------


def test_responses_stream_events_in_order_and_final_text(client: openai.OpenAI) -> None:
    with client.responses.stream(model="mock", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(d.delta for d in deltas) == "Mock answer to: hi"
    assert deltas[-1].snapshot == "Mock answer to: hi"
    assert final.status == "completed" and final.output_text == "Mock answer to: hi"
    assert final.usage is not None and final.usage.output_tokens == 4
    assert final.usage.total_tokens == final.usage.input_tokens + 4
    assert final.id == events[0].response.id and final.id.startswith("resp_")  # type: ignore[union-attr]
    item = final.output[0]
    assert item.type == "message" and item.status == "completed" and item.role == "assistant"
    assert {e.item_id for e in deltas} == {item.id}  # type: ignore[union-attr]


def test_every_streamed_event_validates_against_the_sdk_types(client: openai.OpenAI) -> None:
    # The SDK builds events without validation; validate each one strictly here.
    for model in ("mock", "tool", "cut", "mock:fault=error,after=2"):
        kwargs: dict[str, Any] = {"tools": [WEATHER_TOOL]} if model == "tool" else {}
        stream = client.responses.create(model=model, input="hi", stream=True, **kwargs)
        events = list(stream)
        assert events
        for event in events:
            type(event).model_validate(event.to_dict())
            if hasattr(event, "response"):
                type(event.response).model_validate(event.response.to_dict())


def test_sse_frames_name_their_event_and_carry_increasing_ids(live: LiveGateway) -> None:
    body = {"model": "mock", "input": "hi", "stream": True}
    with httpx.stream("POST", live.url + "/v1/responses", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        raw = response.read().decode()
    assert "[DONE]" not in raw
    for n, fields in enumerate(sse_events(raw)):
        data = json.loads(fields["data"])
        assert fields["event"] == data["type"] and int(fields["id"]) == n
        assert data["sequence_number"] == n


def test_responses_stream_a_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model="tool", input="weather?", tools=[WEATHER_TOOL]
                                 ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    # Both calls stay open to the end: parallel calls may interleave their arguments.
    opened = ["response.output_item.added", *["response.function_call_arguments.delta"] * 3]
    closed = ["response.function_call_arguments.done", "response.output_item.done"]
    assert [e.type for e in events] == ["response.created", "response.in_progress",
                                        *opened, *opened, *closed, *closed,
                                        "response.completed"]
    assert final.status == "completed"
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_1", "get_weather", {"city": "Paris"}), ("call_2", "get_weather", {"city": "Tokyo"})]
    assert all(c.status == "completed" for c in calls)
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.output_index for e in added] == [0, 1]
    assert [e.item.call_id for e in added] == ["call_1", "call_2"]  # type: ignore[union-attr]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "Paris"}, {"city": "Tokyo"}]


def test_responses_text_then_calls_are_separate_items(client: openai.OpenAI) -> None:
    with client.responses.stream(model="mixed", input="weather?", tools=[WEATHER_TOOL]
                                 ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [(o.type, o.status) for o in final.output] == [  # type: ignore[union-attr]
        ("message", "completed"), ("function_call", "completed"),
        ("function_call", "completed")]
    assert final.output_text == "Let me look."
    types = [e.type for e in events]
    # The message is done before the first call is added.
    assert types.index("response.output_item.done") < types.index(
        "response.function_call_arguments.delta")
    completion = client.chat.completions.create(model="mixed", messages=PROMPT,
                                                tools=[{"type": "function", "function": {
                                                    "name": "get_weather"}}])
    message = completion.choices[0].message
    assert message.content == "Let me look." and len(message.tool_calls or []) == 2


def test_responses_structured_output_is_parsed(client: openai.OpenAI,
                                               live: LiveGateway) -> None:
    with client.responses.stream(model="json", input="weather?", text_format=Weather) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == WEATHER
    provider = live.gateway.models["json"][0]
    assert isinstance(provider, ScriptedProvider)
    fmt = provider.requests[-1].response_format
    assert fmt is not None and fmt.name == "Weather" and fmt.strict
    assert fmt.schema_["properties"].keys() == {"city", "temperature", "conditions"}


def test_responses_max_output_tokens_ends_incomplete(client: openai.OpenAI) -> None:
    with client.responses.stream(model="mock", input="one two three", max_output_tokens=2
                                 ) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    response = events[-1].response  # type: ignore[union-attr]
    assert response.status == "incomplete" and response.output_text == "Mock answer"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


def test_responses_error_mid_stream_is_an_error_event_then_failed(
        client: openai.OpenAI) -> None:
    with client.responses.stream(model="mock:fault=error,after=2", input="hi") as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    types = [e.type for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert types.count("response.output_text.delta") == 2
    error = events[-2]
    assert error.type == "error" and error.code == "mock_error" and error.message
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete"


def test_responses_failure_before_the_first_token_keeps_its_status(
        client: openai.OpenAI) -> None:
    for stream in (True, False):
        with pytest.raises(openai.RateLimitError) as info:
            client.responses.create(model="mock:fault=429,retry_after=3600",
                                    input="hi", stream=stream)
        assert info.value.response.headers["retry-after"] == "3600"


def test_client_leaving_a_responses_stream_aborts_the_upstream(
        live: LiveGateway, upstream: MockUpstream) -> None:
    upstream.reset()
    body = {"model": "up-slow", "input": "hi", "stream": True}
    with httpx.stream("POST", live.url + "/v1/responses", json=body, timeout=10) as response:
        for line in response.iter_lines():
            if line == "event: response.output_text.delta":
                break
    record = upstream.wait_for(lambda r: r.aborted_at is not None, timeout=5)
    assert record is not None and record.tokens_sent < 1000
    assert poll(lambda: live.active() == 0, 5)
    [row] = live.wait_log(lambda r: r["endpoint"] == "responses" and r["model"] == "up-slow")
    assert row["status"] == "cancelled"


def test_responses_needs_the_gateway_key(tmp_path: Path) -> None:
    keys = [{"id": "alice", "sha256": hash_key("sk-alice")}]
    with LiveGateway(gateway_config(tmp_path, [], keys=keys)) as gateway:
        response = httpx.post(gateway.url + "/v1/responses", timeout=10,
                              json={"model": "mock", "input": "hi"})
        assert response.status_code == 401
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-alice", max_retries=0,
                           timeout=10) as sdk:
            assert sdk.responses.create(model="mock", input="hi").output_text


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_responses_request_gets_a_server_error(live: LiveGateway,
                                                            mode: str) -> None:
    """schemathesis against the documented request body (as ``test_gateway_schema`` does
    for chat completions): valid bodies are answered as documented, invalid ones are 4xx."""
    raw = httpx.get(live.url + "/openapi.json", timeout=5).json()
    schemas = raw["components"]["schemas"]
    schemas["ResponsesRequest"]["properties"]["model"] = {"enum": ["mock"]}

    def shrink(node: Any) -> None:  # arbitrary nested JSON makes generation the slow part
        if isinstance(node, dict):
            if node.get("type") == "array":
                node["maxItems"] = min(node.get("maxItems", 3), 3)
            if node.get("type") == "object" and node.get("additionalProperties") is not False:
                node["maxProperties"] = len(node.get("properties", {})) + 3
            for value in node.values():
                shrink(value)
        elif isinstance(node, list):
            for value in node:
                shrink(value)

    for name in schemas:  # the request body's schemas, not the documented answers
        if name == "ResponsesRequest" or name.startswith("_"):
            shrink(schemas[name])
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=live.url)
    strategy = schema["/v1/responses"]["POST"].as_strategy(generation_mode=GenerationMode(mode))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    session = requests.Session()

    @settings(max_examples=40, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        case.validate_response(case.call(session=session, timeout=10), checks=checks)

    try:
        check()
    finally:
        session.close()


# -- /v1/responses, not streamed ----------------------------------------------------------


def test_responses_create_without_streaming(client: openai.OpenAI) -> None:
    response = client.responses.create(model="mock", input="hi there", instructions="Be brief.",
                                       temperature=0.5, metadata={"k": "v"})
    type(response).model_validate(response.to_dict())
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "Mock answer to: hi there"
    assert response.instructions == "Be brief." and response.temperature == 0.5
    assert response.metadata == {"k": "v"} and response.store is False
    assert response.usage is not None and response.usage.output_tokens == 5


def test_responses_create_function_calls_and_length(client: openai.OpenAI) -> None:
    response = client.responses.create(model="tool", input="weather?", tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "name": "get_weather"})
    type(response).model_validate(response.to_dict())
    assert [(o.type, getattr(o, "call_id", None)) for o in response.output] == [
        ("function_call", "call_1"), ("function_call", "call_2")]
    assert response.tool_choice.type == "function"  # type: ignore[union-attr]
    assert response.tools[0].name == "get_weather"  # type: ignore[union-attr]
    cut = client.responses.create(model="cut", input="hi")
    assert cut.status == "incomplete" and cut.output_text == "ab"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


# -- the Responses request, mapped to the core ------------------------------------------


def test_responses_conversation_items_become_core_messages(
        client: openai.OpenAI, recorder: ScriptedProvider) -> None:
    first = client.responses.create(model="tool", input="weather?", tools=[WEATHER_TOOL])
    client.responses.create(
        model="recorder", instructions="Be brief.",
        input=[{"role": "developer", "content": "Use Celsius."},
               {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
               *[item.to_dict() for item in first.output],  # the calls, sent back as they came
               {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
               {"type": "function_call_output", "call_id": "call_2", "output": "25C"}],
        tools=[WEATHER_TOOL], tool_choice="required", max_output_tokens=50, top_p=0.5)
    request = recorder.requests[-1]
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."), ("system", "Use Celsius."), ("user", "weather?"),
        ("assistant", ""), ("tool", "21C"), ("tool", "25C")]
    assert [c["id"] for c in request.messages[3].tool_calls or ()] == ["call_1", "call_2"]
    assert request.messages[3].tool_calls[0]["function"] == {  # type: ignore[index]
        "name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert [m.tool_call_id for m in request.messages[4:]] == ["call_1", "call_2"]
    assert request.tools == (ToolSpec(name="get_weather", description="Weather in a city",
                                      parameters=WEATHER_TOOL["parameters"]),)
    assert request.tool_choice == "required"
    assert (request.max_tokens, request.top_p) == (50, 0.5)


def test_responses_assistant_text_and_a_call_make_one_message(
        client: openai.OpenAI, recorder: ScriptedProvider) -> None:
    client.responses.create(model="recorder", input=[
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "done"}]}],
        text={"format": {"type": "json_object"}})
    request = recorder.requests[-1]
    assert [(m.role, m.content, bool(m.tool_calls)) for m in request.messages] == [
        ("user", "hi", False), ("assistant", "Let me look.", True), ("tool", "done", False)]
    assert request.response_format is not None
    assert request.response_format.schema_ == {"type": "object"}


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input", "input_image"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools", "function tools only"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not among the tools"),
    ({"background": True, "store": False}, "store", "requires store=true"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "Unrecognized request argument"),
    ({"input": []}, "input", "at least 1"),
])
def test_responses_bad_requests_are_400_naming_the_field(
        live: LiveGateway, body: dict[str, Any], param: str, fragment: str) -> None:
    response = httpx.post(live.url + "/v1/responses",
                          json={"model": "mock", "input": "hi", **body}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].split(".")[0] == param and fragment in error["message"]


def test_responses_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi")


# -- /v1/chat/completions: structured output and tools ----------------------------------


def test_chat_stream_structured_output_is_parsed(client: openai.OpenAI,
                                                 live: LiveGateway) -> None:
    with client.chat.completions.stream(model="json", messages=PROMPT,
                                        response_format=Weather) as stream:
        partials = [e.parsed for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == WEATHER
    assert partials[-1] == WEATHER.model_dump() and len(partials) > 3
    provider = live.gateway.models["json"][0]
    assert isinstance(provider, ScriptedProvider)
    fmt = provider.requests[-1].response_format
    assert fmt is not None and (fmt.name, fmt.strict) == ("Weather", True)
    assert fmt.schema_["additionalProperties"] is False


def test_chat_response_format_variants_map_to_the_core(
        client: openai.OpenAI, recorder: ScriptedProvider) -> None:
    client.chat.completions.create(model="recorder", messages=PROMPT,
                                   response_format={"type": "json_object"})
    client.chat.completions.create(model="recorder", messages=PROMPT,
                                   response_format={"type": "text"})
    client.chat.completions.create(model="recorder", messages=PROMPT, response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                               "description": "d"}})
    formats = [r.response_format for r in recorder.requests]
    assert formats[0] == ResponseFormat(name="json_object", schema={"type": "object"},
                                        strict=False)
    assert formats[1] is None
    assert formats[2] == ResponseFormat(name="w", schema={"type": "object"}, strict=False)


def test_chat_stream_tool_calls(client: openai.OpenAI, live: LiveGateway) -> None:
    with client.chat.completions.stream(model="tool", messages=PROMPT,
                                        tools=[openai.pydantic_function_tool(GetWeather)],
                                        tool_choice="required") as stream:
        events = list(stream)
        final = stream.get_final_completion()
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name, e.parsed_arguments) for e in done] == [
        (0, "GetWeather", GetWeather(city="Paris")), (1, "GetWeather", GetWeather(city="Tokyo"))]
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(deltas) == 8  # "" then three pieces, per call
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    # Each id and name once: the SDK concatenates every piece it gets for an index.
    assert [(c.id, c.function.name) for c in calls] == [  # type: ignore[union-attr]
        ("call_1", "GetWeather"), ("call_2", "GetWeather")]
    provider = live.gateway.models["tool"][0]
    assert isinstance(provider, ScriptedProvider)
    request = provider.requests[-1]
    assert request.tool_choice == "required" and request.tools is not None
    assert request.tools[0].name == "GetWeather"
    assert request.tools[0].description == "The current weather in a city."


def test_chat_tool_call_chunks_on_the_wire(live: LiveGateway) -> None:
    body = {"model": "tool", "messages": PROMPT, "stream": True,
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=10) as r:
        payloads = sse_payloads(r.read())
    assert payloads[-1] == "[DONE]"
    calls = [c for p in payloads[:-1] for c in
             (json.loads(p)["choices"][0]["delta"].get("tool_calls") or [])]
    firsts = [c for c in calls if "id" in c]
    assert [(c["index"], c["id"], c["type"], c["function"]["name"]) for c in firsts] == [
        (0, "call_1", "function", "get_weather"), (1, "call_2", "function", "get_weather")]
    assert all("name" not in c["function"] for c in calls if "id" not in c)
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_non_streaming_tool_calls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tool", messages=PROMPT, tools=[openai.pydantic_function_tool(GetWeather)])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in calls] == [("call_1", "GetWeather", {"city": "Paris"}),
                                ("call_2", "GetWeather", {"city": "Tokyo"})]


def test_chat_tool_results_sent_back_become_core_messages(
        client: openai.OpenAI, recorder: ScriptedProvider) -> None:
    tools = [openai.pydantic_function_tool(GetWeather)]
    with client.chat.completions.stream(model="tool", messages=PROMPT, tools=tools) as stream:
        message = stream.get_final_completion().choices[0].message
    client.chat.completions.create(model="recorder", tools=tools, messages=[
        *PROMPT, message,  # the SDK's own object, as the docs show it
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C"}])
    request = recorder.requests[-1]
    assert [(m.role, m.content, m.tool_call_id) for m in request.messages] == [
        ("user", "hi", None), ("assistant", "", None), ("tool", "21C", "call_1"),
        ("tool", "25C", "call_2")]
    assert request.messages[1].tool_calls == (
        {"id": "call_1", "type": "function",
         "function": {"name": "GetWeather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "GetWeather", "arguments": '{"city": "Tokyo"}'}})


@pytest.mark.parametrize(("body", "fragment"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}]},
     "only assistant"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
])
def test_chat_bad_tools_and_formats_are_400(live: LiveGateway, body: dict[str, Any],
                                            fragment: str) -> None:
    response = httpx.post(live.url + "/v1/chat/completions",
                          json={"model": "mock", "messages": PROMPT, **body}, timeout=10)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


# -- the scripted mock and the mock upstream, end to end -----------------------------------


def test_mock_structured_output_through_the_gateway(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="mock", messages=PROMPT,
                                        response_format=Weather) as stream:
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, Weather)
    with client.responses.stream(model="mock", input="hi", text_format=Weather) as rstream:
        assert isinstance(rstream.get_final_response().output_parsed, Weather)


def test_mock_parallel_tool_calls_interleaved_through_responses(client: openai.OpenAI) -> None:
    other = {**WEATHER_TOOL, "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}
    with client.responses.stream(model="mock:parallel_tools=true", input="weather and time?",
                                 tools=[WEATHER_TOOL, other]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    calls = [o for o in final.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [set(json.loads(c.arguments)) for c in calls] == [{"city"}, {"zone"}]
    deltas = [e.output_index for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas != sorted(deltas)  # interleaved, and still put together right
    answer = client.responses.create(model="mock", tools=[WEATHER_TOOL, other], input=[
        {"role": "user", "content": "weather and time?"}, *calls,  # as the docs show it
        *[{"type": "function_call_output", "call_id": c.call_id, "output": "ok"}
          for c in calls]])
    assert "get_weather returned ok" in answer.output_text


def test_mock_tool_calls_through_chat_completions(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="mock", messages=PROMPT,
                                        tools=[openai.pydantic_function_tool(GetWeather)]
                                        ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    call = (final.choices[0].message.tool_calls or [])[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)  # type: ignore[union-attr]


def test_upstream_structured_output_and_tools_through_the_gateway(
        client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="up", messages=PROMPT,
                                        response_format=Weather) as stream:
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, Weather)
    with client.responses.stream(model="up", input="weather?", tools=[WEATHER_TOOL]) as rs:
        calls = [o for o in rs.get_final_response().output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", sample_json(WEATHER_TOOL["parameters"]))]


# -- the mock upstream itself -------------------------------------------------------------


def test_mock_upstream_answers_schemas_and_tools(upstream: MockUpstream) -> None:
    with openai.OpenAI(base_url=upstream.url, api_key="x", max_retries=0, timeout=10) as sdk:
        with sdk.chat.completions.stream(model="m", messages=PROMPT,
                                         response_format=Weather) as stream:
            parsed = stream.get_final_completion().choices[0].message.parsed
        assert parsed == Weather.model_validate(sample_json(Weather.model_json_schema()))
        tools = [openai.pydantic_function_tool(GetWeather)]
        with sdk.chat.completions.stream(model="m", messages=PROMPT, tools=tools) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        call = (final.choices[0].message.tool_calls or [])[0]
        assert isinstance(call.function.parsed_arguments, GetWeather)  # type: ignore[union-attr]
        answer = sdk.chat.completions.create(model="m", tools=tools, messages=[
            *PROMPT, final.choices[0].message,
            {"role": "tool", "tool_call_id": call.id, "content": "21C"}])
        assert answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.content
        plain = sdk.chat.completions.create(model="m", messages=PROMPT, tools=tools,
                                            tool_choice="none")
        assert plain.choices[0].message.tool_calls is None


def test_sample_json_covers_refs_optionals_and_formats() -> None:
    class Inner(BaseModel):
        when: str
        tags: list[int]

    class Outer(BaseModel):
        inner: Inner
        maybe: Inner | None
        kind: str = "x"

    assert Outer.model_validate(sample_json(Outer.model_json_schema()))
    assert sample_json({"type": "string", "format": "date-time"}) == "2024-01-01T00:00:00Z"
    assert sample_json({"enum": ["a", "b"]}) == "a"
    assert sample_json({"type": ["null", "integer"], "minimum": 5}) == 6
