"""Running the gateway under uvicorn, with the one timeout uvicorn lacks.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no timeout for
*reading a request*: a client that connects and then sends its headers a byte at a time
(slowloris) holds the connection forever, and a few thousand of them reach
``limit_concurrency`` and lock everyone else out. :class:`HeaderTimeoutProtocol` closes a
connection whose request headers are not complete ``header_timeout`` seconds after it
connected, or after the first byte of its next request on a kept-alive connection
(nginx ``client_header_timeout``). It also aborts a connection whose client stopped
reading ``send_timeout + 1`` s ago: the app gives such a stream up, but uvicorn's
``transport.close()`` would wait forever for the unread buffer to drain.

The listening socket is bound here, before uvicorn starts, so that an address already in
use is a one-line :class:`~tokenrelay.errors.ConfigurationError` and the real port of
``port = 0`` is known.

Example::

    config = load_config("gateway.toml")
    config.check_exposure()
    sock = bind(config)
    build_server(config).run(sockets=[sock])
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import ConfigurationError
from .config import ServerConfig
from .sse import SendTimeout

__all__ = [
    "HeaderTimeoutProtocol",
    "bind",
    "build_server",
    "header_timeout_protocol",
    "url",
    "uvicorn_config",
]

log = logging.getLogger("tokenrelay.server")

#: Connections (not requests) before uvicorn answers 503; SSE streams are long-lived.
MAX_CONNECTIONS = 2048
BACKLOG = 2048
#: Seconds streams in progress get to finish on shutdown before they are cancelled.
GRACEFUL_SHUTDOWN = 10


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus deadlines for receiving request headers and for
    a client that stopped reading."""

    header_timeout: float = 10.0
    #: Seconds the send buffer may stay full (the client not reading) before the
    #: connection is aborted; ``None``: never.
    write_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            # The first bytes of the next request on a kept-alive connection. (uvicorn
            # cancels its keep-alive timer on any byte, so without this a client could
            # dribble a byte every few seconds forever.)
            self._arm_header_timer()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timeout is not None and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_timer()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        # The client stopped reading. SSEResponse gives up after send_timeout, but then
        # uvicorn's transport.close() waits for the unread buffer to drain, i.e. forever:
        # the socket and its buffers would stay. Abort (RST) instead.
        self._write_timer = None
        log.debug("aborting a connection that read nothing for %.1f s", self.write_timeout)
        self.transport.abort()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request headers in %.1f s",
                      self.header_timeout)
            self.transport.close()


class _DroppedClients(logging.Filter):
    """uvicorn logs an exception raised by the app with its traceback ("Exception in ASGI
    application"); a client dropped because it stopped reading is expected behaviour, so
    it becomes one warning line of ours instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SendTimeout):
            log.warning("%s", exc)
            return False
        return True


_DROPPED_CLIENTS = _DroppedClients()


def header_timeout_protocol(seconds: float, write_timeout: float | None = None,
                            ) -> type[HeaderTimeoutProtocol]:
    """The protocol class with its deadlines set (uvicorn takes a class, not options)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout": seconds, "write_timeout": write_timeout})


def _loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def uvicorn_config(config: ServerConfig, app: Any = None, *,
                   log_config: dict[str, Any] | None = LOGGING_CONFIG) -> uvicorn.Config:
    """The uvicorn settings of the gateway.

    Args:
        config: the gateway configuration.
        app: the ASGI app; default ``create_app(config)``.
        log_config: uvicorn's logging setup; ``None`` leaves logging alone (tests).
    """
    if app is None:
        from .app import create_app

        app = create_app(config)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        # A second after the app's own send_timeout (it ends the stream first).
        http=header_timeout_protocol(config.header_timeout, config.send_timeout + 1.0),
        loop=_loop(),
        ws="none",
        lifespan="on",
        timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]
        limit_concurrency=MAX_CONNECTIONS,
        backlog=BACKLOG,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        # Behind no proxy by default: X-Forwarded-For from clients is not trusted.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_level="warning",
        log_config=log_config,
    )
    # After Config, which (re)configures uvicorn's loggers; one filter for any number of
    # servers in the process.
    logging.getLogger("uvicorn.error").addFilter(_DROPPED_CLIENTS)
    return uv


def build_server(config: ServerConfig, app: Any = None, *,
                 log_config: dict[str, Any] | None = LOGGING_CONFIG) -> uvicorn.Server:
    """A uvicorn server for the gateway; run it with ``.run(sockets=[bind(config)])``."""
    return uvicorn.Server(uvicorn_config(config, app, log_config=log_config))


def bind(config: ServerConfig) -> socket.socket:
    """A listening socket on ``config.host``/``config.port``.

    Raises:
        ConfigurationError: the address cannot be used (in use, not local, no permission).
    """
    try:
        infos = socket.getaddrinfo(config.host.strip("[]"), config.port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address, family=family, backlog=BACKLOG)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigurationError(
            f"cannot listen on {config.host} port {config.port}: {reason}"
            " (pick another --port, or stop the process using it)") from exc


def url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
