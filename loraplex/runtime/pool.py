"""SlotPool: which (name, version) each of the max_loras GPU slots holds, and who may still read it.

A plan takes every slot it needs at once, under one lock (hits share a slot and bump its refcount,
misses get the policy's victims among free slots), or takes nothing and waits: no plan ever holds
some slots while waiting for others, so plans cannot deadlock on each other. A slot is free when no
plan holds it (the runtime drops a plan's refcounts only once its step finished on the device: an
event query on CUDA), it is not pinned, and the plan itself does not use it. A slot's new content is
written by exactly one plan (the one that chose it, the "filler"); other plans that need the same
adapter meanwhile share the slot and wait on its Fill.
"""

from __future__ import annotations

import threading
import time

from ..errors import CapacityError
from .policy import EvictionPolicy

TIER = "gpu"


class Fill:
    """One upload of one adapter into one slot; other plans wait on `done`."""

    __slots__ = ("key", "slot", "done", "error", "upload", "device_done")

    def __init__(self, key, slot: int):
        self.key = key
        self.slot = slot
        self.done = threading.Event()  # host side: the upload was issued (CUDA) or finished (CPU), or failed
        self.error: BaseException | None = None
        self.upload = None  # UploadHandle (CUDA: its event orders readers after the copies)
        self.device_done = False  # cached UploadHandle.query(): once true it stays true

    def ready_on_device(self) -> bool:
        if not self.device_done and self.upload is not None and self.upload.query():
            self.device_done = True
        return self.device_done or self.upload is None


class _Slot:
    __slots__ = ("index", "key", "refs", "fill", "ranks", "rank")

    def __init__(self, index: int):
        self.index = index
        self.key = None  # what the slot's memory holds (may be stale: then it is not in by_key)
        self.refs = 0
        self.fill: Fill | None = None
        self.ranks = None  # [target][slice] ranks in memory; padding beyond is zero. None: unknown
        self.rank = 0  # max over targets: BatchPlan.slot_ranks


