"""The gateway's security properties, each against a live uvicorn gateway on loopback.

API keys (hashed, constant-time, every header form), loopback-only without keys, per-key
limits (concurrency, requests/min, tokens/min atomically, max_tokens clamp), the body cap,
parameter validation, CORS, secrets kept out of every output, and connection timeouts
(slowloris, idle keep-alive). Every network wait has a timeout, so nothing can hang.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import LiveGateway, Processes, closed_port, sse_payloads
from pydantic import ValidationError

from tokenrelay.cli.serve import server_config
from tokenrelay.errors import ConfigurationError, UsageError
from tokenrelay.server.config import KeyConfig, LogConfig, ServerConfig, hash_key, load_config
from tokenrelay.server.security import ANONYMOUS, Authenticator, GatewayHTTPError

TIMEOUT = httpx.Timeout(10.0)
HI = [{"role": "user", "content": "hi"}]
#: A stream of ~10 s: long enough to be "in progress" for the whole of a test.
SLOW = "mock:tokens=50,tps=5"

RAW = {
    "plain": "gw-plain-0123456789abcdef",
    "conc": "gw-conc-0123456789abcdef",
    "rpm": "gw-rpm-0123456789abcdef",
    "tpm": "gw-tpm-0123456789abcdef",
    "clamp": "gw-clamp-0123456789abcdef",
}
ALLOWED_ORIGIN = "https://app.example.com"
MAX_BODY = 4096
JSON = {"content-type": "application/json"}


def bearer(key_id: str) -> dict[str, str]:
    return {"authorization": f"Bearer {RAW[key_id]}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    limits: dict[str, dict[str, int]] = {
        "conc": {"max_concurrent": 2}, "rpm": {"requests_per_minute": 3},
        "tpm": {"tokens_per_minute": 110}, "clamp": {"max_tokens": 3},
    }
    keys = [KeyConfig(id=k, sha256=hash_key(raw), **limits.get(k, {}))
            for k, raw in RAW.items()]
    config = ServerConfig(
        serve_local=False, keys=keys, max_body_bytes=MAX_BODY, cors_origins=[ALLOWED_ORIGIN],
        log=LogConfig(path=str(tmp_path_factory.mktemp("security") / "requests.db")))
    with LiveGateway(config) as live:
        yield live


@pytest.fixture
def client(gw: LiveGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, *,
                        code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# -- API keys: the Authenticator --------------------------------------------------------


def _auth(*raw_keys: str) -> Authenticator:
    return Authenticator([KeyConfig(id=f"k{i}", sha256=hash_key(raw))
                          for i, raw in enumerate(raw_keys)])


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer s3cret-key"},
    {"authorization": "bearer   s3cret-key "},
    {"api-key": "s3cret-key"},
    {"x-api-key": "s3cret-key"},
], ids=["bearer", "bearer-lowercase-spaces", "api-key", "x-api-key"])
def test_every_header_form_is_checked_the_same_way(headers: dict[str, str]) -> None:
    assert _auth("other-key", "s3cret-key").check(headers).id == "k1"


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Basic czNjcmV0LWtleQ=="},
    {"authorization": "Bearer"},
    {"authorization": "Bearer "},
    {"authorization": "s3cret-key"},
    {"authorization": "Token s3cret-key", "x-api-key": "s3cret-key"},  # never falls through
    {"authorization": "Bearer wrong-key"},
    {"api-key": ""},
    {"x-api-key": "S3CRET-KEY"},
], ids=["missing", "basic", "bearer-empty", "bearer-space", "no-scheme",
        "malformed-plus-valid", "wrong", "empty-api-key", "case-changed"])
def test_missing_malformed_or_wrong_keys_are_401(headers: dict[str, str]) -> None:
    with pytest.raises(GatewayHTTPError) as info:
        _auth("s3cret-key").check(headers)
    assert info.value.status == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.headers == {"www-authenticate": "Bearer"}


def test_keys_are_held_hashed_and_compared_in_constant_time_against_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    auth = _auth("first-raw-key", "second-raw-key", "third-raw-key")
    held = repr(auth.keys) + repr(auth._digests) + repr(vars(auth))
    for raw in ("first-raw-key", "second-raw-key", "third-raw-key"):
        assert raw not in held
        assert raw.encode().hex() not in held
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("tokenrelay.server.security.hmac.compare_digest", spy)
    assert auth.check({"x-api-key": "first-raw-key"}).id == "k0"
    # Every key is compared, the match included: no early exit that times could reveal.
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never raw keys


def test_without_keys_everyone_is_anonymous() -> None:
    assert Authenticator([]).check({}) is ANONYMOUS
    assert Authenticator([]).check({"authorization": "garbage"}) is ANONYMOUS


def test_the_serve_config_holds_only_the_hash(tmp_path: Path) -> None:
    from tokenrelay.server.app import create_app

    raw = "gw-raw-key-never-kept-0123456789"
    config = server_config(api_keys=(raw, "another-raw-key-0123456789"), log_enabled=False)
    assert [k.id for k in config.keys] == ["key1", "key2"]
    assert config.keys[0].sha256 == hash_key(raw)
    app = create_app(config.model_copy(update={"serve_local": False}))
    for text in (repr(config), config.model_dump_json(), repr(app.state.gateway.auth.keys),
                 repr(vars(app.state.gateway))):
        assert raw not in text
    # Ids from a config file are kept; the command line's keys get the next free ones.
    toml = tmp_path / "gw.toml"
    toml.write_text(f'[[keys]]\nid = "key1"\nsha256 = "{hash_key("file-key")}"\n')
    config = server_config(str(toml), api_keys=(raw,))
    assert [k.id for k in config.keys] == ["key1", "key2"]


def test_hash_key_command_prints_the_stored_form() -> None:
    from click.testing import CliRunner

    from tokenrelay.cli import cli

    done = CliRunner().invoke(cli, ["hash-key", "gw-secret-for-config"])
    assert done.exit_code == 0
    assert done.stdout.strip() == hash_key("gw-secret-for-config")
    done = CliRunner().invoke(cli, ["hash-key", "-"], input="from-stdin-key\n")
    assert done.stdout.strip() == hash_key("from-stdin-key")


def test_route_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenrelay.server.app import Gateway

    monkeypatch.setenv("TOKENRELAY_QWEN_2_API_KEY", "sk-route-key")
    config = server_config(routes=("qwen-2=http://127.0.0.1:9/v1",), log_enabled=False)
    (route,) = config.models
    assert (route.name, route.base_url, route.api_key, route.api_key_env) == (
        "qwen-2", "http://127.0.0.1:9/v1", None, "TOKENRELAY_QWEN_2_API_KEY")
    provider, _ = Gateway(config.model_copy(update={"serve_local": False})).models["qwen-2"]
    assert provider.api_key == "sk-route-key"  # type: ignore[attr-defined]
    assert "sk-route-key" not in repr(provider)
    with pytest.raises(UsageError, match="NAME=BASE_URL"):
        server_config(routes=("qwen=file:///etc/passwd",))


# -- API keys: live ----------------------------------------------------------------------


@pytest.mark.parametrize("header", ["authorization", "api-key", "x-api-key"])
def test_live_key_accepted_in_every_header(client: httpx.Client, header: str) -> None:
    value = f"Bearer {RAW['plain']}" if header == "authorization" else RAW["plain"]
    r = client.post("/v1/chat/completions", headers={header: value},
                    json={"model": "mock", "messages": HI})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Mock answer to: hi"


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer not-a-configured-key"},
    {"x-api-key": "not-a-configured-key"},
    {"authorization": f"Basic {RAW['plain']}"},
    {"authorization": "Bearer"},
], ids=["missing", "wrong-bearer", "wrong-x-api-key", "basic", "bearer-no-token"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat", "/v1/models"])
def test_live_bad_keys_get_an_openai_401(client: httpx.Client, headers: dict[str, str],
                                         path: str) -> None:
    if path == "/v1/models":
        r = client.get(path, headers=headers)
    else:
        r = client.post(path, headers=headers,
                        json={"model": "mock", "messages": HI, "prompt": "hi"})
    error = assert_openai_error(r, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


# -- /metrics -----------------------------------------------------------------------------


def test_metrics_need_a_key_when_keys_are_configured(client: httpx.Client) -> None:
    assert_openai_error(client.get("/metrics"), 401)
    assert_openai_error(client.get("/metrics", headers={"authorization": "Bearer nope"}), 401)
    r = client.get("/metrics", headers=bearer("plain"))
    assert r.status_code == 200 and "tokenrelay_active_streams" in r.text


def test_metrics_public_opens_them_to_a_scraper_without_a_key(tmp_path: Path) -> None:
    config = ServerConfig(serve_local=False, metrics_public=True,
                          keys=[KeyConfig(id="k", sha256=hash_key(RAW["plain"]))],
                          log=LogConfig(enabled=False))
    with LiveGateway(config) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        assert c.get("/metrics").status_code == 200
        assert_openai_error(c.get("/v1/models"), 401)  # the rest still needs the key


# -- no keys: loopback only --------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    ServerConfig(host=host).check_exposure()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_exposed_without_keys_is_refused(host: str) -> None:
    with pytest.raises(ConfigurationError, match="without API keys"):
        ServerConfig(host=host).check_exposure()
    keyed = ServerConfig(host=host, keys=[KeyConfig(id="a", sha256=hash_key("k" * 20))])
    keyed.check_exposure()


def _tokenrelay_argv(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("tokenrelay")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "tokenrelay.cli"]
    return [*base, *args]


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TOKENRELAY_API_KEYS", None)
    return env


def test_serve_refuses_0_0_0_0_without_keys() -> None:
    done = subprocess.run(_tokenrelay_argv("serve", "--host", "0.0.0.0", "--port", "0"),
                          capture_output=True, text=True, timeout=30, env=_cli_env(),
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: refusing to listen on 0.0.0.0 without API keys")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_serve_end_to_end_never_prints_the_raw_key(processes: Processes) -> None:
    raw = "gw-cli-secret-0123456789abcdef"
    serve = processes.serve(None, "--api-key", raw, "--no-log")
    with httpx.Client(base_url=serve.url, timeout=TIMEOUT) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"authorization": f"Bearer {raw}"})
        assert r.status_code == 200
        assert "mock" in [m["id"] for m in r.json()["data"]]
    assert processes.stop(serve) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    output = serve.output()
    assert "serving on" in output
    assert raw not in output
    assert "Traceback" not in output


# -- per-key limits ----------------------------------------------------------------------


def test_concurrent_streams_limit(gw: LiveGateway) -> None:
    body = {"model": SLOW, "messages": HI, "stream": True}
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as c:
        streams = [c.stream("POST", "/v1/chat/completions", json=body, headers=bearer("conc"))
                   for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        # Keep the iterators: dropping one closes its connection (a disconnect).
        readers = [r.iter_raw() for r in responses]
        try:
            for r, reader in zip(responses, readers, strict=True):
                assert r.status_code == 200
                next(reader)  # the stream has started: its slot is held
            assert gw.gateway.limiter.active("conc") == 2
            refused = c.post("/v1/chat/completions", json=body, headers=bearer("conc"))
            assert_openai_error(refused, 429, code="concurrency_limit")
            assert int(refused.headers["retry-after"]) >= 1
            # Another key is not affected.
            assert c.post("/v1/chat/completions", headers=bearer("plain"),
                          json={"model": "mock", "messages": HI}).status_code == 200
            readers.pop(0).close()
            streams.pop(0).__exit__(None, None, None)  # the client goes away
            deadline = time.monotonic() + 5
            while True:
                r = c.post("/v1/chat/completions", headers=bearer("conc"),
                           json={"model": "mock", "messages": HI})
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert r.status_code == 200, "the closed stream's slot was never released"
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_requests_per_minute_limit(client: httpx.Client) -> None:
    body = {"model": "mock", "messages": HI}
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=body,
                           headers=bearer("rpm")).status_code == 200
    r = client.post("/v1/chat/completions", json=body, headers=bearer("rpm"))
    error = assert_openai_error(r, 429, code="rate_limit")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 61


async def test_tokens_per_minute_is_atomic_under_concurrency(gw: LiveGateway) -> None:
    # 20 requests at once, each reserving max_tokens=10 + 1 for the prompt ("hi" is
    # estimated at 1 token) against 110 tokens/min: exactly 10 fit. Each admitted one lasts 1 s, so none finishes (and reconciles) meanwhile.
    body = {"model": "mock:tokens=50,delay=1", "messages": HI, "max_tokens": 10}
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=gw.url, timeout=TIMEOUT, limits=limits) as c:
        responses = await asyncio.gather(*(
            c.post("/v1/chat/completions", json=body, headers=bearer("tpm"))
            for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 10
    for r in responses:
        if r.status_code == 429:
            assert_openai_error(r, 429, code="token_limit")
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_is_clamped_to_the_keys_limit(client: httpx.Client, stream: bool) -> None:
    body = {"model": "mock:tokens=50", "messages": HI, "max_tokens": 50, "stream": stream}
    r = client.post("/v1/chat/completions", json=body, headers=bearer("clamp"))
    assert r.status_code == 200, r.text
    if not stream:
        choice = r.json()["choices"][0]
        assert r.json()["usage"]["completion_tokens"] == 3
        assert choice["finish_reason"] == "length"
        assert len(choice["message"]["content"].split()) == 3
        return
    chunks = [json.loads(p) for p in sse_payloads(r.text) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([d for d in deltas if d]) == 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_clamp_applies_when_the_request_sets_none(client: httpx.Client) -> None:
    r = client.post("/chat", json={"model": "mock:tokens=50", "prompt": "hi"},
                    headers=bearer("clamp"))
    texts = [line for line in r.text.splitlines() if line == "event: text"]
    assert len(texts) == 3
    assert '"finish_reason":"length"' in r.text


# -- body cap ----------------------------------------------------------------------------


def _raw_request(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``request`` and read until the server closes or a response is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def test_content_length_over_the_cap_is_413_before_the_body_is_read(gw: LiveGateway) -> None:
    # Headers only: the 413 must come without the server waiting for 10 MB of body.
    started = time.monotonic()
    response = _raw_request(gw.port, (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 10000000\r\n\r\n"))
    assert time.monotonic() - started < 2
    assert response.startswith(b"HTTP/1.1 413 ")
    error = json.loads(response.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_too_large"


def test_chunked_body_over_the_cap_is_413(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "mock", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=body(), headers=JSON | bearer("plain"))
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, code="body_too_large")


def test_chunked_body_under_the_cap_is_served(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "mock", "messages": '
        yield b'[{"role": "user", "content": "hi"}]}'

    r = client.post("/v1/chat/completions", content=body(), headers=JSON | bearer("plain"))
    assert r.status_code == 200, r.text


# -- parameter validation ----------------------------------------------------------------


@pytest.mark.parametrize(("patch", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"n": 2}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"frobnicate": True}, "frobnicate"),
    ({"model": ""}, "model"),
    # Upstreams and their keys come from the config only, never from a request
    # (LiteLLM CVE-2024-6587).
    ({"base_url": "http://127.0.0.1:1/v1"}, "base_url"),
    ({"api_key": "sk-from-the-request"}, "api_key"),
])
def test_invalid_parameters_are_400_naming_the_field(client: httpx.Client,
                                                     patch: dict[str, Any], param: str) -> None:
    body = {"model": "mock", "messages": HI, **patch}
    r = client.post("/v1/chat/completions", json=body, headers=bearer("plain"))
    error = assert_openai_error(r, 400, param=param)
    assert param.split(".")[0] in error["message"]


def test_missing_field_and_bad_json_are_400(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"model": "mock"}, headers=bearer("plain"))
    assert_openai_error(r, 400, param="messages")
    r = client.post("/v1/chat/completions", content=b"{not json",
                    headers=JSON | bearer("plain"))
    assert_openai_error(r, 400, code="invalid_json")
    r = client.post("/chat", json={"prompt": "hi", "colour": "red"}, headers=bearer("plain"))
    assert_openai_error(r, 400, param="colour")


def test_scripted_mock_answers_are_bounded(client: httpx.Client) -> None:
    # The mock builds its answer in one go on the event loop; 10**7 tokens would freeze
    # the gateway for seconds for everyone.
    started = time.monotonic()
    r = client.post("/v1/chat/completions", headers=bearer("plain"),
                    json={"model": "mock:tokens=10000000", "messages": HI, "max_tokens": 1})
    assert_openai_error(r, 400, param="model")
    assert time.monotonic() - started < 1


# -- CORS --------------------------------------------------------------------------------


def test_cors_allowlist(client: httpx.Client) -> None:
    ok = client.get("/healthz", headers={"origin": ALLOWED_ORIGIN})
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = client.get("/healthz", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    ok = client.options("/v1/chat/completions", headers={"origin": ALLOWED_ORIGIN, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = client.options("/v1/chat/completions",
                             headers={"origin": "https://evil.example", **preflight})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


def test_cors_wildcard_with_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="credentials"):
        ServerConfig(cors_origins=["*"], cors_credentials=True)
    with pytest.raises(ConfigurationError, match="credentials"):
        load_config(cors_origins=["*"], cors_credentials=True)
    ServerConfig(cors_origins=["*"])  # without credentials it is allowed


# -- secrets never leak ------------------------------------------------------------------


@pytest.mark.parametrize("base_url", ["http://user:sk-in-url@10.0.0.5:8000/v1",
                                      "https://sk-in-url@api.example.com/v1",
                                      "file:///etc/passwd", "10.0.0.5:8000/v1"])
def test_routes_refuse_credentials_in_the_url_and_non_http_schemes(base_url: str) -> None:
    # Upstream URLs show in connection error messages; a key inside one would leak.
    with pytest.raises(ConfigurationError) as info:
        load_config(models=[{"name": "up", "base_url": base_url}])
    assert "sk-in-url" not in str(info.value)



def test_keys_and_upstream_secrets_never_appear_in_any_output(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gateway_key, upstream_key, wrong_key = "gw-secret", "sk-secret-upstream", "wrong-key-xyz"
    db = tmp_path / "requests.db"
    config = ServerConfig(
        serve_local=False, log=LogConfig(path=str(db)),
        keys=[KeyConfig(id="alice", sha256=hash_key(gateway_key))],
        models=[{"name": "upstream", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                 "api_key": upstream_key}])
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    good = {"authorization": f"Bearer {gateway_key}"}
    with LiveGateway(config) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            r = c.request(method, path, **kwargs)
            seen.append(f"{r.status_code} {dict(r.headers)} {r.text}")
            return r

        assert call("POST", "/v1/chat/completions", headers=good,
                    json={"model": "mock", "messages": HI}).status_code == 200
        for stream in (False, True):
            r = call("POST", "/v1/chat/completions", headers=good,
                     json={"model": "upstream", "messages": HI, "stream": stream})
            assert r.status_code == 502
        assert call("POST", "/chat", headers=good,
                    json={"model": "upstream", "prompt": "hi"}).status_code == 502
        for headers in ({"authorization": f"Bearer {wrong_key}"}, {"x-api-key": wrong_key},
                        {"authorization": f"Basic {gateway_key}"}):
            assert call("POST", "/v1/chat/completions", headers=headers,
                        json={"model": "upstream", "messages": HI}).status_code == 401
        assert call("GET", "/v1/models", headers=good).status_code == 200
        call("GET", "/healthz")
        call("GET", "/openapi.json")
        assert call("GET", "/metrics").status_code == 401  # keys configured: one needed
        metrics = call("GET", "/metrics", headers=good).text
        assert "tokenrelay_requests" in metrics
        reqlog = live.gateway.reqlog
        assert reqlog is not None
        deadline = time.monotonic() + 5
        while len(reqlog.rows()) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = reqlog.rows()
        assert len(rows) == 8  # 4 answered, 4 refused (3 POSTs and /metrics: 401)
        assert sum(row["status"] == "refused" for row in rows) == 4
        assert any(row["error"] for row in rows)
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    haystacks = {"responses": "\n".join(seen), "logs": caplog.text, "metrics": metrics,
                 "request log rows": repr(rows), "request log files": files.decode("latin-1"),
                 "config repr": repr(config)}
    for secret in (gateway_key, upstream_key, wrong_key):
        for where, text in haystacks.items():
            assert secret not in text, f"{secret!r} leaked into {where}"


# -- connection timeouts: slowloris, idle keep-alive -------------------------------------

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
SLACK = 1.5


def test_uvicorn_settings() -> None:
    from tokenrelay.server.run import HeaderTimeoutProtocol, uvicorn_config

    config = ServerConfig(serve_local=False, header_timeout=3, keep_alive_timeout=2,
                          log=LogConfig(enabled=False))
    uv = uvicorn_config(config, app=object())
    assert issubclass(uv.http, HeaderTimeoutProtocol)  # type: ignore[arg-type]
    assert uv.http.header_timeout == 3  # type: ignore[union-attr]
    assert uv.timeout_keep_alive == 2
    assert (uv.limit_concurrency, uv.backlog) == (2048, 2048)
    # X-Forwarded-For is not trusted; no access log (the request log is the one record).
    assert uv.proxy_headers is False and uv.access_log is False
    assert uv.loop == "uvloop"
    assert uv.ws == "none"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    config = ServerConfig(serve_local=False, header_timeout=HEADER_TIMEOUT,
                          body_timeout=BODY_TIMEOUT, keep_alive_timeout=KEEP_ALIVE,
                          log=LogConfig(enabled=False))
    with LiveGateway(config) as live:
        yield live


def _closed_after(sock: socket.socket, pieces: list[bytes], *, every: float,
                  limit: float) -> float:
    """Send ``pieces`` one every ``every`` seconds; seconds until the server closed."""
    started = time.monotonic()
    sock.settimeout(0.05)
    pending = list(pieces)
    next_send = started
    while time.monotonic() - started < limit:
        try:
            if pending and time.monotonic() >= next_send:
                sock.sendall(pending.pop(0))
                next_send += every
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        if data == b"":
            return time.monotonic() - started
        raise AssertionError(f"the server answered a partial request: {data!r}")
    raise AssertionError(f"still open after {limit} s")


def test_slowloris_headers_are_cut_off(strict: LiveGateway) -> None:
    pieces = [b"POST /v1/chat/completions HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n",
              b"Content-Type: application/json\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(40)]
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        elapsed = _closed_after(sock, pieces, every=0.2, limit=HEADER_TIMEOUT + SLACK)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + SLACK


def test_a_trickled_body_gets_408_and_the_connection_closes(strict: LiveGateway) -> None:
    # Headers at once, then the body a byte every 0.2 s: it would take 40 s in all.
    body = json.dumps({"model": "mock", "messages": HI}).encode().ljust(200)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sock.settimeout(0.05)
        received = b""
        sent = 0
        while time.monotonic() - started < BODY_TIMEOUT + SLACK:
            try:
                if sent < len(body):
                    sock.sendall(body[sent:sent + 1])
                    sent += 1
                data = sock.recv(4096)
            except TimeoutError:
                time.sleep(0.15)
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            if not data:
                break
            received += data
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b'"code":"body_timeout"' in received.replace(b" ", b"")
    assert BODY_TIMEOUT - 0.1 <= elapsed <= BODY_TIMEOUT + SLACK
    assert sent < len(body)


def test_a_connection_that_sends_nothing_is_closed(strict: LiveGateway) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        elapsed = _closed_after(sock, [], every=1, limit=HEADER_TIMEOUT + SLACK)
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + SLACK


def _get_healthz(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200 ")
    return body


def test_slow_second_request_on_a_kept_alive_connection_is_cut_off(strict: LiveGateway) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        _get_healthz(sock)
        # A byte every 0.3 s would keep resetting uvicorn's own keep-alive timer forever.
        pieces = [bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"]
        elapsed = _closed_after(sock, pieces, every=0.3, limit=HEADER_TIMEOUT + SLACK)
    assert elapsed <= HEADER_TIMEOUT + SLACK


def test_idle_keep_alive_connections_are_closed(strict: LiveGateway) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
        _get_healthz(sock)
        _get_healthz(sock)  # kept alive between requests
        elapsed = _closed_after(sock, [], every=1, limit=KEEP_ALIVE + SLACK)
    assert KEEP_ALIVE - 0.1 <= elapsed <= KEEP_ALIVE + SLACK


def test_streams_longer_than_the_header_timeout_are_not_cut(strict: LiveGateway) -> None:
    # Headers arrive at once; the answer then takes ~2.5 s, well past header_timeout.
    body = {"model": "mock:tokens=6,tps=2", "messages": HI, "stream": True}
    started = time.monotonic()
    with httpx.Client(base_url=strict.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert time.monotonic() - started > HEADER_TIMEOUT * 2
    assert r.status_code == 200
    assert r.text.rstrip().endswith("data: [DONE]")
