"""Fakes to test against: tokenrelay's own tests use them, and so can yours.

* :class:`MockUpstream` (:mod:`tokenrelay.testing.mock_upstream`) — a fault-injecting
  OpenAI-compatible HTTP server on a thread of its own (``tokenrelay mock-upstream`` from
  the command line), with a record of every request it saw;
* :class:`MockProvider` — the scripted in-process provider (model ``mock:...``);
* :func:`parse_spec` (:mod:`tokenrelay.testing._mock_spec`) — the one spelling of both
  mocks' options and faults: ``tokens=50,tps=20,fault=error,after=5``.

Names load on first use, so that the scripted provider (which reads the option spelling
from here) does not pull in the HTTP server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..providers.mock import MockProvider
    from ._mock_spec import parse_spec
    from .mock_upstream import Behaviour, Exchange, MockUpstream, RequestRecord, token_text

__all__ = ["Behaviour", "Exchange", "MockProvider", "MockUpstream", "RequestRecord",
           "parse_spec", "token_text"]

_HOMES = {
    "Behaviour": "tokenrelay.testing.mock_upstream",
    "Exchange": "tokenrelay.testing.mock_upstream",
    "MockUpstream": "tokenrelay.testing.mock_upstream",
    "RequestRecord": "tokenrelay.testing.mock_upstream",
    "token_text": "tokenrelay.testing.mock_upstream",
    "MockProvider": "tokenrelay.providers.mock",
    "parse_spec": "tokenrelay.testing._mock_spec",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
