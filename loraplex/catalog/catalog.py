"""Catalog: the adapters of one storage root, by name and by deterministic id, kept current."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ..errors import AdapterChanged, AdapterNotFound, CatalogError, InvalidAdapter, InvalidAdapterName
from .entry import AdapterEntry, CatalogDiff
from .ids import IdTable
from .names import check_name
from .peft import parse_config_bytes
from .store import LocalStore, StoredAdapter
from .weights import read_tensors

log = logging.getLogger("loraplex.catalog")


def _is_url(root) -> bool:
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


class Catalog:
    """Adapters found under `root`: a directory or an fsspec URL (s3://bucket/prefix, gs://, http...).

    Listing reads only adapter_config.json and stats the weight file; weights are read on demand by
    load_tensors(). Invalid adapters are skipped with a warning and listed in invalid().
    """

    catalog_type = "storage"

    def __init__(self, root, *, cache_dir=None, cache_bytes: int = 20 << 30, storage_options=None):
        if _is_url(root):
            from .remote import RemoteStore

            self._store = RemoteStore(root, cache_dir=cache_dir, cache_bytes=cache_bytes,
                                      storage_options=storage_options or {})
        else:
            root = os.fspath(root)
            if root.startswith("file://"):
                root = root[len("file://"):]
            self._store = LocalStore(root)
        self.root = self._store.root
        self._lock = threading.RLock()
        self._items: dict[str, StoredAdapter] = {}
        self._entries: dict[str, AdapterEntry] = {}
        self._invalid: dict[str, str] = {}
        self._ids = IdTable()
        self._listeners: list[Callable[[CatalogDiff], None]] = []
        self.refresh()

    # ---- lookup -------------------------------------------------------------------------------
    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return [self._entries[n] for n in self.names()]

    def invalid(self) -> dict[str, str]:
        """name -> reason, for every directory that is not a servable adapter."""
        return dict(self._invalid)

    def get(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        check_name(name)
        reason = self._invalid.get(name)
        if reason is not None:
            raise InvalidAdapter(name, reason)
        raise AdapterNotFound(name, self.root)

    __getitem__ = get

    def get_adapter_id(self, name: str) -> int:
        return self.get(name).id

    def get_adapter_name(self, adapter_id: int) -> str:
        name = self._ids.by_id.get(adapter_id)
        if name is None or name not in self._entries:
            raise AdapterNotFound(f"#{adapter_id}", self.root)
        return name

    # ---- keeping current ------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[CatalogDiff], None]) -> None:
        """Call listener(diff) after every refresh that changed something (caches drop stale keys)."""
        self._listeners.append(listener)

    def refresh(self) -> CatalogDiff:
        """Re-list storage; re-read only the configs of adapters whose version changed."""
        with self._lock:
            items, invalid = self._store.scan()
            added, removed, changed = [], [], []
            entries = {}
            for name, item in items.items():
                old = self._items.get(name)
                if old is not None and old.version == item.version and name in self._entries:
                    entries[name] = self._entries[name]
                    continue
                if old is not None and old.version == item.version and name in self._invalid:
                    invalid[name] = self._invalid[name]
                    continue
                try:
                    spec = parse_config_bytes(name, self._store.read_config(item))
                except (InvalidAdapter, CatalogError) as e:
                    invalid[name] = getattr(e, "reason", str(e))
                    continue
                entries[name] = AdapterEntry(name, 0, item.version, self._store.local_dir(item), spec,
                                             item.weight_format, item.size_bytes)
            for name, reason in invalid.items():
                if self._invalid.get(name) != reason:
                    log.warning("skipping LoRA adapter '%s' in %s: %s", name, self.root, reason)
            for name in entries:
                if name not in self._entries:
                    added.append(name)
                elif self._entries[name].version != entries[name].version:
                    changed.append(name)
            removed = [n for n in self._entries if n not in entries]
            self._ids.remove(removed)
            renumbered = self._ids.add(sorted(entries))
            for name, e in entries.items():
                i = self._ids.by_name[name]
                if e.id != i:
                    entries[name] = _with_id(e, i)
            if renumbered:
                log.info("adapter id collision in %s: ids re-assigned deterministically", self.root)
            self._items = {n: items[n] for n in entries}
            self._items.update({n: items[n] for n in invalid if n in items})
            self._entries = entries
            self._invalid = invalid
            diff = CatalogDiff(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(changed)))
        if diff:
            for listener in list(self._listeners):
                try:
                    listener(diff)
                except Exception:  # noqa: BLE001 - one bad listener must not stop the catalog
                    log.exception("catalog listener failed")
        return diff

    def watch(self, callback: Callable[[CatalogDiff], None] | None = None, interval: float = 2.0):
        """Refresh in the background (filesystem events where available, else every `interval` s).
        Returns a Watcher; call .stop() to end it."""
        from .watch import Watcher

        return Watcher(self, callback, interval)

    # ---- reading --------------------------------------------------------------------------------
    def local_path(self, name: str) -> str:
        """A local directory with the adapter's files (remote adapters are downloaded first)."""
        entry = self.get(name)
        return self._store.materialize(self._items[name], entry.version)

    def load_tensors(self, name: str, entry: AdapterEntry | None = None):
        """{PEFT key: tensor} of the adapter, validated against its config. Raises AdapterChanged if
        the files changed under the read (call refresh() and retry), never returns a torn mix."""
        return self.load_adapter(name, entry)[2]

    def load_adapter(self, name: str, entry: AdapterEntry | None = None):
        """(entry, layout, tensors) for one consistent version of the adapter."""
        entry = entry or self.get(name)
        item = self._items.get(name)
        if item is None or item.version != entry.version:
            raise AdapterChanged(name, entry.version, item.version if item else None)
        local = self._store.materialize(item, entry.version)
        wpath = os.path.join(local, os.path.basename(item.weights_path))
        layout, tensors = read_tensors(name, wpath, item.weight_format, entry.spec)
        now = self._store.current_version(item, local)
        if now != entry.version:
            raise AdapterChanged(name, entry.version, now)
        return entry, layout, tensors

    def __repr__(self):
        return f"Catalog({self.root!r}, {len(self._entries)} adapters, {len(self._invalid)} invalid)"


def _with_id(entry: AdapterEntry, i: int) -> AdapterEntry:
    from dataclasses import replace

    return replace(entry, id=i)


__all__ = ["Catalog", "InvalidAdapterName"]
