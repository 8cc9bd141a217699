"""``python -m tokenrelay.cli``: the same as the ``tokenrelay`` console script."""

from __future__ import annotations

from . import main

main()
