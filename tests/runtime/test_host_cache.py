"""HostCache and the eviction policies, on their own (the runtime tests cover them with real slabs)."""

import threading
import time
from types import SimpleNamespace

import pytest

from loraplex.errors import CapacityError
from loraplex.runtime.host_cache import HostCache
from loraplex.runtime.policy import LFUPolicy, LRUPolicy, make_policy


def _put(cache, name, nbytes, leases=0, version="v1"):
    key = (name, version)
    res = cache.reserve(key, nbytes)
    cache.commit(res, SimpleNamespace(key=key), leases=leases)
    return key


def test_budget_and_lru_order():
    c = HostCache(300, None, LRUPolicy())
    a, _, d = _put(c, "a", 100), _put(c, "b", 100), _put(c, "d", 100)
    assert c.used_bytes == 300
    assert c.lease_if_present(a) is not None  # a is now most recent
    c.unlease(a)
    e = _put(c, "e", 100)  # evicts b, the least recently used
    assert set(c.keys()) == {a, d, e}
    assert c.evictions == 1 and c.peak_bytes <= 300
    f = _put(c, "f", 200)  # evicts d then a
    assert set(c.keys()) == {e, f}
    assert c.stats()["evictions"] == 3


def test_reservations_count_against_the_budget():
    c = HostCache(250, None, LRUPolicy(), wait_s=0.05)
    res = c.reserve(("a", "1"), 200)
    assert c.reserved_bytes == 200
    with pytest.raises(CapacityError, match="within the wait"):  # the in-flight load holds the budget
        c.reserve(("b", "1"), 100)
    c.cancel(res)
    c.reserve(("b", "1"), 100)
    assert c.peak_bytes <= 250


def test_too_large_and_all_pinned():
    pinned = set()
    c = HostCache(200, None, LRUPolicy(), is_pinned=lambda k: k[0] in pinned, wait_s=0.05)
    with pytest.raises(CapacityError, match="needs 300 bytes.*host_cache_bytes is 200"):
        c.reserve(("big", "1"), 300)
    _put(c, "a", 150)
    pinned.add("a")
    with pytest.raises(CapacityError, match="pinned adapters use 150"):
        c.reserve(("b", "1"), 100)
    pinned.clear()
    _put(c, "b", 100)
    assert c.keys() == [("b", "v1")]


def test_leased_entries_survive_and_waiters_get_room():
    c = HostCache(200, None, LRUPolicy(), wait_s=5)
    a = _put(c, "a", 200, leases=1)
    done = []

    def load_b():
        done.append(c.reserve(("b", "1"), 100))

    th = threading.Thread(target=load_b)
    th.start()
    time.sleep(0.05)
    assert not done and a in c  # a is leased: not evicted while its upload runs
    c.unlease(a)
    th.join(5)
    assert done and a not in c and c.peak_bytes <= 200


def test_count_cap():
    c = HostCache(10_000, 2, LRUPolicy())
    _put(c, "a", 10)
    _put(c, "b", 10)
    _put(c, "c", 10)
    assert len(c.keys()) == 2 and ("a", "v1") not in c


def test_stale_versions_dropped_when_released():
    c = HostCache(1000, None, LRUPolicy())
    old = _put(c, "a", 100, leases=1, version="v1")
    other = _put(c, "b", 100)
    c.drop_stale("a", "v2")
    assert old in c  # still leased by an upload
    c.unlease(old)
    assert old not in c and other in c
    res = c.reserve(("a", "v1"), 100)
    c.commit(res, SimpleNamespace(key=("a", "v1")), stale=True)  # a stale load nobody waits for
    assert ("a", "v1") not in c and c.used_bytes == 100 and c.reserved_bytes == 0


def test_lfu_with_aging():
    p = LFUPolicy(half_life=4)
    for _ in range(5):
        p.touch("hot")
    p.touch("cold")
    assert p.order(["hot", "cold"]) == ["cold", "hot"]
    for _ in range(40):  # hot's uses age away while "new" keeps being used
        p.touch("new")
    p.touch("cold")
    assert p.order(["hot", "cold", "new"])[-1] == "new"
    assert p.frequency("hot") < 0.01
    lru = LRUPolicy()
    for k in "abc":
        lru.touch(k)
    lru.touch("a")
    assert lru.order(["a", "b", "c"]) == ["b", "c", "a"]


