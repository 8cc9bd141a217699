"""The HTTP shell every provider over HTTP shares: one aiohttp session per event loop, a
POST whose response is closed when the consumer stops, and HTTP and transport errors
translated once into the core's error tree.

A provider subclasses :class:`HTTPProvider` with its wire format (body, parser, paths) and
its authentication as plain headers: :class:`~.openai_compat.OpenAIProvider` sends
``Authorization: Bearer``; a provider with another scheme (``x-api-key``, a query token)
passes its own ``headers`` and sends no Bearer header to undo.

The HTTP client is aiohttp: on this project's gateway benchmark it reads 64 relayed
streams for 6.4 µs of CPU per frame, against 13 µs (httpx, one client per connection) to
92 µs (httpx with one shared pool, whose bookkeeping grows with its connections), and its
connector queues requests beyond ``max_connections`` in O(1) (bench/README.md, 2026-12-02).

One provider object is cached and shared by every caller, and callers come from
different event loops (the sync API's background loop, each ``asyncio.run``, the
gateway's). A client session and its pooled connections belong to the loop that opened
them, so the provider keeps one session per running loop (:class:`LoopSessions`).
"""

from __future__ import annotations

import builtins
import contextlib
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import yarl

from ..errors import (
    APIStatusError,
    ConfigurationError,
    ConnectionError,
    ProviderError,
    StreamError,
    TimeoutError,
    UsageError,
    status_error,
)
from ._sessions import LoopSessions
from .base import Provider

__all__ = ["HTTPProvider", "checked_base_url", "read_some", "retry_after"]

#: Error bodies are read up to this size: they are for a message, not for data.
MAX_ERROR_BODY = 64 * 1024
STREAM_HEADERS = {
    "Accept": "text/event-stream",
    "Content-Type": "application/json",
    # A compressed event stream is buffered by the compressor: ask for none.
    "Accept-Encoding": "identity",
}
#: What the client library raises for a failed request (aiohttp's connect timeout is a
#: ``TimeoutError``).
TRANSPORT_ERRORS = (aiohttp.ClientError, builtins.TimeoutError, OSError)


