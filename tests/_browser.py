"""Browser-test helpers: headless Chromium (the gateway is ``_harness.LiveGateway``).

Chromium is the system one (Debian: ``apt-get install -y chromium``) driven by Playwright
for Python (``pip install playwright``). ``playwright install`` (a browser download) is
never needed: the browser is launched with ``executable_path``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_ARGS", "chromium_path", "launch_chromium"]

# Offline and quiet: no component updates, sync, first-run UI or background fetches.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]


def chromium_path() -> str | None:
    """The system Chromium, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


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
