"""Background refresh of a catalog: filesystem events (watchdog) where available, polling otherwise."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("loraplex.catalog")
_READ_EVENTS = ("opened", "closed_no_write")  # watchdog's event_type of a file opened, or closed unwritten
_SETTLE_S = 0.05  # a burst of events (a copy of many files) becomes one refresh


class Watcher:
    """Keeps `catalog` current from a daemon thread; callback(diff) after each refresh that changed
    something.

    With events (watchdog, local roots): each event names the adapter directory it happened in, and
    only those are refreshed (catalog.refresh(names)), so the cost follows the change; a full
    rescan every `rescan` s catches what events can miss (inotify queue overflow, network
    filesystems). Without events (events=False, no watchdog, or no inotify watch left): a full
    refresh every `interval` s."""

    def __init__(self, catalog, callback, interval: float, events: bool = True, rescan: float = 60.0):
        if not interval > 0 or not rescan > 0:
            raise ValueError(f"watch interval and rescan must be > 0 seconds, got {interval!r}, {rescan!r}")
        self.catalog = catalog
        self.callback = callback
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._names: set[str] = set()  # adapter dirs named by events since the last refresh
        self._observer = self._start_observer() if events else None
        self.rescan = rescan if self._observer is not None else interval
        self._thread = threading.Thread(target=self._run, name="loraplex-catalog-watch", daemon=True)
        self._thread.start()

    @property
    def uses_events(self) -> bool:
        return self._observer is not None

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return None
        root = os.path.abspath(self.catalog.root)
        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                # Reads are not changes: without this, every scan and load_tensors() (which open
                # files under the root) would wake another refresh.
                if event.event_type in _READ_EVENTS:
                    return
                names = {_adapter_of(root, p) for p in (event.src_path, getattr(event, "dest_path", ""))}
                names.discard(None)
                if names:
                    with watcher._lock:
                        watcher._names |= names
                    watcher._wake.set()

        obs = Observer()
        try:
            obs.schedule(_Handler(), root, recursive=True)
            obs.start()
        except OSError as e:  # e.g. the inotify watch limit (one watch per adapter dir): poll instead
            log.warning("catalog watch of %s falls back to polling every %s s: %s", root, self.interval, e)
            return None
        return obs

    def _run(self):
        next_full = time.monotonic() + self.rescan
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_full - time.monotonic()))
            if self._stop.is_set():
                break
            names = None
            if self._wake.is_set():
                self._wake.clear()
                self._stop.wait(_SETTLE_S)
                with self._lock:
                    names, self._names = self._names, set()
            if time.monotonic() >= next_full:
                names = None  # the periodic full refresh covers what the events named too
                next_full = time.monotonic() + self.rescan
            try:
                diff = self.catalog.refresh() if names is None else self.catalog.refresh(names)
            except Exception:  # noqa: BLE001 - a failed scan is retried at the next event or tick
                log.exception("catalog refresh of %s failed", self.catalog.root)
                if names:
                    with self._lock:
                        self._names |= names
                continue
            if diff and self.callback is not None:
                try:
                    self.callback(diff)
                except Exception:  # noqa: BLE001
                    log.exception("catalog watch callback failed")

    def stop(self, timeout: float = 5.0):
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _adapter_of(root: str, path) -> str | None:
    """The adapter directory name `path` lies in (its first component under root), or None."""
    if not path:
        return None
    path = os.fsdecode(path)
    if not path.startswith(root + os.sep):
        return None  # the root itself (its own mtime), or outside it
    return path[len(root) + 1:].split(os.sep, 1)[0] or None
