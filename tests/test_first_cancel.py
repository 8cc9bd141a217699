"""The first cancel of a fresh process closes the upstream within a token or two.

The README's "cancellation closes the upstream within one token" held only once the
token estimator was loaded: the first stopped stream of a process counted its tokens by
loading cl100k_base (~0.26 s) on the event loop before the aborted socket was closed,
and an upstream streaming one chunk every 20 ms sent ~15 more meanwhile. Each case runs
in a subprocess of its own, so that it is the first cancel of a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokenrelay.testing.mock_upstream import MockUpstream

CLIENT = Path(__file__).with_name("_first_cancel_client.py")
WAYS = [("async", "break"), ("async", "close"), ("async", "cancel"), ("async", "sigint"),
        ("sync", "break"), ("sync", "close"), ("sync", "sigint")]
#: Chunks in flight when the consumer stops: one the loop already holds, one on the wire.
SLACK = 2


def _run(face: str, how: str, provider: str, url: str) -> dict[str, int]:
    proc = subprocess.run([sys.executable, str(CLIENT), face, how, provider, url],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("face", "how"), WAYS)
def test_openai_compatible_upstream_stops_at_the_first_cancel(face: str, how: str) -> None:
    with MockUpstream() as upstream:
        report = _run(face, how, "openai", upstream.url)
        record = upstream.wait_for(lambda r: r.aborted_at is not None, timeout=10)
        assert record is not None, "the upstream never saw the client leave"
        assert record.tokens_sent <= report["consumed"] + SLACK, (
            f"the upstream sent {record.tokens_sent} chunks for {report['consumed']} consumed"
        )


@pytest.mark.local
@pytest.mark.parametrize(("face", "how"), WAYS)
def test_local_decoder_stops_at_the_first_cancel(face: str, how: str) -> None:
    report = _run(face, how, "local", "")
    assert report["decoded"] <= report["consumed"] + SLACK, (
        f"the decoder sampled {report['decoded']} tokens for {report['consumed']} consumed"
    )