class SlotPool:
    def __init__(self, max_loras: int, policy: EvictionPolicy, *, is_pinned=lambda key: False, metrics=None):
        self.max_loras = max_loras
        self.policy = policy
        self._is_pinned = is_pinned
        self._metrics = metrics
        self._cond = threading.Condition(threading.RLock())
        self.slots = [_Slot(i) for i in range(max_loras)]
        for s in self.slots:
            s.ranks = ()  # no targets yet; add_target extends this with zeros (fresh targets are zeros)
        self.by_key: dict = {}  # live keys only: key -> slot index
        self.hits = self.misses = self.evictions = 0
        self.peak_refs = 0

    @property
    def lock(self):
        return self._cond

    # ---- taking slots ---------------------------------------------------------------------------
    def acquire(self, keys, *, timeout: float, reclaim=None):
        """Hold a slot for every key (distinct keys). Returns (slots {key: index}, fills this caller
        must perform, fills of other callers to wait for). Waits up to `timeout` for busy slots."""
        keys = list(dict.fromkeys(keys))
        if len(keys) > self.max_loras:
            raise CapacityError(
                f"batch uses {len(keys)} distinct LoRA adapters but there are only max_loras={self.max_loras} GPU slots"
            )
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                got = self._try_acquire(keys)
                if got is not None:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    busy = sum(1 for s in self.slots if s.refs)
                    raise CapacityError(
                        f"no free GPU slot within {timeout:.1f}s for {len(keys)} LoRA adapters: {busy} of "
                        f"{self.max_loras} slots are used by steps still in flight, {self._pinned_count()} pinned"
                    )
                self._cond.wait(min(left, 0.005))
            if reclaim is not None:  # outside our lock: reclaim releases finished steps through release()
                reclaim()

    def _try_acquire(self, keys):
        hits = {k: self.by_key[k] for k in keys if k in self.by_key}
        need = [k for k in keys if k not in hits]
        used = set(hits.values())
        free = [s for s in self.slots if s.refs == 0 and s.index not in used and not self._pinned_slot(s)]
        if len(need) > len(free):
            pinned_other = sum(1 for s in self.slots if self._pinned_slot(s) and s.index not in used)
            if len(keys) > self.max_loras - pinned_other:
                raise CapacityError(
                    f"batch uses {len(keys)} distinct LoRA adapters but only {self.max_loras - pinned_other} of "
                    f"max_loras={self.max_loras} GPU slots are not pinned to other adapters"
                )
            return None
        victims = self._victims(free, len(need))
        fills, waits, slots = [], [], {}
        for key, s in zip(need, victims, strict=True):
            if s.key is not None and self.by_key.get(s.key) == s.index:
                del self.by_key[s.key]
                self.policy.forget(s.key)
                self.evictions += 1
                if self._metrics is not None:
                    self._metrics.evicted(TIER)
            s.key = key
            s.fill = Fill(key, s.index)
            self.by_key[key] = s.index
            fills.append(s.fill)
        for key in keys:
            s = self.slots[self.by_key[key]]
            s.refs += 1
            self.peak_refs = max(self.peak_refs, s.refs)
            self.policy.touch(key)
            slots[key] = s.index
            if key in hits and not s.fill.done.is_set():
                waits.append(s.fill)
        self.hits += len(hits)
        self.misses += len(need)
        if self._metrics is not None:
            self._metrics.hit(TIER, len(hits))
            self._metrics.miss(TIER, len(need))
            self._set_gauges()
        return slots, fills, waits

    def _victims(self, free, n: int):
        if n == 0:
            return []
        empty = [s for s in free if s.key is None or self.by_key.get(s.key) != s.index]
        if len(empty) >= n:
            return empty[:n]
        live = [s for s in free if s not in empty]
        order = self.policy.order([s.key for s in live])
        by_key = {s.key: s for s in live}
        return empty + [by_key[k] for k in order[: n - len(empty)]]

    def _pinned_slot(self, s: _Slot) -> bool:
        return s.key is not None and self.by_key.get(s.key) == s.index and self._is_pinned(s.key)

    def _pinned_count(self) -> int:
        return sum(1 for s in self.slots if self._pinned_slot(s))

    # ---- fills ----------------------------------------------------------------------------------
    def finish_fill(self, fill: Fill, *, upload=None, slice_ranks=None, rank: int = 0,
                    error: BaseException | None = None) -> None:
        with self._cond:
            s = self.slots[fill.slot]
            if error is not None:
                fill.error = error
                if s.fill is fill:
                    if self.by_key.get(fill.key) == s.index:
                        del self.by_key[fill.key]
                        self.policy.forget(fill.key)
                    s.key = None
                    s.ranks = None  # a failed upload may have written part of the slot
                    s.rank = 0
            else:
                fill.upload = upload
                s.ranks = slice_ranks
                s.rank = rank
            fill.done.set()
            self._set_gauges()
            self._cond.notify_all()

    # ---- giving slots back ----------------------------------------------------------------------
    def release(self, indices) -> None:
        with self._cond:
            for i in indices:
                s = self.slots[i]
                if s.refs <= 0:
                    raise RuntimeError(f"slot {i} released more often than taken")
                s.refs -= 1
            self._cond.notify_all()

    def drop_stale(self, name: str, current_version) -> None:
        """New plans must not get other versions of `name`; plans holding them keep reading them."""
        with self._cond:
            for key in [k for k in self.by_key if k[0] == name and k[1] != current_version]:
                del self.by_key[key]
                self.policy.forget(key)
            self._set_gauges()
            self._cond.notify_all()

    def add_target(self, n_slices: int) -> None:
        """A target was registered: every resident adapter lacks its weights, so forget them all.
        Slot memory stays as it is, so the known ranks (padding bookkeeping) are kept and extended
        with the new target's, which is all zeros. Only when no plan holds a slot."""
        with self._cond:
            self.forget_all("register a LoRA target")
            for s in self.slots:
                if s.ranks is not None:
                    s.ranks = (*s.ranks, (0,) * n_slices)

    def forget_all(self, what: str = "switch the merged LoRA adapter") -> None:
        """Every slot's content is unwanted (the targets or the merged adapter changed): no key is resident
        any more. Slot memory stays as it is, and so does the rank bookkeeping of its padding. Only
        when no plan holds a slot."""
        with self._cond:
            if any(s.refs for s in self.slots):
                raise RuntimeError(f"cannot {what} while plans hold GPU slots")
            for key in list(self.by_key):
                self.policy.forget(key)
            self.by_key.clear()
            for s in self.slots:
                s.key, s.fill, s.rank = None, None, 0
            self._set_gauges()

    # ---- queries --------------------------------------------------------------------------------
    def resident(self, key):
        """Slot index holding `key` with its upload issued and good, else None."""
        with self._cond:
            i = self.by_key.get(key)
            if i is None:
                return None
            f = self.slots[i].fill
            return i if f is not None and f.done.is_set() and f.error is None else None

    def slot_ranks(self) -> list[int]:
        return [s.rank for s in self.slots]

    def _set_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.slots_occupied.set(len(self.by_key))

    def stats(self) -> dict:
        with self._cond:
            return {
                "entries": len(self.by_key),
                "slots": self.max_loras,
                "bytes": None,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "in_use": sum(1 for s in self.slots if s.refs),
                "pinned": self._pinned_count(),
                "keys": {i: k for k, i in self.by_key.items()},
            }


__all__ = ["Fill", "SlotPool"]
