"""Background refresh of a catalog: filesystem events (watchdog) where available, polling otherwise."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("loraplex.catalog")


class Watcher:
    def __init__(self, catalog, callback, interval: float):
        self.catalog = catalog
        self.callback = callback
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer = self._start_observer()
        self._thread = threading.Thread(target=self._run, name="loraplex-catalog-watch", daemon=True)
        self._thread.start()

    @property
    def uses_events(self) -> bool:
        return self._observer is not None

    def _start_observer(self):
        if getattr(self.catalog._store, "remote", False):
            return None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return None
        wake = self._wake

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        obs = Observer()
        try:
            obs.schedule(_Handler(), self.catalog.root, recursive=True)
            obs.start()
        except OSError as e:  # e.g. inotify watch limit: fall back to polling
            log.warning("catalog watch falls back to polling: %s", e)
            return None
        return obs

    def _run(self):
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._stop.is_set():
                break
            if self._wake.is_set():
                self._wake.clear()
                self._stop.wait(0.05)  # let a burst of events (a copy of many files) settle
            try:
                diff = self.catalog.refresh()
            except Exception:  # noqa: BLE001 - a failed scan is retried at the next tick
                log.exception("catalog refresh failed")
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
