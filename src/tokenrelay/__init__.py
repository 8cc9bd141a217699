"""tokenrelay: stream large-language-model text to people as it is generated.

>>> import tokenrelay
>>> with tokenrelay.stream("Why is the sky blue?", max_tokens=64) as s:
...     for text in s.text_stream():
...         print(text, end="", flush=True)
"""

from . import errors, events, providers, structured, tools
from ._api import abatch, acomplete, astream, batch, complete, stream
from ._stream import AsyncStream, Result, ToolCall
from ._sync_stream import Stream
from .errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConnectionError,
    ProviderError,
    RateLimitError,
    ServerError,
    StreamError,
    StructuredOutputError,
    TimeoutError,
    TokenrelayError,
    UsageError,
)
from .events import (
    Done,
    ErrorEvent,
    Metrics,
    RawChunk,
    StreamEvent,
    StructuredPartial,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    ToolResult,
    Usage,
    UsageEvent,
)
from .request import Message, Request, ResponseFormat, RetryPolicy, Timeouts, ToolSpec
from .tools import Tool

__version__ = "0.1.0"

__all__ = [
    "APIStatusError",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConnectionError",
    "Done",
    "ErrorEvent",
    "Message",
    "Metrics",
    "ProviderError",
    "RateLimitError",
    "RawChunk",
    "Request",
    "ResponseFormat",
    "Result",
    "RetryPolicy",
    "ServerError",
    "Stream",
    "StreamError",
    "StreamEvent",
    "StructuredOutputError",
    "StructuredPartial",
    "TextDelta",
    "TimeoutError",
    "Timeouts",
    "TokenrelayError",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallDone",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "UsageError",
    "UsageEvent",
    "__version__",
    "abatch",
    "acomplete",
    "astream",
    "batch",
    "complete",
    "errors",
    "events",
    "providers",
    "stream",
    "structured",
    "tools",
]
