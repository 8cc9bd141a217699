"""The gateway for the person who runs it (issue 11): what ``serve`` prints, the access
line per request, ``GET /v1/models/{id}``, JSON 404/405 bodies, routed models' owners,
OpenAI parameters the gateway does not act on, and ``examples/gateway.toml``.

Clients are the official ``openai`` SDK wherever it has a call for the request.
"""

from __future__ import annotations

import logging
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _harness import LiveGateway, Processes, gateway_config, mock_routes, poll
from click.testing import CliRunner
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

from tokenrelay.cli.serve import serve
from tokenrelay.server.access import ACCESS_LOGGER, access_line
from tokenrelay.server.config import ServerConfig, load_config
from tokenrelay.testing.mock_upstream import MockUpstream

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gateway.toml"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
#: What clients send by default or commonly (openai-python's create() parameters the
#: gateway does not act on).
UNUSED = {"reasoning_effort": "low", "metadata": {"team": "a"}, "store": False,
          "user": "u-1", "service_tier": "auto", "verbosity": "low",
          "prompt_cache_key": "k", "safety_identifier": "s-1", "parallel_tool_calls": True,
          "frequency_penalty": 0.1, "presence_penalty": 0.1, "logit_bias": {"50256": -100},
          "prompt_cache_retention": "in_memory", "modalities": ["text"]}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, upstream: MockUpstream
         ) -> Iterator[LiveGateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    models = mock_routes(upstream.url, up="tokens=6")
    models.append({"name": "up-responses", "base_url": upstream.url,
                   "upstream_model": "tokens=3", "api": "responses"})
    models.append({"name": "org/model-7b", "base_url": upstream.url, "upstream_model": "tokens=2"})
    with LiveGateway(gateway_config(tmp, models)) as gateway:
        yield gateway


@pytest.fixture
def client(live: LiveGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                       timeout=10) as sdk:
        yield sdk


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The access lines, as ``serve`` turns them on (INFO on ``tokenrelay.access``)."""
    ACCESS_LOGGER.setLevel(logging.INFO)
    caplog.set_level(logging.INFO, logger="tokenrelay.access")
    try:
        yield caplog
    finally:
        ACCESS_LOGGER.setLevel(logging.NOTSET)


def access_lines(caplog: pytest.LogCaptureFixture, live: LiveGateway, count: int
                 ) -> list[str]:
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tokenrelay.access"]

    poll(lambda: len(lines()) >= count, 5)
    return lines()


# -- GET /v1/models/{id}, owners ---------------------------------------------------------


def test_models_retrieve_and_routed_owners(client: openai.OpenAI) -> None:
    mock = client.models.retrieve("mock")
    assert mock.id == "mock" and mock.object == "model"
    assert mock.owned_by == "tokenrelay (mock)"
    routed = client.models.retrieve("up")
    # A routed model shows its route (upstream host and model), not "openai".
    assert routed.owned_by != "openai"
    host = routed.owned_by.split()[0]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", host), routed.owned_by
    assert "tokens=6" in routed.owned_by
    assert (routed.model_extra or {}).get("route", {}).get("upstream_model") == "tokens=6"
    listed = {m.id: m.owned_by for m in client.models.list()}
    assert listed["up"] == routed.owned_by and listed["mock"] == mock.owned_by
    assert all(owner != "openai" for owner in listed.values()), listed
    # Names with a slash (Hugging Face style) too.
    assert client.models.retrieve("org/model-7b").id == "org/model-7b"
    # The scripted mock's names are served, so they can be retrieved too.
    assert client.models.retrieve("mock:tokens=3").id == "mock:tokens=3"

    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert "no-such-model" in caught.value.message
    assert caught.value.code == "model_not_found"


# -- OpenAI-style JSON bodies for every 404 and 405 ----------------------------------------


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/nothing", 404),
    ("POST", "/v1/nothing", 404),
    ("GET", "/favicon.ico", 404),
    ("GET", "/v1/chat/completions", 405),
    ("PUT", "/v1/chat/completions", 405),
    ("DELETE", "/v1/models", 405),
    ("POST", "/v1/models/mock", 405),
    ("GET", "/chat", 405),
])
def test_every_404_and_405_is_an_openai_error_body(live: LiveGateway, method: str, path: str,
                                                   status: int) -> None:
    # (A POST carries a JSON body: without one the gateway answers 415 first.)
    response = httpx.request(method, live.url + path, timeout=5,
                             json={} if method == "POST" else None)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert path in error["message"] and method in error["message"]
    if status == 405:
        assert response.headers["allow"]
        assert response.headers["allow"].split(",")[0].strip() in error["message"]


def test_sdk_reads_the_404_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/nothing/here", cast_to=object)
    assert "/v1/nothing/here" in caught.value.message


# -- OpenAI parameters the gateway does not act on ------------------------------------------


def test_unused_openai_parameters_are_passed_to_openai_compatible_upstreams(
        client: openai.OpenAI, upstream: MockUpstream, live: LiveGateway) -> None:
    upstream.reset()
    completion = client.chat.completions.create(model="up", messages=PROMPT, **UNUSED)
    assert completion.choices[0].message.content
    sent = upstream.chat_requests()[-1].body
    for name, value in UNUSED.items():
        assert sent.get(name) == value, (name, sent)

    # A Responses upstream gets the Responses parameters (the mock upstream speaks
    # Chat Completions only: what the gateway would send is checked here).
    gateway = live.gateway
    params = {"reasoning": {"effort": "low"}, "store": False, "prompt_cache_key": "k"}
    assert gateway.router.unused_parameters("up-responses", params, api="responses") == params


def test_unused_openai_parameters_are_ignored_with_one_warning_line(
        client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tokenrelay.server")
    for _ in range(3):
        stream = client.chat.completions.create(model="mock", messages=PROMPT, stream=True,
                                                **UNUSED)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == \
            "Mock answer to: hi"
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "tokenrelay.server" and "ignoring OpenAI" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one line, not one per request
    for name in UNUSED:
        assert name in warnings[0]
    answer = client.responses.create(model="mock", input="hi", reasoning={"effort": "low"})
    assert answer.output_text == "Mock answer to: hi"


def test_unknown_fields_are_still_a_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="mock", messages=PROMPT,
                                       extra_body={"frobnicate": 1})
    assert caught.value.param == "frobnicate"  # type: ignore[attr-defined]
    assert "frobnicate" in caught.value.message and "Unrecognized" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="mock", input="hi", extra_body={"frobnicate": 1})
    assert "frobnicate" in caught.value.message


@pytest.mark.parametrize("params", [{"logprobs": True}, {"top_logprobs": 3},
                                    {"modalities": ["text", "audio"]},
                                    {"audio": {"voice": "alloy", "format": "wav"}}])
def test_what_the_gateway_cannot_deliver_is_refused_by_name(client: openai.OpenAI,
                                                            params: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="mock", messages=PROMPT, **params)
    assert next(iter(params)) in caught.value.message
    # What SDKs send by default passes.
    client.chat.completions.create(model="mock", messages=PROMPT, logprobs=False)


# -- the access line ---------------------------------------------------------------------


def test_access_line_format() -> None:
    scope = {"method": "POST", "path": "/v1/chat/completions", "client": ("127.0.0.1", 5)}
    line = access_line(scope, 200, duration=1.2345, model="mock", outcome="ok", ttft=0.0123,
                       prompt_tokens=3, completion_tokens=5)
    assert line == ('127.0.0.1 "POST /v1/chat/completions" 200 model=mock ttft=0.012s'
                    " prompt_tokens=3 completion_tokens=5 time=1.234s")
    assert access_line({"method": "GET", "path": "/"}, 404, duration=0) == \
        '- "GET /" 404 time=0.000s'
    assert "outcome=cancelled" in access_line(scope, 200, duration=0, outcome="cancelled")
    assert " model=m key=alice " in access_line(scope, 200, duration=0, model="m", key="alice")


def test_one_access_line_per_request(client: openai.OpenAI, live: LiveGateway,
                                     access: pytest.LogCaptureFixture) -> None:
    stream = client.chat.completions.create(model="mock", messages=PROMPT, stream=True)
    assert list(stream)
    client.chat.completions.create(model="up", messages=PROMPT)
    client.models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mock", messages=PROMPT, temperature=5)
    httpx.get(live.url + "/v1/nothing", timeout=5)
    lines = access_lines(access, live, 5)
    assert len(lines) == 5, lines
    streamed, routed, models, rejected, missing = lines
    assert re.fullmatch(r'127\.0\.0\.1 "POST /v1/chat/completions" 200 model=mock'
                        r" ttft=\d+\.\d{3}s prompt_tokens=\d+ completion_tokens=4"
                        r" time=\d+\.\d{3}s", streamed), streamed
    assert "model=up " in routed and "completion_tokens=6" in routed
    assert models.startswith('127.0.0.1 "GET /v1/models" 200 time=')
    assert rejected.startswith('127.0.0.1 "POST /v1/chat/completions" 400 ')
    assert missing.startswith('127.0.0.1 "GET /v1/nothing" 404 ')


def test_a_client_that_leaves_is_logged_as_cancelled(live: LiveGateway,
                                                     access: pytest.LogCaptureFixture) -> None:
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=5, json={
            "model": "mock:tokens=500,tps=50", "messages": PROMPT,
            "stream": True}) as response:
        next(response.iter_lines())
    lines = access_lines(access, live, 1)
    assert "outcome=cancelled" in lines[-1] and "model=mock" in lines[-1]


# -- what `serve` prints -----------------------------------------------------------------


def _serve(processes: Processes, tmp_path: Path, *args: str, requests: int = 1
           ) -> tuple[str, str]:
    """``tokenrelay serve`` (mock only) as users run it, ``requests`` requests, then
    stopped: (its URL, what it printed)."""
    config = {"serve_local": False, "log": {"path": str(tmp_path / "req.db")}}
    serve = processes.serve(config, *args)
    with openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(requests):
            sdk.chat.completions.create(model="mock", messages=PROMPT,
                                        reasoning_effort="low")
    if "--quiet" not in args:
        poll(lambda: serve.output().count("POST /v1/chat/completions") >= requests, 10)
    processes.stop(serve)
    return serve.url, serve.output()


def test_serve_banner_and_access_lines(processes: Processes, tmp_path: Path) -> None:
    url, err = _serve(processes, tmp_path)
    assert re.search(rf"chat page: +{re.escape(url)}/\n", err), err
    assert re.search(r"models: +mock \(scripted\)\n", err), err
    assert f"request log: {tmp_path / 'req.db'}" in err
    line = next(line for line in err.splitlines() if "POST /v1/chat/completions" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 127\.0\.0\.1 \"POST /v1/chat/completions\""
                    r" 200 model=mock ttft=\S+ prompt_tokens=\d+ completion_tokens=4 ", line)
    assert "Traceback" not in err


def test_serve_warns_once_about_parameters_it_ignores(processes: Processes,
                                                      tmp_path: Path) -> None:
    _, err = _serve(processes, tmp_path, "--quiet", requests=3)
    warnings = [line for line in err.splitlines() if "ignoring OpenAI parameter" in line]
    assert len(warnings) == 1 and "reasoning_effort" in warnings[0], err


def test_serve_quiet_prints_no_access_lines(processes: Processes, tmp_path: Path) -> None:
    _, err = _serve(processes, tmp_path, "--quiet", requests=2)
    assert "chat page:" in err
    assert "POST /v1/chat/completions" not in err, err


# -- examples/gateway.toml ---------------------------------------------------------------


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model of a config table (``log: LogConfig``, ``models: list[ModelRoute]``)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def test_example_config_loads_and_shows_every_setting_with_a_comment() -> None:
    loaded = load_config(EXAMPLE)
    assert loaded.models[0].name == "qwen" and loaded.keys[0].id == "alice"
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    # Every setting is in the file (set, or commented out where setting it would change
    # the default's meaning), and every line that sets one carries a comment.
    written = set(re.findall(r"^#? ?([a-z0-9_]+) = ", text, re.MULTILINE))
    sections = set(re.findall(r"^#? ?\[\[?([a-z_]+)\]\]?", text, re.MULTILINE))
    top = set()
    for name, field in ServerConfig.model_fields.items():
        kind = _section(field.annotation)
        if kind is None:
            top.add(name)
            continue
        assert name in sections, f"[{name}] is missing"
        missing = set(kind.model_fields) - written
        assert not missing, (name, missing)
    assert top <= written, top - written
    for line in text.splitlines():
        if re.match(r"^[a-z0-9_]+ = ", line):
            assert "#" in line.split("=", 1)[1] or line.startswith("sha256"), line
    # The values written are the defaults wherever the comment says "default".
    defaults = ServerConfig()
    for key in ("host", "port", "heartbeat", "send_timeout", "header_timeout",
                "body_timeout", "keep_alive_timeout", "max_body_bytes", "cors_credentials",
                "metrics_public", "access_log", "serve_local", "allowed_hosts",
                "drain_timeout_s", "workers"):
        assert data[key] == getattr(defaults, key), key
    for section in ("log", "redis", "streams"):  # the tables of one each: their defaults too
        for key, value in data[section].items():
            assert value == getattr(getattr(defaults, section), key), (section, key)


def test_example_config_is_linked_from_serve_help_and_the_readme() -> None:
    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0
    assert "examples/gateway.toml" in result.output
    assert "examples/gateway.toml" in (ROOT / "README.md").read_text()


def test_examples_api_key_grants_nothing() -> None:
    # Copying the example as it is must not open the gateway to a well-known key.
    import hashlib

    sha = load_config(EXAMPLE).keys[0].sha256
    for guess in ("", "secret", "password", "changeme", "alice", "key", "sk-..."):
        assert hashlib.sha256(guess.encode()).hexdigest() != sha


def test_access_log_setting_is_off_with_quiet() -> None:
    from tokenrelay.cli.serve import server_config

    assert server_config(None).access_log is True
    assert server_config(None, quiet=True).access_log is False
    assert ServerConfig.model_validate({"access_log": False}).access_log is False


def test_a_console_that_stops_reading_does_not_stall_the_gateway(tmp_path: Path) -> None:
    # stderr is a pipe nobody reads once the banner is out: ~500 access lines fill its
    # 64 KiB; a write() on the event loop would then block every request for good.
    import subprocess

    from _harness import tokenrelay_argv

    cfg = tmp_path / "gw.toml"
    cfg.write_text("serve_local = false\n[log]\nenabled = false\n")
    proc = subprocess.Popen(tokenrelay_argv("serve", "--port", "0", "--config", str(cfg)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        banner = ""
        while "access log:" not in banner:
            line = proc.stderr.readline()
            assert line, banner
            banner += line
        url = re.search(r"serving on (\S+)", banner).group(1)  # type: ignore[union-attr]
        body = {"model": "mock:tokens=1", "messages": PROMPT}
        with httpx.Client(base_url=url, timeout=5) as http:
            for _ in range(1200):  # nothing reads stderr any more
                assert http.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


# (background: true is served: tests/test_gateway_background.py)
@pytest.mark.parametrize("params", [{"conversation": "conv_1"}, {"prompt": {"id": "pmpt_1"}},
                                    {"top_logprobs": 2},
                                    {"background_options": {"max_runtime": 60}}])
def test_responses_parameters_it_cannot_deliver_are_refused_by_name(
        client: openai.OpenAI, params: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="mock", input="hi", **params)
    name = next(iter(params))
    assert name in caught.value.message and "Unrecognized" not in caught.value.message


def test_access_line_names_the_key_id_never_the_key(tmp_path: Path,
                                                    access: pytest.LogCaptureFixture) -> None:
    from tokenrelay.server.config import hash_key

    raw = "operator-test-key-0123456789"
    with LiveGateway(gateway_config(tmp_path, [], keys=[{"id": "alice", "sha256": hash_key(raw)}])
                     ) as live, openai.OpenAI(base_url=live.url + "/v1", api_key=raw,
                                              max_retries=0) as sdk:
        sdk.chat.completions.create(model="mock", messages=PROMPT)
        line = access_lines(access, live, 1)[-1]
    assert " model=mock key=alice " in line and raw not in line


def test_refusals_before_an_endpoint_get_their_access_line(
        live: LiveGateway, access: pytest.LogCaptureFixture) -> None:
    url = live.url + "/v1/chat/completions"
    httpx.post(url, content=b"{}", headers={"content-type": "text/plain"}, timeout=5)  # 415
    too_big = b'{"x": "' + b"a" * live.gateway.config.max_body_bytes + b'"}'
    httpx.post(url, content=too_big, headers={"content-type": "application/json"},
               timeout=5)  # 413 on the direct path
    lines = access_lines(access, live, 2)
    assert [line.split('"')[2].split()[0] for line in lines] == ["415", "413"], lines
    assert all('"POST /v1/chat/completions"' in line for line in lines)
