"""trm: build data, train, evaluate, solve, import reference checkpoints.

One module per group of commands; each registers its commands on ``common.app``.
"""

from __future__ import annotations

import os
import sys

# the order in which the commands register is the order `trm --help` lists them
# isort: off
from . import data, train, evaluate, tools  # noqa: F401

# isort: on
from .common import app

__all__ = ["app", "main"]


class _ReaderGone:
    """stdout that, once its reader has gone (``trm train | head``), discards what is written
    instead of raising: the command finishes its work (a run its training, with checkpoints)
    and exits as it would have."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._discard()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._discard()

    def _discard(self) -> None:
        self._gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush then finds a file
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    """The ``trm`` command."""
    sys.stdout = _ReaderGone(sys.stdout)
    app()
