"""HostAdapterCache, the worker manager's host tier: byte budget, LRU order, pins, parallel loads
that happen once per key, failures that are not cached. Plain Python: no vLLM needed."""

from __future__ import annotations

import threading
import time

import pytest

from loraplex.vllm_plugin.host_cache import HostAdapterCache


class Loader:
    def __init__(self, delay=0.0, fail=()):
        self.calls = []
        self.delay = delay
        self.fail = set(fail)
        self.lock = threading.Lock()

    def __call__(self, name, size):
        with self.lock:
            self.calls.append(name)
        time.sleep(self.delay)
        if name in self.fail:
            raise OSError(f"cannot read {name}")
        return {"name": name, "size": size}


def _cache(loader, **kw):
    return HostAdapterCache(loader, lambda v: v["size"], **kw)


def test_hits_misses_and_lru_eviction_by_bytes():
    loader = Loader()
    cache = _cache(loader, max_bytes=100)
    for name in ("a", "b", "c"):
        assert cache.get(name, name, 40)["name"] == name
    # a + b + c = 120 > 100: the oldest (a) went
    assert cache.keys() == ["b", "c"]
    cache.get("b", "b", 40)  # touch b: c is now the oldest
    cache.get("d", "d", 40)
    assert cache.keys() == ["b", "d"]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["loads"], s["evictions"], s["bytes"]) == (1, 4, 4, 2, 80)
    assert loader.calls == ["a", "b", "c", "d"]


def test_entry_cap_and_set_limits():
    cache = _cache(Loader(), max_bytes=10**9, max_entries=2)
    for name in ("a", "b", "c"):
        cache.get(name, name, 1)
    assert cache.keys() == ["b", "c"]
    cache.set_limits(max_bytes=1)  # one 1-byte entry fits
    assert cache.keys() == ["c"]
    cache.set_limits(max_bytes=0)
    assert cache.keys() == []
    cache.set_limits(max_bytes=100, max_entries=0)  # 0: no count cap
    for name in ("a", "b", "c"):
        cache.get(name, name, 1)
    assert len(cache.keys()) == 3


def test_pins_survive_eviction_and_discard_drops():
    cache = _cache(Loader(), max_bytes=50)
    cache.pin("a")
    cache.get("a", "a", 40)
    cache.get("b", "b", 40)
    cache.get("c", "c", 40)
    assert "a" in cache and "b" not in cache and "c" in cache
    cache.unpin("a")  # over budget again: a, now the oldest unpinned, goes
    assert cache.keys() == ["c"]
    assert cache.discard(lambda k: k == "c") == 1 and cache.keys() == []


def test_parallel_prefetch_loads_each_key_once():
    loader = Loader(delay=0.2)
    cache = _cache(loader, workers=4)
    t0 = time.monotonic()
    futures = [cache.prefetch(k, k, 1) for k in ("a", "b", "c", "d", "a", "b")]
    results = [f.result(timeout=10)["name"] for f in futures]
    elapsed = time.monotonic() - t0
    assert results == ["a", "b", "c", "d", "a", "b"]
    assert sorted(loader.calls) == ["a", "b", "c", "d"]
    assert elapsed < 0.6, f"4 loads of 0.2 s on 4 threads took {elapsed:.2f} s"
    assert cache.get("c", "c", 1)["name"] == "c" and cache.stats()["hits"] == 1


def test_failures_propagate_and_are_not_cached():
    loader = Loader(fail={"bad"})
    cache = _cache(loader)
    with pytest.raises(OSError, match="cannot read bad"):
        cache.get("bad", "bad", 1)
    loader.fail.clear()
    assert cache.get("bad", "bad", 1)["name"] == "bad"
    assert loader.calls == ["bad", "bad"] and cache.stats()["failures"] == 1


def test_held_entries_wait_for_their_use():
    """Adapters loaded ahead of a queued request are held until it runs, then evictable as usual."""
    cache = _cache(Loader(), max_bytes=100)
    cache.hold("ahead")
    cache.prefetch("ahead", "ahead", 40).result()
    for name in ("x", "y", "z"):  # 40 each: without the hold, "ahead" would be the first to go
        cache.get(name, name, 40)
    assert "ahead" in cache and cache.stats()["pinned"] == 0  # a hold is not a pin
    cache.get("ahead", "ahead", 40)
    cache.release("ahead")
    cache.get("w", "w", 40)
    cache.get("v", "v", 40)
    assert "ahead" not in cache and cache.stats()["bytes"] <= 100
