"""Catalog: the adapters of one storage root, by name and by deterministic id, kept current."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import CatalogError, InvalidAdapter, InvalidAdapterName
from .base import CatalogBase
from .entry import AdapterEntry, CatalogDiff
from .ids import IdTable
from .peft import parse_config_bytes
from .store import LocalStore, StoredAdapter

if TYPE_CHECKING:
    from .watch import Watcher

log = logging.getLogger("loraplex.catalog")


def _is_url(root: object) -> bool:
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


class Catalog(CatalogBase):
    """Adapters found under `root`: a directory or an fsspec URL (s3://bucket/prefix, gs://, http...).

    Listing reads only adapter_config.json and stats the weight file; weights are read on demand by
    load_tensors() / load_adapter() / files() (see CatalogBase). Invalid adapters are skipped with a
    warning and listed in invalid().
    """

    catalog_type = "storage"

    def __init__(self, root: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                 cache_bytes: int = 20 << 30, storage_options: dict[str, Any] | None = None) -> None:
        self._store: Any  # LocalStore or RemoteStore: one duck-typed interface (scan, read_config, ...)
        if _is_url(root):
            from .remote import RemoteStore

            self._store = RemoteStore(str(root), cache_dir=cache_dir, cache_bytes=cache_bytes,
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
        self._ids = IdTable()  # updated in place under the lock during a refresh
        self._by_id: dict[int, str] = {}  # the published id -> name of the current entries
        self._listeners: list[Callable[[CatalogDiff], None]] = []
        self.refresh()

    # ---- keeping current ------------------------------------------------------------------------
    def refresh(self, names: Iterable[str] | None = None) -> CatalogDiff:
        """Re-list storage; re-read only the configs of adapters whose version changed.

        names: only these adapter directories may have changed (what filesystem events reported):
        stat just them, so the cost follows the change, not the catalog's size. Stores that cannot
        list one adapter (remote ones) list everything."""
        # A listing creates several small objects per adapter; with the cyclic GC on, 100k adapters
        # trigger repeated full collections that rescan every object of the process (torch has
        # many): 20-40% of a listing's time. Nothing built here forms cycles, so pausing it is safe.
        paused = gc.isenabled()
        gc.disable()
        try:
            diff = self._refresh(names)
        finally:
            if paused:
                gc.enable()
        if diff:
            self._notify(diff)
        return diff

    def _refresh(self, names: Iterable[str] | None) -> CatalogDiff:
        with self._lock:
            old_entries = self._entries
            scan_names = getattr(self._store, "scan_names", None)
            if names is None or scan_names is None:
                items: dict[str, StoredAdapter]
                check: Mapping[str, StoredAdapter]
                suspects: Iterable[str]
                items, invalid = self._store.scan()
                check, kept, suspects = items, {}, old_entries
            else:
                names = set(names)
                check, part_invalid = scan_names(names)
                items = dict(self._items)
                invalid = {n: r for n, r in self._invalid.items() if n not in names}
                kept = dict(old_entries)
                for n in names:
                    items.pop(n, None)
                    kept.pop(n, None)
                items.update(check)
                invalid.update(part_invalid)
                suspects = [n for n in names if n in old_entries]
            fresh = []  # (item, spec) of adapters that are new or changed
            for name, item in check.items():
                old = self._items.get(name)
                if old is not None and old.version == item.version:
                    e = old_entries.get(name)
                    if e is not None:
                        kept[name] = e
                        continue
                    reason = self._invalid.get(name)
                    if reason is not None:
                        invalid[name] = reason
                        continue
                try:
                    spec = parse_config_bytes(name, self._store.read_config(item))
                except (InvalidAdapter, CatalogError) as e:
                    invalid[name] = getattr(e, "reason", None) or str(e)
                    continue
                fresh.append((item, spec))
            for name, reason in invalid.items():
                if self._invalid.get(name) != reason:
                    log.warning("skipping LoRA adapter '%s' in %s: %s", name, self.root, reason)
            fresh_names = {it.name for it, _ in fresh}
            added = [n for n in fresh_names if n not in old_entries]
            changed = [n for n in fresh_names if n in old_entries]
            removed = [n for n in suspects if n not in kept and n not in fresh_names]  # gone or now invalid
            # Ids before entries: an entry is built once, with its final id.
            renumbered = self._ids.remove(removed)
            renumbered = self._ids.add(added) or renumbered
            by_name = self._ids.by_name
            if renumbered:
                moved = [n for n, e in kept.items() if e.id != by_name[n]]
                if moved:
                    log.info("adapter id collision in %s: new ids for %s (ids are re-derived from the names)",
                             self.root, ", ".join(sorted(moved)[:10]))
                    kept.update({n: replace(kept[n], id=by_name[n]) for n in moved})
            entries = kept
            local_dir = self._store.local_dir
            for item, spec in fresh:
                entries[item.name] = AdapterEntry(item.name, by_name[item.name], item.version, local_dir(item),
                                                  spec, item.weight_format, item.size_bytes)
            # Items of invalid configs are kept too, so an unchanged bad config is not re-read each time.
            self._items = items
            self._entries = entries
            if added or removed or renumbered:  # lock-free readers see the old or the new table, whole
                self._by_id = dict(self._ids.by_id)
            self._invalid = invalid
            return CatalogDiff(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(changed)))

    def watch(self, callback: Callable[[CatalogDiff], None] | None = None, interval: float = 2.0, *,
              events: bool = True, rescan: float = 60.0) -> Watcher:
        """Keep the catalog current in the background; callback(diff) after each change.

        Local roots use filesystem events (watchdog) unless events=False: only the adapters an
        event names are re-read, and a full rescan runs every `rescan` s in case events were lost.
        Otherwise (remote roots, no watchdog, inotify limit) a full refresh every `interval` s.
        Returns a Watcher; call .stop() (or use it as a context manager)."""
        from .watch import Watcher

        return Watcher(self, callback, interval, events=events and not getattr(self._store, "remote", False),
                       rescan=rescan)

    def _held(self, name: str) -> tuple[Any, StoredAdapter] | None:
        item = self._items.get(name)
        return None if item is None else (self._store, item)

    def __repr__(self) -> str:
        return f"Catalog({self.root!r}, {len(self._entries)} adapters, {len(self._invalid)} invalid)"


__all__ = ["Catalog", "InvalidAdapterName"]
