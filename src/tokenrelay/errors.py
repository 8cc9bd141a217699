"""The tokenrelay error tree.

Third-party exceptions (httpx, llama.cpp, sqlite) are translated once, at the boundary
where they happen, with ``raise X(...) from exc``::

    TokenrelayError
    ├── UsageError                 the caller asked for something invalid (bad option, unknown model)
    ├── ConfigurationError         missing model file, missing extra, bad config
    ├── StructuredOutputError      the answer is not JSON matching the requested schema
                                   (``response_format=``); keeps the raw text
    └── ProviderError              the provider failed
        ├── ConnectionError        could not reach the provider (retryable)
        │   └── TimeoutError       kind = connect | first_token | idle | total
        ├── APIStatusError         the provider answered with an HTTP error status
        │   ├── BadRequestError        400, 404, 422
        │   ├── AuthenticationError    401, 403
        │   ├── RateLimitError         429 (retryable; carries retry_after)
        │   └── ServerError            408, 409, 5xx (retryable)
        └── StreamError            the stream broke after it started: an error frame,
                                   a reset, a malformed chunk, a missing terminator.
                                   Never retried (it would duplicate text); keeps the
                                   partial text.
"""

from __future__ import annotations

import builtins
from typing import Any, Literal

__all__ = [
    "APIStatusError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConnectionError",
    "ProviderError",
    "RateLimitError",
    "ServerError",
    "StreamError",
    "StructuredOutputError",
    "TimeoutError",
    "TokenrelayError",
    "UsageError",
]


class TokenrelayError(Exception):
    """Base of every error tokenrelay raises."""

    code: str = "error"
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: Text generated before the failure (set by the stream that failed).
        self.partial_text: str = ""


class UsageError(TokenrelayError, ValueError):
    """The caller asked for something invalid: fix the arguments."""

    code = "invalid_request"


class ConfigurationError(TokenrelayError):
    """Something needed is missing or misconfigured: a model file, an extra, a key."""

    code = "configuration_error"


class StructuredOutputError(TokenrelayError):
    """The answer is not JSON that matches the requested schema (``response_format=``).

    ``raw_text`` (and ``partial_text``) keep the text the model produced; ``errors`` lists
    the validation errors, when the JSON parsed but did not match.
    """

    code = "structured_output_invalid"

    def __init__(self, message: str, *, raw_text: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.raw_text = raw_text
        self.partial_text = raw_text
        self.errors: list[Any] = errors or []


class ProviderError(TokenrelayError):
    """The provider failed."""

    code = "provider_error"


class ConnectionError(ProviderError, builtins.ConnectionError):
    """The provider could not be reached, or the connection dropped before any token."""

    code = "connection_error"
    retryable = True


TimeoutKind = Literal["connect", "first_token", "idle", "total"]


class TimeoutError(ConnectionError, builtins.TimeoutError):
    """A deadline passed. ``kind`` says which one."""

    def __init__(self, message: str, *, kind: TimeoutKind) -> None:
        super().__init__(message)
        self.kind: TimeoutKind = kind
        self.code = f"timeout_{kind}"
        # Waiting again for a model that has not answered in time rarely helps, except
        # when the connection itself did not open.
        self.retryable = kind == "connect"


class APIStatusError(ProviderError):
    """The provider answered with an HTTP error status."""

    code = "api_error"

    def __init__(self, message: str, *, status_code: int, body: object = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class BadRequestError(APIStatusError):
    code = "bad_request"


class AuthenticationError(APIStatusError):
    code = "authentication_error"


class RateLimitError(APIStatusError):
    code = "rate_limited"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        body: object = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    code = "server_error"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: object = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body)
        self.retry_after = retry_after


class StreamError(ProviderError):
    """The stream broke after it started. Not retried; ``partial_text`` keeps what came."""

    code = "stream_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


def status_error(
    status_code: int, message: str, *, body: object = None, retry_after: float | None = None
) -> APIStatusError:
    """The right APIStatusError subclass for an HTTP status."""
    if status_code in (401, 403):
        return AuthenticationError(message, status_code=status_code, body=body)
    if status_code == 429:
        return RateLimitError(message, status_code=status_code, body=body, retry_after=retry_after)
    if status_code in (408, 409) or status_code >= 500:
        return ServerError(message, status_code=status_code, body=body, retry_after=retry_after)
    return BadRequestError(message, status_code=status_code, body=body)
