"""``tokenrelay chat``: a conversation in the terminal that keeps its history.

Ctrl-C while an answer streams stops that answer (the partial text stays in the
history) and returns to the prompt; Ctrl-C at the prompt drops the line; Ctrl-D
leaves. Lines starting with ``/`` are commands (``/help``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click

from ..config import resolve
from ..errors import TokenrelayError
from ..request import build_request
from ._errors import report
from ._exchange import Output, stream_answer
from ._options import ModelOptions, model_options
from ._render import Terminal
from .run import continue_options, logged_conversation, output_options

__all__ = ["ChatSession", "chat"]

_HELP = """\
/reset          clear the history (the system prompt stays)
/system [TEXT]  set the system prompt (without TEXT: show it)
/save FILE      write the conversation to FILE as JSON
/help           this help
/exit           leave (so does Ctrl-D)
Ctrl-C stops an answer as it streams; the partial answer stays in the history."""

_PROMPT = "> "


def _enable_line_editing() -> None:
    # readline gives input() history and editing; absent on some platforms.
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


class ChatSession:
    """The state of one conversation: history, system prompt, options."""

    def __init__(self, options: ModelOptions, output: Output, term: Terminal,
                 *, model_name: str) -> None:
        self.options = options
        self.output = output
        self.term = term
        self.model_name = model_name
        self.system = options.system
        self.history: list[dict[str, str]] = []
        self._commands: dict[str, Callable[[str], bool]] = {
            "/reset": self._reset,
            "/system": self._system,
            "/save": self._save,
            "/help": self._help,
            "/exit": self._exit,
            "/quit": self._exit,
        }

    def _say(self, text: str, style: str = "dim") -> None:
        self.term.note(text, style=style)

    # -- the loop ------------------------------------------------------------------------

    def loop(self, *, interactive: bool) -> None:
        if interactive:
            _enable_line_editing()
            self._say(f"Chatting with {self.model_name}. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = input(_PROMPT if interactive else "")
            except KeyboardInterrupt:
                # Ctrl-C at the prompt drops the line, as a shell does.
                self.term.err.print()
                continue
            except EOFError:
                if interactive:
                    self.term.err.print()
                return
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.ask(line)
            except KeyboardInterrupt:
                # Between two steps of an answer (footer, log): back to the prompt.
                self.term.err.print()

    def ask(self, text: str) -> None:
        """Send ``text`` with the history and stream the answer."""
        self.history.append({"role": "user", "content": text})
        try:
            outcome = stream_answer(self.history, self.options, output=self.output,
                                    term=self.term, system=self.system)
        except TokenrelayError as exc:  # refused before streaming: the turn did not happen
            self.history.pop()
            report(exc)
            return
        result = outcome.result
        if result.text:
            # Partial answers (Ctrl-C, mid-stream error) stay: the next turn builds on what
            # the user saw.
            self.history.append({"role": "assistant", "content": result.text})
        else:
            self.history.pop()
        if result.error is not None:
            report(result.error)
        elif outcome.interrupted and not self.term.stderr_tty:
            self._say("(stopped)")

    def resume(self, conversation: list[dict[str, str]]) -> None:
        """Start from a logged conversation; its system prompt unless -s gave one."""
        for message in conversation:
            if message["role"] == "system":
                if self.options.system is None:
                    self.system = message["content"]
            else:
                self.history.append(message)
        turns = sum(1 for m in self.history if m["role"] == "user")
        self._say(f"continuing a conversation of {turns} turn" + ("s" if turns != 1 else ""))

    def messages(self) -> list[dict[str, str]]:
        """The conversation as sent to the model: system prompt first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    # -- commands: each returns False to leave ------------------------------------------

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        handler = self._commands.get(name.lower())
        if handler is None:
            self._say(f"unknown command {name}; /help lists them", style="yellow")
            return True
        return handler(arg.strip())

    def _reset(self, arg: str) -> bool:
        self.history.clear()
        self._say("history cleared" + (" (system prompt kept)" if self.system else ""))
        return True

    def _system(self, arg: str) -> bool:
        if not arg:
            self._say(f"system prompt: {self.system!r}" if self.system else "no system prompt")
        else:
            self.system = arg
            self._say("system prompt set")
        return True

    def _save(self, arg: str) -> bool:
        if not arg:
            self._say("usage: /save FILE", style="yellow")
            return True
        path = Path(arg).expanduser()
        document = {"model": self.model_name, "messages": self.messages()}
        try:
            path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n",
                            encoding="utf-8")
        except OSError as exc:
            self._say(f"error: could not write {path}: {exc.strerror or exc}", style="red")
            return True
        self._say(f"saved {len(self.messages())} messages to {path}")
        return True

    def _help(self, arg: str) -> bool:
        self._say(_HELP, style="")
        return True

    def _exit(self, arg: str) -> bool:
        return False


@click.command("chat")
@model_options
@output_options
@continue_options
def chat(options: ModelOptions, markdown: bool, no_log: bool, stats: bool | None,
         continue_: bool, cid: str | None) -> None:
    """Chat with a model; the conversation keeps its history.

    \b
    Commands: /reset, /system TEXT, /save FILE, /help, /exit.
    Ctrl-C stops the answer being streamed; Ctrl-D leaves.
    -c goes on from the latest exchange in the log (--cid ID: from that one).
    """
    entry = logged_conversation(continue_, cid)
    if entry is not None and options.model is None and entry.model:
        options = replace(options, model=entry.model)
    # Refuse bad options and unknown models now, not after the first question.
    build_request("check", temperature=options.temperature, max_tokens=options.max_tokens,
                  top_p=options.top_p, stop=list(options.stop) or None, seed=options.seed)
    _, model_name = resolve(options.model, base_url=options.base_url, api_key=options.api_key)
    output = Output(markdown=markdown, stats=stats, log=not no_log)
    session = ChatSession(options, output, Terminal.detect(),
                          model_name=model_name or "the endpoint's first model")
    if entry is not None:
        session.resume(entry.conversation())
    interactive = sys.stdin is not None and sys.stdin.isatty()
    session.loop(interactive=interactive)
