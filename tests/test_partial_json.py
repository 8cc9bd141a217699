"""The incremental partial-JSON parser against jiter (the reference) and json.loads."""

from __future__ import annotations

import doctest
import itertools
import json
import math
from typing import Any

import jiter
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenrelay import _partial_json
from tokenrelay._partial_json import PartialJSONError, PartialJSONParser

# -- helpers ---------------------------------------------------------------------------------


NOTHING: Any = object()  # nothing to show yet (jiter raises; the parser's value is None)


def reference(prefix: str) -> Any:
    """jiter's partial parse of a valid prefix, or NOTHING where jiter has nothing to show."""
    try:
        return jiter.from_json(prefix.encode(), partial_mode="trailing-strings")
    except ValueError as exc:
        # A valid prefix only fails this way: empty, or an unfinished top-level scalar.
        assert "EOF while parsing a value" in str(exc), (prefix, exc)
        return NOTHING


def same(a: Any, b: Any) -> bool:
    """Deep equality that tells 1 from 1.0 from True, -0.0 from 0.0, and lets nan equal nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def diff_path(old: Any, new: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Path of the innermost value holding every difference between two snapshots."""
    if same(old, new):
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[Any] = [
            k for k in old.keys() | new.keys() if not same(old.get(k, _ABSENT), new.get(k, _ABSENT))
        ]
    elif isinstance(old, list) and isinstance(new, list):
        keys = [k for k in range(max(len(old), len(new))) if not same(_at(old, k), _at(new, k))]
    else:
        return path
    if len(keys) != 1:
        return path
    (key,) = keys
    if key in (old if isinstance(old, dict) else range(len(old))) and key in (
        new if isinstance(new, dict) else range(len(new))
    ):
        return diff_path(old[key], new[key], (*path, key))
    return (*path, key)


def _at(items: list[Any], k: int) -> Any:
    return items[k] if k < len(items) else _ABSENT


_ABSENT = object()


def split(doc: str, cuts: list[int]) -> list[str]:
    points = [0, *sorted(cuts), len(doc)]
    return [doc[a:b] for a, b in itertools.pairwise(points)]


def check_stream(doc: str, deltas: list[str]) -> None:
    """After every delta, value and changed_path agree with jiter on the same prefix."""
    parser = PartialJSONParser()
    prefix = ""
    previous = NOTHING
    for delta in deltas:
        parser.feed(delta)
        prefix += delta
        expected = reference(prefix)
        shown = None if expected is NOTHING else expected
        assert same(parser.value, shown), (prefix, parser.value, expected)
        assert parser.changed_path == diff_path(previous, expected), (prefix, delta)
        previous = expected
    assert same(parser.finish(), json.loads(doc))
    assert parser.done


# -- strategies ------------------------------------------------------------------------------

WS = st.text(alphabet=" \t\n\r", max_size=2)
SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                 "\t": "\\t"}  # fmt: skip


def u_escape(ch: str, upper: bool) -> str:
    code = ord(ch)
    if code > 0xFFFF:  # a surrogate pair
        code -= 0x10000
        text = f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    else:
        text = f"\\u{code:04x}"
    return text.upper().replace("\\U", "\\u") if upper else text


@st.composite
def json_string(draw: st.DrawFn, text: str | None = None) -> str:
    """A string literal that escapes its characters in every way JSON allows."""
    if text is None:
        text = draw(st.text(max_size=12))
    styles = draw(st.lists(st.sampled_from("ppppul"), min_size=len(text), max_size=len(text)))
    out = ['"']
    for ch, style in zip(text, styles, strict=True):
        if style == "p" and ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif style == "p" and ord(ch) >= 0x20:
            out.append("\\/" if ch == "/" and len(out) % 2 else ch)
        else:
            out.append(u_escape(ch, style == "u"))
    out.append('"')
    return "".join(out)


NUMBER = st.from_regex(
    r"-?(0|[1-9][0-9]{0,20})(\.[0-9]{1,18})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)
SCALAR = st.one_of(
    st.sampled_from(["true", "false", "null", "NaN", "Infinity", "-Infinity"]),
    NUMBER,
    json_string(),
)


@st.composite
def json_array(draw: st.DrawFn, children: st.SearchStrategy[str]) -> str:
    parts = ["[", draw(WS)]
    for k, item in enumerate(draw(st.lists(children, max_size=5))):
        if k:
            parts += [",", draw(WS)]
        parts += [item, draw(WS)]
    return "".join([*parts, "]"])


@st.composite
def json_object(draw: st.DrawFn, children: st.SearchStrategy[str]) -> str:
    keys = draw(st.lists(st.text(max_size=6), max_size=5, unique=True))
    parts = ["{", draw(WS)]
    for k, key in enumerate(keys):
        if k:
            parts += [",", draw(WS)]
        parts += [draw(json_string(key)), draw(WS), ":", draw(WS), draw(children), draw(WS)]
    return "".join([*parts, "}"])


VALUE = st.recursive(
    SCALAR, lambda children: json_array(children) | json_object(children), max_leaves=25
)
DOC = st.builds(lambda a, v, b: a + v + b, WS, VALUE, WS)

# Documents json.dumps writes, from Python values (floats in repr form, optional indent).
PY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
DUMPED = st.builds(
    lambda value, ascii_, indent: json.dumps(value, ensure_ascii=ascii_, indent=indent),
    PY_VALUE,
    st.booleans(),
    st.sampled_from([None, 0, 2]),
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- property tests --------------------------------------------------------------------------


@SETTINGS
@given(doc=DOC)
def test_one_character_deltas_match_jiter(doc: str) -> None:
    check_stream(doc, list(doc))


@SETTINGS
@given(data=st.data(), doc=DOC | DUMPED)
def test_random_splits_match_jiter(data: st.DataObject, doc: str) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(doc)), max_size=12))
    check_stream(doc, split(doc, cuts))


