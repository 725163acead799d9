"""Loader: storage -> slab on a thread pool, one load per (name, version) however many ask for it.

acquire(entry, claim=True) returns a Future of the slab. A claimed slab comes with a host-cache lease
taken for the caller at the moment the slab enters the cache (so it cannot be evicted between the
load finishing and the caller's upload); the caller returns it with HostCache.unlease(key). A failed
load sets its exception on the future (every waiter sees the catalog's error) and caches nothing.
A version change cancels a queued load and marks a running one stale: its result is still a
consistent old version for the requests that asked for it, but it is dropped from the cache once they
are done with it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from ..catalog.reader import open_adapter
from .slab import Slab, pack
from .workers import loader_pool

log = logging.getLogger("loraplex.runtime")


class _Load:
    __slots__ = ("entry", "future", "claims", "cancelled")

    def __init__(self, entry):
        self.entry = entry
        self.future: Future = Future()
        self.claims = 0
        self.cancelled = False


class Loader:
    def __init__(self, catalog, host, plan_layout, *, workers: int = 4, pin: bool = False, metrics=None):
        self.catalog = catalog
        self.host = host
        self._plan_layout = plan_layout  # (entry, modules) -> SlabLayout for the registered targets
        self.pin = pin
        self._metrics = metrics
        self._lock = threading.Lock()
        self._loads: dict = {}  # key -> _Load, queued or running
        self.failures: dict = {}  # key -> exception of its last failed load (cleared on success)
        self._pool = loader_pool(workers)
        self.completed = 0
        self.failed = 0

    def acquire(self, entry, claim: bool = True) -> Future:
        """Future of the slab for entry.key: already cached, joining a load in flight, or a new load."""
        key = entry.key
        with self._lock:
            load = self._loads.get(key)
            if load is not None:
                if claim:
                    load.claims += 1
                    self.host._count("miss")
                return load.future
            slab = self.host.lease_if_present(key) if claim else self.host.peek(key)
            if slab is not None:
                f = Future()
                f.set_result(slab)
                return f
            if not claim:
                self.host._count("miss")
            load = _Load(entry)
            load.claims = int(claim)
            self._loads[key] = load
            self._set_gauge()
        self._pool.submit(self._run, load)
        return load.future

    def in_flight(self) -> int:
        return len(self._loads)

    def loading(self, key) -> bool:
        return key in self._loads

    def cancel_stale(self, name: str, current_version) -> None:
        """A refresh changed or removed `name`: forget its loads of other versions."""
        with self._lock:
            for key in [k for k in self._loads if k[0] == name and k[1] != current_version]:
                load = self._loads.pop(key)
                load.cancelled = True
                load.future.cancel()  # a queued load never starts; a running one finishes as stale
            self._set_gauge()
            for key in [k for k in self.failures if k[0] == name]:
                del self.failures[key]

    def _run(self, load: _Load) -> None:
        if not load.future.set_running_or_notify_cancel():
            return
        entry, res, reader = load.entry, None, None
        name = entry.name
        try:
            t0 = time.perf_counter()
            reader = open_adapter(self.catalog, name, entry)
            layout = self._plan_layout(entry, reader.layout)
            t1 = time.perf_counter()
            res = self.host.reserve(entry.key, layout.nbytes)
            t2 = time.perf_counter()
            buf = self.host.buffer_for(res, layout.numel, layout.dtype, self.pin)
            pack(name, reader, layout, buf)
            t3 = time.perf_counter()
            r, reader = reader, None
            r.close()  # raises AdapterChanged if the files changed while we copied them
            t4 = time.perf_counter()
            slab = Slab(entry, layout, buf)
        except BaseException as e:  # noqa: BLE001 - every failure goes to every waiter
            if reader is not None:
                reader.abort()
            if res is not None:
                self.host.cancel(res)
            with self._lock:
                if self._loads.get(entry.key) is load:
                    del self._loads[entry.key]
                self.failures[entry.key] = e
                self.failed += 1
                self._set_gauge()
            if self._metrics is not None:
                self._metrics.load_failures.inc()
            log.debug("loading LoRA adapter '%s' failed: %s", name, e)
            load.future.set_exception(e)
            return
        if self._metrics is not None:
            # read: open + header + layout + the final version check; pack: each tensor read from the file
            # (page cache or disk) and copied into its slab region
            self._metrics.phase("read", (t1 - t0) + (t4 - t3))
            self._metrics.phase("pack", t3 - t2)
        with self._lock:
            if self._loads.get(entry.key) is load:
                del self._loads[entry.key]
            self.failures.pop(entry.key, None)
            self.completed += 1
            slab = self.host.commit(res, slab, leases=load.claims, stale=load.cancelled)
            self._set_gauge()
        load.future.set_result(slab)

    def _set_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.loads_in_flight.set(len(self._loads))

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            for load in self._loads.values():
                load.cancelled = True
                load.future.cancel()
        self._pool.shutdown(wait=wait, cancel_futures=True)


__all__ = ["Loader"]
