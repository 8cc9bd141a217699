from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.transforms import (
    CodeBlock,
    acode_blocks,
    asentences,
    by_size,
    code_blocks,
    sentences,
    words,
)


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


texts = st.text(alphabet="ab .!?\n`'\"xyz", max_size=200)
cut_lists = st.lists(st.integers(min_value=0, max_value=400), max_size=30)


@given(texts, cut_lists, st.integers(min_value=1, max_value=20))
def test_by_size_keeps_text_and_sizes(text: str, cuts: list[int], size: int) -> None:
    pieces = list(by_size(split_at(text, cuts), size))
    assert "".join(pieces) == text
    assert all(len(p) >= size for p in pieces[:-1])


@given(texts, cut_lists)
def test_words_and_sentences_keep_text_whatever_the_split(text: str, cuts: list[int]) -> None:
    chunks = split_at(text, cuts)
    assert "".join(words(chunks)) == text
    assert "".join(sentences(chunks)) == text
    # The grouping does not depend on how the text was split.
    assert list(sentences(chunks)) == list(sentences([text[i] for i in range(len(text))]))


def test_sentences_and_words() -> None:
    chunks = ["Hello wor", "ld. How are", " you? I'm fi", "ne!", " Bye"]
    assert list(sentences(chunks)) == ["Hello world. ", "How are you? ", "I'm fine! ", "Bye"]
    assert list(words(["he", "llo wo", "rld  x"])) == ["hello ", "world  ", "x"]


ANSWER = (
    "Here is code:\n```python\nprint('hi')\nx = 1\n```\nand more\n"
    "~~~\nplain ``` not a fence\n~~~\nthe end ```js\nnot code\n"
    "```bash\necho unclosed"
)
EXPECTED = [
    CodeBlock("python", "print('hi')\nx = 1\n"),
    CodeBlock("", "plain ``` not a fence\n"),
    CodeBlock("bash", "echo unclosed"),
]


@settings(max_examples=200)
@given(cut_lists)
def test_code_blocks_any_split(cuts: list[int]) -> None:
    assert list(code_blocks(split_at(ANSWER, cuts))) == EXPECTED


def test_code_block_emitted_as_soon_as_it_closes() -> None:
    seen: list[list[CodeBlock]] = []
    from tokenrelay.transforms import CodeBlockExtractor

    extractor = CodeBlockExtractor()
    for piece in ["intro\n``", "`py\nx=1\n", "```\n", "after"]:
        seen.append(extractor.feed(piece))
    assert seen[:2] == [[], []]
    assert seen[2] == [CodeBlock("py", "x=1\n")]


def test_async_wrappers() -> None:
    async def source(parts: list[str]):  # type: ignore[no-untyped-def]
        for p in parts:
            yield p

    async def main() -> tuple[list[str], list[CodeBlock]]:
        s = [x async for x in asentences(source(["A b. C", " d."]))]
        c = [x async for x in acode_blocks(source(["```\nz\n", "```\n"]))]
        return s, c

    assert asyncio.run(main()) == (["A b. ", "C d."], [CodeBlock("", "z\n")])
