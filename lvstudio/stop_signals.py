"""Stop requests from signals: SIGINT (Ctrl-C), SIGTERM (kill, systemd, Docker, CI runners) and SIGHUP (the terminal
went away) all mean "stop after the work in flight, keep what can be resumed, say how to continue".

    with graceful_stop(on_first=session.stop) as stop:
        session.run()                 # returns after the chunk in flight once a signal came
    if stop.requested:
        ...                           # keep the job, print the resume command, exit with stop.exit_code

The first signal sets the `StopRequest` (and calls `on_first`); a second one raises `StopNow` at once (a
KeyboardInterrupt, so `except Exception` blocks do not swallow it). The exit code is the shell's: 128 + the signal
number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP). SIGTERM or SIGHUP that the process was told to ignore
(SIGHUP under `nohup`) stay ignored; SIGINT is always handled (a shell ignores it for background jobs, where it
only ever comes from an explicit `kill -INT`). Handlers can only be installed by the main thread; elsewhere
`graceful_stop` installs none and the request can still be set by hand (`StopRequest.request`). Render loops,
training loops, the studios and a batch of renders all use this module: blocks nest (an inner block shares the outer
one's request), and `current_stop()` lets a loop deep inside a command (the training loop) see the request without
it being passed through every function.
"""

from __future__ import annotations

import contextvars
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["STOP_SIGNALS", "StopNow", "StopRequest", "current_stop", "exit_code_for", "graceful_stop", "signal_name"]

STOP_SIGNALS: tuple[int, ...] = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP"))
                                      if s is not None)
_current: contextvars.ContextVar[StopRequest | None] = contextvars.ContextVar("lvstudio_stop", default=None)


def exit_code_for(signum: int) -> int:
    """The exit code of a process stopped by `signum` (128 + the number, as shells report it)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """"SIGTERM" for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once (the work in flight is abandoned; what was saved before stays)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum)


class StopRequest:
    """A thread-safe "please stop" flag with the signal that raised it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self.callbacks: list[Callable[[int], None]] = []  # called on the first request (innermost last)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask to stop (from a signal handler, or by hand); the first request calls the callbacks."""
        first = not self._event.is_set()
        if self.signum is None:
            self.signum = int(signum)
        self._event.set()
        if first:
            for callback in list(self.callbacks):
                callback(int(signum))

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum if self.signum is not None else signal.SIGINT)

    @property
    def name(self) -> str:
        return signal_name(self.signum if self.signum is not None else signal.SIGINT)


def current_stop() -> StopRequest | None:
    """The stop request of the innermost `graceful_stop` block in this context, if any."""
    return _current.get()


def _note(text: str) -> None:
    """Write a line to stderr from a signal handler (no locks, never fails: the terminal may be gone)."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


@contextmanager
def graceful_stop(on_first: Callable[[int], None] | None = None, *, what: str = "the work in flight",
                  quiet: bool = False) -> Iterator[StopRequest]:
    """Handle SIGINT, SIGTERM and SIGHUP for the duration of the block (module docstring).

    on_first(signum): called in the handler on the first signal (keep it short and thread-safe, e.g. set an event).
    what: named in the note printed on the first signal ("stopping after {what}").

    Nested blocks (a batch of renders, each render with its own block) share the outer block's request and
    handlers: the inner block only adds its `on_first` for its duration.
    """
    outer = current_stop()
    if outer is not None:
        if on_first is not None:
            outer.callbacks.append(on_first)
        try:
            yield outer
        finally:
            if on_first is not None:
                outer.callbacks.remove(on_first)
        return
    stop = StopRequest()
    if on_first is not None:
        stop.callbacks.append(on_first)

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - the signal handler signature
        if stop.requested:
            raise StopNow(signum)
        if not quiet:
            _note(f"{signal_name(signum)}: stopping after {what} (send it again to stop at once)")
        stop.request(signum)

    installed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            old = signal.getsignal(signum)
            if old is signal.SIG_IGN and signum != signal.SIGINT:
                continue  # e.g. SIGHUP under nohup: the user asked for it to be ignored
            installed[signum] = old
            signal.signal(signum, handler)
    token = _current.set(stop)
    try:
        yield stop
    finally:
        _current.reset(token)
        for signum, old in installed.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
