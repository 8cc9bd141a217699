"""The outside probe of issue 9, each point against a live gateway on loopback.

Tokens/min without ``max_tokens``; upstream redirects and invalid statuses; upstream
details kept from clients; the Host and Content-Type guard (DNS rebinding, cross-site
"simple" POSTs); the request line + header cap; the request log of refusals, of early
cancellations and its file modes. (Shutdown, kill -9 and slow readers, which need a
process of their own or the kernel's view, are in ``test_gateway_shutdown.py``.)
"""

from __future__ import annotations

import json
import logging
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import LiveGateway, poll, sse_payloads
from _raw_http import RawServer, open_stream, response

from tokenrelay import RetryPolicy
from tokenrelay.errors import APIStatusError
from tokenrelay.providers.openai_compat import OpenAIProvider
from tokenrelay.server.config import KeyConfig, LogConfig, ServerConfig, hash_key

HI = [{"role": "user", "content": "hi"}]
TIMEOUT = httpx.Timeout(10.0)
KEY = "gw-hardening-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
#: What an upstream error body says that no client may read.
SECRET_DETAIL = "db-7.internal.corp password expired for svc-llm"


def gateway_config(tmp: Path, **options: Any) -> ServerConfig:
    return ServerConfig.model_validate({
        "serve_local": False, "log": {"path": str(tmp / "requests.db")}, **options})


def rows(live: LiveGateway, count: int, predicate: Any = lambda r: True) -> list[dict[str, Any]]:
    assert live.gateway.reqlog is not None
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        assert live.gateway.reqlog is not None
        found[:] = [r for r in live.gateway.reqlog.rows(1000) if predicate(r)]
        return len(found) >= count

    poll(enough, 5)
    return found


# -- 1. tokens per minute without max_tokens ------------------------------------------------


@pytest.fixture(scope="module")
def tpm_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    keys = [KeyConfig(id=f"k{i}", sha256=hash_key(f"{KEY}-{i}"), tokens_per_minute=300)
            for i in range(8)]
    with LiveGateway(gateway_config(tmp_path_factory.mktemp("tpm"), keys=keys)) as live:
        yield live


def key(i: int) -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}-{i}"}


@pytest.mark.parametrize(("index", "endpoint", "stream"), [
    (0, "/v1/chat/completions", True), (1, "/v1/chat/completions", False),
    (2, "/v1/responses", True), (3, "/chat", True),
])
def test_tokens_per_minute_holds_without_max_tokens(tpm_gateway: LiveGateway, index: int,
                                                    endpoint: str, stream: bool) -> None:
    # The probe: six ~194-token answers through a 300/min key, max_tokens left out.
    model = "mock:tokens=190"
    if endpoint == "/chat":
        body: dict[str, Any] = {"model": model, "prompt": "hi"}
    elif endpoint == "/v1/responses":
        body = {"model": model, "input": "hi", "stream": stream}
    else:
        body = {"model": model, "messages": HI, "stream": stream}
    statuses = []
    with httpx.Client(base_url=tpm_gateway.url, timeout=TIMEOUT) as c:
        for _ in range(6):
            r = c.post(endpoint, json=body, headers=key(index))
            statuses.append(r.status_code)
    admitted = rows(tpm_gateway, statuses.count(200),
                    lambda r: r["key_id"] == f"k{index}" and r["status"] == "ok")
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in admitted)
    # The minute holds its limit, give or take the one request that crossed it (the
    # first reserves 256 + the prompt; after it, the window holds its real usage).
    admitted_count = statuses.count(200)
    assert 1 <= admitted_count <= 2, statuses
    assert statuses == [200] * admitted_count + [429] * (6 - admitted_count)
    assert used <= 300 + max(r["prompt_tokens"] + r["completion_tokens"] for r in admitted)


def window(live: LiveGateway, key_id: str) -> int:
    state = live.gateway.limiter._states[key_id]
    return state.tokens_in_window


