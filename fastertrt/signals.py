"""SIGTERM and SIGHUP as exceptions while fastertrt writes or serves something, so
the cleanup that runs on Ctrl-C (partial folders removed, a tritonserver stopped)
also runs when a job scheduler, `kill` or a closed terminal stops the process
(Python's default is to die on the spot)."""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (a KeyboardInterrupt, so code that handles Ctrl-C
    handles these the same way); `signum` says which. Exit status 128 + signum."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise(signum, frame):
    raise Terminated(signum)


_HELD = {"depth": 0, "saved": {}}


def hold_signals() -> None:
    """Make SIGTERM and SIGHUP raise Terminated until the matching release_signals()
    (calls nest); only in the main thread, where Python delivers signals, and only
    where nothing else handles them (an ignored SIGHUP under nohup stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _HELD["depth"] == 0:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                _HELD["saved"][sig] = signal.signal(sig, _raise)
    _HELD["depth"] += 1


def release_signals() -> None:
    if threading.current_thread() is not threading.main_thread() or _HELD["depth"] == 0:
        return
    _HELD["depth"] -= 1
    if _HELD["depth"] == 0:
        for sig, handler in _HELD["saved"].items():
            signal.signal(sig, handler)
        _HELD["saved"].clear()


@contextlib.contextmanager
def terminate_raises():
    """hold_signals() for the block."""
    hold_signals()
    try:
        yield
    finally:
        release_signals()
