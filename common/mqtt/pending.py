"""Packets sent and not acknowledged yet (PUBACK or SUBACK), each with the Future its acknowledgement resolves."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

Outcome = TypeVar("Outcome")


class PendingAcks(Generic[Outcome]):
    """The Futures of one kind of acknowledgement, by packet id.

    paho's network thread resolves them (``resolve``) and does nothing more: a waiter wakes at once, and the
    Futures' callbacks run on the link's dispatcher. The lock is never held while calling paho, nor while resolving:
    paho calls on_publish holding the lock its own publish() takes (a pipelined sender deadlocked once, c3f7d60).

    An acknowledgement may arrive before its sender has registered (paho hands the packet to its thread before
    publish() returns its id): it is kept until then.
    """

    def __init__(self, new_future: Callable[[], Future]) -> None:
        """``new_future`` makes the Futures handed out (the dispatcher's, so their callbacks run there)."""
        self._new_future = new_future
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._early: dict[int, Outcome | Exception] = {}
        """Outcomes that arrived before their sender registered, by packet id."""
        self._ignored: set[int] = set()
        """Packet ids nobody waits for (their waiter gave up, or nobody ever will): their acknowledgement is dropped."""
        self._closed: Callable[[], Exception] | None = None
        """Once the link is closed: the error for every Future still waiting or asked for."""

    def expect(self, mid: int) -> Future:
        """The Future of packet ``mid``'s acknowledgement: its outcome, or the exception that refused it."""
        future = self._new_future()
        with self._lock:
            if self._closed is not None:
                outcome: Outcome | Exception = self._closed()
            elif mid in self._early:
                outcome = self._early.pop(mid)
            else:
                self._waiting[mid] = future
                return future
        _settle(future, outcome)
        return future

    def resolve(self, mid: int, outcome: Outcome | Exception) -> None:
        """Packet ``mid`` was acknowledged with ``outcome`` (an exception when refused). On paho's thread."""
        with self._lock:
            future = self._waiting.pop(mid, None)
            if future is None:
                if mid in self._ignored:
                    self._ignored.discard(mid)
                elif self._closed is None:
                    self._early[mid] = outcome
                return
        _settle(future, outcome)

    def abandon(self, mid: int) -> None:
        """The waiter of ``mid`` gave up (timed out): its acknowledgement, when it comes, is nobody's."""
        with self._lock:
            if self._waiting.pop(mid, None) is not None:
                self._ignored.add(mid)

    def ignore(self, mid: int) -> None:
        """Nobody will wait for ``mid`` (a subscription made again on reconnection): drop its acknowledgement."""
        with self._lock:
            self._ignored.add(mid)

    def close(self, error: Callable[[], Exception]) -> None:
        """The link is closing: every Future still waiting, and every one asked for from now on, fails with a new
        ``error()``."""
        with self._lock:
            self._closed = error
            waiting = list(self._waiting.values())
            self._waiting.clear()
            self._early.clear()
            self._ignored.clear()
        for future in waiting:
            _settle(future, error())


def _settle(future: Future, outcome: object) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
