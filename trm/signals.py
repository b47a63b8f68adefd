"""Stopping a command by signal: SIGINT / SIGTERM answered one line each, the first stopping
the run (after the step while training, at once before or after it), the second aborting it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time


class StopSignals:
    """SIGINT / SIGTERM: the first stops the run, the second aborts it at once; each is answered
    with one line on stderr.

    While fit trains (``stage`` "training") the first asks the loop to stop after the current
    step, with a checkpoint; at any other stage (the data, the model, the run directory being
    set up, or after training) it stops at once. Stopping at once raises KeyboardInterrupt in
    the main thread, once: while it unwinds, and while any other exception does (the stack's
    cleanup is running), further signals are only answered, so that no cleanup is cut short.
    ``deferred()`` holds an abort back until the end of a block that must not stop midway.

    Python runs a handler once for several signals that arrive while the main thread is inside
    one C call (a long torch op); a wakeup pipe (``signal.set_wakeup_fd``, one byte per signal)
    counts them, so that a fast double Ctrl-C is two signals, not one. Handlers are installed
    only in the main thread (``trm train`` holds one instance for the whole command and hands
    it to fit).
    """

    LATE_S = 2.0  # how long after the block a signal counts as the second of a double Ctrl-C

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self.stage = "setup"  # "setup", "training" (set by fit) or "finished"
        self._previous: dict = {}
        self._wakeup: tuple[int, int] | None = None  # the wakeup pipe (read end, write end)
        self._aborting = self._pending = self._handling = False
        self._deferring = self._count = 0
        self._skipped: list[int] = []  # without a wakeup pipe: signals whose call came during another
        self._ended = 0.0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        if os.name == "posix":  # set_wakeup_fd takes a pipe on POSIX (a socket on Windows: not counted there)
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            replaced = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            if replaced != -1:  # another user's (an event loop): leave it theirs, count one per call
                signal.set_wakeup_fd(replaced)
                os.close(read)
                os.close(write)
            else:
                self._wakeup = (read, write)
        return self

    def __exit__(self, *exc) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        if self._count == 1:  # half a double Ctrl-C: its second may come as the command ends
            self._ended = time.monotonic()
            for sig in self._previous:
                signal.signal(sig, self._late)
        else:
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _late(self, sig, frame) -> None:
        """A signal after the block, which one signal stopped. Within LATE_S of its end it is the
        second of a double Ctrl-C, answered and nothing more: the command has stopped, and the
        process may be ending, where a KeyboardInterrupt cuts into exit handlers with a
        traceback. Later, it is handled as before the block."""
        if time.monotonic() - self._ended <= self.LATE_S:
            _say("aborted: the run had stopped already")
            return
        self._restore()
        signal.raise_signal(sig)

    @contextlib.contextmanager
    def deferred(self):
        """A block that must not stop midway (creating and taking a run directory): a signal
        that would abort inside it is answered at once and raises when the block ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        self.raise_pending()

    def raise_pending(self) -> None:
        """Raise an abort that was held back (fit calls it between steps)."""
        if self._pending:
            self._pending = False
            self._abort()

    def _handle(self, sig, frame) -> None:
        if self._handling:  # Python runs handlers inside handlers: the call under way answers this one, in order
            if self._wakeup is None:
                self._skipped.append(sig)
            return
        self._handling, abort = True, False
        try:
            names = self._delivered(sig)
            while names:
                for name in names:
                    abort = self._answer(name) or abort
                names = self._delivered(None)
        finally:
            self._handling = False
        if self._wakeup is not None and select.select([self._wakeup[0]], [], [], 0)[0]:
            self._handle(sig, frame)  # one whose call came after the last look and was skipped
        if abort:
            self._abort()

    def _answer(self, name: str) -> bool:
        """One line for one signal; whether it stops the command at once."""
        self._count += 1
        if self.received is None:
            self.received = name
            _say(f"{name}: {_FIRST_SIGNAL[self.stage]}")
            return self.stage != "training"
        _say(f"aborted: {_ABORTED}")
        return True

    def _abort(self) -> None:
        if self._aborting:
            return  # raised once: the stack is unwinding, and its cleanup runs to its end
        if self._deferring or sys.exc_info()[1] is not None:  # a block that must end, or cleanup under way
            self._pending = True
            return
        self._aborting = True
        raise KeyboardInterrupt

    def _delivered(self, sig: int | None) -> list[str]:
        """The names of the signals delivered since the last look, one byte each in the wakeup
        pipe; none where an earlier call answered this one already. `sig`: the signal this call
        is for (it waits a moment for its byte, which another thread may not have written yet),
        None: only a look. Without the pipe, one per call (and those skipped meanwhile)."""
        if self._wakeup is None:  # one call per signal, but those that came during a call
            skipped = [self._skipped.pop(0) for _ in range(len(self._skipped))]
            return [signal.Signals(s).name for s in ([] if sig is None else [sig]) + skipped]
        data = _drain(self._wakeup[0])
        if not data and sig is not None and select.select([self._wakeup[0]], [], [], 0.01)[0]:
            data = _drain(self._wakeup[0])
        return [signal.Signals(b).name for b in data if b in (signal.SIGINT, signal.SIGTERM)]


_FIRST_SIGNAL = {  # by stage
    "setup": "stopping at once (training has not started)",
    "training": "stopping after this step with a checkpoint (again to abort at once)",
    "finished": "stopping at once (training is over)",
}
_ABORTED = "stopping at once; the run keeps its last checkpoint, if it wrote one"


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except (BlockingIOError, InterruptedError):
            return data
        if not chunk:
            return data
        data += chunk


def _say(message: str) -> None:
    """One line straight to the file descriptor: a signal handler that printed through the
    console could run inside the console's own write and repeat its buffer. On a terminal it
    starts on a line of its own (after the ^C echoed, or the live bar, which redraws below it)."""
    try:
        fd = sys.stderr.fileno()
        os.write(fd, (("\n" if os.isatty(fd) else "") + message + "\n").encode())
    except (OSError, ValueError, AttributeError):  # no usable stderr (a captured or closed stream)
        pass