def test_the_reservation_is_settled_with_the_real_usage_every_way(
        tpm_gateway: LiveGateway) -> None:
    with httpx.Client(base_url=tpm_gateway.url, timeout=TIMEOUT) as c:
        # Finished, streamed: the window holds exactly what was used.
        r = c.post("/v1/chat/completions", headers=key(4), json={
            "model": "mock:tokens=7", "messages": HI, "stream": True,
            "stream_options": {"include_usage": True}})
        usage = json.loads(sse_payloads(r.text)[-2])["usage"]  # the frame before [DONE]
        assert poll(lambda: tpm_gateway.gateway.limiter.total_active() == 0, 2)
        assert window(tpm_gateway, "k4") == usage["total_tokens"]
        # Failed mid-stream: what was generated counts, not the reservation.
        c.post("/v1/chat/completions", headers=key(5), json={
            "model": "mock:tokens=50,fault=error,after=3", "messages": HI, "stream": True})
        (row,) = rows(tpm_gateway, 1, lambda r: r["key_id"] == "k5")
        assert row["status"] == "error"
        assert poll(lambda: tpm_gateway.gateway.limiter.total_active() == 0, 2)
        assert window(tpm_gateway, "k5") == row["prompt_tokens"] + row["completion_tokens"]
    # Cancelled by the client mid-stream: what it got counts.
    with httpx.Client(base_url=tpm_gateway.url, timeout=TIMEOUT) as c, \
            c.stream("POST", "/v1/chat/completions", headers=key(6), json={
                "model": "mock:tokens=200,tps=50", "messages": HI,
                "stream": True}) as r:
        for line in r.iter_lines():
            if "tok" in line or "content" in line:
                break
    (row,) = rows(tpm_gateway, 1, lambda r: r["key_id"] == "k6")
    assert row["status"] == "cancelled" and 0 < row["completion_tokens"] < 200
    assert poll(lambda: tpm_gateway.gateway.limiter.total_active() == 0, 2)
    assert window(tpm_gateway, "k6") == row["prompt_tokens"] + row["completion_tokens"]


# -- 2, 3, 6. what an upstream answers ------------------------------------------------------


@pytest.fixture(scope="module")
def canary() -> Iterator[RawServer]:
    """A host in no config: nothing may ever connect to it."""
    with RawServer(lambda path: response(200, b'{"stolen": true}')) as server:
        yield server


@pytest.fixture(scope="module")
def odd_upstream(canary: RawServer) -> Iterator[RawServer]:
    """An upstream whose answer is chosen by the route: the path is /s<status>/v1/..."""
    def answer(path: str) -> bytes:
        status = int(path.split("/")[1][1:])
        if 300 <= status < 400:
            return response(status, b"", reason="Moved",
                            headers={"location": canary.url + "/chat/completions"})
        body = json.dumps({"error": {"message": f"{SECRET_DETAIL} (status {status})",
                                     "type": "server_error"}}).encode()
        return response(status, body, headers={"retry-after": "0"})

    with RawServer(answer) as server:
        yield server


STATUSES = [301, 302, 303, 307, 308, 600, 999, 400, 401, 403, 404, 413, 422, 429, 500, 501,
            502, 503, 504]
#: The documented mapping (README "Upstream errors").
EXPECTED = {400: 400, 413: 413, 422: 422, 429: 429, 503: 503, 504: 504}


