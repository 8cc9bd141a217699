"""``tokenrelay mock-upstream``: a fault-injecting OpenAI-compatible server to test against.

See :mod:`tokenrelay.testing.mock_upstream` for the behaviours and faults it can be asked for.
"""

from __future__ import annotations

import asyncio

import click

from ..testing.mock_upstream import Behaviour, MockUpstream

__all__ = ["mock_upstream"]


@click.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--behaviour", "spec", default="", metavar="SPEC",
              help='What requests get by default, e.g. "tokens=200,tps=50,delay=0.3".')
def mock_upstream(host: str, port: int, spec: str) -> None:
    """Serve a scripted OpenAI-compatible API that can fail on demand.

    Each request picks its behaviour with x-mock-* headers or with options in the
    model name (key=value, separated by ','), spelled as for model mock:

    \b
    tokens=N  delay=S  tps=R                      answer length and pace
    fault=reset|close|malformed|error|stall|429|500 ...
    after=N   times=K   retry_after=S              when, how often, Retry-After

    \b
    tokenrelay mock-upstream --port 8001
    tokenrelay -m fault=error,after=5 --base-url http://127.0.0.1:8001/v1 hi
    curl http://127.0.0.1:8001/_mock/requests       what it saw (JSON)

    Runs until Ctrl-C.
    """
    server = MockUpstream(host, port, behaviour=Behaviour.parse(spec))
    try:
        asyncio.run(_serve(server))
    except KeyboardInterrupt:
        click.echo("tokenrelay: mock upstream stopped", err=True)


async def _serve(server: MockUpstream) -> None:
    await server.astart()
    click.echo(f"tokenrelay: mock upstream on {server.url}  (Ctrl-C stops it)", err=True)
    await server.serve_forever()
