"""Incremental partial-JSON parser: each delta is scanned once, so a whole stream costs O(n).

The usual way to show JSON while it streams (openai-python's ``jiter.from_json(...,
partial_mode=True)`` on each chunk, instructor, the Vercel AI SDK) re-parses the whole
accumulated text every time, which is quadratic in the document size. :class:`PartialJSONParser` is a push parser instead: it keeps a
stack of the open containers, builds dicts and lists in place, and holds the one unfinished
scalar (a string or number "tip") apart until ``value`` is read.

``value`` after each delta equals ``jiter.from_json(prefix, partial_mode="trailing-strings")``
for the same prefix: unfinished strings are shown as far as they go (a half-received escape or
surrogate pair is held back), unfinished numbers and literals (``1.``, ``-``, ``tru``) and
object keys without a value are left out. Where it deliberately differs:

* jiter raises "EOF while parsing a value" while nothing can be shown at the top level
  (``""``, ``" "``, ``"-"``, ``"tru"``); here ``value`` is ``None`` and no error is raised,
  because the input is still a valid prefix.
* jiter's partial mode stops silently at some malformed input and returns what it has:
  anything after a complete top-level value (``{} x``), a character other than ``,``/``]``/``}``
  after an element (``[1 2``, ``[1}``, ``[0x``, ``[1.2.3``, ``[truex``), a bad hex digit in a
  trailing ``\\u`` escape (``"ab\\u12g``). No continuation of such input is valid JSON, so this
  parser raises :class:`PartialJSONError` at the offending character (trailing whitespace is
  fine).
* Offsets are character offsets into the concatenated input; jiter reports byte columns.
* Lone surrogate escapes (``"\\ud800"``) are an error, as in jiter and pydantic (they cannot
  be encoded as UTF-8), although :func:`json.loads` accepts them.

Like jiter, pydantic and :func:`json.loads`, it accepts ``NaN``, ``Infinity`` and
``-Infinity``. Integers longer than :func:`sys.get_int_max_str_digits` are an error, as there.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any, NoReturn

__all__ = ["PartialJSONError", "PartialJSONParser"]


class PartialJSONError(ValueError):
    """The input is not valid JSON (or ended too early, from ``finish()``).

    Args:
        message: what was expected and what came instead.
        offset: character offset of the problem in the concatenated input.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset {offset}")
        self.offset = offset


# Parser states: what the next non-whitespace character may be.
_VALUE = 0  # a value: the top-level one or an object member's
_ARR_FIRST = 1  # after "[": a value or "]"
_ARR_VALUE = 2  # after "," in an array: a value
_ARR_NEXT = 3  # after an array element: "," or "]"
_OBJ_FIRST = 4  # after "{": a key or "}"
_OBJ_KEY = 5  # after "," in an object: a key
_OBJ_COLON = 6  # after a key: ":"
_OBJ_NEXT = 7  # after a member's value: "," or "}"
_STRING = 8  # inside a string (a key or a value)
_NUMBER = 9
_LITERAL = 10  # inside true / false / null
_DONE = 11  # after the top-level value: whitespace only

_EXPECTED = {
    _VALUE: "a value",
    _ARR_FIRST: "a value or ']'",
    _ARR_VALUE: "a value",
    _ARR_NEXT: "',' or ']'",
    _OBJ_FIRST: "a string key or '}'",
    _OBJ_KEY: "a string key",
    _OBJ_COLON: "':' after the object key",
    _OBJ_NEXT: "',' or '}'",
    _STRING: "the rest of the string",
    _NUMBER: "the rest of the number",
    _LITERAL: "the rest of the literal",
}

# Number grammar (RFC 8259 section 6) as a DFA over the characters of one number.
_N_START, _N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(9)
_NUM_COMPLETE = (False, False, True, True, False, True, False, False, True)
_DIGITS = "0123456789"


def _to(chars: str, state: int) -> dict[str, int]:
    return dict.fromkeys(chars, state)


_NUM_NEXT: tuple[dict[str, int], ...] = (
    {"-": _N_MINUS, "0": _N_ZERO, **_to("123456789", _N_INT)},  # start
    {"0": _N_ZERO, **_to("123456789", _N_INT)},  # "-"
    {".": _N_DOT, **_to("eE", _N_E)},  # "0", "-0"
    {**_to(_DIGITS, _N_INT), ".": _N_DOT, **_to("eE", _N_E)},  # integer digits
    _to(_DIGITS, _N_FRAC),  # "1."
    {**_to(_DIGITS, _N_FRAC), **_to("eE", _N_E)},  # fraction digits
    {**_to(_DIGITS, _N_EXP), **_to("+-", _N_ESIGN)},  # "1e"
    _to(_DIGITS, _N_EXP),  # "1e+"
    _to(_DIGITS, _N_EXP),  # exponent digits
)

