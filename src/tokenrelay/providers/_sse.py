"""Server-sent events: an incremental decoder (client side) and an encoder (server side).

The decoder follows the WHATWG "event stream interpretation" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

* UTF-8, decoded incrementally so a multibyte sequence split across reads survives;
  one leading BOM is dropped;
* lines end with CRLF, LF or CR, and an ending may itself be split (CR | LF);
* a blank line dispatches the event; ``data:`` lines are joined with LF; a block with
  no ``data:`` line dispatches nothing;
* ``:`` starts a comment; ``field`` alone means an empty value; one space after the
  colon is dropped; unknown fields are ignored;
* ``id`` persists across events (and is ignored when it contains NUL); ``retry`` only
  counts when it is all ASCII digits;
* an event not closed by a blank line when the stream ends is discarded.

It works on whole reads with ``str.split`` / ``str.find`` (C loops), never per
character: it is on the hot path of every streamed token.
"""

from __future__ import annotations

import codecs
import re
from typing import NamedTuple

__all__ = ["SSEDecoder", "ServerSentEvent", "comment", "encode_event"]


# A NamedTuple, not a frozen dataclass: as immutable, and built ~5x faster (a frozen
# dataclass sets each field through object.__setattr__), once per streamed token.
class ServerSentEvent(NamedTuple):
    """One dispatched event.

    Attributes:
        data: the ``data:`` lines joined with LF.
        event: the event type (``"message"`` when none was given).
        id: the last event id seen so far in the stream (``None`` before any).
        retry: the reconnection time in ms, when this event's block set one.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Bytes in, events out: ``feed(chunk) -> list[ServerSentEvent]``.

    Example::

        decoder = SSEDecoder()
        for chunk in network_reads:
            for event in decoder.feed(chunk):
                handle(event.data)
    """

    __slots__ = (
        "_data",
        "_decoder",
        "_event",
        "_partial",
        "_pending_cr",
        "_retry",
        "_started",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial: list[str] = []  # pieces of an unfinished line
        self._pending_cr = False  # the last read ended with CR: a leading LF is its pair
        self._started = False  # the BOM check is done
        self._data: list[str] = []
        self._event = ""
        self._retry: int | None = None
        #: The last event id buffer (persists across events, as the spec says).
        self.last_event_id: str | None = None
        #: The reconnection time (ms) the server asked for, if any.
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode one read; return the events it completed."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return []
        if self._pending_cr:
            self._pending_cr = False
            if text[0] == "\n":
                text = text[1:]
        if (
            # Fast path: one read holding exactly one plain "data: ...\n\n" frame and
            # nothing pending, which is how token streams arrive almost every time.
            not self._partial
            and not self._data
            and not self._event
            and self._retry is None
            and text.startswith("data: ")
            and text.find("\n") == len(text) - 2
            and text.endswith("\n\n")
            and "\r" not in text
        ):
            return [ServerSentEvent(text[6:-2], "message", self.last_event_id, None)]
        if "\r" in text:
            # A CR at the very end may be the first half of a CRLF: the line ends here
            # either way, and a LF opening the next read is swallowed.
            self._pending_cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        elif "\n" not in text:
            self._partial.append(text)
            return []
        if self._partial:
            self._partial.append(text)
            text = "".join(self._partial)
            self._partial.clear()
        lines = text.split("\n")
        tail = lines.pop()
        if tail:
            self._partial.append(tail)
        return self._lines(lines)

    def plain_data(self, chunk: bytes) -> bytes | None:
        """The payload, as bytes, when ``chunk`` is exactly one ``data: X\\n\\n`` frame and
        nothing is pending; else ``None`` and nothing changes (use :meth:`feed`).

        Most reads of a token stream are one such frame: this skips UTF-8 decoding and
        line splitting for them (a JSON parser takes the bytes as they are).
        """
        if (
            self._started
            and not self._pending_cr
            and not self._partial
            and not self._data
            and not self._event
            and self._retry is None
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
            and not self._decoder.getstate()[0]
        ):
            return chunk[6:-2]
        return None

    def plain_data_with_id(self, chunk: bytes) -> bytes | None:
        """:meth:`plain_data` for a frame that starts with a numeric ``id:`` line
        (``id: N\\ndata: X\\n\\n``, how a tokenrelay gateway numbers its frames): the
        payload, with ``last_event_id`` set to N; else ``None`` and nothing changes.

        The general way costs such a frame ~60% more (decoding and splitting its lines).
        """
        end = chunk.find(b"\n", 4, 24)
        if end < 0 or not chunk.startswith(b"id: "):
            return None
        ident = chunk[4:end]
        if not ident.isdigit():
            return None
        payload = self.plain_data(chunk[end + 1:])
        if payload is not None:
            self.last_event_id = ident.decode()
        return payload

    def _lines(self, lines: list[str]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(
                        ServerSentEvent(
                            "\n".join(data), self._event or "message", self.last_event_id,
                            self._retry,
                        )
                    )
                    data.clear()
                self._event = ""
                self._retry = None
                continue
            # Fast path: almost every line of a token stream is "data: ...".
            if line.startswith("data:"):
                data.append(line[6:] if line.startswith(" ", 5) else line[5:])
                continue
            colon = line.find(":")
            if colon == 0:
                continue  # comment
            if colon < 0:
                name, value = line, ""
            else:
                name = line[:colon]
                value = line[colon + 2:] if line.startswith(" ", colon + 1) else line[colon + 1:]
            if name == "event":
                self._event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                if "\0" not in value:
                    self.last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry = self._retry = int(value)
        return events

    def end(self) -> list[ServerSentEvent]:
        """The stream ended: flush the decoder. An unterminated event is discarded."""
        self._decoder.decode(b"", final=True)
        self._partial.clear()
        self._data.clear()
        self._event = ""
        self._retry = None
        return []


_NEWLINES = re.compile(r"\r\n|\r|\n")


def _single_line(name: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {name} cannot contain a line break: {value!r}")
    return value


def encode_event(
    data: str, *, id: str | int | None = None, event: str | None = None, retry: int | None = None
) -> bytes:
    """One SSE frame: ``event:``, ``id:``, ``retry:`` then one ``data:`` line per line.

    Line breaks in ``data`` (CRLF, CR or LF) come back as LF once decoded.

    Args:
        data: the payload (usually compact JSON).
        id: the event id (must not contain a line break or NUL).
        event: the event type; omitted means ``message``.
        retry: the reconnection time to ask clients for, in ms.
    """
    parts: list[str] = []
    if event:
        parts.append(f"event: {_single_line('event', event)}\n")
    if id is not None:
        sid = _single_line("id", str(id))
        if "\0" in sid:
            raise ValueError("an SSE id cannot contain NUL")
        parts.append(f"id: {sid}\n")
    if retry is not None:
        parts.append(f"retry: {int(retry)}\n")
    if "\n" in data or "\r" in data:
        for line in _NEWLINES.split(data):
            parts.append(f"data: {line}\n")
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode()


def comment(text: str = "") -> bytes:
    """A comment frame (``: text``), e.g. a heartbeat; clients ignore it."""
    lines = _NEWLINES.split(text) if text else [""]
    return ("".join(f": {line}\n" if line else ":\n" for line in lines) + "\n").encode()
