"""API keys and per-key limits.

* Keys are stored hashed (SHA-256) and compared in constant time against every configured
  key, whichever header carried them: ``Authorization: Bearer``, ``api-key`` (Azure style)
  or ``x-api-key``. One function extracts, one function checks.
* Limits per key: concurrent streams, requests per minute, tokens per minute, a
  ``max_tokens`` clamp. The gateway runs on one event loop and no ``await`` separates a
  check from its update, so each check-and-reserve is atomic under concurrency.
  Tokens are reserved up front and always reconciled with the real usage at the end
  (finished, failed or cancelled, streamed or not): the reservation is the prompt's
  estimated tokens plus ``max_tokens`` (after the key's clamp and the configured
  default), or plus ``UNBOUNDED_RESERVE`` when the request sets no bound at all. So a
  key's minute exceeds its tokens/min by at most what the requests running when it was
  reached use beyond their reservation (one request's worth, one at a time).
  Several processes (workers, replicas) share the same limits in Redis instead:
  ``shared_limits.SharedLimiter``, chosen by ``[redis] url``; this one stays the default.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..request import Request
from .config import KeyConfig

__all__ = ["ANONYMOUS", "Authenticator", "GatewayHTTPError", "Lease", "Limiter",
           "clamp_max_tokens", "limit_refusal", "reservation"]

ANONYMOUS = KeyConfig(id="anonymous", sha256="0" * 64)
#: Completion tokens reserved for a request without ``max_tokens`` (none asked, no key
#: clamp, no ``max_tokens_default``): reserving 0 let such requests past tokens/min
#: (issue 9: six 194-token answers through a 300/min key). Settled with the real usage.
UNBOUNDED_RESERVE = 256
#: Characters per token of the prompt estimate (English averages ~4 with cl100k).
_CHARS_PER_TOKEN = 4


def reservation(request: Request, key: KeyConfig) -> int:
    """Tokens to hold for ``request`` until its real usage is known: the prompt's estimate
    (characters / 4, cheap and never zero) plus its ``max_tokens``, or plus
    ``UNBOUNDED_RESERVE`` (at most what the key's minute leaves room for) without one."""
    prompt = sum(len(m.content) for m in request.messages) // _CHARS_PER_TOKEN + 1
    if request.max_tokens is not None:
        return prompt + request.max_tokens
    completion = UNBOUNDED_RESERVE
    if key.tokens_per_minute is not None:
        completion = max(1, min(completion, key.tokens_per_minute - prompt))
    return prompt + completion


def clamp_max_tokens(key: KeyConfig, requested: int | None, default: int | None) -> int | None:
    """A request's ``max_tokens`` (or the configured default) within the key's clamp."""
    value = requested if requested is not None else default
    if key.max_tokens is not None:
        value = key.max_tokens if value is None else min(value, key.max_tokens)
    return value


def limit_refusal(key: KeyConfig, which: str, retry_after: int) -> GatewayHTTPError:
    """The 429 of a key over its limit ``which`` (``concurrency``, ``requests`` or
    ``tokens``): the same answer from every limiter."""
    if which == "concurrency":
        message = f"too many concurrent streams for this key (limit {key.max_concurrent})"
        code = "concurrency_limit"
    elif which == "requests":
        message = f"request rate limit reached ({key.requests_per_minute}/min)"
        code = "rate_limit"
    else:
        message = f"token rate limit reached ({key.tokens_per_minute} tokens/min)"
        code = "token_limit"
    return GatewayHTTPError(429, message, type="rate_limit_error", code=code,
                            headers={"retry-after": str(retry_after)})


class GatewayHTTPError(Exception):
    """An error answered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def extract_key(headers: dict[str, str]) -> str | None:
    """The presented API key, from any accepted header form."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return ""  # present but malformed: never anonymous
    for name in ("api-key", "x-api-key"):
        value = headers.get(name)
        if value is not None:
            return value.strip()
    return None


class Authenticator:
    def __init__(self, keys: list[KeyConfig]) -> None:
        self.keys = keys
        self._digests = [(bytes.fromhex(k.sha256), k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, headers: dict[str, str]) -> KeyConfig:
        """The key's config, or a 401. Without configured keys, everyone is anonymous."""
        if not self.keys:
            return ANONYMOUS
        presented = extract_key(headers)
        if not presented:
            raise GatewayHTTPError(401, "missing API key: send Authorization: Bearer <key>",
                                   type="authentication_error", code="invalid_api_key",
                                   headers={"www-authenticate": "Bearer"})
        digest = hashlib.sha256(presented.encode()).digest()
        found: KeyConfig | None = None
        # Compare against every key, without an early exit, in constant time each.
        for stored, config in self._digests:
            if hmac.compare_digest(stored, digest):
                found = config
        if found is None:
            raise GatewayHTTPError(401, "invalid API key", type="authentication_error",
                                   code="invalid_api_key",
                                   headers={"www-authenticate": "Bearer"})
        return found


@dataclass
class _KeyState:
    active: int = 0
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_in_window: int = 0


class _Releases(Protocol):
    def _release(self, lease: Lease, used_tokens: int | None) -> None: ...


class Lease:
    """One admitted request's hold on its key's limits; ``release()`` exactly once."""

    def __init__(self, limiter: _Releases, key: KeyConfig, reserved: int) -> None:
        self._limiter = limiter
        self.key = key
        self.reserved = reserved
        self._released = False

    def release(self, used_tokens: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self, used_tokens)


class Limiter:
    """Per-key concurrency, request-rate and token-rate limits (sliding 60 s windows)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._states: dict[str, _KeyState] = {}
        self._clock = clock

    def active(self, key_id: str) -> int:
        state = self._states.get(key_id)
        return 0 if state is None else state.active

    def total_active(self) -> int:
        return sum(s.active for s in self._states.values())

    def clamp_max_tokens(self, key: KeyConfig, requested: int | None,
                         default: int | None) -> int | None:
        return clamp_max_tokens(key, requested, default)

    def acquire(self, key: KeyConfig, reserve_tokens: int) -> Lease:
        """Admit a request or raise a 429. No await inside: atomic on the event loop."""
        now = self._clock()
        state = self._states.setdefault(key.id, _KeyState())
        window = now - 60.0
        while state.requests and state.requests[0] <= window:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= window:
            state.tokens_in_window -= state.tokens.popleft()[1]
        if key.max_concurrent is not None and state.active >= key.max_concurrent:
            raise limit_refusal(key, "concurrency", 1)
        if key.requests_per_minute is not None and \
                len(state.requests) >= key.requests_per_minute:
            raise limit_refusal(key, "requests",
                                max(1, int(state.requests[0] + 60.0 - now) + 1))
        if key.tokens_per_minute is not None and \
                state.tokens_in_window + reserve_tokens > key.tokens_per_minute:
            retry = max(1, int(state.tokens[0][0] + 60.0 - now) + 1) if state.tokens else 60
            raise limit_refusal(key, "tokens", retry)
        state.active += 1
        state.requests.append(now)
        if reserve_tokens:
            state.tokens.append((now, reserve_tokens))
            state.tokens_in_window += reserve_tokens
        return Lease(self, key, reserve_tokens)

    def _release(self, lease: Lease, used_tokens: int | None) -> None:
        state = self._states[lease.key.id]
        state.active -= 1
        if used_tokens is not None and used_tokens != lease.reserved:
            # Reconcile the reservation with what was really used, always (a reservation
            # of 0 once skipped this, and with it the whole token limit).
            delta = used_tokens - lease.reserved
            state.tokens.append((self._clock(), delta))
            state.tokens_in_window += delta
