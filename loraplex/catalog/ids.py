"""Deterministic adapter ids: the same name gets the same id on every replica and restart.

id(name) = 1 + blake2b("k:name") mod (2**31 - 2) for the first probe k = 0, 1, 2, ... whose id is
free. Collisions are resolved by processing claims in (k, name) order: in round k every name still
without an id proposes its k-th hash, and when several names propose the same free id the one that
sorts first (by its UTF-8 bytes) gets it; the others go on to round k + 1. The result depends only on
the set of names, so replicas that list the same catalog agree. A name's id can change only when a
newly added name collides with it and sorts before it (about n / 2**31 per addition: 5e-5 with 100k
adapters); caches are keyed by (name, version), never by id, so that never serves wrong weights.
"""

from __future__ import annotations

import hashlib

ID_SPACE = (1 << 31) - 2  # ids are in [1, 2**31 - 2]: positive and fit in int32


def probe(name: str, k: int) -> int:
    digest = hashlib.blake2b(f"{k}:{name}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % ID_SPACE


class IdTable:
    """name <-> id for a set of names, updated incrementally."""

    def __init__(self):
        self.by_name: dict[str, int] = {}
        self.by_id: dict[int, str] = {}
        self._probed = set()  # names that needed k > 0 (removing one of these may free an id)

    def add(self, names) -> bool:
        """Add names; returns True if existing ids had to be recomputed."""
        new = [n for n in names if n not in self.by_name]
        clash = False
        for n in new:
            i = probe(n, 0)
            if i in self.by_id:
                clash = True
                break
            self.by_name[n] = i
            self.by_id[i] = n
        if clash:
            self.assign(list(self.by_name) + new)
        return clash

    def remove(self, names) -> None:
        names = [n for n in names if n in self.by_name]
        for n in names:
            del self.by_id[self.by_name.pop(n)]
        if any(n in self._probed for n in names):
            self.assign(list(self.by_name))

    def assign(self, names) -> None:
        """Full deterministic assignment (used only when a collision is involved)."""
        by_name, by_id = {}, {}
        pending = sorted(set(names), key=lambda n: n.encode("utf-8", "surrogatepass"))
        k = 0
        self._probed = set()
        while pending:
            left = []
            for n in pending:  # sorted order: the first proposer of an id wins it
                i = probe(n, k)
                if i in by_id:
                    left.append(n)
                else:
                    by_id[i] = n
                    by_name[n] = i
                    if k:
                        self._probed.add(n)
            pending = left
            k += 1
        self.by_name, self.by_id = by_name, by_id
