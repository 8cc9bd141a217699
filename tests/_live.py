"""A real gateway on loopback: uvicorn in a thread, on a free 127.0.0.1 port.

It runs the production server setup (``tokenrelay.server.run``: the header-timeout
protocol, keep-alive timeout, uvloop when installed), so connection-level behaviour
(slowloris, idle keep-alive, disconnects) is tested for real; ``httpx.ASGITransport``
would buffer whole bodies and has no sockets.

    with LiveGateway(ServerConfig(serve_local=False)) as gw:
        httpx.get(gw.url + "/healthz")
"""

from __future__ import annotations

import threading
import time
from typing import Any, Self

from tokenrelay.server.app import Gateway
from tokenrelay.server.config import ServerConfig
from tokenrelay.server.run import bind, build_server

__all__ = ["LiveGateway"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class LiveGateway:
    """The gateway of ``config`` served on ``127.0.0.1:<free port>`` while in ``with``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config.model_copy(update={"host": "127.0.0.1", "port": 0})
        self.server = build_server(self.config, log_config=None)
        self.app: Any = self.server.config.app
        self.gateway: Gateway = self.app.state.gateway
        self.host = "127.0.0.1"
        self.port = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self, sock: Any) -> None:
        try:
            self.server.run(sockets=[sock])
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - re-raised by __exit__
            self._error = exc

    def __enter__(self) -> Self:
        sock = bind(self.config)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                        name=f"gateway:{self.port}")
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"the gateway did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        assert self._thread is not None
        self._thread.join(_STOP_TIMEOUT)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(_STOP_TIMEOUT)
        if self._error is not None and not isinstance(self._error, SystemExit):
            raise self._error
