"""The vLLM worker's host tier: the runtime's pinned slab arena, with a loader pool in front of it.

One cache for both front ends. Each adapter version is held once, as a slab packed for vLLM's stacked
tensors (slab_layout.py) in the runtime's HostCache + HostArena: one pinned buffer of exactly
host_cache_bytes, so the byte budget counts what is really allocated (a pinned tensor per adapter
would be rounded up to a power of two by the caching host allocator), compacted when the free bytes
are split, with a reservation taken before a load reads a byte (the budget holds while loads are in
flight). Pinned versions (LORAPLEX_PIN_ADAPTERS) and versions held by unfinished requests (the ledger)
are never evicted; a slab is never moved or freed while an upload reads it (a lease).

Next to each slab the cache keeps its "shell": the vLLM LoRAModel with only what the slab does not
cover (modules vLLM's own path places, e.g. none for a Llama), which is what vLLM's own CPU cache
(max_cpu_loras) holds: no second copy of the weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future

from ..runtime.arena import HostArena
from ..runtime.host_cache import HostCache
from ..runtime.policy import LRUPolicy
from ..runtime.workers import loader_pool


class SlabEntry:
    """What a load produces: the slab (in the arena) and the shell vLLM's manager registers."""

    __slots__ = ("slab", "shell", "rank")

    def __init__(self, slab, shell, rank: int):
        self.slab = slab
        self.shell = shell
        self.rank = rank


class SlabCache:
    def __init__(self, load: Callable[..., SlabEntry], *, max_bytes: int, max_entries: int | None = None,
                 workers: int = 4, pin: bool = False):
        """load(cache, key, *args) -> SlabEntry runs on the loader pool; it packs into this cache with
        slab_layout.pack_into(cache.host, key, ...)."""
        self._load = load
        self.arena = HostArena(max_bytes, pin=pin)
        # The entry cap is ours, not the HostCache's: versions pinned or held by unfinished requests do not
        # count against it (the byte budget, the arena, is hard for everyone).
        self.max_entries = max_entries
        self.host = HostCache(self.arena.nbytes, None, LRUPolicy(), is_pinned=self._kept, arena=self.arena)
        self._pool = loader_pool(workers)
        self._lock = threading.Lock()
        self._loading: dict[Hashable, Future] = {}
        self._extra: dict[Hashable, SlabEntry] = {}  # key -> entry (shell, rank) while its slab is cached
        self._pinned: set[Hashable] = set()
        self._held: set[Hashable] = set()
        self.loads = self.failures = 0

    @property
    def max_bytes(self) -> int:
        return self.host.budget

    def _kept(self, key) -> bool:
        return key in self._pinned or key in self._held

    # ---- reading -------------------------------------------------------------------------------
    def get(self, key: Hashable, *args) -> SlabEntry:
        """The entry for key: cached, or waited for if in flight, else loaded now (on the pool)."""
        entry = self._cached(key, count=True)
        if entry is not None:
            return entry
        return self.prefetch(key, *args).result()

    def _cached(self, key, count=False) -> SlabEntry | None:
        slab = self.host.lease_if_present(key, count=count)
        if slab is None:
            return None
        self.host.unlease(key)
        with self._lock:
            entry = self._extra.get(key)
        return entry if entry is not None and entry.slab is slab else None

    def lease(self, key) -> SlabEntry | None:
        """The entry with its slab leased (not moved or evicted until unlease(key)), or None."""
        slab = self.host.lease_if_present(key, count=False)
        if slab is None:
            return None
        with self._lock:
            entry = self._extra.get(key)
        if entry is None or entry.slab is not slab:
            self.host.unlease(key)
            return None
        return entry

    def unlease(self, key) -> None:
        self.host.unlease(key)

    def prefetch(self, key: Hashable, *args) -> Future:
        """Start loading key in the background (no-op if cached or in flight); returns its Future."""
        entry = self._cached(key)
        if entry is not None:
            done: Future = Future()
            done.set_result(entry)
            return done
        with self._lock:
            fut = self._loading.get(key)
            if fut is None:
                fut = self._loading[key] = self._pool.submit(self._load_one, key, args)
            return fut

    def _load_one(self, key, args) -> SlabEntry:
        try:
            entry = self._load(self, key, *args)
        except BaseException:
            with self._lock:
                self._loading.pop(key, None)
                self.failures += 1
            raise
        with self._lock:
            self._loading.pop(key, None)
            self._extra[key] = entry
            self.loads += 1
            if len(self._extra) > 2 * max(16, len(self.host.keys())):  # forget evicted entries' shells
                self._extra = {k: e for k, e in self._extra.items() if k in self.host}
        self._trim(keep=key)
        return entry

    def _trim(self, keep=None) -> None:
        """Evict, least recently used first, the entries over the cap that nothing keeps."""
        if self.max_entries is None:
            return
        keys = [k for k in self.host.keys() if not self._kept(k)]
        for k in self.host.policy.order([k for k in keys if k != keep])[:max(0, len(keys) - self.max_entries)]:
            self.host.drop(k, evicted=True)

    def __contains__(self, key) -> bool:
        return key in self.host

    def is_loading(self, key) -> bool:
        with self._lock:
            return key in self._loading

    # ---- policy --------------------------------------------------------------------------------
    def pin(self, key: Hashable) -> None:
        self._pinned.add(key)

    def unpin(self, key: Hashable) -> None:
        self._pinned.discard(key)

    def hold(self, key: Hashable) -> None:
        """Keep key from eviction until release(key) (versions held by unfinished requests)."""
        self._held.add(key)

    def release(self, key: Hashable) -> None:
        self._held.discard(key)

    def discard(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every cached key for which match(key) is true (leased ones go when released)."""
        gone = [k for k in self.host.keys() if match(k)]
        for k in gone:
            self._pinned.discard(k)
            self._held.discard(k)
            self.host.drop(k)
        return len(gone)

    def set_limits(self, max_bytes: int | None = None, max_entries: int | None = None) -> None:
        """Shrink (or restore, up to the arena's size) the byte budget and the entry cap; evicts now."""
        if max_bytes is not None:
            self.host.budget = max(0, min(int(max_bytes), self.arena.nbytes))
        if max_entries is not None:
            self.max_entries = int(max_entries) if max_entries > 0 else None
        self.host.shrink_to_budget()
        self._trim()

    # ---- introspection -------------------------------------------------------------------------
    @property
    def generation(self) -> tuple:
        """Changes whenever the cached or pinned set may have (residency metrics)."""
        h = self.host
        return (len(h.keys()), h.evictions, self.loads, len(self._pinned))

    def stats(self) -> dict:
        s = self.host.stats()
        with self._lock:
            loading = len(self._loading)
        return {"entries": s["entries"], "bytes": s["bytes"], "max_bytes": s["budget_bytes"],
                "max_entries": self.max_entries, "reserved_bytes": s["reserved_bytes"],
                "peak_bytes": s["peak_bytes"], "arena_bytes": self.arena.nbytes, "loading": loading,
                "pinned": len([k for k in self._pinned if k in self.host]), "hits": s["hits"],
                "misses": s["misses"], "loads": self.loads, "evictions": s["evictions"], "failures": self.failures}

    def keys(self) -> list:
        return self.host.keys()

    def items(self) -> list:
        """(key, SlabEntry) of every cached entry."""
        keys = self.host.keys()
        with self._lock:
            return [(k, self._extra[k]) for k in keys if k in self._extra]

    def pinned_keys(self) -> set:
        return set(self._pinned)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
