"""One Catalog per process for LORAPLEX_CATALOG, opened on first use and refreshed on demand.

The plugin runs in every vLLM process but only some of them need the catalog (the API server to
resolve names, workers to load weights); opening it lazily keeps the others from scanning storage.
Refreshes triggered by requests (an unknown name, a /v1/models listing) are rate-limited, so a flood
of requests for names that do not exist cannot turn into a flood of storage scans.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ..catalog import Catalog, open_catalog
from ..catalog.names import check_name
from ..config import CatalogConfig
from ..errors import AdapterNotFound, InvalidAdapter, InvalidAdapterName

log = logging.getLogger("loraplex.vllm_plugin")

ENV_CATALOG = "LORAPLEX_CATALOG"
ENV_REFRESH = "LORAPLEX_REFRESH_INTERVAL"  # seconds between on-demand refreshes (default 1)


class CatalogHandle:
    def __init__(self, url: str, min_refresh_interval: float | None = None):
        self.url = url
        if min_refresh_interval is None:
            min_refresh_interval = float(os.environ.get(ENV_REFRESH, "1.0"))
        self.min_refresh_interval = min_refresh_interval
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._last_refresh = 0.0
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

    def subscribe(self, listener) -> None:
        """listener(CatalogDiff) after every refresh that changed something."""
        with self._lock:
            self._listeners.append(listener)
            if self._catalog is not None:
                self._catalog.subscribe(listener)

    def refresh(self, force: bool = False):
        """Re-list storage unless that was done less than min_refresh_interval ago (or force).
        Returns the CatalogDiff, or None when skipped."""
        catalog = self.catalog
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_refresh < self.min_refresh_interval:
                return None
            self._last_refresh = now
        return catalog.refresh()

    def get(self, name):
        """The AdapterEntry for `name`, refreshing once if it is unknown. Raises InvalidAdapterName,
        AdapterNotFound or InvalidAdapter."""
        check_name(name)  # before opening or re-listing anything for an unsafe name
        catalog = self.catalog
        try:
            return catalog.get(name)
        except AdapterNotFound:
            if self.refresh() is None:
                raise
        return catalog.get(name)

    def lookup(self, name):
        """get(name), or None if the name is unsafe, unknown or invalid (vLLM then answers 404)."""
        try:
            return self.get(name)
        except InvalidAdapterName as e:
            log.debug("loraplex: refusing adapter name %r: %s", name, e.reason)
        except AdapterNotFound:
            pass
        except InvalidAdapter as e:
            log.warning("loraplex: %s", e)
        return None

    def names(self, refresh: bool = True) -> list[str]:
        if refresh:
            self.refresh()
        return self.catalog.names()

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
