"""The suite's guarantees about itself: no network but loopback, no quiet skips."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

IN_NETNS = os.environ.get("TOKENRELAY_TEST_NETNS") == "on"


@pytest.mark.skipif(not IN_NETNS, reason="runs inside scripts/test.sh's network namespace")
def test_nothing_but_loopback_is_reachable_at_the_os_level() -> None:
    # A subprocess: no socket patch of conftest applies there, as for every CLI test.
    code = textwrap.dedent("""
        import errno, socket
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("192.0.2.1", 80))   # TEST-NET-1: unreachable without a route
        except OSError as exc:
            print(exc.errno)
        else:
            print("connected")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout.strip()
    assert out == str(errno.ENETUNREACH), out
    # /proc/net/dev lists the interfaces of this process's namespace (sysfs, the host's).
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in lines] == ["lo"]


def test_a_skip_fails_under_strict_skips(tmp_path: Path) -> None:
    here = Path(__file__).parent
    for helper in [here / "conftest.py", *here.glob("_*.py")]:  # the suite's own hooks
        (tmp_path / helper.name).write_text(helper.read_text())
    (tmp_path / "test_skips.py").write_text(textwrap.dedent("""
        import pytest

        def test_quiet():
            pytest.skip("needs something not installed")

        @pytest.mark.skipif(True, reason="not applicable here: another OS")
        def test_other_os():
            pass
    """))
    env = {**os.environ, "TOKENRELAY_STRICT_SKIPS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-rA", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert "1 failed, 1 skipped" in run.stdout, run.stdout
    assert "skipped in CI: 'needs something not installed'" in run.stdout