# NaN and the infinities are not JSON (RFC 8259), but jiter, pydantic and json.loads accept them.
_LITERALS: dict[str, tuple[str, Any]] = {
    "t": ("true", True),
    "f": ("false", False),
    "n": ("null", None),
    "N": ("NaN", math.nan),
    "I": ("Infinity", math.inf),
    "-": ("-Infinity", -math.inf),
}
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_WS = " \t\n\r"

# The first character that ends a run of plain string content.
_STRING_SPECIAL = re.compile(r'["\\\x00-\x1f]').search
_NOT_WS = re.compile(r"[^ \t\n\r]").search

_MISSING: Any = object()


def _number(text: str) -> int | float:
    if "." in text or "e" in text or "E" in text:
        return float(text)
    return int(text)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


class PartialJSONParser:
    """Parse one JSON value that arrives in pieces, in O(total length).

    Example:
        >>> p = PartialJSONParser()
        >>> p.feed('{"city": "Par')
        >>> p.value
        {'city': 'Par'}
        >>> p.feed('is", "te')
        >>> p.value, p.changed_path
        ({'city': 'Paris'}, ('city',))
        >>> p.feed('mp": 2')
        >>> p.value, p.changed_path
        ({'city': 'Paris', 'temp': 2}, ('temp',))
        >>> p.feed("1}")
        >>> p.finish()
        {'city': 'Paris', 'temp': 21}

    ``value`` is one live object, updated in place by later feeds: treat it as read-only and
    ``copy.deepcopy`` it to keep a snapshot. ``feed`` costs O(len(delta)); reading ``value``
    costs O(1) plus rebuilding the unfinished string, if it grew (a ``str`` cannot grow in
    place), so one very long string read after every delta is the one quadratic case. After an error every ``feed``/``finish`` raises
    the same :class:`PartialJSONError` again.
    """

    __slots__ = (
        "_changed", "_dirty", "_error", "_esc", "_hi", "_is_key", "_key", "_lit", "_lit_n",
        "_max_digits", "_nstate", "_num", "_parent", "_path", "_pieces", "_plain", "_pos",
        "_root", "_serial", "_shadow", "_stack", "_state", "_t0", "_tip", "_tip_in", "_tip_key",
        "_tip_path", "_v0", "_vis",
    )  # fmt: skip

    def __init__(self) -> None:
        self._state = _VALUE
        self._stack: list[Any] = []  # open containers, outermost first
        self._path: list[str | int] = []  # key of each open container but the root
        self._key = ""  # the current object key
        self._root: Any = None
        self._pos = 0  # characters consumed before the current delta
        self._error: PartialJSONError | None = None
        self._changed: tuple[str | int, ...] | None = None
        self._plain = False  # inside a string, no escape or surrogate half pending
        # The unfinished scalar ("tip"): _STRING, _NUMBER, _LITERAL, or 0 for none.
        self._tip = 0
        self._parent: Any = None  # the container the tip goes in (None: the root)
        self._tip_key: Any = None  # its key there (an index in a list)
        self._tip_in = False  # the tip's current value sits in its parent
        self._tip_path: tuple[str | int, ...] | None = None
        self._shadow: Any = _MISSING  # what a duplicate key held before this value
        self._serial = 0  # counts tips, so a feed can tell "same tip" from "new tip"
        self._dirty = False  # the tip's shown value is stale
        self._is_key = False
        self._pieces: list[str] = []  # the string tip's content, joined when shown
        self._vis = 0  # characters of string content so far
        self._esc = ""  # an unfinished escape, e.g. "\\u00"
        self._hi = -1  # a high surrogate waiting for its low half
        self._num = ""
        self._nstate = _N_START
        self._lit = ""
        self._lit_n = 0
        self._t0 = 0  # _serial and _marker() when the current feed began
        self._v0: Any = None
        self._max_digits = sys.get_int_max_str_digits()

    @property
    def value(self) -> Any:
        """The value so far (``None`` until something can be shown)."""
        if self._dirty:
            self._dirty = False
            if self._tip == _STRING:
                pieces = self._pieces
                if len(pieces) != 1:
                    text = "".join(pieces)
                    pieces.clear()
                    pieces.append(text)
                if self._tip_in and self._parent is not None:
                    self._parent[self._tip_key] = pieces[0]
                else:
                    self._place(pieces[0])
            elif _NUM_COMPLETE[self._nstate]:
                self._place(_number(self._num))
            elif self._tip_in:
                self._unplace()
        return self._root

    @property
    def changed_path(self) -> tuple[str | int, ...] | None:
        """Path of the innermost value holding every change the last feed made, or ``None``."""
        return self._changed

    @property
    def done(self) -> bool:
        """Whether a complete top-level value has been parsed.

        A bare top-level number is only complete at whitespace or ``finish()``: more digits
        may follow.
        """
        return self._state == _DONE

    def feed(self, delta: str) -> None:
        """Parse the next piece of the document.

        Args:
            delta: the new text only; each piece is passed exactly once.

        Raises:
            PartialJSONError: the text so far cannot be the start of a JSON document.
        """
        if self._plain and delta and '"' not in delta and "\\" not in delta and delta.isprintable():
            # Fast path: the whole delta is plain string content, the commonest case.
            self._pieces.append(delta)
            self._pos += len(delta)
            if self._is_key:
                self._changed = None
            else:
                self._vis += len(delta)
                self._dirty = True
                self._changed = self._tip_path or self._make_tip_path()
            return
        if self._error is not None:
            raise self._error
        try:
            self._run(delta)
        except PartialJSONError as exc:
            self._error = exc
            self._plain = False
            raise

    def finish(self) -> Any:
        """Mark the end of input and return the complete value.

        Raises:
            PartialJSONError: the document is incomplete or invalid.
        """
        if self._error is not None:
            raise self._error
        state = self._state
        if state == _NUMBER and _NUM_COMPLETE[self._nstate]:
            if not self._stack:
                self._commit(_number(self._num), changed=False)
                return self._root
            state = _ARR_NEXT if type(self._stack[-1]) is list else _OBJ_NEXT
        if state != _DONE:
            expected = "the rest of the escape" if self._esc else _EXPECTED[state]
            self._error = PartialJSONError(
                f"unexpected end of input: expected {expected}", self._pos
            )
            self._plain = False  # so that feed() reaches the error check
            raise self._error
        return self._root

    # -- the scanner ---------------------------------------------------------------------------

    def _run(self, delta: str) -> None:
        self._changed = None
        self._t0 = self._serial
        self._v0 = self._marker()
        base = self._pos
        n = len(delta)
        i = 0
        while i < n:
            st = self._state
            if st == _STRING:
                if not self._plain:
                    i = self._scan_escape(delta, i, base)
                    continue
                m = _STRING_SPECIAL(delta, i)
                j = n if m is None else m.start()
                if j > i:
                    self._pieces.append(delta[i:j])
                    if not self._is_key:
                        self._vis += j - i
                        self._dirty = True
                    if j == n:
                        break
                c = delta[j]
                i = j + 1
                if c == '"':
                    self._end_string()
                elif c == "\\":
                    self._esc = "\\"
                    self._plain = False
                else:
                    self._fail(f"control character {c!r} in a string (escape it)", base + j)
                continue
            if st == _NUMBER:
                i = self._scan_number(delta, i, n, base)
                continue
            if st == _LITERAL:
                i = self._scan_literal(delta, i, n, base)
                continue
            c = delta[i]
            if c in _WS:
                i += 1
                if i < n and delta[i] in _WS:  # a longer run (indentation): skip it in C
                    m = _NOT_WS(delta, i)
                    i = n if m is None else m.start()
                continue
            if st <= _ARR_VALUE:  # a value may start here
                if c == '"':
                    self._begin_tip(_STRING)
                    self._is_key = False
                    self._pieces.clear()
                    self._vis = 0
                    self._dirty = True
                    self._state = _STRING
                    self._plain = True
                    i += 1
                elif c == "{" or c == "[":
                    self._open({} if c == "{" else [])
                    i += 1
                elif c in "-0123456789":
                    self._begin_tip(_NUMBER)
                    self._num = ""
                    self._nstate = _N_START
                    self._state = _NUMBER
                elif c in "tfnNI":
                    self._begin_tip(_LITERAL)
                    self._lit = c
                    self._lit_n = 0
                    self._state = _LITERAL
                elif c == "]" and st == _ARR_FIRST:
                    self._close()
                    i += 1
                elif c == "]" and st == _ARR_VALUE:
                    self._fail("expected a value after ',', got ']' (trailing comma)", base + i)
                else:
                    self._fail(f"expected {_EXPECTED[st]}, got {c!r}", base + i)
            elif st == _ARR_NEXT or st == _OBJ_NEXT:
                if c == ",":
                    self._state = _ARR_VALUE if st == _ARR_NEXT else _OBJ_KEY
                elif c == ("]" if st == _ARR_NEXT else "}"):
                    self._close()
                else:
                    self._fail(f"expected {_EXPECTED[st]}, got {c!r}", base + i)
                i += 1
            elif st == _OBJ_FIRST or st == _OBJ_KEY:
                if c == '"':
                    self._tip = _STRING
                    self._serial += 1
                    self._is_key = True
                    self._pieces.clear()
                    self._state = _STRING
                    self._plain = True
                elif c == "}" and st == _OBJ_FIRST:
                    self._close()
                elif c == "}":
                    self._fail(
                        "expected a string key after ',', got '}' (trailing comma)", base + i
                    )
                else:
                    self._fail(f"expected {_EXPECTED[st]}, got {c!r}", base + i)
                i += 1
            elif st == _OBJ_COLON:
                if c != ":":
                    self._fail(f"expected ':' after the object key, got {c!r}", base + i)
                self._state = _VALUE
                i += 1
            else:  # _DONE
                self._fail(f"unexpected {c!r} after the end of the JSON value", base + i)
        self._pos = base + n
        self._end_of_feed()

    def _end_string(self) -> None:
        self._plain = False
        pieces = self._pieces
        text = pieces[0] if len(pieces) == 1 else "".join(pieces)
        if self._is_key:
            self._tip = 0
            self._key = text
            self._state = _OBJ_COLON
        else:
            self._commit(text, changed=self._serial != self._t0 or self._vis != self._v0)

    def _scan_escape(self, delta: str, i: int, base: int) -> int:
        """One character of an escape, or of what must follow a high surrogate."""
        c = delta[i]
        esc = self._esc
        if not esc:  # a high surrogate came last: only "\\" (then "u" and a low half) may follow
            if c != "\\":
                self._lone_surrogate(base + i)
            self._esc = "\\"
            return i + 1
        if len(esc) == 1:
            if c == "u":
                self._esc = "\\u"
                return i + 1
            ch = _ESCAPES.get(c)
            if ch is None:
                self._fail(f"invalid escape '\\{c}' in a string", base + i)
            if self._hi >= 0:
                self._lone_surrogate(base + i)
            self._esc = ""
            self._add(ch)
            return i + 1
        if c not in _HEX:
            self._fail(f"expected a hex digit in a \\u escape, got {c!r}", base + i)
        esc += c
        if len(esc) < 6:
            self._esc = esc
            return i + 1
        self._esc = ""
        code = int(esc[2:6], 16)
        if self._hi >= 0:
            if not 0xDC00 <= code <= 0xDFFF:
                self._lone_surrogate(base + i)
            code = 0x10000 + ((self._hi - 0xD800) << 10) + (code - 0xDC00)
            self._hi = -1
        elif 0xD800 <= code <= 0xDBFF:
            self._hi = code  # held back until the low half arrives, as jiter does
            return i + 1
        elif 0xDC00 <= code <= 0xDFFF:
            self._lone_surrogate(base + i)
        self._add(chr(code))
        return i + 1

    def _add(self, ch: str) -> None:
        self._pieces.append(ch)
        self._plain = True
        if not self._is_key:
            self._vis += 1
            self._dirty = True

    def _lone_surrogate(self, offset: int) -> NoReturn:
        self._fail(
            "lone surrogate in a \\u escape (expected a \\uD800-\\uDBFF, \\uDC00-\\uDFFF pair)",
            offset,
        )

    def _scan_number(self, delta: str, i: int, n: int, base: int) -> int:
        ns = self._nstate
        start = i
        while i < n:
            nxt = _NUM_NEXT[ns].get(delta[i])
            if nxt is None:
                break
            ns = nxt
            i += 1
        num = self._num = self._num + delta[start:i]
        self._nstate = ns
        self._dirty = True
        if ns == _N_INT and self._max_digits and len(num) > self._max_digits:
            excess = len(num) - (num[0] == "-") - self._max_digits
            if excess > 0:  # int() would refuse it, as json.loads and jiter do
                self._fail("integer out of range (too many digits)", base + i - excess)
        if i < n:  # the number ended at delta[i]
            c = delta[i]
            if c == "I" and ns == _N_MINUS:  # not a number after all: -Infinity
                self._tip = self._state = _LITERAL
                self._lit = "-"
                self._lit_n = 1
                self._dirty = False
                return i
            if not _NUM_COMPLETE[ns]:
                self._fail(f"expected a digit, got {c!r}", base + i)
            if ns == _N_ZERO and c in _DIGITS:
                self._fail("invalid number: leading zero", base + i)
            v0 = self._v0
            unchanged = (
                self._serial == self._t0
                and v0 is not None
                and (v0 == num or _same(_number(v0), _number(num)))
            )
            self._commit(_number(num), changed=not unchanged)
        return i

    def _scan_literal(self, delta: str, i: int, n: int, base: int) -> int:
        word, value = _LITERALS[self._lit]
        k = self._lit_n
        while i < n and k < len(word):
            if delta[i] != word[k]:
                self._fail(f"expected {word!r}, got {delta[i]!r}", base + i)
            i += 1
            k += 1
        self._lit_n = k
        if k == len(word):
            self._commit(value, changed=True)
        return i

    # -- building the value --------------------------------------------------------------------

    def _begin_tip(self, kind: int) -> None:
        self._tip = kind
        self._serial += 1
        self._tip_in = False
        self._tip_path = None
        stack = self._stack
        if stack:
            parent = self._parent = stack[-1]
            if type(parent) is list:
                self._tip_key = len(parent)
            else:
                self._tip_key = self._key
                self._shadow = parent.get(self._key, _MISSING)
        else:
            self._parent = None

    def _make_tip_path(self) -> tuple[str | int, ...]:
        self._tip_path = (*self._path, self._tip_key) if self._stack else ()
        return self._tip_path

    def _marker(self) -> Any:
        """What the tip shows now, to tell at the end of a feed whether it changed."""
        if self._tip == _STRING and not self._is_key:
            return self._vis
        if self._tip == _NUMBER and _NUM_COMPLETE[self._nstate]:
            return self._num
        return None

    def _place(self, value: Any) -> None:
        parent = self._parent
        if parent is None:
            self._root = value
        elif self._tip_in or type(parent) is dict:
            parent[self._tip_key] = value
        else:
            parent.append(value)
        self._tip_in = True

    def _unplace(self) -> None:
        parent = self._parent
        if parent is None:
            self._root = None
        elif type(parent) is list:
            parent.pop()
        elif self._shadow is _MISSING:
            del parent[self._tip_key]
        else:
            parent[self._tip_key] = self._shadow
        self._tip_in = False

    def _commit(self, value: Any, *, changed: bool) -> None:
        """Store the finished tip in its parent and move past it."""
        parent = self._parent
        if parent is None:
            self._root = value
            self._state = _DONE
        elif type(parent) is list:
            if self._tip_in:
                parent[-1] = value
            else:
                parent.append(value)
            self._state = _ARR_NEXT
        else:
            parent[self._tip_key] = value
            self._state = _OBJ_NEXT
        if changed:
            self._mark(self._tip_path or self._make_tip_path())
        self._tip = 0
        self._tip_in = False
        self._dirty = False

    def _open(self, container: dict[str, Any] | list[Any]) -> None:
        stack = self._stack
        if stack:
            parent = stack[-1]
            if type(parent) is list:
                key: str | int = len(parent)
                parent.append(container)
            else:
                key = self._key
                parent[key] = container
            self._path.append(key)
        else:
            self._root = container
        stack.append(container)
        self._mark(tuple(self._path))
        self._state = _OBJ_FIRST if type(container) is dict else _ARR_FIRST

    def _close(self) -> None:
        self._stack.pop()
        if self._stack:
            self._path.pop()
        self._after_value()

    def _after_value(self) -> None:
        stack = self._stack
        if not stack:
            self._state = _DONE
        else:
            self._state = _ARR_NEXT if type(stack[-1]) is list else _OBJ_NEXT

    def _mark(self, path: tuple[str | int, ...]) -> None:
        """Widen ``changed_path`` to the common ancestor of what it held and ``path``."""
        old = self._changed
        if old is None:
            self._changed = path
            return
        k = 0
        for a, b in zip(old, path, strict=False):
            if type(a) is not type(b) or a != b:
                break
            k += 1
        if k < len(old):
            self._changed = old[:k]

    def _end_of_feed(self) -> None:
        """Record a change to the still-unfinished tip, if the feed made one."""
        tip = self._tip
        if tip == _STRING and not self._is_key:
            if self._serial != self._t0 or self._vis != self._v0:
                self._mark(self._tip_path or self._make_tip_path())
        elif tip == _NUMBER:
            now = self._num if _NUM_COMPLETE[self._nstate] else None
            v0 = self._v0 if self._serial == self._t0 else None
            if now is None:
                changed = v0 is not None
            else:
                changed = v0 is None or (now != v0 and not _same(_number(now), _number(v0)))
            if changed:
                self._mark(self._tip_path or self._make_tip_path())

    def _fail(self, message: str, offset: int) -> NoReturn:
        raise PartialJSONError(message, offset)
