"""Deterministic adapter ids: the same name gets the same id on every replica and restart.

id(name) = 1 + blake2b("k:name") mod (2**31 - 2) for the first probe k = 0, 1, 2, ... whose id is
free. Collisions are resolved in rounds: in round k every name still without an id proposes its k-th
hash; an id proposed by several names goes to the one that sorts first (by code point, which is also
the order of their UTF-8 bytes), and the others go on to round k + 1. The result depends only on the
set of names, so replicas that list the same catalog agree, whatever order they saw names come and go
in. A name's id can change only when a newly added name collides with it and sorts before it (about
n / 2**31 per addition: 5e-5 with 100k adapters), or when a removal frees the id it lost in a
collision; caches are keyed by (name, version), never by id, so that never serves wrong weights.
Collisions do happen in real catalogs: with 100k names about two pairs collide (birthday bound).
"""

from __future__ import annotations

import hashlib

ID_SPACE = (1 << 31) - 2  # ids are in [1, 2**31 - 2]: positive and fit in int32


def probe(name: str, k: int, _blake2b=hashlib.blake2b, _from_bytes=int.from_bytes) -> int:
    """The k-th candidate id of `name` (bound builtins: called once per adapter of a listing)."""
    digest = _blake2b(f"{k}:{name}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return 1 + _from_bytes(digest, "little") % ID_SPACE


class IdTable:
    """name <-> id for a set of names, updated incrementally; always equal to assign(all names).

    Invariant used by the updates: every name not in _probed holds its round-0 id and is the first
    sorting of the names whose round-0 hash that is; the others (in _probed) lost round 0. So an
    update only redoes the rounds of the few probed names and of new or displaced ones."""

    def __init__(self):
        self.by_name: dict[str, int] = {}
        self.by_id: dict[int, str] = {}
        self._probed: set[str] = set()  # names holding an id of round k > 0

    def add(self, names) -> bool:
        """Add names; returns True if the id of a name already present changed."""
        first = {}
        for n in names:
            if n not in self.by_name and n not in first:
                first[n] = probe(n, 0)
        if not first:
            return False
        by_id, by_name = self.by_id, self.by_name
        before = {n: by_name[n] for n in self._probed}
        losers = self._clear_probed()
        for n, i in first.items():  # round 0: new names against each other and the round-0 holders
            holder = by_id.get(i)
            if holder is None:
                by_id[i] = n
                by_name[n] = i
            elif n < holder:  # the new name sorts first: the holder goes on to round 1
                if holder not in first:
                    before[holder] = i
                losers.append(holder)
                del by_name[holder]
                by_id[i] = n
                by_name[n] = i
            else:
                losers.append(n)
        self._rounds(losers, 1)
        return any(by_name.get(n) != i for n, i in before.items())

    def remove(self, names) -> bool:
        """Remove names; returns True if the id of a remaining name changed."""
        names = [n for n in names if n in self.by_name]
        for n in names:
            del self.by_id[self.by_name.pop(n)]
            self._probed.discard(n)
        if not names or not self._probed:
            return False
        # A removal can free an id that a probed name lost in an earlier round (not only removing a
        # probed name itself): a fresh replica listing the remaining names would give it that id.
        # Round-0 holders keep theirs (removing rivals never changes who sorts first).
        before = {n: self.by_name[n] for n in self._probed}
        self._rounds(self._clear_probed(), 0)
        return any(self.by_name[n] != i for n, i in before.items())

    def assign(self, names) -> None:
        """Full deterministic assignment from scratch (the reference the updates agree with)."""
        self.by_name, self.by_id, self._probed = {}, {}, set()
        self._rounds(list(dict.fromkeys(names)), 0)

    def _clear_probed(self) -> list[str]:
        probed = list(self._probed)
        for n in probed:
            del self.by_id[self.by_name.pop(n)]
        self._probed = set()
        return probed

    def _rounds(self, pending: list[str], k: int) -> None:
        """Rounds k, k+1, ... for `pending` against the ids already held."""
        by_id, by_name = self.by_id, self.by_name
        while pending:
            winners: dict[int, str] = {}  # free id -> the first-sorting name proposing it this round
            left = []
            for n in pending:
                i = probe(n, k)
                if i in by_id:
                    left.append(n)
                    continue
                rival = winners.get(i)
                if rival is None:
                    winners[i] = n
                elif n < rival:
                    winners[i] = n
                    left.append(rival)
                else:
                    left.append(n)
            for i, n in winners.items():
                by_id[i] = n
                by_name[n] = i
                if k:
                    self._probed.add(n)
            pending = left
            k += 1