@SETTINGS
@given(doc=DUMPED)
def test_dumped_documents_in_one_character_deltas(doc: str) -> None:
    check_stream(doc, list(doc))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), doc=DOC)
def test_malformed_tail_raises_where_no_prefix_can_continue(data: st.DataObject, doc: str) -> None:
    """Cutting a valid document and appending junk fails exactly where the input stops being a
    JSON prefix, which json.loads confirms."""
    cut = data.draw(st.integers(0, len(doc)))
    junk = data.draw(st.sampled_from(["}", "]", ",", ":", "x", "\x01", "'", "]]", "}}"]))
    text = doc[:cut] + junk
    parser = PartialJSONParser()
    try:
        for ch in text:
            parser.feed(ch)
        parser.finish()
    except PartialJSONError as exc:
        assert exc.offset >= cut
        with pytest.raises(ValueError):
            json.loads(text)
    else:
        assert same(parser.value, json.loads(text))


# -- hand-written cases ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ('"ab', "ab"),
        ('"a\\', "a"),
        ('"a\\u00', "a"),
        ('"a\\u00e9', "aé"),
        ('"\\ud83d', ""),  # a high surrogate waits for its low half
        ('"\\ud83d\\ude', ""),
        ('"\\ud83d\\ude00', "😀"),
        ("12", 12),
        ("-0", 0),
        ("1.5", 1.5),
        ("1e5", 100000.0),
        ("[1.", []),  # an unfinished number is left out
        ("[-", []),
        ("[1e+", []),
        ("[tru", []),
        ("[true", [True]),
        ('{"a"', {}),  # a key without a value is left out
        ('{"a": ', {}),
        ('{"a": "', {"a": ""}),
        ('{"a": [1, {"b": nul', {"a": [1, {}]}),
        ('{"a":1,"a":-', {"a": 1}),  # a duplicate key keeps its old value until the new shows
        ("[-Inf", []),
        ("[-Infinity", [-math.inf]),
    ],
)
def test_partial_values(prefix: str, expected: Any) -> None:
    assert same(reference(prefix), expected)  # jiter agrees
    for deltas in ([prefix], list(prefix)):
        parser = PartialJSONParser()
        for delta in deltas:
            parser.feed(delta)
        assert same(parser.value, expected)


@pytest.mark.parametrize("prefix", ["", " \n", "-", "1.", "1e", "1e-", "t", "nul", "fals", "-Inf"])
def test_nothing_to_show_yet_is_none_where_jiter_raises_eof(prefix: str) -> None:
    with pytest.raises(ValueError, match="EOF while parsing a value"):
        jiter.from_json(prefix.encode(), partial_mode="trailing-strings")
    parser = PartialJSONParser()
    parser.feed(prefix)
    assert parser.value is None
    assert not parser.done


@pytest.mark.parametrize(
    ("doc", "offset", "message"),
    [
        ("[1,]", 3, "trailing comma"),
        ('{"a":1,}', 7, "trailing comma"),
        ("{,", 1, "expected a string key or '}'"),
        ('{"a" 1', 5, "expected ':'"),
        ('{"a"::', 5, "expected a value"),
        ("01", 1, "leading zero"),
        ("[-01", 3, "leading zero"),
        ("1.e5", 2, "expected a digit"),
        ('{"a":1.}', 7, "expected a digit"),
        ("[1e+-", 4, "expected a digit"),
        ("-a", 1, "expected a digit"),
        ("tx", 1, "expected 'true'"),
        ("[nan", 2, "expected 'null'"),
        ('"\\x', 2, "invalid escape"),
        ('"a\x01', 2, "control character"),
        ('"\t', 1, "control character"),
        ('"\\u12g"', 5, "hex digit"),
        ('"\\ud800"', 7, "lone surrogate"),
        ('"\\ud83d\\n', 8, "lone surrogate"),
        ('"\\ud800\\u0041"', 12, "lone surrogate"),
        ('"\\udc00"', 6, "lone surrogate"),
        ("\ufeff1", 0, "expected a value"),
        ("+1", 0, "expected a value"),
        ("[\x0c", 1, "expected a value or ']'"),
    ],
)
def test_malformed_raises_at_the_offset_jiter_reports(doc: str, offset: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"column {offset + 1}$"):  # jiter: 1-based ASCII column
        jiter.from_json(doc.encode(), partial_mode="trailing-strings")
    for deltas in ([doc], list(doc)):
        parser = PartialJSONParser()
        with pytest.raises(PartialJSONError, match=message) as info:
            for delta in deltas:
                parser.feed(delta)
        assert info.value.offset == offset
        assert f"at offset {offset}" in str(info.value)


