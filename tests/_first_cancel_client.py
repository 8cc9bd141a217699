"""A fresh process that stops one stream the way a user would, then reports counts.

    python _first_cancel_client.py FACE HOW PROVIDER URL

FACE ``async`` | ``sync``; HOW ``break`` | ``close`` | ``cancel`` (async only) | ``sigint``
(a real SIGINT to this process, as Ctrl-C sends); PROVIDER ``openai`` (the
OpenAI-compatible upstream at URL) | ``local`` (the embedded model). It stops after
``STOP_AFTER`` text deltas and prints one JSON line: the deltas consumed, and for the
local provider the tokens its decoder sampled. Nothing is warmed up first: this is the
first cancel of the process, with the token estimator not loaded yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import tokenrelay
from tokenrelay.events import TextDelta

STOP_AFTER = 5


def main() -> None:
    face, how, which, url = sys.argv[1:5]
    provider: Any = None
    options: dict[str, Any] = {}
    if which == "local":
        from tokenrelay.providers.local import LocalProvider

        provider = LocalProvider(n_threads=1, n_ctx=512)
        options = {"provider": provider, "max_tokens": 200,
                   "extra": {"ignore_eos": True}}
    else:
        # 200 tokens, one every 20 ms; the upstream reports usage only at the end, so a
        # stream stopped early counts its tokens itself.
        options = {"model": "tokens=200,tps=50", "base_url": url, "api_key": "test"}
    consumed = 0
    try:
        if face == "async":
            consumed = asyncio.run(_async(how, options))
        else:
            consumed = _sync(how, options)
    except KeyboardInterrupt:
        consumed = _counted[0]
    report = {"consumed": consumed}
    if provider is not None:
        report["decoded"] = provider.tokens_decoded
    print(json.dumps(report), flush=True)


_counted = [0]


def _seen(event: object) -> bool:
    """Count a text delta; true when it is time to stop."""
    if isinstance(event, TextDelta):
        _counted[0] += 1
    return _counted[0] >= STOP_AFTER


async def _async(how: str, options: dict[str, Any]) -> int:
    if how == "cancel":
        stopped = asyncio.Event()

        async def consume() -> None:
            async with tokenrelay.astream("Count to one hundred.", **options) as stream:
                async for event in stream:
                    if _seen(event):
                        stopped.set()

        task = asyncio.create_task(consume())
        await stopped.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return _counted[0]
    async with tokenrelay.astream("Count to one hundred.", **options) as stream:
        async for event in stream:
            if _seen(event):
                if how == "break":
                    break
                if how == "close":
                    await stream.aclose()
                    break
                if how == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)  # asyncio.run cancels this task
                    signal_sent = True  # noqa: F841 - keep consuming until it lands
    return _counted[0]


def _sync(how: str, options: dict[str, Any]) -> int:
    with tokenrelay.stream("Count to one hundred.", **options) as stream:
        for event in stream:
            if _seen(event):
                if how == "break":
                    break
                if how == "close":
                    stream.close()
                    break
                if how == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt lands here
    return _counted[0]


if __name__ == "__main__":
    main()
