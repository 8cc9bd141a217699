"""Checks every request passes before any endpoint sees it (pure functions of the scope).

* **Host** (DNS rebinding): a gateway without API keys trusts whoever reaches it, which on
  loopback means the local user, and any web page that user opens if the page can make
  the browser talk to 127.0.0.1. A page cannot read cross-origin answers, but a DNS
  rebinding attack points its own name at 127.0.0.1: the browser then sends requests
  with ``Host: attacker.example`` and lets the page read the answers. Without keys only
  loopback names (``localhost``, ``127.0.0.0/8``, ``[::1]``) and the configured
  ``allowed_hosts`` are served; with keys, ``allowed_hosts`` when it is set. (The
  vLLM / Jupyter / Ollama answer to the same attack: ``--allowed-origins``,
  ``allow_remote_access``, ``OLLAMA_ORIGINS``.)
* **Content-Type**: a cross-site ``<form>`` or ``fetch(..., {mode: "no-cors"})`` may POST
  a ``text/plain`` body without a CORS preflight; requiring ``application/json`` on every
  POST makes any such request a 415 before anything parses it.

Both answer an OpenAI error object; ``Gateway.log_refused`` logs them like every refusal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

__all__ = ["Refusal", "RequestGuard", "logging_refusals"]

#: Names that always mean this machine.
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


class Refusal(Exception):
    """A request refused before its endpoint: status, error code, message."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def host_name(value: str) -> str:
    """The host of a ``Host`` header, without its port, lower case (``[::1]:8000`` →
    ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit():
        return name
    return value


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """Host and Content-Type checks of one gateway (see the module docstring).

    Args:
        check_host: refuse Host names that are not loopback or in ``allowed_hosts``.
        allowed_hosts: further accepted names (``"*.example.com"`` matches sub-domains,
            ``"*"`` any name).
    """

    def __init__(self, *, check_host: bool, allowed_hosts: list[str]) -> None:
        self.allowed = {h.lower().rstrip(".") for h in allowed_hosts}
        self.any_host = "*" in self.allowed
        self.suffixes = tuple(h[1:] for h in self.allowed if h.startswith("*."))
        self.check_host = check_host and not self.any_host
        self._seen: dict[bytes, bool] = {}

    def host_allowed(self, raw: bytes) -> bool:
        known = self._seen.get(raw)
        if known is not None:
            return known
        host = host_name(raw.decode("latin-1"))
        ok = (is_loopback(host) or host.rstrip(".") in self.allowed
              or bool(self.suffixes and host.endswith(self.suffixes)))
        if len(self._seen) < 1024:  # a handful of names in practice; never unbounded
            self._seen[raw] = ok
        return ok

    def check(self, scope: Any) -> None:
        """Raise :class:`Refusal` for a request that must not reach its endpoint."""
        host: bytes | None = None
        content_type: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"content-type":
                content_type = value
        if self.check_host and (host is None or not self.host_allowed(host)):
            shown = "none" if host is None else repr(host.decode("latin-1")[:100])
            raise Refusal(
                403, "host_not_allowed",
                f"Host {shown} is not served here: this gateway answers loopback names"
                " (and the names in its allowed_hosts setting) only, so that a web page"
                " cannot reach it through DNS rebinding")
        if scope["method"] == "POST" and (
                content_type is None
                or content_type.split(b";", 1)[0].strip().lower() != b"application/json"):
            raise Refusal(
                415, "unsupported_media_type",
                "the Content-Type header must be application/json (a request body is"
                " JSON)", param="content-type")


def logging_refusals(scope: Any, send: Any,
                     log_refused: Callable[[Any, int, str, str], None]) -> Any:
    """``send``, telling ``log_refused`` of a response whose status is 400 or more (for
    the answers no endpoint logs itself: Starlette's 404 and 405, the GET endpoints' 401)."""
    async def logged_send(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            log_refused(scope, message["status"], "", "refused")
        await send(message)

    return logged_send