@pytest.mark.parametrize(
    ("doc", "offset", "lenient"),
    [
        ("[1 2", 3, [1]),
        ("[1}", 2, [1]),
        ("[0x", 2, [0]),
        ("[1.2.3", 4, [1.2]),
        ("[truex", 5, [True]),
        ('{"a":1]', 6, {"a": 1}),
        ("{} x", 3, {}),
        ("1 2", 2, 1),
        ('"a" "b"', 4, "a"),
        ("1\x0c", 1, 1),
        ('"ab\\u12g', 7, "ab"),
    ],
)
def test_raises_where_jiter_silently_stops(doc: str, offset: int, lenient: Any) -> None:
    """Deliberate difference: no continuation of these is valid JSON, so fail early."""
    assert same(jiter.from_json(doc.encode(), partial_mode="trailing-strings"), lenient)
    with pytest.raises(ValueError):
        json.loads(doc)
    parser = PartialJSONParser()
    with pytest.raises(PartialJSONError) as info:
        parser.feed(doc)
    assert info.value.offset == offset


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("", "a value"),
        ("[1", "',' or ']'"),
        ('{"a": 1', "',' or '}'"),
        ('{"a"', "':'"),
        ('"abc', "the rest of the string"),
        ('"a\\u00', "the rest of the escape"),
        ("1.", "the rest of the number"),
        ("tru", "the rest of the literal"),
    ],
)
def test_finish_on_incomplete_input(doc: str, expected: str) -> None:
    parser = PartialJSONParser()
    parser.feed(doc)
    with pytest.raises(
        PartialJSONError, match=f"unexpected end of input: expected {expected}"
    ) as info:
        parser.finish()
    assert info.value.offset == len(doc)
    with pytest.raises(PartialJSONError):  # errors are sticky
        parser.feed("]")


def test_finish_completes_a_top_level_number() -> None:
    parser = PartialJSONParser()
    parser.feed("12")
    assert not parser.done
    assert parser.finish() == 12
    assert parser.done


def test_changed_path_follows_the_stream() -> None:
    parser = PartialJSONParser()
    steps: list[tuple[str, tuple[str | int, ...] | None]] = [
        ('{"us', ()),  # the root object appeared
        ('ers": [{"name": "A', ("users",)),  # the list and what is in it
        ("da", ("users", 0, "name")),
        ('", "age": ', None),  # a key without a value shows nothing
        ("3", ("users", 0, "age")),
        ("6", ("users", 0, "age")),
        ("}", None),
        (", ", None),
        ('{"name": "Bo"}', ("users", 1)),
        ("], ", None),
        ('"ok": tr', None),
        ("ue", ("ok",)),
        ("", None),
        ("}", None),
    ]
    for delta, path in steps:
        parser.feed(delta)
        assert parser.changed_path == path, delta
    assert parser.finish() == {
        "users": [{"name": "Ada", "age": 36}, {"name": "Bo"}],
        "ok": True,
    }


def test_changed_path_for_numbers_that_come_and_go() -> None:
    parser = PartialJSONParser()
    parser.feed("[1")
    assert parser.changed_path == ()
    parser.feed(".")  # 1. is not a number: the element disappears
    assert (parser.value, parser.changed_path) == ([], (0,))
    parser.feed("0")
    assert (parser.value, parser.changed_path) == ([1.0], (0,))
    parser.feed("0")  # 1.00 == 1.0: nothing visible changed
    assert parser.changed_path is None
    parser.feed(", 2")  # both elements: the list is the innermost common value
    assert parser.changed_path == (1,)
    parser.feed("3, 4")
    assert parser.changed_path == ()


def test_split_surrogate_pair_and_escapes() -> None:
    doc = '{"k\\u00e9y": "a\\"b\\\\c\\n\\ud83d\\ude00/\\/"}'
    for size in (1, 2, 3, 5, 7):
        parser = PartialJSONParser()
        for i in range(0, len(doc), size):
            parser.feed(doc[i : i + size])
            expected = reference(doc[: i + size])
            assert same(parser.value, None if expected is NOTHING else expected)
        assert parser.finish() == json.loads(doc)


def test_value_is_live_and_reads_are_idempotent() -> None:
    parser = PartialJSONParser()
    parser.feed('{"a": ["x", "y')
    first = parser.value
    assert first == {"a": ["x", "y"]}
    assert parser.value is first
    parser.feed('z"]}')
    assert first == {"a": ["x", "yz"]}  # the same object, updated in place
    assert parser.finish() is first


def test_large_integer_limit_matches_python() -> None:
    parser = PartialJSONParser()
    with pytest.raises(PartialJSONError, match="out of range"):
        parser.feed("[" + "1" * 5000)


def test_docstring_example() -> None:
    assert doctest.testmod(_partial_json).failed == 0
