"""Drive the ``tokenrelay`` command the way a person would: in a terminal, or piped.

The child gets the pty as its controlling terminal, so ``\\x03`` sent to the master is
turned into SIGINT by the line discipline, exactly as Ctrl-C at a keyboard. Reads use
``select`` with deadlines, so a hung child fails a test instead of hanging it, and
assertions look at the output with ANSI escape sequences removed.

:func:`tokenrelay` runs the real entry point (the console script) with pipes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

__all__ = ["PtyProcess", "cli_env", "strip_ansi", "tokenrelay", "tokenrelay_argv"]


def tokenrelay_argv(*args: str) -> list[str]:
    """The real entry point: the console script beside the interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("tokenrelay")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "tokenrelay.cli"]
    return [*base, *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment (conftest isolates it) plus a wide, colour-capable terminal."""
    env = dict(os.environ)
    env.update(TERM="xterm-256color", COLUMNS="200", LINES="50")
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def tokenrelay(*args: str, input: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``tokenrelay ARGS`` with pipes; stdin is empty unless ``input`` is given."""
    return subprocess.run(
        tokenrelay_argv(*args), input=input if input is not None else "", text=True,
        capture_output=True, env=env or cli_env(), timeout=timeout, check=False,
    )

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erase
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: titles, links
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
)


def strip_ansi(text: str) -> str:
    """``text`` without escape sequences and carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


def _controlling_tty() -> None:  # runs in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProcess:
    """A child process on a pty (stdin, stderr, and stdout unless ``stdout_pipe``).

    Args:
        argv: the command.
        env: its environment.
        stdout_pipe: give the child a pipe as stdout (to check that nothing but the
            answer goes there while stderr is a terminal).
        rows, cols: the terminal size.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], cwd: str | None = None,
                 stdout_pipe: bool = False, rows: int = 30, cols: int = 100) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.master = master
        self._raw = bytearray()
        self._stdout = bytearray()
        self._pos = 0
        self._eof = False
        try:
            self.proc = subprocess.Popen(
                list(argv), stdin=slave, stderr=slave,
                stdout=subprocess.PIPE if stdout_pipe else slave,
                # preexec_fn: the only way to hand the child a controlling terminal;
                # it only calls ioctl, which is safe between fork and exec.
                env=env, cwd=cwd, start_new_session=True,
                preexec_fn=_controlling_tty,  # noqa: PLW1509
                close_fds=True,
            )
        finally:
            os.close(slave)
        self._out_fd = self.proc.stdout.fileno() if self.proc.stdout is not None else None

    # -- reading ---------------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        """Read what is ready within ``timeout``; False when nothing more can come."""
        fds = [] if self._eof else [self.master]
        if self._out_fd is not None:
            fds.append(self._out_fd)
        if not fds:
            return False
        ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError as exc:  # Linux: EIO on the master once the child is gone
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if fd == self.master:
                if data:
                    self._raw += data
                else:
                    self._eof = True
            elif data:
                self._stdout += data
            else:
                self.proc.stdout.close()  # type: ignore[union-attr]
                self._out_fd = None
        return True

    @property
    def text(self) -> str:
        """Everything the terminal showed so far, without escape sequences."""
        return strip_ansi(self._raw.decode("utf-8", "replace"))

    @property
    def stdout(self) -> str:
        """What the child wrote to its stdout pipe (``stdout_pipe=True``)."""
        return self._stdout.decode("utf-8", "replace")

    def expect(self, pattern: str, *, timeout: float = 10.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) shows after the previous match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self._pos)
            if match:
                self._pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._pump(min(remaining, 0.2)) and self._exited():
                raise AssertionError(
                    f"{pattern!r} did not show within {timeout}s; the terminal showed:\n"
                    + self.text[self._pos:][-3000:]
                )

    def _exited(self) -> bool:
        return self.proc.poll() is not None and self._eof and self._out_fd is None

    # -- writing ---------------------------------------------------------------------

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def sendline(self, text: str) -> None:
        self.send(text + "\r")

    def ctrl_c(self) -> None:
        self.send("\x03")

    def ctrl_d(self) -> None:
        self.send("\x04")

    # -- ending ----------------------------------------------------------------------

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the exit code, reading output meanwhile (a full pty would block it)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or not self._eof or self._out_fd is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self.proc.poll() is None:
                    self.close()
                    raise AssertionError(
                        f"the process did not exit within {timeout}s; the terminal showed:\n"
                        + self.text[-3000:]
                    )
                break  # exited; a grandchild may hold the pty open
            if not self._pump(min(remaining, 0.2)) and self.proc.poll() is not None:
                break
        return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        try:
            os.close(self.master)
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