@pytest.fixture(scope="module")
def odd_gateway(odd_upstream: RawServer, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[LiveGateway]:
    base = f"http://127.0.0.1:{odd_upstream.port}"
    models = [{"name": f"r{s}", "base_url": f"{base}/s{s}/v1"} for s in STATUSES]
    with LiveGateway(gateway_config(tmp_path_factory.mktemp("odd"), models=models)) as live:
        live.gateway.retry = RetryPolicy(max_retries=0)
        yield live


def assert_generic(text: str, route: str, odd_upstream: RawServer, canary: RawServer) -> None:
    assert SECRET_DETAIL not in text
    assert f"127.0.0.1:{odd_upstream.port}" not in text
    assert f"127.0.0.1:{canary.port}" not in text and "location" not in text.lower()
    assert repr(route) in text or f'\\"{route}\\"' in text or route in text


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("stream", [True, False])
def test_upstream_statuses_map_to_valid_ones_and_redirects_are_never_followed(
        odd_gateway: LiveGateway, odd_upstream: RawServer, canary: RawServer,
        status: int, stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tokenrelay.server")
    route = f"r{status}"
    with httpx.Client(base_url=odd_gateway.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", json={"model": route, "messages": HI,
                                                 "stream": stream})
    assert r.status_code == EXPECTED.get(status, 502), r.text
    error = r.json()["error"]
    assert route in error["message"]
    assert_generic(r.text + json.dumps(dict(r.headers)), route, odd_upstream, canary)
    if 300 <= status < 400:
        assert error["code"] == "upstream_redirect"
    if status >= 600:
        assert error["code"] == "upstream_invalid_status"
    assert canary.connections == 0, "a redirect was followed to a host in no config"
    # The operator keeps the details: the request log row and the log line.
    (row,) = rows(odd_gateway, 1, lambda x: x["model"] == route and x["status"] == "error"
                  and x["endpoint"] == "chat.completions"
                  and x["http_status"] == r.status_code and x["id"] not in SEEN)
    SEEN.add(row["id"])
    assert f"127.0.0.1:{odd_upstream.port}" in row["error"]
    if not 300 <= status < 400 and status < 600:
        assert SECRET_DETAIL in row["error"]
        assert SECRET_DETAIL in caplog.text


SEEN: set[int] = set()


@pytest.mark.parametrize("endpoint", ["/chat", "/v1/responses"])
def test_upstream_details_stay_out_of_every_endpoint(
        odd_gateway: LiveGateway, odd_upstream: RawServer, canary: RawServer,
        endpoint: str) -> None:
    body: dict[str, Any] = {"model": "r500", "prompt": "hi"} if endpoint == "/chat" else {
        "model": "r500", "input": "hi", "stream": True}
    with httpx.Client(base_url=odd_gateway.url, timeout=TIMEOUT) as c:
        r = c.post(endpoint, json=body)
    assert r.status_code == 502
    assert_generic(r.text, "r500", odd_upstream, canary)


def test_model_listing_does_not_follow_redirects(odd_upstream: RawServer,
                                                 canary: RawServer) -> None:
    import asyncio

    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{odd_upstream.port}/s302/v1")

    async def listing() -> None:
        try:
            await provider.list_models()
        finally:
            await provider.aclose()

    with pytest.raises(APIStatusError) as caught:
        asyncio.run(listing())
    assert caught.value.code == "upstream_redirect" and caught.value.status_code == 302
    assert canary.connections == 0


def test_a_mid_stream_upstream_error_frame_is_generic(tmp_path: Path) -> None:
    frames = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}\n\n'
              b'data: {"error":{"message":"' + SECRET_DETAIL.encode() + b'","type":"x"}}\n\n')
    with RawServer(lambda path: response(200, frames, content_type="text/event-stream")) as up, \
            LiveGateway(gateway_config(tmp_path, models=[{"name": "mid", "base_url": up.url}])
                        ) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", json={"model": "mid", "messages": HI,
                                                 "stream": True})
        assert r.status_code == 200 and '"Hi"' in r.text
        assert SECRET_DETAIL not in r.text and str(up.port) not in r.text
        assert "the upstream of model 'mid'" in r.text
        (row,) = rows(live, 1, lambda x: x["model"] == "mid")
        assert SECRET_DETAIL in row["error"]


# -- 4. Host (DNS rebinding) and Content-Type ----------------------------------------------


@pytest.fixture(scope="module")
def open_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    """Loopback without keys, as `tokenrelay serve` runs by default."""
    config = gateway_config(tmp_path_factory.mktemp("open"),
                            allowed_hosts=["llm.home.arpa", "*.lab.example"])
    with LiveGateway(config) as live:
        yield live


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000",
                                  "127.0.0.1.attacker.example", "localhost.attacker.example",
                                  "home.arpa", "lab.example", "10.0.0.5", "[2001:db8::1]:80"])
