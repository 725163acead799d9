"""MemoryCatalog: adapters registered by name and local path (vLLM's own behaviour), with the same
entry/id interface as the storage Catalog."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import AdapterNotFound, CatalogError, InvalidAdapter, StorageError
from .base import CatalogBase
from .check import CHANGED, check_file
from .entry import AdapterEntry, CatalogDiff
from .ids import IdTable
from .names import check_name
from .peft import AdapterSpec, parse_config_bytes
from .store import StoredAdapter, read_config_file, stat_adapter_dir

if TYPE_CHECKING:
    from .watch import Watcher

log = logging.getLogger("loraplex.catalog")


class _DirStore:
    """The files of one registered directory. The path is the operator's choice, so symlinks in it
    are followed wherever they lead (a Hugging Face cache snapshot links into ../../blobs)."""

    remote = False

    def __init__(self, name: str, path: str):
        self.name = name
        self.path = path

    def stat(self) -> StoredAdapter:
        if not os.path.isdir(self.path):
            raise InvalidAdapter(self.name, f"{self.path} is not a directory")
        try:
            return stat_adapter_dir(self.name, self.path, None)
        except OSError as e:
            raise StorageError(self.name, f"cannot stat {self.path}: {e.strerror or e}") from None

    def read_config(self, item: StoredAdapter) -> bytes:
        return read_config_file(self.name, item.config_path, None)

    def materialize(self, item: StoredAdapter, version: str) -> str:
        return self.path

    def current_version(self, item: StoredAdapter, local_dir: str) -> str | None:
        try:
            return self.stat().version
        except CatalogError:
            return None

    def check(self, item: StoredAdapter, spec: AdapterSpec) -> None:
        """The weights check (see catalog.check): InvalidAdapter if it fails, StorageError if the
        files changed under it (register again, or the next refresh reads them)."""
        v = check_file(self.name, spec, item.weights_path, item.weight_format, version=item.version)
        if type(v) is str and self.current_version(item, self.path) != item.version:
            v = CHANGED
        if v is CHANGED:
            raise StorageError(self.name, f"{self.path} changed while it was checked; try again")
        if v is not None:
            raise InvalidAdapter(self.name, v)


class MemoryCatalog(CatalogBase):
    """Adapters added with register(name, path) and removed with unregister(name)."""

    catalog_type = "memory"

    def __init__(self) -> None:
        self.root = "<memory>"
        self._lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}
        self._items: dict[str, tuple[_DirStore, StoredAdapter]] = {}  # name -> (its files, as listed)
        self._paths: dict[str, str] = {}  # every registered name, valid or not
        self._invalid: dict[str, str] = {}
        self._ids = IdTable()  # updated in place under the lock
        self._by_id: dict[int, str] = {}  # its published copy, for lock-free get_adapter_name
        self._listeners: list[Callable[[CatalogDiff], None]] = []

    # ---- registration ---------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike[str]) -> AdapterEntry:
        """Add or replace adapter `name` from the PEFT directory `path`, validated now (the config and
        the weights check): raises InvalidAdapter naming `name`, and nothing is registered."""
        check_name(name)
        path = os.path.abspath(os.fspath(path))
        store = _DirStore(name, path)
        item = store.stat()
        spec = parse_config_bytes(name, store.read_config(item))
        store.check(item, spec)
        with self._lock:
            old = self._entries.get(name)
            self._paths[name] = path
            self._invalid.pop(name, None)
            self._put(store, item, spec)
            entry = self._entries[name]
        self._notify(CatalogDiff(changed=(name,)) if old else CatalogDiff(added=(name,)))
        return entry

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._paths.pop(name, None) is None:
                raise AdapterNotFound(name, self.root)
            self._invalid.pop(name, None)
            had = self._drop(name)
        if had:
            self._notify(CatalogDiff(removed=(name,)))

    def _put(self, store: _DirStore, item: StoredAdapter, spec: AdapterSpec) -> None:
        name = store.name
        renumbered = self._ids.add([name])
        self._entries[name] = AdapterEntry(name, self._ids.by_name[name], item.version, store.path, spec,
                                           item.weight_format, item.size_bytes)
        self._items[name] = (store, item)
        if renumbered:
            self._sync_ids()
        self._by_id = dict(self._ids.by_id)

    def _drop(self, name: str) -> bool:
        if self._entries.pop(name, None) is None:
            return False
        self._items.pop(name)
        if self._ids.remove([name]):
            self._sync_ids()
        self._by_id = dict(self._ids.by_id)
        return True

    def _sync_ids(self) -> None:
        by_name = self._ids.by_name
        for n, e in self._entries.items():
            if e.id != by_name[n]:
                self._entries[n] = replace(e, id=by_name[n])

    # ---- keeping current ------------------------------------------------------------------------
    def refresh(self) -> CatalogDiff:
        """Re-stat every registered directory: a changed one is re-read and its weights checked
        (changed); one whose files are gone or invalid now leaves the entries (removed) and shows in
        invalid(), and comes back when it is fixed (added)."""
        added: list[str] = []
        removed: list[str] = []
        changed: list[str] = []
        with self._lock:
            for name, path in list(self._paths.items()):
                old = self._entries.get(name)
                store = _DirStore(name, path)
                try:
                    item = store.stat()
                    if old is not None and item.version == old.version:
                        continue
                    spec = parse_config_bytes(name, store.read_config(item))
                    store.check(item, spec)
                except CatalogError as e:
                    reason = getattr(e, "reason", None) or str(e)
                    if self._invalid.get(name) != reason:
                        log.warning("LoRA adapter '%s' (%s) is no longer servable: %s", name, path, reason)
                    self._invalid[name] = reason
                    if self._drop(name):
                        removed.append(name)
                    continue
                self._invalid.pop(name, None)
                self._put(store, item, spec)
                (changed if old is not None else added).append(name)
        diff = CatalogDiff(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(changed)))
        if diff:
            self._notify(diff)
        return diff

    def watch(self, callback: Callable[[CatalogDiff], None] | None = None, interval: float = 2.0, *,
              events: bool = False) -> Watcher:
        """Poll refresh() every `interval` s (registered paths may be anywhere: no events)."""
        from .watch import Watcher

        return Watcher(self, callback, interval, events=False)

    def _held(self, name: str) -> tuple[_DirStore, StoredAdapter] | None:
        return self._items.get(name)

    def __repr__(self) -> str:
        return f"MemoryCatalog({len(self._entries)} adapters)"


__all__ = ["MemoryCatalog"]
