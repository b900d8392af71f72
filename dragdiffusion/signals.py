"""Stopping cleanly on Ctrl-C (SIGINT) and SIGTERM: the command lines install ``stop_on_signals``.

A signal raises ``Interrupted`` at the next Python step of the main thread (a Trainer then tears down and
re-raises it; the command exits 130 or 143). Inside ``deferred_signals()`` (writing a sample's output files) the
signal waits until the block ends, so an output folder is never left half-written.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

from .errors import Interrupted

_state = {"depth": 0, "pending": None}


def _handler(signum, frame):
    if _state["depth"] > 0:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise ``Interrupted`` (main thread only; a no-op elsewhere)."""
    try:
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread (e.g. a server's worker): keep the process's handlers
        pass


@contextmanager
def deferred_signals():
    """Hold a signal until the block is done; then raise it."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending = _state["pending"]
        if _state["depth"] == 0 and pending is not None:
            _state["pending"] = None
            raise Interrupted(pending)
