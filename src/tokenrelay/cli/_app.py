"""The ``tokenrelay`` command group: default-command routing and the error boundary."""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import __version__
from ._errors import handle_errors
from .bench import bench
from .chat import chat
from .compare import compare
from .logs import logs
from .models import models
from .run import run
from .serve import hash_key_command, serve

__all__ = ["TokenrelayGroup", "cli", "main"]

_GROUP_OPTIONS = {"--help", "-h", "--version"}


class TokenrelayGroup(click.Group):
    """A group whose unknown first word is a prompt for ``run``.

    ``tokenrelay "Why is the sky blue?"`` is ``tokenrelay run "Why is the sky blue?"``,
    and so is ``tokenrelay -m mock hello``. With no arguments it reads the prompt from
    stdin when stdin is not a terminal, and shows the help otherwise.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["run", *args]
        elif not args and not ctx.resilient_parsing and not _stdin_is_tty():
            args = ["run"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        # The error boundary of every command: see _errors.py.
        with handle_errors():
            return super().invoke(ctx)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (OSError, ValueError):
        return False


@click.group(cls=TokenrelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tokenrelay",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Stream LLM answers to the terminal as they are generated.

    \b
    tokenrelay "PROMPT"        stream an answer (same as: tokenrelay run "PROMPT")
    tokenrelay chat            a conversation that keeps its history
    tokenrelay compare PROMPT  streamed vs non-streamed, side by side
    tokenrelay models          the models it can reach, and the default
    tokenrelay logs            the exchanges it recorded

    The answer goes to stdout; the indicator, footer and errors go to stderr.
    """


for _command in (run, chat, compare, models, logs):
    cli.add_command(_command)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(hash_key_command)


def main(argv: list[str] | None = None) -> None:
    """The console script: ``tokenrelay``."""
    cli.main(args=argv, prog_name="tokenrelay")
