"""Providers: where tokens come from. One contract (:class:`Provider`), three kinds.

* :class:`~tokenrelay.providers.openai_compat.OpenAIProvider` — any OpenAI-compatible
  Chat Completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama);
* :class:`~tokenrelay.providers.local.LocalProvider` — the embedded SmolLM2 (or any GGUF)
  run by llama-cpp-python (extra ``[local]``);
* :class:`~tokenrelay.providers.mock.MockProvider` — scripted, for tests and demos.
"""

from __future__ import annotations

from .base import Chunk, ModelInfo, Provider, ToolCallChunk
from .mock import MockProvider

__all__ = ["Chunk", "MockProvider", "ModelInfo", "Provider", "ToolCallChunk"]


def __getattr__(name: str) -> object:
    # Heavy providers import on first use (llama_cpp, httpx clients).
    if name == "OpenAIProvider":
        from .openai_compat import OpenAIProvider

        return OpenAIProvider
    if name == "LocalProvider":
        from .local import LocalProvider

        return LocalProvider
    raise AttributeError(name)