def test_a_rebound_host_name_is_refused_without_keys(open_gateway: LiveGateway,
                                                     host: str) -> None:
    with httpx.Client(base_url=open_gateway.url, timeout=TIMEOUT) as c:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/")):
            r = c.request(method, path, headers={"host": host},
                          json={"model": "mock", "messages": HI} if method == "POST" else None)
            assert r.status_code == 403, (method, path, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost:{port}",
                                  "LOCALHOST", "[::1]:{port}", "127.1.2.3", "llm.home.arpa",
                                  "llm.home.arpa:{port}", "gpu.lab.example"])
def test_loopback_and_allowed_host_names_are_served(open_gateway: LiveGateway,
                                                    host: str) -> None:
    with httpx.Client(base_url=open_gateway.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", headers={"host": host.format(
            port=open_gateway.port)}, json={"model": "mock", "messages": HI})
    assert r.status_code == 200, r.text


def test_with_keys_any_host_name_is_served(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, keys=[KeyConfig(id="a", sha256=hash_key(KEY))])
    with LiveGateway(config) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", headers={"host": "gateway.example", **AUTH},
                   json={"model": "mock", "messages": HI})
        assert r.status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x",
                                          "application/jsonx", "application/json-patch+json"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/chat"])
def test_a_post_that_is_not_json_is_415_naming_the_header(
        open_gateway: LiveGateway, content_type: str | None, path: str) -> None:
    # A cross-site "simple" POST (text/plain, no preflight) that used to be parsed as JSON.
    body = json.dumps({"model": "mock", "messages": HI, "prompt": "hi", "input": "hi"})
    headers = {} if content_type is None else {"content-type": content_type}
    with httpx.Client(base_url=open_gateway.url, timeout=TIMEOUT) as c:
        r = c.post(path, content=body.encode(), headers=headers)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_media_type" and error["param"] == "content-type"
    assert "Content-Type" in error["message"] and "application/json" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON",
                                          "application/json; charset=utf-8"])
