"""Stream transforms: regroup a text stream for the place it is shown.

Tokens are the wrong unit for many sinks: a speech engine wants sentences, a chat
bubble that re-renders wants fewer, larger pieces, a code runner wants whole fenced
code blocks. Each transform is a pure state machine (``feed(text) -> pieces``,
``flush() -> pieces``) with thin sync and async wrappers that accept any iterable of
text, such as ``stream.text_stream()``::

    with tokenrelay.stream("Tell me a story") as s:
        for sentence in sentences(s.text_stream()):
            speak(sentence)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = [
    "CodeBlock",
    "CodeBlockExtractor",
    "SentenceBuffer",
    "SizeBuffer",
    "WordBuffer",
    "aby_size",
    "acode_blocks",
    "asentences",
    "awords",
    "by_size",
    "code_blocks",
    "sentences",
    "words",
]

T = TypeVar("T")


class _Transform(Protocol[T]):
    def feed(self, text: str) -> list[T]: ...
    def flush(self) -> list[T]: ...


class SizeBuffer:
    """Pieces of at least ``size`` characters (the last one may be shorter)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._parts: list[str] = []
        self._length = 0

    def feed(self, text: str) -> list[str]:
        self._parts.append(text)
        self._length += len(text)
        if self._length < self.size:
            return []
        out = "".join(self._parts)
        self._parts, self._length = [], 0
        return [out]

    def flush(self) -> list[str]:
        out = "".join(self._parts)
        self._parts, self._length = [], 0
        return [out] if out else []


class _BoundaryBuffer:
    """Emits text up to the last boundary match; keeps the rest."""

    _boundary: re.Pattern[str]

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        self._pending += text
        last_end = -1
        pieces: list[str] = []
        start = 0
        for match in self._boundary.finditer(self._pending):
            # A boundary at the very end may still grow ("..." / "?!"), wait for more.
            if match.end() == len(self._pending):
                break
            pieces.append(self._pending[start : match.end()])
            start = last_end = match.end()
        if last_end >= 0:
            self._pending = self._pending[last_end:]
        return [p for p in pieces if p]

    def flush(self) -> list[str]:
        out, self._pending = self._pending, ""
        return [out] if out else []


class WordBuffer(_BoundaryBuffer):
    """Whole words, each with the whitespace that follows it."""

    _boundary = re.compile(r"\S+\s+")


class SentenceBuffer(_BoundaryBuffer):
    """Whole sentences (ending in . ! ? or a newline), with the whitespace after them."""

    # A sentence ends at terminal punctuation (optionally followed by closing quotes or
    # brackets) followed by whitespace, or at a blank line.
    _boundary = re.compile(r"[^.!?\n]*?(?:[.!?]+[\"')\]]*\s+|\n\s*)")


@dataclass(frozen=True, slots=True)
class CodeBlock:
    """A fenced code block from markdown text."""

    language: str
    code: str


class CodeBlockExtractor:
    """Whole fenced code blocks (```lang ... ```) as soon as each one closes."""

    _open = re.compile(r"(?m)^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n")

    def __init__(self) -> None:
        self._buffer = ""
        self._fence: str | None = None
        self._language = ""
        self._scan_from = 0

    def feed(self, text: str) -> list[CodeBlock]:
        self._buffer += text
        blocks: list[CodeBlock] = []
        while True:
            if self._fence is None:
                match = self._open.search(self._buffer, self._scan_from)
                if match is None:
                    # Keep only a tail that may be the start of a fence line.
                    cut = self._buffer.rfind("\n")
                    if cut >= 0:
                        self._buffer = self._buffer[cut + 1 :]
                    self._scan_from = 0
                    return blocks
                self._fence, self._language = match.group(1), match.group(2)
                self._buffer = self._buffer[match.end() :]
                self._scan_from = 0
            closing = re.compile(
                rf"(?m)^[ \t]*{re.escape(self._fence[0])}{{{len(self._fence)},}}[ \t]*(?:\n|$)"
            )
            match = closing.search(self._buffer, self._scan_from)
            if match is None or (match.end() == len(self._buffer) and
                                 not self._buffer.endswith("\n")):
                # Not closed yet (or the closing line may still be growing).
                self._scan_from = max(0, self._buffer.rfind("\n") + 1)
                return blocks
            blocks.append(CodeBlock(self._language, self._buffer[: match.start()]))
            self._buffer = self._buffer[match.end() :]
            self._fence, self._language, self._scan_from = None, "", 0

    def flush(self) -> list[CodeBlock]:
        blocks = []
        if self._fence is not None:
            if self._buffer.rstrip().endswith(self._fence):
                code = self._buffer.rstrip()[: -len(self._fence)]
                blocks.append(CodeBlock(self._language, code.rstrip(" \t")))
            else:
                # An unclosed block at the end of the answer still is the code.
                blocks.append(CodeBlock(self._language, self._buffer))
        self._buffer, self._fence, self._language, self._scan_from = "", None, "", 0
        return blocks


class _Apply(Generic[T]):
    @staticmethod
    def sync(transform: _Transform[T], source: Iterable[str]) -> Iterator[T]:
        for text in source:
            yield from transform.feed(text)
        yield from transform.flush()

    @staticmethod
    async def async_(transform: _Transform[T], source: AsyncIterable[str]) -> AsyncIterator[T]:
        async for text in source:
            for piece in transform.feed(text):
                yield piece
        for piece in transform.flush():
            yield piece


def by_size(source: Iterable[str], size: int) -> Iterator[str]:
    """Regroup text into pieces of at least ``size`` characters."""
    return _Apply.sync(SizeBuffer(size), source)


def words(source: Iterable[str]) -> Iterator[str]:
    """Regroup text into whole words."""
    return _Apply.sync(WordBuffer(), source)


def sentences(source: Iterable[str]) -> Iterator[str]:
    """Regroup text into whole sentences."""
    return _Apply.sync(SentenceBuffer(), source)


def code_blocks(source: Iterable[str]) -> Iterator[CodeBlock]:
    """The fenced code blocks of a markdown answer, each as soon as it closes."""
    return _Apply.sync(CodeBlockExtractor(), source)


def aby_size(source: AsyncIterable[str], size: int) -> AsyncIterator[str]:
    return _Apply.async_(SizeBuffer(size), source)


def awords(source: AsyncIterable[str]) -> AsyncIterator[str]:
    return _Apply.async_(WordBuffer(), source)


def asentences(source: AsyncIterable[str]) -> AsyncIterator[str]:
    return _Apply.async_(SentenceBuffer(), source)


def acode_blocks(source: AsyncIterable[str]) -> AsyncIterator[CodeBlock]:
    return _Apply.async_(CodeBlockExtractor(), source)
