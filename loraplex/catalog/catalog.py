"""Catalog: the adapters of one storage root, by name and by deterministic id, kept current."""

from __future__ import annotations

import gc
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import CatalogError, InvalidAdapter, InvalidAdapterName
from .background import NameQueue
from .base import CatalogBase
from .check import CHANGED, UNCHECKED, check_items
from .entry import AdapterEntry, CatalogDiff
from .ids import IdTable
from .peft import parse_config_bytes
from .store import LocalStore, StoredAdapter

if TYPE_CHECKING:
    from .watch import Watcher

log = logging.getLogger("loraplex.catalog")


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every Catalog of this process


def _after_fork_in_child() -> None:
    # The background checks may hold a catalog's lock at the fork; in the child that thread does
    # not exist and the lock would stay held forever. Only the forking thread runs there now.
    for cat in list(_LIVE):
        cat._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_url(root: object) -> bool:
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


class Catalog(CatalogBase):
    """Adapters found under `root`: a directory or an fsspec URL (s3://bucket/prefix, gs://, http...).

    Listing reads adapter_config.json and stats the weight file; tensors are read on demand by
    load_tensors() / load_adapter() / files() (see CatalogBase). Every version listed also gets a
    cheap weights check (loraplex.catalog.check: the safetensors header against the file size and the
    config, no tensor data read). Invalid adapters are skipped with a warning and listed in invalid().

    When the weights check runs (what names(), entries(), len() and `in` show):
    - A refresh that finds at most `sync_checks` new or changed adapters checks them before it
      returns: one that fails is never listed (it is in invalid()). refresh([name]), what a server
      does for a request or a filesystem event, is such a refresh.
    - The first listing of a larger catalog lists every adapter at once and checks them in the
      background (wait_checks() / checks_pending()); one that fails leaves the listing when its
      check runs, and listeners get a diff with it in `removed`.
    - A later refresh that finds more than `sync_checks` new or changed adapters (a mass publish)
      holds them out of the listing until the background has checked them; get() checks one on
      demand. So an adapter published after the first listing is never listed if it fails.
    - get(name) of an adapter still awaiting its check checks it first: get() never returns an
      entry that failed the check.
    - Remote stores: a check reads the local copy when one is on disk, else the header by ranged
      reads (a GET of its first 64 KiB, a second for a longer header). The background check of a
      first listing does no ranged reads (one request per adapter, for every restart): adapters with
      no local copy are listed as unchecked() until their first download checks them (a failure
      then drops them like a background failure). `.bin` adapters on a remote store, and any whose
      header read failed (storage unreachable), are listed unchecked() the same way.
    """

    catalog_type = "storage"

    def __init__(self, root: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                 cache_bytes: int = 20 << 30, storage_options: dict[str, Any] | None = None,
                 sync_checks: int = 256) -> None:
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
        # Weights-check state, changed under the lock; lock-free readers only test membership.
        self.sync_checks = sync_checks
        self._pending: dict[str, bool] = {}  # name -> listed?, for entries awaiting their check
        self._pending_size = 0  # len(_pending) when it was last built
        self._hidden: set[str] = set()  # the pending names held out of the listing
        self._view: tuple[dict, frozenset] = (self._entries, frozenset())  # what listings read, in one
        self._unchecked: set[str] = set()  # listed, no check possible yet (remote, no local copy)
        self._listed_once = False
        self._checks = NameQueue(self._check_batch)  # restarts itself in a forked child
        _LIVE.add(self)
        self.refresh()

    # ---- keeping current ------------------------------------------------------------------------
    def refresh(self, names: Iterable[str] | None = None) -> CatalogDiff:
        """Re-list storage; re-read only the configs of adapters whose version changed, and run the
        weights check on them (before this returns if at most sync_checks; see the class doc).

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
            deferred = len(fresh) > self.sync_checks
            fresh_unchecked = set()
            if fresh and not deferred:
                fresh, fresh_unchecked, moving = self._check_fresh(fresh, items, invalid)
                for n in moving:  # rewritten while checked: a listed adapter stays at its listed version
                    if n in old_entries and n in self._items:  # (whose reads now raise AdapterChanged)
                        kept[n] = old_entries[n]
                        items[n] = self._items[n]
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
            # Check states carry over for the unchanged entries only.
            pending = {n: v for n, v in self._pending.items() if n in kept}
            hidden = {n for n in self._hidden if n in kept}
            unchecked = {n for n in self._unchecked if n in kept} | fresh_unchecked
            if deferred:  # listed at once in a first listing; held out of it afterwards
                listed = not self._listed_once
                if pending:
                    pending.update(dict.fromkeys(fresh_names, listed))
                else:
                    pending = dict.fromkeys(fresh_names, listed)
                if not listed:
                    hidden.update(fresh_names)
            entries = kept
            local_dir = self._store.local_dir
            for item, spec in fresh:
                entries[item.name] = AdapterEntry(item.name, by_name[item.name], item.version, local_dir(item),
                                                  spec, item.weight_format, item.size_bytes)
            # Items of invalid configs are kept too, so an unchanged bad config is not re-read each time.
            self._items = items
            # Lock-free get() reads _entries, then _pending, then _invalid: a new entry must be pending
            # before it is there, and a name leaving the entries for invalid() must be in invalid() first
            # (else a get() in between finds it nowhere: AdapterNotFound for an adapter being rewritten).
            # Listings read _view, the entries and the held-out names in one.
            self._pending = pending
            self._pending_size = len(pending)
            self._invalid = invalid
            self._entries = entries
            self._hidden = hidden
            self._view = (entries, frozenset(hidden))
            if added or removed or renumbered:  # lock-free readers see the old or the new table, whole
                self._by_id = dict(self._ids.by_id)
            self._unchecked = unchecked
            self._listed_once = True
            if deferred:
                self._checks.put(fresh_names)
            return CatalogDiff(tuple(sorted(added)), tuple(sorted(removed)), tuple(sorted(changed)))

    # ---- the weights check ----------------------------------------------------------------------
    def _check_fresh(self, fresh, items, invalid):
        """Check the (item, spec) of new or changed adapters now: (those to list, those of them that
        could not be checked, the names whose files changed under the check)."""
        verdicts = check_items(self._store, fresh, network=True)
        passed, unchecked, moving = [], set(), set()
        for item, spec in fresh:
            v = verdicts[item.name]
            if v is CHANGED:
                items.pop(item.name, None)  # not this version: the next refresh reads what storage holds now
                moving.add(item.name)
            elif type(v) is str:
                invalid[item.name] = v
            else:
                if v is UNCHECKED:
                    unchecked.add(item.name)
                passed.append((item, spec))
        return passed, unchecked, moving

    def _check_batch(self, names: Iterable[str], network: bool = False) -> None:
        """Check these pending or unchecked entries and apply the verdicts. Remote reads: ranged ones
        for held-out names (and all with network=True); listed ones only from local copies."""
        with self._lock:
            todo = [(self._items[n], self._entries[n]) for n in names
                    if (n in self._pending or n in self._unchecked) and n in self._entries and n in self._items]
            hidden = set(self._hidden)
        verdicts = {}
        for net, group in ((network, [t for t in todo if t[1].name not in hidden]),
                           (True, [t for t in todo if t[1].name in hidden])):
            if group:
                verdicts.update(check_items(self._store, [(it, e.spec) for it, e in group], network=net))
        self._apply(todo, verdicts)

    def _apply(self, todo: list, verdicts: Mapping[str, Any]) -> None:
        failed = {}
        with self._lock:
            for _, entry in todo:
                n = entry.name
                cur = self._entries.get(n)
                if cur is None or cur.version != entry.version or not (n in self._pending or n in self._unchecked):
                    continue  # refreshed meanwhile: that refresh decided
                v = verdicts.get(n, UNCHECKED)
                if v is CHANGED:
                    continue  # still pending: the next refresh lists what storage holds now
                if type(v) is str:
                    failed[n] = v
                    continue
                self._pending.pop(n, None)  # in place: lock-free readers only test membership
                self._hidden.discard(n)
                if v is UNCHECKED:
                    self._unchecked.add(n)
                else:
                    self._unchecked.discard(n)
            if failed:
                self._drop_failed(failed)  # out of the entries before they stop being pending
                for n in failed:
                    self._pending.pop(n, None)
                self._hidden.difference_update(failed)
                self._unchecked.difference_update(failed)
            self._view = (self._entries, frozenset(self._hidden))
            if len(self._pending) * 4 < self._pending_size:
                # A dict keeps its table as it empties: once a first listing's checks are done, every
                # get() would probe 100k deleted slots for a name that is not there (about 2x slower).
                self._pending = dict(self._pending)
                self._pending_size = len(self._pending)
        if failed:
            self._notify(CatalogDiff(removed=tuple(sorted(failed))))

    def _drop_failed(self, failed: dict) -> None:
        entries = {n: e for n, e in self._entries.items() if n not in failed}
        if self._ids.remove(list(failed)):
            by_name = self._ids.by_name
            entries.update({n: replace(e, id=by_name[n]) for n, e in entries.items() if e.id != by_name[n]})
        self._by_id = dict(self._ids.by_id)
        self._invalid = {**self._invalid, **failed}
        self._entries = entries  # whole: lock-free readers iterate it
        for n, reason in failed.items():
            log.warning("dropping LoRA adapter '%s' in %s: %s", n, self.root, reason)

    def _downloaded(self, entry: AdapterEntry, item: Any) -> None:
        if entry.name in self._unchecked:  # a remote adapter listed unchecked: its local copy is here now
            self._apply([(item, entry)], check_items(self._store, [(item, entry.spec)], network=False))
        super()._downloaded(entry, item)

    def get(self, name: str) -> AdapterEntry:
        """The entry of `name`; one not checked yet is checked first (InvalidAdapter if it fails)."""
        entry = self._entries.get(name)
        if entry is not None and name not in self._pending:
            return entry
        if entry is not None:
            self._check_batch([name], network=True)
        return super().get(name)

    __getitem__ = get

    @property
    def _listing(self) -> tuple[dict, frozenset]:
        return self._view

    def wait_checks(self, timeout: float | None = None) -> bool:
        """Block until the background weights checks queued so far are done; False after `timeout` s."""
        return self._checks.wait(timeout)

    def checks_pending(self) -> int:
        """Adapters queued for a background weights check."""
        return len(self._checks)

    def unchecked(self) -> list[str]:
        """Listed adapters whose weights are not checked yet: awaiting the background (a first listing
        of more than sync_checks adapters), or remote ones with no local copy (see the class doc)."""
        with self._lock:
            return sorted({n for n, listed in self._pending.items() if listed} | self._unchecked)

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