def checked_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash, or a UsageError if it is not http(s)."""
    url = base_url.rstrip("/")
    try:
        parsed = yarl.URL(url)
        host = parsed.host
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid base URL {base_url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise UsageError(
            f"invalid base URL {base_url!r}: it must start with http:// or https://"
            " (e.g. http://127.0.0.1:8000/v1)"
        )
    if not host:
        raise UsageError(f"invalid base URL {base_url!r}: it names no host")
    return url


class HTTPProvider(Provider):
    """A provider that streams over HTTP (abstract: subclasses add the wire format).

    Args:
        base_url: the API root (http or https).
        connect_timeout: seconds to open the connection. Reading has no client timeout:
            the stream enforces the first-token, idle and total deadlines itself.
        max_connections: connections per event loop; further requests wait for one.
            Set explicitly because a default pool (100 in aiohttp and httpx) would
            silently queue a gateway's extra streams.
        headers: headers sent with every request, authentication included.
    """

    def __init__(
        self,
        *,
        base_url: str,
        connect_timeout: float | None = 10.0,
        max_connections: int = 256,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        url = checked_base_url(base_url)
        if max_connections < 1:
            raise UsageError("max_connections must be at least 1")
        self.base_url = url
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._headers = {"User-Agent": "tokenrelay", **(headers or {})}
        self._sessions = LoopSessions(self._new_session)

    def __repr__(self) -> str:
        # Never the headers: they carry the key.
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- HTTP client, one per event loop ------------------------------------------------

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.connect_timeout, sock_read=None
            ),
        )

    def _client(self) -> aiohttp.ClientSession:
        return self._sessions.get()

    async def aclose(self) -> None:
        """Close this loop's session; sessions of other loops are dropped with their loop."""
        await self._sessions.aclose()

    @contextlib.asynccontextmanager
    async def _post(self, url: str, body: bytes, *, headers: Mapping[str, str] | None = None,
                    method: str = "POST") -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body`` (or another ``method``); the response is released to the pool if it
        was read to the end, else closed (which is what aborts the upstream generation)."""
        session = self._client()
        sent = STREAM_HEADERS if headers is None else {**STREAM_HEADERS, **headers}
        data = body or None
        try:
            try:
                response = await session.request(method, url, data=data, headers=sent,
                                                 allow_redirects=False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError) or method != "POST":
                    # Could not connect at all: not a stale connection. (aiohttp sends an
                    # idempotent request again on a stale connection by itself.)
                    raise
                # A pooled connection the server closed just as it was reused (aiohttp,
                # unlike httpcore, does not check a pooled socket for EOF before reuse):
                # the request never reached the server, so ask once more at once, on a
                # fresh connection, instead of failing into the stream's retry backoff.
                response = await session.request(method, url, data=data, headers=sent,
                                                  allow_redirects=False)
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, url) from exc
        try:
            yield response
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    # -- error translation (once, here) -----------------------------------------------

    #: A hint appended to the message of an error status (e.g. which key to check).
    status_hints: Mapping[int, str] = {}

    def _error_text(self, payload: Any) -> str:
        """The message of an error body (decoded JSON, or its text): the wire format's own
        error object in subclasses; here the body itself, cut short."""
        return str(payload)[:500]

    def _status_error(self, response: aiohttp.ClientResponse, data: bytes) -> APIStatusError:
        status = response.status
        reason = response.reason or ""
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = data.decode("utf-8", "replace").strip() or reason
        message = self._error_text(payload)
        text = f"{self.base_url} answered {status} {reason}: {message}"
        hint = self.status_hints.get(status)
        if hint:
            text += f" ({hint})"
        return status_error(status, text, body=payload, retry_after=retry_after(response.headers))

    def _unexpected_status(self, response: aiohttp.ClientResponse) -> APIStatusError:
        """A status that is neither success nor an HTTP error: a redirect (never
        followed: it could send the prompt and the key to any host), a 1xx, or no valid
        HTTP status at all (outside 100-599)."""
        status = response.status
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            error = APIStatusError(
                f"{self.base_url} answered {status} {response.reason or ''}, a redirect to"
                f" {location[:200]!r}; redirects are not followed (they could send the"
                " prompt and the key to another host): set the base URL to the API root"
                " itself", status_code=status)
            error.code = "upstream_redirect"
        else:
            error = APIStatusError(
                f"{self.base_url} answered with HTTP status {status}, which is not a"
                " success or an error status (200-299, 400-599)", status_code=status)
            error.code = "upstream_invalid_status"
        return error

    def _transport_error(self, exc: BaseException, url: str) -> ProviderError | ConfigurationError:
        detail = _detail(exc)
        if isinstance(exc, builtins.TimeoutError):  # aiohttp.ConnectionTimeoutError
            return TimeoutError(
                f"could not connect to {url} within {self.connect_timeout:g}s (connect"
                " timeout); is the server up and reachable?",
                kind="connect",
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            detail = _connect_detail(exc)
            return ConnectionError(
                f"could not connect to {url}: {detail}; is the server running and the base"
                " URL right?"
            )
        if isinstance(exc, aiohttp.InvalidURL):
            return ConfigurationError(f"cannot request {url}: {detail}")
        return ConnectionError(f"the connection to {url} failed before the answer: {detail}")

    def _broken(self, exc: BaseException, *, started: bool) -> ProviderError:
        detail = _detail(exc)
        if started:
            return StreamError(
                f"the connection to {self.base_url} broke mid-stream: {detail}",
                code="connection_lost",
            )
        # Nothing was shown yet, so asking again cannot duplicate text: retryable.
        return ConnectionError(
            f"the connection to {self.base_url} broke before the first token: {detail}"
        )


def _connect_detail(exc: aiohttp.ClientConnectorError) -> str:
    """Why a connection could not be opened, in plain words: aiohttp's own message
    ("Cannot connect to host h:p ssl:default [Connect call failed ...]") names its
    internals (issue 11)."""
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    reason = getattr(os_error, "strerror", None) or ""
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", ())  # aiohttp >= 3.11
    if isinstance(exc, dns_error) or isinstance(os_error, socket.gaierror):
        return f"cannot resolve host {exc.host!r}" + (f" ({reason})" if reason else "")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake failed ({reason or type(os_error).__name__})"
    return (reason or type(os_error).__name__).lower()


def _detail(exc: BaseException) -> str:
    # Client errors often wrap the useful OSError ("Connection reset by peer") emptily.
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


async def read_some(response: aiohttp.ClientResponse) -> bytes:
    data = bytearray()
    while len(data) < MAX_ERROR_BODY:
        piece = await response.content.readany()
        if not piece:
            break
        data += piece
    return bytes(data[:MAX_ERROR_BODY])


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an
    HTTP-date, RFC 9110 §10.2.3); ``None`` when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
