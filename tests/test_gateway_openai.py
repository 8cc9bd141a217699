"""The official ``openai`` SDK, unchanged, against a live gateway.

Every test runs against the embedded scripted ``mock`` model and against a route to the
mock upstream (``tokenrelay.testing.mock_upstream``), so both ends of the gateway are covered:
the in-process provider and the OpenAI-compatible provider over a real socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from _harness import LiveGateway, gateway_config, mock_routes
from openai.types.chat import ChatCompletionMessageParam

from tokenrelay.testing.mock_upstream import MockUpstream, token_text

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Target:
    """A model served by the gateway, and the models that script its failures."""

    model: str
    text: str
    completion_tokens: int
    error_after_two: str
    rate_limited: str


MOCK = Target("mock", "Mock answer to: hi", 4, "mock:fault=error,after=2",
              "mock:fault=429,retry_after=3600")
UPSTREAM = Target("up", token_text(6), 6, "up-error", "up-429")
TARGETS = pytest.mark.parametrize("target", [MOCK, UPSTREAM], ids=["mock", "upstream"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    tmp: Path = tmp_path_factory.mktemp("gateway")
    with MockUpstream() as upstream:
        models = mock_routes(upstream.url, up="tokens=6",
                             up_error="fault=error,after=2,tokens=6",
                             up_429="fault=429,retry_after=3600")
        with LiveGateway(gateway_config(tmp, models)) as gateway:
            yield gateway


@pytest.fixture
def client(live: LiveGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                       timeout=10) as sdk:
        yield sdk


@pytest.fixture
async def aclient(live: LiveGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                              timeout=10)


@TARGETS
def test_streaming_text(client: openai.OpenAI, target: Target) -> None:
    stream = client.chat.completions.create(model=target.model, messages=PROMPT, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == target.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.model == target.model and c.id == chunks[0].id for c in chunks)


@TARGETS
async def test_async_streaming_with_a_final_usage_chunk(aclient: openai.AsyncOpenAI,
                                                        target: Target) -> None:
    async with aclient:
        stream = await aclient.chat.completions.create(
            model=target.model, messages=PROMPT, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    *text_chunks, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == target.text
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == target.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + target.completion_tokens
    assert all(c.usage is None for c in text_chunks)


@TARGETS
def test_non_streaming_completion_with_usage(client: openai.OpenAI, target: Target) -> None:
    completion = client.chat.completions.create(model=target.model, messages=PROMPT)
    assert completion.object == "chat.completion" and completion.model == target.model
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", target.text)
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == target.completion_tokens


async def test_async_non_streaming(aclient: openai.AsyncOpenAI) -> None:
    async with aclient:
        completion = await aclient.chat.completions.create(model="up", messages=PROMPT,
                                                           max_tokens=2)
    assert completion.choices[0].message.content == token_text(2)
    assert completion.choices[0].finish_reason == "length"


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert {"mock", "up", "up-error", "up-429"} <= set(ids)


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert info.value.status_code == 404 and "no-such-model" in info.value.message


@TARGETS
def test_bad_temperature_is_a_bad_request_naming_the_field(client: openai.OpenAI,
                                                           target: Target) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=target.model, messages=PROMPT, temperature=5,
                                       stream=True)
    assert "temperature" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "temperature"


@TARGETS
def test_rate_limit_past_the_retry_cap_is_a_rate_limit_error(client: openai.OpenAI,
                                                             target: Target) -> None:
    for stream in (True, False):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=target.rate_limited, messages=PROMPT,
                                           stream=stream)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "3600"


@TARGETS
def test_mid_stream_error_raises_api_error_after_the_first_text(client: openai.OpenAI,
                                                                target: Target) -> None:
    received: list[str] = []
    stream = client.chat.completions.create(model=target.error_after_two, messages=PROMPT,
                                            stream=True)
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == target.text[:len("".join(received))] and len(received) == 2
    assert not isinstance(info.value, openai.APIStatusError)  # the status was a 200
    assert info.value.message


@TARGETS
async def test_async_mid_stream_error(aclient: openai.AsyncOpenAI, target: Target) -> None:
    received = []
    async with aclient:
        stream = await aclient.chat.completions.create(model=target.error_after_two,
                                                       messages=PROMPT, stream=True)
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 2
