"""Pure text state machines of local decoding: token bytes → text, stop strings.

No llama.cpp here: the local provider feeds them token by token, and tests drive them
with made-up token tables.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable

__all__ = ["IncrementalDetokenizer", "StopMatcher"]


class IncrementalDetokenizer:
    """Token ids in, text out, in linear time.

    Each token's bytes go through an incremental UTF-8 decoder, so a character whose
    bytes are split across tokens comes out whole with the token that completes it.
    Bytes of a character cut off by the end of generation are dropped.

    Args:
        piece: the bytes of one token.
    """

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete character, waiting for the next token."""
        return self._decoder.getstate()[0]


class StopMatcher:
    """Cuts text at the first stop string, including one split across pieces.

    ``feed`` returns the text that is safe to show: a tail that could be the start of a
    stop string is held back until the next piece settles it.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text to emit, stopped)``; after a stop, nothing more should be fed."""
        if not self._stops:
            return text, False
        pending = self._held + text
        cut = min((i for s in self._stops if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return pending[:cut], True
        keep = self._prefix_tail(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop string."""
        held, self._held = self._held, ""
        return held

    def _prefix_tail(self, text: str) -> int:
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
