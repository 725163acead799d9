"""VersionLedger: which adapter versions the worker's unfinished requests hold.

A request is bound to one adapter version from its first token to its last (identity.py), across
preemption and recomputation. The worker must therefore keep that version loadable until the request
finishes, even if storage has moved on: the host cache never evicts a version the ledger holds.

The ledger learns about requests from two places, both ordered before the step that first runs them:
the engine core's announcement of every request it queues (engine_core.py), and each step's scheduler
output (new requests; finished ones, which include requests aborted while queued). It is a plain
in-memory map, one per worker, touched only by the worker's engine thread.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


class VersionLedger:
    def __init__(self):
        self._holders: dict[Hashable, set[str]] = {}  # version key -> ids of unfinished requests on it
        self._key_of: dict[str, Hashable] = {}  # request id -> its version key

    def hold(self, req_id: str, key: Hashable) -> bool:
        """Record that request req_id runs on version `key`; True if `key` was not held before. A
        request keeps the version it was first bound to (a second announcement does not move it)."""
        if req_id in self._key_of:
            return False
        self._key_of[req_id] = key
        holders = self._holders.get(key)
        if holders is None:
            self._holders[key] = {req_id}
            return True
        holders.add(req_id)
        return False

    def finish(self, req_ids: Iterable[str]) -> list[Hashable]:
        """Forget finished requests; returns the versions no request holds any more."""
        released = []
        for req_id in req_ids:
            key = self._key_of.pop(req_id, None)
            if key is None:
                continue
            holders = self._holders[key]
            holders.discard(req_id)
            if not holders:
                del self._holders[key]
                released.append(key)
        return released

    def holders(self, key: Hashable) -> frozenset[str]:
        return frozenset(self._holders.get(key, ()))

    def key_of(self, req_id: str) -> Hashable | None:
        return self._key_of.get(req_id)

    def __contains__(self, key) -> bool:
        return key in self._holders

    def keys(self) -> list[Hashable]:
        return list(self._holders)

    def __len__(self) -> int:
        """Unfinished requests known to the ledger."""
        return len(self._key_of)
