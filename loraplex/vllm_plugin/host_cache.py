"""HostAdapterCache: loaded adapters in host memory, loaded on a thread pool, byte-budget LRU.

The second cache tier under vLLM's own (max_cpu_loras, counted in adapters): an adapter vLLM
evicted comes back from here without touching storage, and the adapters a step needs load in
parallel instead of one after another inside the step. Values are whatever the loader returns
(vLLM LoRAModels, already packed and scaled, for the worker manager); keys must change when the
adapter's files change (the worker manager keys by (name, path, version)), so a stale value is
never served.

This is deliberately small and self-contained: the loraplex Runtime's pinned slab cache can take
its place behind the same four calls (get, prefetch, pin, discard) once it can hand out vLLM
LoRAModels.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor


class HostAdapterCache:
    def __init__(self, load: Callable[..., object], size_of: Callable[[object], int], *,
                 max_bytes: int = 2 << 30, max_entries: int | None = None, workers: int = 4):
        self._load = load
        self._size_of = size_of
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="loraplex-load")
        self._lock = threading.Lock()
        self._ready: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()  # LRU order: oldest first
        self._loading: dict[Hashable, Future] = {}
        self._pinned: set[Hashable] = set()
        self._held: set[Hashable] = set()  # not evicted for now (loaded ahead for a waiting request)
        self._bytes = 0
        self.hits = self.misses = self.loads = self.evictions = self.failures = 0
        self.generation = 0  # bumped whenever the set of cached or pinned keys changes

    # ---- reading -------------------------------------------------------------------------------
    def get(self, key: Hashable, *args):
        """The value for key: cached, or waited for if in flight, else loaded now (on the pool)."""
        with self._lock:
            hit = self._ready.get(key)
            if hit is not None:
                self._ready.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
        return self.prefetch(key, *args).result()

    def prefetch(self, key: Hashable, *args) -> Future:
        """Start loading key in the background (no-op if cached or in flight); returns its Future."""
        with self._lock:
            hit = self._ready.get(key)
            if hit is not None:
                done: Future = Future()
                done.set_result(hit[0])
                return done
            fut = self._loading.get(key)
            if fut is None:
                fut = self._loading[key] = self._pool.submit(self._load_one, key, args)
            return fut

    def _load_one(self, key, args):
        try:
            value = self._load(*args)
        except BaseException:
            with self._lock:
                self._loading.pop(key, None)
                self.failures += 1
            raise
        size = int(self._size_of(value))
        with self._lock:
            self._loading.pop(key, None)
            self.loads += 1
            old = self._ready.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._ready[key] = (value, size)
            self._bytes += size
            self.generation += 1
            self._evict_locked(keep=key)
        return value

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._ready

    def is_loading(self, key) -> bool:
        with self._lock:
            return key in self._loading

    # ---- policy --------------------------------------------------------------------------------
    def pin(self, key: Hashable) -> None:
        """Never evict key (it may still be loading; pins survive until unpin/discard)."""
        with self._lock:
            self._pinned.add(key)
            self.generation += 1

    def hold(self, key: Hashable) -> None:
        """Keep key (maybe still loading) from eviction until release(key): a softer pin, not shown as
        one, for entries loaded ahead of their use."""
        with self._lock:
            self._held.add(key)

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._held.discard(key)
            self._evict_locked()

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            self._pinned.discard(key)
            self.generation += 1
            self._evict_locked()

    def discard(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every cached key for which match(key) is true (changed or removed adapters)."""
        with self._lock:
            gone = [k for k in self._ready if match(k)]
            for k in gone:
                self._bytes -= self._ready.pop(k)[1]
                self._pinned.discard(k)
                self._held.discard(k)
            self.generation += bool(gone)
            return len(gone)

    def set_limits(self, max_bytes: int | None = None, max_entries: int | None = None) -> None:
        with self._lock:
            if max_bytes is not None:
                self.max_bytes = int(max_bytes)
            if max_entries is not None:
                self.max_entries = int(max_entries) if max_entries > 0 else None
            self._evict_locked()

    def _evict_locked(self, keep=None) -> None:
        def over():
            return self._bytes > self.max_bytes or (self.max_entries is not None
                                                    and len(self._ready) > self.max_entries)

        for k in list(self._ready):  # oldest first
            if not over():
                break
            if k in self._pinned or k in self._held or k == keep:
                continue
            self._bytes -= self._ready.pop(k)[1]
            self.evictions += 1
            self.generation += 1

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._ready), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "max_entries": self.max_entries, "loading": len(self._loading),
                    "pinned": len(self._pinned), "hits": self.hits, "misses": self.misses,
                    "loads": self.loads, "evictions": self.evictions, "failures": self.failures}

    def keys(self) -> list:
        with self._lock:
            return list(self._ready)

    def items(self) -> list:
        """(key, value) of every cached entry, oldest first."""
        with self._lock:
            return [(k, v) for k, (v, _) in self._ready.items()]

    def pinned_keys(self) -> set:
        with self._lock:
            return set(self._pinned)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
