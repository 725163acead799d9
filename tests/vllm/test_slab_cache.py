"""The vLLM worker's host tier (slab_cache.py): the runtime's arena under a hard byte budget, versions held
by unfinished requests or pinned never evicted, a soft entry cap that does not count them, and a load
that cannot fit failing alone. No vLLM needed: slabs here are plain byte buffers."""

from __future__ import annotations

import pytest
import torch

from loraplex.errors import CapacityError
from loraplex.vllm_plugin.slab_cache import SlabCache, SlabEntry

KB = 1024


class Slab:
    def __init__(self, key, buffer):
        self.key = key
        self.buffer = buffer


def _load(cache, key, nbytes):
    res = cache.host.reserve(key, nbytes)
    buf = cache.host.buffer_for(res, nbytes, torch.uint8, False)
    buf.fill_(hash(key) % 251)
    slab = cache.host.commit(res, Slab(key, buf))
    return SlabEntry(slab, shell=None, rank=4)


def _cache(budget=64 * KB, entries=None):
    return SlabCache(_load, max_bytes=budget, max_entries=entries, workers=2)


def test_budget_holds_at_every_load_and_counts_the_arena():
    cache = _cache()
    for i in range(40):
        entry = cache.get(("a", str(i)), (5 + i % 7) * KB)
        assert int(entry.slab.buffer[0]) == hash(("a", str(i))) % 251  # its own bytes
    s = cache.stats()
    assert s["arena_bytes"] == 64 * KB and s["peak_bytes"] <= s["arena_bytes"]
    assert s["evictions"] > 0 and s["bytes"] <= 64 * KB
    assert s["loads"] == 40 and s["misses"] == 40


def test_held_and_pinned_versions_are_never_evicted():
    cache = _cache()
    cache.get(("held", "1"), 20 * KB)
    cache.hold(("held", "1"))
    cache.get(("pinned", "1"), 20 * KB)
    cache.pin(("pinned", "1"))
    for i in range(20):
        cache.get(("other", str(i)), 10 * KB)
    assert ("held", "1") in cache and ("pinned", "1") in cache
    # a load that cannot fit beside them fails alone, naming the adapter
    with pytest.raises(CapacityError, match="big"):
        cache.get(("big", "1"), 30 * KB)
    assert ("held", "1") in cache
    cache.release(("held", "1"))
    cache.get(("big", "1"), 30 * KB)  # the released version made room
    assert ("held", "1") not in cache and ("pinned", "1") in cache


def test_entry_cap_does_not_count_what_is_kept():
    cache = _cache(entries=1)
    cache.get(("a", "1"), KB)
    cache.hold(("a", "1"))
    cache.get(("b", "1"), KB)
    cache.get(("c", "1"), KB)  # b goes (the cap is one unheld entry); a stays, held
    assert set(cache.keys()) == {("a", "1"), ("c", "1")}
    assert cache.stats()["evictions"] == 1


def test_leased_slab_stays_until_unleased_and_discard_and_limits():
    cache = _cache()
    cache.get(("a", "1"), 8 * KB)
    entry = cache.lease(("a", "1"))
    assert entry is not None
    assert cache.discard(lambda k: k[0] == "a") == 1
    assert entry.slab.buffer.numel() == 8 * KB  # still readable by the upload holding the lease
    cache.unlease(("a", "1"))
    assert ("a", "1") not in cache
    for i in range(4):
        cache.get(("b", str(i)), 8 * KB)
    cache.set_limits(max_bytes=16 * KB)
    assert cache.stats()["bytes"] <= 16 * KB
    cache.set_limits(max_bytes=1 << 30)  # never beyond the arena
    assert cache.max_bytes == 64 * KB


def test_concurrent_prefetches_of_one_key_load_once():
    cache = _cache()
    futures = [cache.prefetch(("a", "1"), 4 * KB) for _ in range(8)]
    assert len({id(f.result()) for f in futures}) == 1
    assert cache.stats()["loads"] == 1