def test_json_with_parameters_is_accepted(open_gateway: LiveGateway, content_type: str) -> None:
    body = json.dumps({"model": "mock", "messages": HI}).encode()
    with httpx.Client(base_url=open_gateway.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert r.status_code == 200, r.text


# -- 5. the request line and headers are capped ---------------------------------------------


def raw_request(port: int, head: bytes, *, chunk: int = 65536, timeout: float = 10,
                ) -> tuple[bytes, int]:
    """Send ``head`` (a request line + headers) in pieces; the answer and the bytes the
    server took before it answered or closed."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            while sent < len(head):
                sent += sock.send(head[sent:sent + chunk])
        except OSError:
            pass
        answer = b""
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                answer += piece
        except OSError:
            pass
    return answer, sent


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    config = gateway_config(tmp_path_factory.mktemp("keyed"),
                            keys=[KeyConfig(id="a", sha256=hash_key(KEY))])
    with LiveGateway(config) as live:
        yield live


@pytest.fixture(scope="module", params=["httptools", "h11"])
def capped_gateway(request: pytest.FixtureRequest, keyed_gateway: LiveGateway,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if request.param == "httptools":
        yield keyed_gateway  # the shipped protocol
        return
    config = gateway_config(tmp_path_factory.mktemp("h11"),
                            keys=[KeyConfig(id="a", sha256=hash_key(KEY))])
    with LiveGateway(config, http="h11", loop="asyncio") as live:  # the pure-Python protocol
        yield live


@pytest.mark.parametrize("shape", ["one_line", "many_headers", "url"])
def test_request_line_and_headers_over_64_kib_are_431_before_auth(
        capped_gateway: Any, shape: str) -> None:
    if shape == "one_line":
        head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000
    elif shape == "many_headers":
        head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
            b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(700))
    else:
        head = b"GET /v1/models?q=" + b"c" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    answer, _ = raw_request(capped_gateway.port, head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "headers_too_large"
    assert capped_gateway.gateway.reqlog is not None
    assert poll(lambda: any(r["http_status"] == 431
                            for r in capped_gateway.gateway.reqlog.rows(1000)), 5)


def test_a_64_mb_header_line_is_cut_off_early(capped_gateway: Any) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (64 << 20)
    answer, sent = raw_request(capped_gateway.port, head, chunk=1 << 20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    # The server stopped taking the line long before its end (it held 58 MB before).
    assert sent < 16 << 20, sent


def test_headers_under_the_cap_are_served(capped_gateway: Any) -> None:
    head = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nConnection: close\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n")
    answer, _ = raw_request(capped_gateway.port, head)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


# -- 7. the request log: refusals, early cancellations, file modes --------------------------


def test_every_refused_request_is_logged(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, max_body_bytes=2048, keys=[
        KeyConfig(id="a", sha256=hash_key(KEY), requests_per_minute=1000, max_concurrent=1)])
    with LiveGateway(config) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        chat = "/v1/chat/completions"
        expected = {
            400: c.post(chat, content=b"{nope", headers={**AUTH,
                                                        "content-type": "application/json"}),
            401: c.post(chat, json={"model": "mock", "messages": HI}),
            404: c.post(chat, json={"model": "nope", "messages": HI}, headers=AUTH),
            413: c.post(chat, json={"model": "mock", "messages": [
                {"role": "user", "content": "x" * 4096}]}, headers=AUTH),
            415: c.post(chat, content=b"{}", headers={**AUTH, "content-type": "text/plain"}),
        }
        with c.stream("POST", chat, headers=AUTH, json={
                "model": "mock:tokens=100,tps=20", "messages": HI,
                "stream": True}) as held:
            expected[429] = c.post(chat, json={"model": "mock", "messages": HI}, headers=AUTH)
            held.close()
        expected[405] = c.get(chat, headers=AUTH)
        unknown = c.get("/nowhere", headers=AUTH)
        answer, _ = raw_request(live.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: "
                                + b"a" * 70_000 + b"\r\n\r\n")
        for status, r in expected.items():
            assert r.status_code == status, (status, r.text)
        assert unknown.status_code == 404 and answer.startswith(b"HTTP/1.1 431")
        refused = rows(live, len(expected) + 2, lambda r: r["status"] == "refused")
    logged = sorted(r["http_status"] for r in refused)
    assert logged == sorted([*expected, 404, 431]), refused
    by_status = {r["http_status"]: r for r in refused}
    assert by_status[401]["key_id"] == "-"
    assert by_status[429]["key_id"] == "a" and "concurrency" in by_status[429]["error"]
    assert by_status[415]["endpoint"] == "/v1/chat/completions"
    assert all(r["prompt"] is None and r["answer"] is None for r in refused)


def test_a_stream_cancelled_before_any_byte_is_logged_499(tmp_path: Path) -> None:
    with LiveGateway(gateway_config(tmp_path)) as live:
        sock = open_stream(live.port, {"model": "mock:tokens=3,delay=2",
                                       "messages": HI, "stream": True})
        time.sleep(0.3)
        sock.close()
        (row,) = rows(live, 1, lambda r: r["model"] == "mock")
    assert row["status"] == "cancelled"
    assert row["http_status"] == 499


def test_the_request_log_is_private(tmp_path: Path) -> None:
    folder = tmp_path / "fresh" / "logs"
    config = ServerConfig(serve_local=False, log=LogConfig(path=str(folder / "requests.db")))
    with LiveGateway(config) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        assert c.post("/v1/chat/completions", json={"model": "mock", "messages": HI},
                      ).status_code == 200
        rows(live, 1)
        files = sorted(folder.iterdir())
        assert {f.name for f in files} >= {"requests.db", "requests.db-wal"}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
