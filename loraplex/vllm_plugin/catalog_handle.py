"""One Catalog per process for LORAPLEX_CATALOG, opened on first use, kept current per name.

The plugin runs in every vLLM process but only some of them need the catalog (the API server to
resolve names, workers to load weights); opening it lazily keeps the others from scanning storage.

Lookups look at storage for the one name asked about, not the whole catalog:
- an unknown name is looked up on storage at once (a stat for a directory; one prefix listing for
  an object store, at most once per LORAPLEX_REFRESH_INTERVAL per name), so an adapter published a
  moment ago is found by its first request, whatever else was published or mistyped meanwhile;
- `fresh(name)` re-stats a known local adapter (about 25 µs), so a request never gets a version the
  directory no longer holds. Object stores are re-listed by LORAPLEX_CATALOG_WATCH instead.
- Adapters whose weights turned out unservable (NaN, truncated file, rank too large...) are
  remembered per version: they are refused at once with the reason and not listed, until their
  files change.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ..catalog import Catalog, open_catalog
from ..catalog.names import check_name
from ..config import CatalogConfig
from ..errors import AdapterNotFound, InvalidAdapter

log = logging.getLogger("loraplex.vllm_plugin")

ENV_CATALOG = "LORAPLEX_CATALOG"
ENV_REFRESH = "LORAPLEX_REFRESH_INTERVAL"  # seconds between storage lookups of one unknown remote name


class CatalogHandle:
    def __init__(self, url: str, min_refresh_interval: float | None = None):
        self.url = url
        if min_refresh_interval is None:
            min_refresh_interval = float(os.environ.get(ENV_REFRESH, "1.0"))
        self.min_refresh_interval = min_refresh_interval
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._last_refresh = 0.0
        self._last_lookup: dict[str, float] = {}  # remote: name -> when storage was last asked for it
        self._unservable: dict[tuple[str, object], str] = {}  # (name, version) -> why its weights fail
        self._listeners = []
        self._watcher = None

    @property
    def catalog(self) -> Catalog:
        with self._lock:
            if self._catalog is None:
                self._catalog = open_catalog(CatalogConfig(catalog_type="storage", catalog_path=self.url))
                self._last_refresh = time.monotonic()
                for fn in self._listeners:
                    self._catalog.subscribe(fn)
                log.info("loraplex: catalog %s opened with %d adapters", self.url, len(self._catalog))
            return self._catalog

    @property
    def remote(self) -> bool:
        return "://" in self.url

    def subscribe(self, listener) -> None:
        """listener(CatalogDiff) after every refresh that changed something."""
        with self._lock:
            self._listeners.append(listener)
            if self._catalog is not None:
                self._catalog.subscribe(listener)

    def refresh(self, force: bool = False):
        """Re-list all of storage unless that was done less than min_refresh_interval ago (or force).
        Returns the CatalogDiff, or None when skipped."""
        catalog = self.catalog
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_refresh < self.min_refresh_interval:
                return None
            self._last_refresh = now
        return catalog.refresh()

    def _look_up(self, name: str) -> None:
        """Ask storage about this one name (remote: rate-limited per name)."""
        if self.remote:
            now = time.monotonic()
            with self._lock:
                if now - self._last_lookup.get(name, -1e9) < self.min_refresh_interval:
                    return
                if len(self._last_lookup) > 10_000:  # a flood of random names must not grow this forever
                    self._last_lookup.clear()
                self._last_lookup[name] = now
        self.catalog.refresh([name])

    def get(self, name):
        """The AdapterEntry for `name`, asking storage for it if it is unknown here. Raises
        InvalidAdapterName, AdapterNotFound or InvalidAdapter (bad config, or weights known bad)."""
        check_name(name)  # before opening or looking up anything for an unsafe name
        catalog = self.catalog
        try:
            entry = catalog.get(name)
        except AdapterNotFound:
            self._look_up(name)
            entry = catalog.get(name)
        return self._servable(entry)

    def fresh(self, name):
        """get(name), after checking a local adapter's files for a newer version."""
        check_name(name)
        if not self.remote:
            self.catalog.refresh([name])
        return self.get(name)

    def _servable(self, entry):
        reason = self._unservable.get((entry.name, entry.version))
        if reason is not None:
            raise InvalidAdapter(entry.name, reason)
        return entry

    def mark_unservable(self, entry, reason: str) -> None:
        """Remember that this version's weights cannot be served (until its files change)."""
        with self._lock:
            if len(self._unservable) > 10_000:
                self._unservable.clear()
            self._unservable[(entry.name, entry.version)] = reason

    def names(self, refresh: bool = True) -> list[str]:
        """Servable adapter names: valid configs, minus versions whose weights failed."""
        if refresh:
            self.refresh()
        if not self._unservable:
            return self.catalog.names()
        return [e.name for e in self.catalog.entries() if (e.name, e.version) not in self._unservable]

    def start_watch(self, interval: float) -> None:
        """Refresh in the background (filesystem events where available, else polling)."""
        with self._lock:
            if self._watcher is not None:
                return
        watcher = self.catalog.watch(interval=interval)
        with self._lock:
            if self._watcher is None:
                self._watcher = watcher
                return
        watcher.stop()


_handles: dict[str, CatalogHandle] = {}
_handles_lock = threading.Lock()


def get_handle(url: str | None = None) -> CatalogHandle | None:
    """The process's handle for `url` (default: $LORAPLEX_CATALOG); None if there is no catalog."""
    url = url or os.environ.get(ENV_CATALOG, "").strip()
    if not url:
        return None
    with _handles_lock:
        handle = _handles.get(url)
        if handle is None:
            handle = _handles[url] = CatalogHandle(url)
        return handle
