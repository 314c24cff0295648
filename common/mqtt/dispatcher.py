"""The thread a link runs its handlers and callbacks on, so that paho's network thread never runs user code.

paho's thread only reads packets and hands work over: a message to its handler, an
acknowledgement to the Future that waits for it. The dispatcher runs that work one
piece at a time, in the order it was handed over. A handler may block: later
deliveries wait for it, the network loop does not, so a handler may publish and wait
for the PUBACK (the Future is resolved on paho's thread, its callbacks run here).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

Work = Callable[[], None]
"""A handler call or a callback, with its arguments bound."""


class DispatchedFuture(Future):
    """A Future whose done callbacks run on its dispatcher's thread, whichever thread resolves it.

    A waiter (``result()``, ``exception()``) is woken by whoever resolves it, at once: paho's thread resolves a
    publish's Future, so a handler that waits on one does not wait for itself.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__()
        self._callbacks_run_on = dispatcher
        # Running from the start: the broker decides its outcome, so cancel() refuses (returns False).
        self.set_running_or_notify_cancel()

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` on the dispatcher thread once the future is done (at once if it is already).

        After the link is closed, ``fn`` runs on the thread that adds it.
        """
        dispatcher = self._callbacks_run_on
        super().add_done_callback(lambda future: dispatcher.submit(lambda: fn(future)))


class Dispatcher:
    """One thread that runs the work handed to it, in order; ``stop()`` runs what was handed over first."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        """Makes stopping and handing over atomic: work is either queued before the end or run by its submitter."""
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        """The thread's name."""
        return self._thread.name

    def submit(self, work: Work) -> None:
        """Run ``work`` on the dispatcher thread after what was handed over before; once stopped, here and now."""
        with self._lock:
            if not self._stopped:
                self._work.put(work)
                return
        _run_one(work)

    def future(self) -> DispatchedFuture:
        """A new Future whose done callbacks run on this dispatcher's thread."""
        return DispatchedFuture(self)

    def stop(self, timeout_s: float) -> bool:
        """Run what was handed over, then end the thread; wait for it at most ``timeout_s`` (not at all from the
        thread itself). Whether it ended."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._work.put(None)
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("a message handler is still running after %g s; the link closes without it", timeout_s)
            return False
        return True

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            _run_one(work)


def _run_one(work: Work) -> None:
    try:
        work()
    except Exception:
        # A handler bug costs its own message, not the others' nor the connection.
        log.exception("a message handler or callback failed")
