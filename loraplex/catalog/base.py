"""What the storage Catalog and the MemoryCatalog share: lookup by name and by id, change listeners,
and reads of one consistent version of an adapter's files."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AdapterChanged, AdapterNotFound, InvalidAdapter
from .entry import AdapterEntry, CatalogDiff
from .names import check_name
from .peft import MAX_CONFIG_BYTES
from .store import CONFIG_FILE
from .weights import read_tensors

if TYPE_CHECKING:
    import torch

log = logging.getLogger("loraplex.catalog")


@dataclass(frozen=True)
class AdapterFiles:
    """The local files of one version of an adapter, checked unchanged since it was listed."""

    entry: AdapterEntry
    weights_path: str
    weight_format: str
    local_dir: str
    _store: Any
    _item: Any

    def version_now(self) -> str | None:
        """The version on storage now (None if gone)."""
        return self._store.current_version(self._item, self.local_dir)

    def check(self) -> None:
        """Raise AdapterChanged if the files are no longer this entry's version."""
        now = self.version_now()
        if now != self.entry.version:
            raise AdapterChanged(self.entry.name, self.entry.version, now)


def read_config_dict(name: str, path: str) -> dict[str, Any]:
    """The adapter's config file as a dict (the catalog parsed and checked it when it listed it)."""
    import json

    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidAdapter(name, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(name, f"{CONFIG_FILE} is not a JSON object of at most {MAX_CONFIG_BYTES} bytes")
    return data


class CatalogBase:
    """Subclasses hold, under self._lock: _entries {name: AdapterEntry}, _invalid {name: reason},
    _by_id {id: name} (replaced whole, so lookups need no lock), _listeners; and implement
    _held(name) -> (store, item) for the version they listed (None if none)."""

    root: str
    _lock: threading.RLock
    _entries: dict[str, AdapterEntry]
    _invalid: dict[str, str]
    _by_id: dict[int, str]
    _listeners: list[Callable[[CatalogDiff], None]]

    def _held(self, name: str) -> tuple[Any, Any] | None:
        raise NotImplementedError

    def refresh(self) -> CatalogDiff:
        """Bring the entries up to date with storage (subclasses say how)."""
        raise NotImplementedError

    # ---- lookup ---------------------------------------------------------------------------------
    @property
    def _listing(self) -> tuple[dict, frozenset]:
        """(entries, names held out of the listing) as one consistent pair."""
        return self._entries, frozenset()

    def __len__(self) -> int:
        entries, hidden = self._listing
        return len(entries) - len(hidden)

    def __contains__(self, name: object) -> bool:
        entries, hidden = self._listing
        return name in entries and name not in hidden

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """The listed adapters, sorted: valid configs whose weights passed (or await) the check."""
        entries, hidden = self._listing
        if hidden:
            return sorted(n for n in entries if n not in hidden)
        return sorted(entries)

    def entries(self) -> list[AdapterEntry]:
        entries, hidden = self._listing
        return [entries[n] for n in sorted(entries) if n not in hidden]

    def invalid(self) -> dict[str, str]:
        """name -> reason, for every adapter that cannot be served."""
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
        name = self._by_id.get(adapter_id)
        if name is None:
            raise AdapterNotFound(f"#{adapter_id}", self.root)
        return name

    # ---- change listeners -----------------------------------------------------------------------
    def subscribe(self, listener: Callable[[CatalogDiff], None]) -> None:
        """Call listener(diff) after every change (caches drop stale keys)."""
        self._listeners.append(listener)

    def _notify(self, diff: CatalogDiff) -> None:
        for listener in list(self._listeners):
            try:
                listener(diff)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the catalog
                log.exception("catalog listener failed")

    # ---- reading --------------------------------------------------------------------------------
    def local_path(self, name: str) -> str:
        """A local directory with the adapter's files (remote adapters are downloaded first)."""
        entry = self.get(name)
        held = self._held(name)
        if held is None:  # removed since get(): the entry's version is gone
            raise AdapterChanged(name, entry.version, None)
        store, item = held
        return store.materialize(item, entry.version)

    def files(self, name: str, entry: AdapterEntry | None = None) -> AdapterFiles:
        """The local files of `entry` (default: the current one). Raises AdapterChanged once that
        version is gone: a held entry never gets another version's weights."""
        entry = entry or self.get(name)
        if entry.name != name:
            raise ValueError(f"entry of LoRA adapter '{entry.name}' used to read '{name}'")
        with self._lock:
            held = self._held(name)
        if held is None or held[1].version != entry.version:
            raise AdapterChanged(name, entry.version, held[1].version if held else None)
        store, item = held
        local = store.materialize(item, entry.version)
        if getattr(store, "remote", False):
            self._downloaded(entry, item)
        files = AdapterFiles(entry, os.path.join(local, os.path.basename(item.weights_path)), item.weight_format,
                             local, store, item)
        if not getattr(store, "remote", False):
            # Re-stat before opening: files swapped since the listing (e.g. for a symlink out of the root)
            # are a change, and are never opened. Materialized remote copies are immutable.
            files.check()
        return files

    def _downloaded(self, entry: AdapterEntry, item: Any) -> None:
        """A remote version is on local disk now (a storage catalog checks one it listed unchecked).
        Raises InvalidAdapter if the catalog holds the adapter invalid."""
        if entry.name not in self._entries:
            reason = self._invalid.get(entry.name)
            if reason is not None:
                raise InvalidAdapter(entry.name, reason)

    def load_tensors(self, name: str, entry: AdapterEntry | None = None) -> dict[str, torch.Tensor]:
        """{PEFT key: tensor} of the adapter, validated against its config. Raises AdapterChanged if
        the files changed under the read (call refresh() and retry), never returns a torn mix."""
        return self.load_adapter(name, entry)[2]

    def load_adapter(self, name: str, entry: AdapterEntry | None = None
                     ) -> tuple[AdapterEntry, Any, dict[str, torch.Tensor]]:
        """(entry, layout, tensors) for one consistent version of the adapter."""
        entry, _, layout, tensors = self._read(name, entry, with_config=False)
        return entry, layout, tensors

    def load_peft(self, name: str, entry: AdapterEntry | None = None
                  ) -> tuple[AdapterEntry, dict[str, Any] | None, dict[str, torch.Tensor]]:
        """(entry, config dict, tensors) of one consistent version: what a loader that builds its own
        model (vLLM's LoRAModel) needs, with the weights already checked (shapes, NaN/inf)."""
        entry, config, _, tensors = self._read(name, entry, with_config=True)
        return entry, config, tensors

    def _read(self, name: str, entry: AdapterEntry | None, with_config: bool
              ) -> tuple[AdapterEntry, dict[str, Any] | None, Any, dict[str, torch.Tensor]]:
        files = self.files(name, entry)
        config = None
        try:
            if with_config:
                config = read_config_dict(name, os.path.join(files.local_dir, CONFIG_FILE))
            layout, tensors = read_tensors(name, files.weights_path, files.weight_format, files.entry.spec)
        except (InvalidAdapter, OSError):
            files.check()  # deleted or replaced under the read: a change, not corruption
            raise
        files.check()
        return files.entry, config, layout, tensors
