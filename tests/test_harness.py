"""The harness itself: processes start and stop as promised, the helpers parse right."""

from __future__ import annotations

import signal
import socket
import sys

import httpx
import pytest
from _harness import LiveGateway, Processes, closed_port, sse_events, sse_payloads

from tokenrelay.server import ServerConfig

CONFIG = {"serve_local": False, "log": {"enabled": False}}


def test_several_gateways_run_side_by_side_and_all_stop(processes: Processes) -> None:
    a = processes.serve(CONFIG, name="a")
    b = processes.serve(a.config_path, name="b")  # the same TOML file, as users share one
    assert a.port != b.port
    for proc in (a, b):
        r = httpx.post(proc.url + "/v1/chat/completions", timeout=10, json={
            "model": "mock", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
    processes.close()
    assert not a.alive() and not b.alive()
    for proc in (a, b):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proc.port), timeout=1).close()


def test_a_process_that_ignores_sigterm_is_killed(processes: Processes) -> None:
    stubborn = processes.start("stubborn", [
        sys.executable, "-c",
        ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('up', flush=True); time.sleep(60)")],
        ready=lambda p: "up" in p.output())
    assert processes.stop(stubborn, timeout=0.5) == -signal.SIGKILL


def test_a_process_that_exits_at_start_reports_its_output(processes: Processes) -> None:
    with pytest.raises(RuntimeError, match="(?s)did not start .*config file not found"):
        processes.serve("/nonexistent/no such config.toml")


def test_the_thread_gateway_runs_the_production_server() -> None:
    config = ServerConfig.model_validate(CONFIG)
    with LiveGateway(config) as gw:
        assert type(gw.loop).__module__.startswith("uvloop")
        assert gw.server.config.http.__name__ == "HeaderTimeoutProtocol"
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
        thread = gw._thread
    assert thread is not None and not thread.is_alive()


def test_closed_port_refuses() -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port()), timeout=1).close()


def test_sse_parsing_follows_the_spec() -> None:
    body = (b": comment\r\n\r\nevent: delta\r\nid: 7\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
            b"data:no-space\n\ndata: [DONE]\n\n")
    assert sse_events(body) == [{"event": "delta", "id": "7", "data": "{\"a\":\n1}"},
                                {"data": "no-space"}, {"data": "[DONE]"}]
    assert sse_payloads(body)[-1] == "[DONE]"
