"""Browser-test helpers: the gateway on a loopback uvicorn thread, and headless Chromium.

Chromium is the system one (Debian: ``apt-get install -y chromium``) driven by Playwright
for Python (``pip install playwright``). ``playwright install`` (a browser download) is
never needed: the browser is launched with ``executable_path``.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

__all__ = ["CHROMIUM_ARGS", "GatewayServer", "chromium_path", "launch_chromium"]

# Offline and quiet: no component updates, sync, first-run UI or background fetches.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]


def chromium_path() -> str | None:
    """The system Chromium, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class GatewayServer:
    """Serve an ASGI app with uvicorn on ``127.0.0.1`` (a free port) in a daemon thread.

    The listening socket is bound before the thread starts, so there is no port race.
    """

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none",
                                                    lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, name="gateway",
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._socket.close()


@contextmanager
def launch_chromium(user_data_dir: Path, *, timeout_ms: int = 10_000) -> Iterator[Any]:
    """A Playwright browser context on the system Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    assert executable is not None
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1024, "height": 760}, color_scheme="light")
        context.set_default_timeout(timeout_ms)
        try:
            yield context
        finally:
            context.close()
