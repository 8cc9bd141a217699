"""Pure text state machines of local decoding: token bytes → text, stop strings.

No llama.cpp here: the local provider feeds them token by token, and tests drive them
with made-up token tables.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable

__all__ = ["IncrementalDetokenizer", "JsonEnd", "StopMatcher", "ToolCallText"]


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


class JsonEnd:
    """Finds where a top-level JSON object or array ends in streamed text.

    ``feed`` returns the offset in its piece just past the closing bracket, else -1.
    A top-level scalar (string, number, ...) has no brackets to count: -1 throughout.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False
        self.started = False
        self.done = False

    def feed(self, text: str) -> int:
        if self.done or self._scalar:
            return -1
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch in "{[":
                self._depth += 1
                self.started = True
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0 and self.started:
                    self.done = True
                    return i + 1
            elif not self.started and not ch.isspace():
                self._scalar = True
                return -1
            elif ch == '"':
                self._in_string = True
        return -1


_TOOL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


class ToolCallText:
    """Streamed ``{"name": ..., "arguments": {...}}`` text → the name, then the
    arguments JSON in pieces (the wrapper stripped).

    ``feed`` returns ``(name, arguments piece)``: the name once, with the piece that
    completes the ``"arguments":`` prefix, ``None`` otherwise.
    """

    def __init__(self) -> None:
        self._head = ""
        self.name: str | None = None
        self._arguments = JsonEnd()
        self.complete = False  # the arguments value is closed

    def feed(self, text: str) -> tuple[str | None, str]:
        name = None
        if self.name is None:
            self._head += text
            match = _TOOL_HEAD.match(self._head)
            if match is None:
                return None, ""
            self.name = name = match.group(1)
            text, self._head = self._head[match.end():], ""
        if self.complete:
            return name, ""
        if not self._arguments.started:
            text = text.lstrip()
        end = self._arguments.feed(text)
        if end >= 0:
            self.complete = True
            text = text[:end]
        return name, text
