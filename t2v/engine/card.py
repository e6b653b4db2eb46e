"""The card: one stage at a time computes on a device, in the order they asked."""

from __future__ import annotations

import threading
from types import TracebackType


class Card:
    """A named first-come-first-served lock.

    A stage holds it while it loads a component or computes, and lets it go before writing its output,
    so the next job's stage computes while the last one's frames go to disk. `threading.Lock` wakes
    waiters in no particular order, which would let a late job overtake those that queued before it
    (and, under a stream of them, starve one); tickets keep the order of arrival."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._turn = threading.Condition()
        self._issued = 0
        self._serving = 0

    def __enter__(self) -> Card:
        with self._turn:
            ticket = self._issued
            self._issued += 1
            self._turn.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()

    @property
    def waiting(self) -> int:
        """Stages holding or waiting for the card."""
        with self._turn:
            return self._issued - self._serving

    def __repr__(self) -> str:
        return f"Card({self.name!r})"
