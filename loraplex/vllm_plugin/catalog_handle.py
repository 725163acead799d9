"""One Catalog per process for LORAPLEX_CATALOG, opened on first use, kept current per name.

The plugin runs in every vLLM process but only some of them need the catalog (the API server to
resolve names, workers to load weights); opening it lazily keeps the others from scanning storage.

`entry(name)` and `request(name)` are the one path from a name to a version to a vLLM LoRARequest,
taken by the API server (resolver.py, serving_patch.py) and the workers (worker_manager.py) alike.
Lookups look at storage for the one name asked about, not the whole catalog:
- an unknown name is looked up on storage at once (a stat for a directory; one prefix listing for
  an object store, at most once per LORAPLEX_REFRESH_INTERVAL per name), so an adapter published a
  moment ago is found by its first request, whatever else was published or mistyped meanwhile;
- `entry(name)` re-stats a known local adapter (about 25 µs), so a request never gets a version the
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
from ..errors import AdapterChanged, AdapterNotFound, InvalidAdapter, StorageError
from .identity import catalog_path, version_id, version_token

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
        self._checked: set[tuple] = set()  # (name, version, with vLLM's limits) whose weights passed
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

    # ---- name -> version -> request: the one path every process takes -----------------------------
    def entry(self, name: str, *, fresh: bool = True):
        """The AdapterEntry of the current version of `name`. fresh: re-stat a local adapter's files
        first (about 25 µs), so a republished adapter is seen by its next lookup; an unknown name is
        always looked up on storage. Raises InvalidAdapterName (before touching anything),
        AdapterNotFound, or InvalidAdapter (bad config, or weights known bad for this version)."""
        check_name(name)
        catalog = self.catalog
        if fresh and not self.remote:
            catalog.refresh([name])
        try:
            entry = catalog.get(name)
        except AdapterNotFound:
            self._look_up(name)
            entry = catalog.get(name)
        reason = self._unservable.get((entry.name, entry.version))
        if reason is not None:
            raise InvalidAdapter(entry.name, reason)
        return entry

    def request(self, name: str, *, check_weights: bool = False, lora_config=None):
        """vLLM's LoRARequest for the current version of `name` (identity.py: its versioned path and
        per-version id). check_weights: read this version's weights once and check them (NaN, shapes,
        truncation; with lora_config, vLLM's own limits too) before it is handed out; a failure is
        remembered for the version (InvalidAdapter). A version replaced while it is read is retried
        with the new one."""
        from vllm.lora.request import LoRARequest

        entry = self.entry(name)
        for _ in range(3):
            try:
                if check_weights:
                    self._check_weights(entry, lora_config)
                token = version_token(entry.version)
                # the real directory: a publisher that swaps a symlink leaves this version readable there
                local = os.path.realpath(self.catalog.local_path(name))
                return LoRARequest(lora_name=entry.name, lora_int_id=version_id(entry.name, token),
                                   lora_path=catalog_path(local, entry.version))
            except AdapterChanged:
                entry = self.entry(name)
        raise StorageError(name, "the adapter kept changing while it was read; try again")

    def load_version(self, name: str, token: str, directory: str | None):
        """(config dict, checked tensors) of the version of `name` that `token` names: the current one,
        or one still intact in `directory` (the real directory it was resolved in) after the catalog
        moved on. AdapterChanged if that version is nowhere to be read."""
        try:
            entry = self.entry(name, fresh=False)
            if version_token(entry.version) != token:
                entry = self.entry(name)  # this process may not have seen the change yet
            if version_token(entry.version) == token:
                return self.catalog.load_peft(name, entry)[1:]
        except (AdapterNotFound, AdapterChanged):
            pass
        root_real = getattr(getattr(self.catalog, "_store", None), "root_real", None)
        if directory is None or self.remote or root_real is None:
            raise AdapterChanged(name, token, None)
        from ..catalog.at_path import read_version_at

        return read_version_at(name, directory, root_real, lambda version: version_token(version) == token)

    def _check_weights(self, entry, lora_config=None) -> None:
        key = (entry.name, entry.version, lora_config is not None)
        if key in self._checked:
            return
        try:
            _, config, tensors = self.catalog.load_peft(entry.name, entry)
            if lora_config is not None:
                from .loading import check_vllm_limits
                from .residency import ENV_STATE_DIR, newest_snapshot

                snapshot = newest_snapshot(os.environ.get(ENV_STATE_DIR, "").strip() or "/nonexistent")
                check_vllm_limits(entry.name, config, tensors, lora_config, (snapshot or {}).get("lora_modules"))
        except InvalidAdapter as e:
            self.mark_unservable(entry, e.reason)
            raise
        with self._lock:
            if len(self._checked) > 100_000:
                self._checked.clear()
            self._checked.add(key)

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
