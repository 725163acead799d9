"""A queue of adapter names worked off in batches by one daemon thread, which runs only while the
queue holds names (a catalog with nothing to check has no thread)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

log = logging.getLogger("loraplex.catalog")


class NameQueue:
    """run(batch) is called with up to `batch` names at a time, oldest first, until none are left.
    A name queued again while queued is kept once. An exception from run() is logged; the names of
    that batch are dropped (the catalog checks them on demand instead)."""

    def __init__(self, run, batch: int = 64, thread_name: str = "loraplex-catalog-checks"):
        self._run = run
        self._batch = batch
        self._thread_name = thread_name
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._busy: list[str] = []  # names taken by the thread and not yet done
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _forked(self) -> None:
        """In a child process the thread is gone (and may have held the condition's lock at the
        fork): start over with what was queued or in flight. Only the forking thread exists there."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._queue.extendleft(reversed(self._busy))
        self._queued.update(self._busy)
        self._busy, self._thread = [], None
        if self._queue:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
        self._thread.start()

    def put(self, names) -> None:
        self._forked()
        with self._cond:
            if not self._queued and isinstance(names, (set, frozenset)):  # in bulk: a first listing queues all
                self._queued.update(names)
                self._queue.extend(names)
                names = ()
            for n in names:
                if n not in self._queued:
                    self._queued.add(n)
                    self._queue.append(n)
            if self._queue and self._thread is None:
                self._start()

    def __len__(self) -> int:
        """Names queued or being worked on."""
        self._forked()
        with self._cond:
            return len(self._queue) + len(self._busy)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued name is done; False if `timeout` s passed first."""
        self._forked()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                self._queued.difference_update(batch)
                self._busy = batch
            try:
                self._run(batch)
            except Exception:  # noqa: BLE001 - the thread must go on with the other names
                log.exception("background weights check failed for %d adapters", len(batch))
            finally:
                with self._cond:
                    self._busy = []
                    self._cond.notify_all()
