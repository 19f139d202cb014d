"""Durable before shown (SPEC §5): a run's changes, handed to its live view once committed.

The scheduler makes a ``JobUpdate`` with each store write; ``Feed`` holds it, with the count
of writes it follows, until the store's writer has committed that many, then hands it to the
view's ``on_change``, in order. It lives on the event loop's thread: the writer's thread only
tells the loop what it committed (``release``). It must not write to the store or decide
anything about the build.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from executor.run.results import JobUpdate
from executor.store import Store

__all__ = ["Feed"]


class Feed:
    """The changes of one run on their way to ``on_change``."""

    def __init__(self, store: Store, on_change: Callable[[JobUpdate], None], log: Any) -> None:
        self._store = store
        self._on_change = on_change
        self._log = log  # the scheduler's, bound to the build (structlog's loggers are untyped)
        self._unshown: deque[tuple[int, JobUpdate]] = deque()
        self._closed = False

    @property
    def waiting(self) -> bool:
        """Some change waits for its write to be committed."""
        return bool(self._unshown)

    def close(self) -> None:
        """A write failed: nothing more is shown (it may not be recorded); what waits is still
        shown as its writes are committed."""
        self._closed = True

    def show(self, change: JobUpdate) -> None:
        """Hand ``change`` to ``on_change`` once the store has committed the write it comes
        with (at once if it has, and nothing shown before it waits)."""
        if self._closed:
            return
        ticket = self._store.queued
        if not self._unshown and ticket <= self._store.committed:
            self._on_change(change)
            return
        self._unshown.append((ticket, change))

    def release(self, committed: int | None = None) -> None:
        """Show, in order, every waiting change whose write is committed (by default: as the
        store says now)."""
        committed = self._store.committed if committed is None else committed
        unshown = self._unshown
        while unshown and unshown[0][0] <= committed:
            _, change = unshown.popleft()
            try:
                self._on_change(change)
            except Exception:  # a view's bug must not stop the build or the other changes
                self._log.exception("on_change_failed", change=change.state, job=change.key)
