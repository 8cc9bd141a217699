"""The ``tokenrelay`` command line: stream answers to the terminal.

One module per command (``run``, ``chat``, ``compare``, ``models``, ``logs``); the
group and its default-command routing live in ``_app``, terminal rendering in
``_render``, and the mapping of failures to messages and exit codes in ``_errors``.
"""

from __future__ import annotations

from ._app import cli, main

__all__ = ["cli", "main"]
