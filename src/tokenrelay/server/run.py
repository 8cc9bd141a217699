"""Running the gateway under uvicorn, with what uvicorn lacks: header deadlines and a cap,
resets for dropped readers, a shutdown that drains.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no timeout for
*reading a request*: a client that connects and then sends its headers a byte at a time
(slowloris) holds the connection forever, and a few thousand of them reach
``limit_concurrency`` and lock everyone else out. :class:`HeaderTimeoutProtocol` closes a
connection whose request headers are not complete ``header_timeout`` seconds after it
connected, or after the first byte of its next request on a kept-alive connection
(nginx ``client_header_timeout``). It also aborts a connection whose client stopped
reading ``send_timeout + 1`` s ago: the app gives such a stream up, but uvicorn's
``transport.close()`` would wait forever for the unread buffer to drain; the abort sets
``SO_LINGER`` 0 first, so the kernel sends a reset and frees the socket's buffer at once
(a plain close leaves it in FIN-WAIT-1 holding megabytes of unsent data for minutes).
It caps the request line and headers at ``MAX_HEADER_BYTES`` (431, before the app and
its auth see anything: uvicorn has no such limit with httptools, and one 64 MB header
line held 58 MB).

:class:`GatewayServer` is uvicorn's server with the gateway's shutdown: on SIGTERM the
answers in progress get ``drain_timeout_s`` to finish, then one ``server_shutdown``
error each (``server/shutdown.py``), and the request log is written before exit.

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
import contextlib
import importlib.util
import logging
import re
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import ConfigurationError
from .config import ServerConfig
from .encode import dumps, error_body
from .sse import BreakConnection, SendTimeout

__all__ = [
    "MAX_HEADER_BYTES",
    "GatewayServer",
    "HeaderCapH11Protocol",
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
#: Seconds after the drain deadline (``drain_timeout_s``) at which uvicorn cancels what
#: still runs: the drain ends answers itself first, with an error frame each.
GRACEFUL_SHUTDOWN_MARGIN = 5
#: The request line and headers of one request, together (nginx: 4 × 8 KiB buffers).
MAX_HEADER_BYTES = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
#: The end of a request's head as h11 finds it (a bare LF is accepted too).
_HEAD_END = re.compile(rb"\n\r?\n")


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Close a connection with a TCP reset: its unsent data is dropped by the kernel too.

    ``transport.abort()`` drops only the transport's own buffer; closing the socket then
    leaves the kernel's send buffer (MBs on loopback) queued behind a peer window of
    zero, the socket in FIN-WAIT-1 for minutes. ``SO_LINGER`` 0 makes the close a reset.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:  # already closed
            pass
    transport.abort()


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus deadlines for receiving request headers and for
    a client that stopped reading."""

    header_timeout: float = 10.0
    #: Seconds the send buffer may stay full (the client not reading) before the
    #: connection is aborted; ``None``: never.
    write_timeout: float | None = None
    #: The request line and headers, in bytes, above which the answer is a 431.
    max_header_bytes: int = MAX_HEADER_BYTES
    #: Told of each refused request: ``(scope, status, code, message)`` (the request log).
    on_refused: Callable[[Any, int, str, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        #: Between a request's first byte and its headers' end: bytes fed meanwhile, and
        #: the size of what the parser handed over (URL, names, values).
        self._in_headers = False
        self._header_bytes = 0
        self._header_size = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            # The first bytes of the next request on a kept-alive connection. (uvicorn
            # cancels its keep-alive timer on any byte, so without this a client could
            # dribble a byte every few seconds forever.)
            self._arm_header_timer()
        super().data_received(data)
        if self._in_headers and not self._refused:
            # The parser keeps an unfinished header line in memory: the cap must hold
            # before the line ends, not only once the headers are complete.
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._header_size = 0

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._in_headers = False
        if self._header_size > self.max_header_bytes:
            self._refuse_headers()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse_headers(self) -> None:
        """431, before the app (and so auth) sees the request; the connection closes."""
        self._refused = True
        self._cancel_header_timer()
        scope = dict(self.scope)  # no path yet if the headers never ended
        scope.setdefault("path", self.url[:200].decode("latin-1"))
        _refuse_headers(self.transport, self.max_header_bytes, self.on_refused, scope)

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
        abort_with_reset(self.transport)

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


def _refuse_headers(transport: asyncio.Transport, max_bytes: int,
                    on_refused: Callable[[Any, int, str, str], None] | None,
                    scope: Any) -> None:
    message = f"the request line and headers are over {max_bytes} bytes together"
    if on_refused is not None:
        try:
            on_refused(scope, 431, "headers_too_large", message)
        except Exception:  # logging must not keep the connection open
            log.warning("could not log a refused request", exc_info=True)
    body = dumps(error_body(message, type="invalid_request_error", code="headers_too_large"))
    transport.write(
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (len(body), body))
    transport.close()


class HeaderCapH11Protocol(H11Protocol):
    """uvicorn's pure-Python h11 protocol with the same header cap (for
    ``uvicorn_config(http="h11")``; the gateway ships with httptools).

    h11 itself stops buffering at ``h11_max_incomplete_event_size`` (set to
    ``MAX_HEADER_BYTES``), which uvicorn answers as a plain 400; this answers 431 like the
    httptools protocol. (No header or write timeouts here: those are httptools-only.)
    """

    max_header_bytes: int = MAX_HEADER_BYTES
    on_refused: Callable[[Any, int, str, str], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # reading a request's line and headers
            # h11 bounds only an *incomplete* head; one completed by this read may be
            # bigger (a 77 KB head in two reads): measure it before h11 parses it.
            pending = self.conn.trailing_data[0] + data
            end = _HEAD_END.search(pending)
            if (end is None and len(pending) > self.max_header_bytes) or (
                    end is not None and end.start() > self.max_header_bytes):
                line = pending.split(b"\r\n", 1)[0].split(b" ")
                path = line[1][:200].decode("latin-1") if len(line) > 1 else ""
                _refuse_headers(self.transport, self.max_header_bytes, self.on_refused,
                                {"type": "http", "path": path})
                return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        pending = self.conn.trailing_data[0]
        if len(pending) > self.max_header_bytes:
            line = pending.split(b"\r\n", 1)[0].split(b" ")
            path = line[1][:200].decode("latin-1") if len(line) > 1 else ""
            _refuse_headers(self.transport, self.max_header_bytes, self.on_refused,
                            {"type": "http", "path": path})
            return
        super().send_400_response(msg)


class _DroppedClients(logging.Filter):
    """uvicorn logs an exception raised by the app with its traceback ("Exception in ASGI
    application"); a client dropped because it stopped reading is expected behaviour, so
    it becomes one warning line of ours instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SendTimeout):
            log.warning("%s", exc)
            return False
        # A stream handed to another process at shutdown: its connection is closed on
        # purpose (the producer logged the hand-off).
        return not isinstance(exc, BreakConnection)


_DROPPED_CLIENTS = _DroppedClients()


def header_timeout_protocol(
    seconds: float, write_timeout: float | None = None, *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    on_refused: Callable[[Any, int, str, str], None] | None = None,
) -> type[HeaderTimeoutProtocol]:
    """The protocol class with its deadlines set (uvicorn takes a class, not options)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout": seconds, "write_timeout": write_timeout,
                 "max_header_bytes": max_header_bytes,
                 "on_refused": staticmethod(on_refused) if on_refused else None})


def _loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def uvicorn_config(config: ServerConfig, app: Any = None, *,
                   log_config: dict[str, Any] | None = LOGGING_CONFIG,
                   http: str = "httptools") -> uvicorn.Config:
    """The uvicorn settings of the gateway.

    Args:
        config: the gateway configuration.
        app: the ASGI app; default ``create_app(config)``.
        log_config: uvicorn's logging setup; ``None`` leaves logging alone (tests).
        http: ``"httptools"`` (shipped: header, body and write timeouts, the header cap)
            or ``"h11"`` (pure Python: the header cap only).
    """
    if app is None:
        from .app import create_app

        app = create_app(config)
    gateway = getattr(getattr(app, "state", None), "gateway", None)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        # A second after the app's own send_timeout (it ends the stream first).
        http=header_timeout_protocol(
            config.header_timeout, config.send_timeout + 1.0,
            on_refused=None if gateway is None else gateway.log_refused)
        if http == "httptools" else type(
            "HeaderCapH11Protocol", (HeaderCapH11Protocol,),
            {"on_refused": staticmethod(gateway.log_refused) if gateway else None}),
        loop=_loop(),
        ws="none",
        lifespan="on",
        timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]
        limit_concurrency=MAX_CONNECTIONS,
        backlog=BACKLOG,
        # The drain ends answers first (GatewayServer); this only cuts what it could not.
        timeout_graceful_shutdown=int(config.drain_timeout_s + GRACEFUL_SHUTDOWN_MARGIN),
        # With h11 instead of httptools, the same header cap (HeaderCapH11Protocol).
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
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


class GatewayServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first gives the gateway's answers in progress
    ``drain_timeout`` seconds and then ends them with a ``server_shutdown`` error."""

    def __init__(self, config: uvicorn.Config, *, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # The SIGTERM / Ctrl-C was handled: a drained, flushed stop is a clean exit
            # (status 0), not uvicorn's re-raise of the signal to die by it.
            self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        gateway = getattr(getattr(self.config.app, "state", None), "gateway", None)
        if gateway is not None:
            gateway.drain.begin(self.drain_timeout)
        await super().shutdown(sockets)


def build_server(config: ServerConfig, app: Any = None, *,
                 log_config: dict[str, Any] | None = LOGGING_CONFIG,
                 http: str = "httptools") -> uvicorn.Server:
    """A uvicorn server for the gateway; run it with ``.run(sockets=[bind(config)])``."""
    return GatewayServer(uvicorn_config(config, app, log_config=log_config, http=http),
                         drain_timeout=config.drain_timeout_s)


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