def test_make_policy():
    assert isinstance(make_policy("LRU"), LRUPolicy)
    assert isinstance(make_policy(lambda: LFUPolicy(8)), LFUPolicy)
    with pytest.raises(ValueError, match="one of"):
        make_policy("fifo")
    with pytest.raises(TypeError, match="own instance"):
        make_policy(LRUPolicy())


def test_arena_first_fit_and_coalescing():
    from loraplex.runtime.arena import ALIGN, HostArena

    a = HostArena(10 * ALIGN, pin=False)
    offs = [a.alloc(ALIGN) for _ in range(10)]
    assert offs == [i * ALIGN for i in range(10)] and a.alloc(1) is None
    for i in (1, 2, 5):
        a.free(offs[i], ALIGN)
    assert a.largest_free() == 2 * ALIGN and a.free_bytes() == 3 * ALIGN
    assert a.alloc(2 * ALIGN) == ALIGN  # first fit: the coalesced [1, 3) range
    a.free(offs[4], ALIGN)
    a.free(offs[3], ALIGN)  # coalesces with 4 and 5 on both sides
    assert a.largest_free() == 3 * ALIGN
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(offs[4], ALIGN)
    v = a.view(offs[0], 7, __import__("torch").float32)
    assert v.numel() == 7 and v.data_ptr() == a.buffer.data_ptr()


def test_host_cache_in_an_arena_evicts_for_a_contiguous_range():
    from loraplex.runtime.arena import ALIGN, HostArena

    arena = HostArena(4 * ALIGN, pin=False)
    c = HostCache(4 * ALIGN, None, LRUPolicy(), arena=arena)
    keys = [_put(c, n, ALIGN) for n in "abcd"]
    c.lease_if_present(keys[0])  # a stays (leased); b, c, d are LRU in that order
    c.unlease(keys[0])
    c.lease_if_present(keys[2])  # c leased: the range after it cannot merge with b's
    # evicts b, then d (now the bytes fit, but ranges 1 and 3 are apart), then a: range [0, 2) is free
    big = c.reserve(("e", "1"), 2 * ALIGN)
    assert big.offset == 0 and c.keys() == [keys[2]] and c.evictions == 3
    c.cancel(big)
    c.unlease(keys[2])
    assert arena.free_bytes() == 4 * ALIGN - c.used_bytes


def test_arena_compacts_around_a_pinned_entry():
    """A pinned entry in the middle of the arena splits the free bytes: the cache slides it to the start
    (its bytes intact) instead of refusing an adapter that the budget has room for."""
    import torch

    from loraplex.runtime.arena import ALIGN, HostArena

    arena = HostArena(4 * ALIGN, pin=False)
    pinned = set()
    c = HostCache(4 * ALIGN, None, LRUPolicy(), arena=arena, is_pinned=lambda k: k in pinned)

    def put(name, nbytes, fill):
        key = (name, "v1")
        res = c.reserve(key, nbytes)
        buf = c.buffer_for(res, nbytes, torch.uint8, False)
        buf.fill_(fill)
        c.commit(res, SimpleNamespace(key=key, buffer=buf))
        return key

    a = put("a", ALIGN, 1)
    b = put("b", ALIGN, 2)
    pinned.add(b)
    assert c._entries[b].offset == ALIGN  # free bytes: [0, ALIGN) once a goes, and [2 ALIGN, 4 ALIGN)
    big = c.reserve(("big", "v1"), 3 * ALIGN)
    assert c.keys() == [b] and c._entries[b].offset == 0 and big.offset == ALIGN
    assert bool((c.peek(b).buffer == 2).all()) and c.peek(b).buffer.data_ptr() == arena.buffer.data_ptr()
    assert a not in c
    c.cancel(big)
    assert arena.free_bytes() == 3 * ALIGN
