"""The worker manager's view of requests: which version each unfinished request holds (ledger.py),
what is loaded ahead for queued requests, and which requests fail when their version is lost.

Mixed into LoraplexWorkerLoRAManager; everything here runs on the worker's engine thread except the
loader callbacks, which only report.
"""

from __future__ import annotations

import logging
import threading

from ..errors import AdapterChanged, AdapterNotFound, CatalogError
from . import failures
from .engine_core import prefetch_enabled
from .ledger import VersionLedger

log = logging.getLogger("loraplex.vllm_plugin")


def _lost_message(req, err: BaseException) -> str:
    if isinstance(err, (AdapterChanged, AdapterNotFound)):
        why = "it was replaced or removed on storage before this worker could read it"
    elif isinstance(err, CatalogError):
        why = str(err)
    else:
        why = f"loading it failed inside loraplex ({type(err).__name__}: {err})"
    return (f"LoRA adapter '{req.lora_name}': the version this request started with cannot be loaded: {why}. "
            f"Retry the request to use the adapter's current version.")


class RequestsMixin:
    def _init_requests(self) -> None:
        self.ledger = VersionLedger()
        self._ahead: dict[tuple, int] = {}  # held keys loaded ahead of their first step -> bytes
        self._lost: dict[tuple, str] = {}  # held keys that cannot be loaded -> why
        self._lost_lock = threading.Lock()  # the engine thread and loader callbacks mark versions lost
        self._prefetch = prefetch_enabled()
        self.queue_prefetches = 0  # loads started for requests still waiting in the scheduler
        self.failed_requests = 0
        self._request_of_id: dict[int, tuple] = {}  # lora id -> (a LoRARequest for it, its key), while bound
        self._queued: dict[str, object] = {}  # announced, not yet scheduled: request id -> LoRARequest

    # ---- binding requests to versions -----------------------------------------------------------
    def _bind(self, req_id: str, req) -> tuple:
        bound = self.ledger.key_of(req_id)
        if bound is not None:  # announced, and now scheduled: bound (and failed, if it did) once
            return bound
        key = self._key(req)
        if self.ledger.hold(req_id, key):
            self._host.hold(key)
        self._names[req.lora_int_id] = req.lora_name
        self._request_of_id[req.lora_int_id] = (req, key)
        with self._lost_lock:
            message = self._lost.get(key)
            if message is not None and req_id in self.ledger.holders(key):
                self.failed_requests += 1
                failures.report([req_id], message)
        return key

    def _step_requests(self, requests, mapping) -> list:
        """The step's adapters, one request per lora id. vLLM hands them over as a set of LoRARequests,
        which compare equal by name: two versions of one name collapse into one there, while the
        mapping has both ids. The mapping is the truth; the missing requests come from the bindings."""
        by_id = {r.lora_int_id: r for r in requests if r}
        if mapping is not None:
            for lora_id in set(mapping.index_mapping) | set(mapping.prompt_mapping):
                if lora_id > 0 and lora_id not in by_id and lora_id in self._request_of_id:
                    by_id[int(lora_id)] = self._request_of_id[lora_id][0]
        return list(by_id.values())

    def announce(self, items) -> int:
        """[(request id, LoRARequest)] of requests the engine core just queued: bind each to its
        version, and start loading the versions not in host memory (at most half the byte budget
        ahead, so a long queue cannot push out what running requests use). Returns loads started."""
        now_loading = []
        for req_id, req in items:
            key = self._bind(req_id, req)
            if self._prefetch and key not in self._lost:
                now_loading.append((key, req))
                self._queued[req_id] = req
        started = self._load_ahead(now_loading)
        self._upload_ahead()
        self._residency.publish()  # the held versions changed (also while the engine is paused)
        return started

    def on_step(self, scheduler_output) -> None:
        """Before the model runner takes in a step: bind new requests (covers any announcement that
        was lost), forget finished ones and let their versions go."""
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            self._queued.pop(new.req_id, None)
            if getattr(new, "lora_request", None) is not None:
                self._bind(new.req_id, new.lora_request)
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if finished:
            for req_id in finished:
                self._queued.pop(req_id, None)
            for key in self.ledger.finish(finished):
                self._release(key)
        self._upload_ahead()

    def _upload_ahead(self) -> None:
        """Queued requests' adapters whose slabs are in host memory go to free GPU slots now, before
        their requests are scheduled (while vLLM's CPU cache has room: making room would push out an
        adapter a running request may need next step)."""
        if not self._prefetch:
            return
        manager = self._adapter_manager
        active = manager._active_adapters
        for req in list(self._queued.values()):
            if None not in manager.lora_index_to_id or len(manager) >= manager.capacity:
                return
            key = self._key(req)
            if req.lora_int_id in active or key not in self._host or key in self._lost \
                    or req.lora_int_id == self.merged_id:  # merged: its rows need no slot
                continue
            try:
                self.add_adapter(req)
            except Exception:  # noqa: BLE001 - a head start only: the step loads what it needs
                log.debug("loraplex: early upload of '%s' failed", req.lora_name, exc_info=True)

    def _release(self, key) -> None:
        for lora_id in [i for i, (_, k) in self._request_of_id.items() if k == key]:
            del self._request_of_id[lora_id]
        self._ahead.pop(key, None)
        self._lost.pop(key, None)
        self._host.release(key)
        if self._is_stale(key):
            self._forget_version(key)

    def _is_stale(self, key) -> bool:
        """A catalog version that is no longer the adapter's current one (cheap: one stat)."""
        if self._catalog is None or len(key) != 2:
            return False
        from .identity import version_token

        try:
            return version_token(self._catalog.entry(key[0]).version) != key[1]
        except CatalogError:
            return True

    def _forget_version(self, key) -> None:
        """An old version nobody holds: free its GPU slot and both host copies now rather than
        waiting for LRU eviction."""
        for lora_id, k in list(self._keys.items()):
            if k == key:
                self.remove_adapter(lora_id)
        self._host.discard(lambda k: k == key)

    # ---- loading ahead --------------------------------------------------------------------------
    def prefetch_queued(self, lora_requests) -> int:
        """Start loading adapters for requests that are not bound yet (no request ids)."""
        return self._load_ahead([(self._key(r), r) for r in lora_requests])

    def _load_ahead(self, wanted) -> int:
        for k in [k for k in self._ahead if k not in self._host and not self._host.is_loading(k)]:
            self._ahead.pop(k)  # failed or evicted (not held) meanwhile
        held_ids = self.list_adapters()
        budget = self._host.max_bytes // 2 - sum(self._ahead.values())
        started = 0
        for key, req in wanted:
            if (req.lora_int_id in held_ids and self._keys.get(req.lora_int_id) == key) or key in self._ahead \
                    or key in self._host or self._host.is_loading(key):
                continue
            size = self._size_estimate(req)
            if size > budget:
                break
            future = self._host.prefetch(key, req)
            future.add_done_callback(lambda f, key=key, req=req: self._loaded_ahead(f, key, req))
            self._ahead[key] = size
            budget -= size
            started += 1
        self.queue_prefetches += started
        return started

    def _loaded_ahead(self, future, key, req) -> None:
        """Loader thread: a version that cannot be loaded fails its queued requests now, before any
        step runs them (transient storage errors are left to the step, which tries again)."""
        err = future.exception()
        if err is None:
            self._residency.publish()
        elif isinstance(err, (AdapterChanged, AdapterNotFound)) or not isinstance(err, CatalogError):
            self._mark_lost(key, req, err)

    def _size_estimate(self, req) -> int:
        """Bytes the adapter will take in the host cache (its weight file's size, for catalog ones)."""
        try:
            return int(self._require_catalog().entry(req.lora_name, fresh=False).size_bytes)
        except Exception:  # noqa: BLE001 - not a catalog adapter: count it as large, to stay in budget
            return self._host.max_bytes // 8

    # ---- failing what cannot run ----------------------------------------------------------------
    def _mark_lost(self, key, req, err) -> str:
        """Fail every unfinished request on this version (once: later ones fail as they are bound)."""
        with self._lost_lock:
            message = self._lost.get(key)
            if message is not None:
                return message
            message = _lost_message(req, err)
            if key in self.ledger:
                self._lost[key] = message  # until its last request is done
            holders = self.ledger.holders(key)
            self.failed_requests += len(holders)
        log.warning("loraplex: %s", message)
        failures.report(holders, message)
        return message

    def _prune_lost(self, requests) -> dict[int, str]:
        """{lora id: why} for the requests of a step whose versions are known lost."""
        return {r.lora_int_id: self._lost[k] for r in requests if r and (k := self._key(r)) in self._lost}

    def _collided(self, req, key) -> None:
        """This version's id is held by another live version (identity.py): fail its requests, which
        may retry once the other version's requests are done."""
        message = (f"LoRA adapter '{req.lora_name}': this version's id ({req.lora_int_id}) collides with another "
                   f"adapter version that unfinished requests still use; retry the request shortly")
        log.warning("loraplex: %s", message)
        holders = self.ledger.holders(key)
        self.failed_requests += len(holders)
        failures.report(holders, message)

    def _held_conflict(self, req, key) -> bool:
        """Another version holds this id (a hash collision, identity.py) and still has requests."""
        bound = self._keys.get(req.lora_int_id)
        return bound is not None and bound != key and bound in self.ledger

