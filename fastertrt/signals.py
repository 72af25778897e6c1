"""SIGTERM and SIGHUP as exceptions while fastertrt writes or serves something, so
the same cleanup that runs on Ctrl-C runs when a job scheduler, `kill` or a closed
terminal stops the process (Python's default is to die on the spot)."""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(BaseException):
    """The process got SIGTERM or SIGHUP; `signum` says which. Exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_raises(signums=(signal.SIGTERM, signal.SIGHUP)):
    """Within the block, the signals raise Terminated (main thread only: Python
    delivers signals there; elsewhere the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        if previous[s] in (signal.SIG_DFL, signal.default_int_handler) or previous[s] is None:
            signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
