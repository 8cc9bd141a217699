"""The ``tokenrelay`` command group: default-command routing and the error boundary."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .. import __version__
from ._errors import handle_errors

__all__ = ["TokenrelayGroup", "cli", "main"]

_GROUP_OPTIONS = {"--help", "-h", "--version"}

# Commands load on first use: `tokenrelay "prompt"` should not pay for importing the
# gateway or the benchmark (httpx, the server stack) before its first token.
# name -> (module in this package, attribute)
_COMMANDS = {
    "run": ("run", "run"),
    "chat": ("chat", "chat"),
    "compare": ("compare", "compare"),
    "models": ("models", "models"),
    "logs": ("logs", "logs"),
    "serve": ("serve", "serve"),
    "hash-key": ("serve", "hash_key_command"),
    "bench": ("bench", "bench"),
    "mock-upstream": ("mock_upstream", "mock_upstream"),
    "help": ("_app", "help_command"),
}


class TokenrelayGroup(click.Group):
    """A group whose unknown first word is a prompt for ``run``.

    ``tokenrelay "Why is the sky blue?"`` is ``tokenrelay run "Why is the sky blue?"``,
    and so is ``tokenrelay -m mock hello``. With no arguments it reads the prompt from
    stdin when stdin is not a terminal, and shows the help otherwise.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_COMMANDS})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Each command's whole first sentence, wrapped: click's default cuts it to the
        # terminal's width with "..." (issue 11).
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            module, attr = _COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f".{module}", __package__), attr)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        known = {*self.commands, *_COMMANDS}
        if args and args[0] not in known and args[0] not in _GROUP_OPTIONS:
            args = ["run", *args]
        elif not args and not ctx.resilient_parsing and not _stdin_is_tty():
            args = ["run"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        # The error boundary of every command: see _errors.py.
        with handle_errors():
            return super().invoke(ctx)


@click.command("help")
@click.argument("names", nargs=-1, metavar="[COMMAND]...")
@click.pass_context
def help_command(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Show the help of tokenrelay, or of COMMAND (`tokenrelay help logs show`)."""
    parent = ctx.find_root()
    command: click.Command = parent.command
    info_name = parent.info_name
    context = parent
    for name in names:
        if not isinstance(command, click.Group):
            raise click.UsageError(f"{context.command_path} has no subcommands")
        found = command.get_command(context, name)
        if found is None:
            raise click.UsageError(f"no command {name!r}; `tokenrelay help` lists them")
        command, info_name = found, name
        context = click.Context(command, info_name=info_name, parent=context)
    click.echo(context.get_help(), color=ctx.color)


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
    tokenrelay -c "PROMPT"     continue the latest conversation in the log
    tokenrelay chat            a conversation that keeps its history
    tokenrelay compare PROMPT  streamed vs non-streamed, side by side
    tokenrelay models          the models it can reach, and the default
    tokenrelay logs            the exchanges of the CLI, library and gateway
    tokenrelay help COMMAND    the help of a command (also: COMMAND --help)

    The answer goes to stdout; the indicator, footer and errors go to stderr.
    """


def main(argv: list[str] | None = None) -> None:
    """The console script: ``tokenrelay``."""
    cli.main(args=argv, prog_name="tokenrelay")
