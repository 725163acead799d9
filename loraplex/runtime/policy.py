"""Eviction policies shared by both cache tiers (host slabs and GPU slots).

A tier tells its policy about every use (touch) and removal (forget) and asks it to pick a victim
among the entries it may evict (unpinned, unused); the tier owns what is evictable, the policy only
orders. Each tier has its own policy instance: a GPU hit is not a host access.
"""

from __future__ import annotations


class EvictionPolicy:
    name = "base"

    def touch(self, key) -> None:
        raise NotImplementedError

    def forget(self, key) -> None:
        raise NotImplementedError

    def order(self, candidates) -> list:
        """Candidates sorted so that the first one is evicted first."""
        raise NotImplementedError

    def victim(self, candidates):
        ranked = self.order(candidates)
        return ranked[0] if ranked else None


class LRUPolicy(EvictionPolicy):
    """Least recently used first. Unknown keys count as older than anything touched."""

    name = "lru"

    def __init__(self):
        self._tick = 0
        self._last: dict = {}

    def touch(self, key) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def forget(self, key) -> None:
        self._last.pop(key, None)

    def order(self, candidates) -> list:
        return sorted(candidates, key=lambda k: self._last.get(k, -1))

    def recency(self, key) -> int:
        return self._last.get(key, -1)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first, with aging: a use counts 1 and halves every `half_life` uses of
    the tier, so an adapter that was hot an hour ago does not squat a slot forever. Ties go to LRU."""

    name = "lfu"

    def __init__(self, half_life: int = 256):
        if half_life < 1:
            raise ValueError(f"half_life must be >= 1, got {half_life}")
        self.half_life = half_life
        self._tick = 0
        self._score: dict = {}  # key -> (score at its last use, tick of its last use)

    def touch(self, key) -> None:
        self._tick += 1
        self._score[key] = (self._aged(key) + 1.0, self._tick)

    def forget(self, key) -> None:
        self._score.pop(key, None)

    def _aged(self, key) -> float:
        s = self._score.get(key)
        if s is None:
            return 0.0
        score, last = s
        return score * 2.0 ** (-(self._tick - last) / self.half_life)  # math.exp2 needs Python 3.11

    def frequency(self, key) -> float:
        return self._aged(key)

    def order(self, candidates) -> list:
        return sorted(candidates, key=lambda k: (self._aged(k), self._score.get(k, (0.0, -1))[1]))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(spec) -> EvictionPolicy:
    """A fresh policy from "lru" | "lfu" | an EvictionPolicy subclass | a zero-argument factory."""
    if isinstance(spec, str):
        try:
            return POLICIES[spec.lower()]()
        except KeyError:
            raise ValueError(f"eviction policy must be one of {sorted(POLICIES)}, got {spec!r}") from None
    if isinstance(spec, EvictionPolicy):
        raise TypeError("pass a policy name, class or factory: each tier needs its own instance")
    policy = spec()
    if not isinstance(policy, EvictionPolicy):
        raise TypeError(f"{spec!r} did not make an EvictionPolicy")
    return policy


__all__ = ["EvictionPolicy", "LFUPolicy", "LRUPolicy", "make_policy"]
