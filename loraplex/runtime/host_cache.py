"""HostCache: slabs by (name, version) under a byte budget and an optional count cap.

The budget covers slabs held *and* loads in flight: a loader reserves an adapter's size (known from
the file header) before it reads a byte, so the budget holds at every instant, not just between loads.
An entry is evictable when it is not pinned and no upload holds a lease on it (the pinned buffer must
stay alive until its host->device copy finished).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import CapacityError
from .policy import EvictionPolicy

TIER = "host"


@dataclass
class _Entry:
    slab: object
    nbytes: int
    offset: int | None  # where the slab lives in the arena (None: its own allocation)
    stale: bool = False  # a newer version exists: evicted first, dropped when its last lease ends


class Reservation:
    __slots__ = ("key", "nbytes", "offset", "open")

    def __init__(self, key, nbytes: int, offset: int | None):
        self.key = key
        self.nbytes = nbytes
        self.offset = offset
        self.open = True


class HostCache:
    def __init__(self, budget_bytes: int, max_entries: int | None, policy: EvictionPolicy, *,
                 is_pinned=lambda key: False, metrics=None, reclaim=None, wait_s: float = 30.0, arena=None):
        self.arena = arena  # HostArena: slabs are carved from it (exact budget); None: one allocation each
        self.budget = budget_bytes if arena is None else arena.nbytes
        self.max_entries = max_entries
        self.policy = policy
        self._is_pinned = is_pinned
        self._metrics = metrics
        self._reclaim = reclaim  # called while waiting for room: lets finished uploads return their leases
        self.wait_s = wait_s
        self._cond = threading.Condition(threading.RLock())
        self._entries: dict = {}
        self._leases: dict = {}
        self._reservations: set[Reservation] = set()
        self.used_bytes = 0
        self.reserved_bytes = 0
        self.peak_bytes = 0  # max of used + reserved ever seen: the property tests check it against the budget
        self.hits = self.misses = self.evictions = 0

    # ---- lookups --------------------------------------------------------------------------------
    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self) -> list:
        with self._cond:
            return list(self._entries)

    def lease_if_present(self, key, count: bool = True):
        """The slab for `key` with a lease taken (release with unlease), or None (a miss)."""
        with self._cond:
            e = self._entries.get(key)
            if e is None:
                if count:
                    self._count("miss")
                return None
            self._leases[key] = self._leases.get(key, 0) + 1
            self.policy.touch(key)
            if count:
                self._count("hit")
            return e.slab

    def peek(self, key):
        e = self._entries.get(key)
        return None if e is None else e.slab

    def unlease(self, key, n: int = 1) -> None:
        with self._cond:
            left = self._leases.get(key, 0) - n
            if left < 0:
                raise RuntimeError(f"host cache: lease of {key} released more often than taken")
            if left:
                self._leases[key] = left
            else:
                self._leases.pop(key, None)
                e = self._entries.get(key)
                if e is not None and e.stale:
                    self._remove(key, evicted=False)
            self._cond.notify_all()

    def _count(self, what: str) -> None:
        if what == "hit":
            self.hits += 1
        else:
            self.misses += 1
        if self._metrics is not None:
            (self._metrics.hit if what == "hit" else self._metrics.miss)(TIER)

    # ---- room for loads -------------------------------------------------------------------------
    def reserve(self, key, nbytes: int, timeout: float | None = None) -> Reservation:
        """Make room for a slab of `nbytes` (evicting as the policy says) and hold it for the load."""
        if self.arena is not None:
            nbytes = self.arena.rounded(nbytes)
        if nbytes > self.budget:
            raise CapacityError(
                f"LoRA adapter '{key[0]}' needs {nbytes} bytes of host memory; host_cache_bytes is {self.budget}"
            )
        deadline = time.monotonic() + (self.wait_s if timeout is None else timeout)
        while True:
            with self._cond:
                ok, offset = self._make_room(nbytes)
                if ok:
                    res = Reservation(key, nbytes, offset)
                    self._reservations.add(res)
                    self.reserved_bytes += nbytes
                    self._note_peak()
                    return res
                if not self._reservations and not any(k in self._entries for k in self._leases):
                    raise CapacityError(
                        f"host cache cannot hold LoRA adapter '{key[0]}' ({nbytes} bytes): pinned adapters use "
                        f"{self.used_bytes} of host_cache_bytes={self.budget}"
                        + (f" and max_cpu_loras={self.max_entries}" if self.max_entries else "")
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CapacityError(
                        f"host cache: no room for LoRA adapter '{key[0]}' ({nbytes} bytes) within the wait: "
                        f"every cached adapter is pinned or being uploaded, or loads in flight hold the budget"
                    )
                self._cond.wait(min(left, 0.005))
            if self._reclaim is not None:  # outside our lock: reclaim takes the pool's lock, then ours
                self._reclaim()

    def _fits(self, nbytes: int) -> bool:
        if self.used_bytes + self.reserved_bytes + nbytes > self.budget:
            return False
        return self.max_entries is None or len(self._entries) + len(self._reservations) < self.max_entries

    def _make_room(self, nbytes: int) -> tuple[bool, int | None]:
        """Evict (stale entries first, then as the policy says) until the bytes fit and, with an arena,
        one contiguous range does. (ok, arena offset)."""
        while True:
            if self._fits(nbytes):
                if self.arena is None:
                    return True, None
                off = self.arena.alloc(nbytes)
                if off is None and self._compact():
                    off = self.arena.alloc(nbytes)
                if off is not None:
                    return True, off
            cands = [k for k in self._entries if not self._leases.get(k) and not self._is_pinned(k)]
            if not cands:
                return False, None
            stale = [k for k in cands if self._entries[k].stale]
            victim = stale[0] if stale else self.policy.victim(cands)
            self._remove(victim, evicted=True)

    def _compact(self) -> bool:
        """Slide every entry no upload holds toward the start of the arena, so the free bytes become
        one range. Without it, a pinned entry (never evicted) in the middle of the arena can leave the
        bytes free but split, and an adapter the budget has room for would be refused. Moves are a
        host memcpy, far cheaper than evicting and reading from storage again. Returns True if
        anything moved."""
        moved = False
        buf = self.arena.buffer
        movable = sorted((e.offset, k) for k, e in self._entries.items()
                         if e.offset is not None and not self._leases.get(k))
        for old, key in movable:
            e = self._entries[key]
            self.arena.free(old, e.nbytes)
            new = self.arena.alloc(e.nbytes)  # first fit: at or below `old`, whose range was just freed
            if new != old:
                n = self.arena.rounded(e.nbytes)
                src = buf[old:old + n]
                buf[new:new + n].copy_(src.clone() if new + n > old else src)  # ranges may overlap
                slab = e.slab
                slab.buffer = self.arena.view(new, slab.buffer.numel(), slab.buffer.dtype)
                e.offset = new
                moved = True
        return moved

    def buffer_for(self, res: Reservation, numel: int, dtype, pin: bool):
        """The memory a load packs its slab into: the reserved arena range, or a fresh allocation."""
        import torch

        if res.offset is not None:
            return self.arena.view(res.offset, numel, dtype)
        return torch.empty(max(numel, 1), dtype=dtype, pin_memory=pin)

    def cancel(self, res: Reservation) -> None:
        with self._cond:
            if res.open:
                res.open = False
                self._reservations.discard(res)
                self.reserved_bytes -= res.nbytes
                if res.offset is not None:
                    self.arena.free(res.offset, res.nbytes)
                self._cond.notify_all()

    def commit(self, res: Reservation, slab, *, leases: int = 0, stale: bool = False):
        """Turn the reservation into an entry holding `slab`, with `leases` leases already taken.
        Returns the slab the cache holds for the key: an earlier copy if a racing load of the same
        version won (then `slab`'s memory is released and must not be used)."""
        with self._cond:
            if not res.open:
                raise RuntimeError("host cache: reservation committed twice")
            res.open = False
            self._reservations.discard(res)
            self.reserved_bytes -= res.nbytes
            key = slab.key
            if key in self._entries:  # a racing load of the same version won: keep one copy
                self._entries[key].stale = self._entries[key].stale and stale
                if res.offset is not None:
                    self.arena.free(res.offset, res.nbytes)
            else:
                self._entries[key] = _Entry(slab, res.nbytes, res.offset, stale)
                self.used_bytes += res.nbytes
                self.policy.touch(key)
            kept = self._entries[key].slab
            if leases:
                self._leases[key] = self._leases.get(key, 0) + leases
            elif self._entries[key].stale:  # a stale version nobody waits for
                self._remove(key, evicted=False)
            self._note_peak()
            self._cond.notify_all()
            return kept

    # ---- removal --------------------------------------------------------------------------------
    def _remove(self, key, evicted: bool) -> None:
        e = self._entries.pop(key)
        self.used_bytes -= e.nbytes
        if e.offset is not None:
            self.arena.free(e.offset, e.nbytes)
        if self._metrics is not None:
            self._metrics.host_bytes.set(self.used_bytes)
        self.policy.forget(key)
        if evicted:
            self.evictions += 1
            if self._metrics is not None:
                self._metrics.evicted(TIER)

    def drop(self, key, evicted: bool = False) -> bool:
        """Remove key now (a leased entry goes when its last lease ends). False if it is not cached.
        evicted: count it as an eviction (a cap enforced from outside) rather than a removal."""
        with self._cond:
            e = self._entries.get(key)
            if e is None:
                return False
            if self._leases.get(key):
                e.stale = True
            else:
                self._remove(key, evicted=evicted)
            self._cond.notify_all()
            return True

    def shrink_to_budget(self) -> None:
        """Evict, as the policy says, until the entries fit the budget and the entry cap again (after
        either was lowered); pinned and leased entries stay."""
        with self._cond:
            while self.used_bytes > self.budget or (self.max_entries is not None
                                                    and len(self._entries) > self.max_entries):
                cands = [k for k in self._entries if not self._leases.get(k) and not self._is_pinned(k)]
                if not cands:
                    break
                self._remove(self.policy.victim(cands), evicted=True)
            self._cond.notify_all()

    def drop_stale(self, name: str, current_version) -> int:
        """Drop versions of `name` other than current_version (None: all); leased ones go when released."""
        n = 0
        with self._cond:
            for key in [k for k in self._entries if k[0] == name and k[1] != current_version]:
                if self._leases.get(key):
                    self._entries[key].stale = True
                else:
                    self._remove(key, evicted=False)
                    n += 1
            self._cond.notify_all()
        return n

    def clear(self) -> None:
        with self._cond:
            for key in list(self._entries):
                if self._leases.get(key):
                    self._entries[key].stale = True
                else:
                    self._remove(key, evicted=False)
            self._cond.notify_all()

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.used_bytes + self.reserved_bytes)
        if self._metrics is not None:
            self._metrics.host_bytes.set(self.used_bytes)

    def stats(self) -> dict:
        with self._cond:
            return {
                "entries": len(self._entries),
                "bytes": self.used_bytes,
                "reserved_bytes": self.reserved_bytes,
                "budget_bytes": self.budget,
                "peak_bytes": self.peak_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "leased": sum(1 for k in self._leases if k in self._entries),
                "pinned": sum(1 for k in self._entries if self._is_pinned(k)),
            }


__all__ = ["HostCache", "Reservation"]
