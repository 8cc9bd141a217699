"""``tokenrelay run PROMPT`` (also plain ``tokenrelay PROMPT``): stream one answer."""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from ..errors import UsageError
from ..log import LogEntry
from ._exchange import Output, stream_answer
from ._options import ModelOptions, model_options, tool_options
from ._render import Terminal

__all__ = ["continue_options", "logged_conversation", "output_options", "read_prompt", "run"]


def _piped_stdin() -> str | None:
    """What was piped in, or ``None`` when stdin is a terminal (or closed)."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.read()


def read_prompt(words: tuple[str, ...]) -> str:
    """The prompt: the words joined by spaces; with stdin piped in too, the words, a
    blank line, then stdin (as simonw/llm does: ``cat notes.txt | tokenrelay
    "Summarise:"``). No words, or ``-``, reads the prompt from stdin alone."""
    if not words or words == ("-",):
        piped = _piped_stdin()
        if piped is None:
            raise UsageError('no prompt: pass it as an argument (tokenrelay "...") or on stdin')
        text = piped.rstrip()
    else:
        text = " ".join(words)
        piped = _piped_stdin()
        if piped is not None and piped.strip():
            text = f"{text}\n\n{piped.rstrip()}"
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


def continue_options(func: click.decorators.FC) -> click.decorators.FC:
    """``-c/--continue`` and ``--cid ID``, shared with ``chat``."""
    func = click.option("--cid", metavar="ID",
                        help="Continue exchange ID of `tokenrelay logs` instead.")(func)
    func = click.option("-c", "--continue", "continue_", is_flag=True,
                        help="Continue the latest conversation in the log.")(func)
    return func


def logged_conversation(continue_: bool, cid: str | None) -> LogEntry | None:
    """The logged exchange to continue (``-c`` / ``--cid``), or ``None``.

    Raises:
        UsageError: nothing to continue, or no such exchange.
    """
    if not continue_ and cid is None:
        return None
    from ..log import LogReader, default_log_path

    reader = LogReader(default_log_path())
    try:
        entry = reader.latest_conversation() if cid is None else reader.get(cid)
    finally:
        reader.close()
    if entry is None:
        raise UsageError("nothing to continue: the log has no exchange yet" if cid is None
                         else f"no exchange {cid} in the log; `tokenrelay logs` lists them")
    return entry


def output_options(func: click.decorators.FC) -> click.decorators.FC:
    """``--markdown``, ``--no-log`` and ``--stats``, shared with ``chat``."""
    func = click.option("--stats/--no-stats", default=None,
                        help="Show the indicator and footer on stderr [when it is a terminal].")(func)
    func = click.option("--no-log", is_flag=True,
                        help="Do not record the exchange in the log.")(func)
    func = click.option("--markdown", is_flag=True,
                        help="Render the answer as Markdown, live.")(func)
    return func


@click.command("run")
@click.argument("prompt", nargs=-1)
@model_options
@tool_options
@output_options
@continue_options
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer, then print it.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON event per line on stdout, ending with the done event.")
@click.option("--raw", is_flag=True, help="Print each raw provider chunk as a JSON line.")
def run(
    prompt: tuple[str, ...],
    options: ModelOptions,
    markdown: bool,
    no_log: bool,
    stats: bool | None,
    continue_: bool,
    cid: str | None,
    no_stream: bool,
    as_json: bool,
    raw: bool,
) -> None:
    """Stream the answer to PROMPT (words are joined; stdin is appended, or is the prompt).

    The answer goes to stdout as it is generated; the typing indicator and a footer
    (tokens, time to first token, tokens/s) go to stderr when it is a terminal.
    Ctrl-C stops generation and keeps what was shown (exit code 130).

    \b
    Examples:
      tokenrelay "Why is the sky blue?"
      tokenrelay -c "And at sunset?"          (continue the latest conversation)
      tokenrelay -m mock:tps=20 --json "hello"
      git diff | tokenrelay "Review this diff"
      tokenrelay --schema person.json "Invent a person"
      tokenrelay --tool weather:get_weather "Weather in Paris?"
    """
    if markdown and (as_json or raw):
        raise click.UsageError("--markdown cannot be combined with --json or --raw")
    if markdown and options.response_format is not None:
        raise click.UsageError("--markdown cannot be combined with --schema")
    text = read_prompt(prompt)
    conversation: str | list[dict[str, str]] = text
    entry = logged_conversation(continue_, cid)
    if entry is not None:
        # The logged messages and answer, then this prompt; the same model unless -m.
        conversation = [*entry.conversation(), {"role": "user", "content": text}]
        if options.model is None and entry.model:
            options = replace(options, model=entry.model)
    output = Output(json=as_json, raw=raw, markdown=markdown, buffered=no_stream,
                    stats=stats, log=not no_log,
                    structured=options.response_format is not None, tools=bool(options.tools))
    term = Terminal.detect()
    outcome = stream_answer(conversation, options, output=output, term=term)
    if options.tools and outcome.result.finish_reason == "tool_calls":
        rounds = 5 if options.max_tool_rounds is None else options.max_tool_rounds
        term.note(f"warning: stopped after {rounds} rounds of tool calls with the model still"
                  " calling tools (raise --max-tool-rounds)", style="yellow")
    if outcome.interrupted:
        raise KeyboardInterrupt  # → exit 130, in _errors
    if outcome.result.error is not None:
        raise outcome.result.error
