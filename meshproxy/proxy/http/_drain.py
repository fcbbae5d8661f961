"""Shutdown's signal to the HTTP connections: take no new requests, finish those in flight.

The runtime calls ``begin()`` once, when SIGTERM arrives; every HTTP connection that is
open then (or opens later, before its listener stopped accepting) is told at once and
drains in its own way: HTTP/2 sends GOAWAY and closes when its streams are done, HTTP/1.1
answers its current request with ``Connection: close`` and closes, an idle connection
closes at once. How long the drain may take is the runtime's grace period.
"""

from __future__ import annotations

from collections.abc import Callable


class Drain:
    def __init__(self) -> None:
        self._subscribers: dict[int, Callable[[], None]] = {}
        self._next = 0
        self.draining = False

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the drain begins (now, if it has); returns the unsubscriber."""
        if self.draining:
            callback()
            return lambda: None
        key = self._next
        self._next += 1
        self._subscribers[key] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    def begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        subscribers, self._subscribers = self._subscribers, {}
        for callback in subscribers.values():
            callback()
