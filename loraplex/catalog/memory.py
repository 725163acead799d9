"""MemoryCatalog: adapters registered by name and local path (vLLM's own behaviour), with the same
entry/id interface as the storage Catalog."""

from __future__ import annotations

import os
import threading

from ..errors import AdapterChanged, AdapterNotFound, InvalidAdapter
from .entry import AdapterEntry, CatalogDiff
from .ids import IdTable
from .names import check_name
from .peft import parse_config_bytes
from .store import LocalStore
from .weights import read_tensors


class MemoryCatalog:
    catalog_type = "memory"

    def __init__(self):
        self.root = "<memory>"
        self._lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}
        self._items = {}
        self._ids = IdTable()
        self._listeners = []

    def register(self, name: str, path) -> AdapterEntry:
        """Add or replace adapter `name` from the PEFT directory `path`."""
        check_name(name)
        path = os.path.abspath(os.fspath(path))
        parent, base = os.path.split(path)
        store = LocalStore(parent)
        item = store._stat_adapter(base, os.path.islink(path))
        spec = parse_config_bytes(name, store.read_config(item))
        with self._lock:
            old = self._entries.get(name)
            self._ids.add([name])
            entry = AdapterEntry(name, self._ids.by_name[name], item.version, path, spec,
                                 item.weight_format, item.size_bytes)
            self._entries[name] = entry
            self._items[name] = (store, item)
        diff = CatalogDiff(changed=(name,)) if old else CatalogDiff(added=(name,))
        for listener in list(self._listeners):
            listener(diff)
        return entry

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise AdapterNotFound(name, self.root)
            self._items.pop(name)
            self._ids.remove([name])
        for listener in list(self._listeners):
            listener(CatalogDiff(removed=(name,)))

    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def names(self):
        return sorted(self._entries)

    def entries(self):
        return [self._entries[n] for n in self.names()]

    def invalid(self):
        return {}

    def get(self, name):
        entry = self._entries.get(name)
        if entry is None:
            check_name(name)
            raise AdapterNotFound(name, self.root)
        return entry

    __getitem__ = get

    def get_adapter_id(self, name):
        return self.get(name).id

    def get_adapter_name(self, adapter_id):
        name = self._ids.by_id.get(adapter_id)
        if name is None:
            raise AdapterNotFound(f"#{adapter_id}", self.root)
        return name

    def subscribe(self, listener):
        self._listeners.append(listener)

    def refresh(self):
        return CatalogDiff()

    def local_path(self, name):
        return self.get(name).path

    def load_tensors(self, name, entry=None):
        return self.load_adapter(name, entry)[2]

    def load_adapter(self, name, entry=None):
        entry = entry or self.get(name)
        store, item = self._items[name]
        if item.version != entry.version:
            raise AdapterChanged(name, entry.version, item.version)
        layout, tensors = read_tensors(name, item.weights_path, item.weight_format, entry.spec)
        now = store.current_version(item, entry.path)
        if now != entry.version:
            raise AdapterChanged(name, entry.version, now)
        return entry, layout, tensors


__all__ = ["MemoryCatalog", "InvalidAdapter"]
