"""LoraplexWorkerLoRAManager: vLLM's LRU worker LoRA manager, fed from loraplex's host cache.

vLLM's LRUCacheWorkerLoRAManager reads an adapter from disk inside the engine step that first needs
it, one adapter after another, and forgets it entirely once it falls out of `max_cpu_loras`. This
subclass keeps vLLM's methods and behaviour and changes where adapters come from:

- catalog adapters are read through the catalog (loading.py): exactly the version the request names
  (identity.py: one lora id per version), weights checked before vLLM sees them; other adapters go
  through vLLM's loader;
- every load goes through the runtime's pinned slab arena (slab_cache.py: an exact byte budget, a
  thread pool), keyed by (name, version): each version is held once, packed for vLLM's stacked tensors,
  so an adapter vLLM evicted comes back without storage I/O and a stale copy is never served; vLLM's
  own CPU cache holds only shells (slab_manager.py);
- a miss reaches its GPU slot in one copy on a side stream, waited on only by the steps that use the
  slot (slab_upload.py, slab_manager.py);
- a version stays in host memory while any unfinished request holds it (ledger.py,
  worker_requests.py); a version that cannot be loaded fails only its own requests (failures.py);
- the adapters a step needs are all started in parallel before vLLM adds them one by one;
- unloading (vLLM's remove_lora) frees the GPU slot, vLLM's CPU copy and the host cache's;
- the catalog (LORAPLEX_CATALOG) gives names (worker_catalog.py);
- it tells our punica wrapper each slot's real rank, so kernels skip the zero padding;
- merged mode (worker_merge.py): one adapter version merged into the base weights on the engine
  core's word, every slot holding its adapter minus the merged one, base requests in a slot of their own.

The plugin installs it where vLLM's model runner looks it up (lora_model_runner_mixin).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter

import msgspec
import torch
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from ..config import RuntimeConfig
from ..errors import CatalogError, ConfigError
from .catalog_handle import get_handle
from .identity import split_path
from .loading import build_lora_model
from .residency import ResidencyReporter
from .slab_cache import SlabCache, SlabEntry
from .slab_layout import QUANTS, VllmTargets, pack_into
from .slab_manager import SHELL, LoraplexLoRAModelManager
from .slab_upload import SlabUploader
from .worker_catalog import CatalogMixin
from .worker_merge import BASE_ID, BASE_KEY, MergeMixin, is_base
from .worker_requests import RequestsMixin

log = logging.getLogger("loraplex.vllm_plugin")

ENV_HOST_BYTES = "LORAPLEX_HOST_CACHE_BYTES"  # host cache budget (default: RuntimeConfig's, 2 GiB)
ENV_HOST_ENTRIES = "LORAPLEX_HOST_CACHE_ENTRIES"  # optional cap on cached adapters
ENV_WORKERS = "LORAPLEX_LOAD_WORKERS"  # loader threads (default: RuntimeConfig's, 4)
ENV_QUANT = "LORAPLEX_HOST_SLAB_QUANT"  # "int8": host slabs in int8 (half the bytes; see slab_layout.py)


def model_rank(lora_model) -> int:
    """The largest rank over the adapter's modules (rank_pattern can exceed the config's r)."""
    ranks = []
    for layer in lora_model.loras.values():
        a = layer.lora_a
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(x, torch.Tensor):
                ranks.append(x.shape[0])
    return max(ranks, default=int(getattr(lora_model, "rank", 0) or 0))


def _signature(path: str) -> str:
    """Version of a directory adapter that is not in the catalog: its files' sizes and mtimes."""
    parts = []
    try:
        for name in sorted(os.listdir(path)):
            if name.startswith("adapter_"):
                st = os.stat(os.path.join(path, name))
                parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
    except OSError:
        return "?"
    return "|".join(parts)


def _without(mapping, lora_ids):
    """vLLM's LoRAMapping with the rows of these adapters running without one."""
    return dataclasses.replace(
        mapping, index_mapping=tuple(0 if i in lora_ids else i for i in mapping.index_mapping),
        prompt_mapping=tuple(0 if i in lora_ids else i for i in mapping.prompt_mapping))


class LoraplexWorkerLoRAManager(MergeMixin, RequestsMixin, CatalogMixin, LRUCacheWorkerLoRAManager):
    _manager_cls = LoraplexLoRAModelManager

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._catalog = get_handle()
        defaults = RuntimeConfig()
        max_entries = os.environ.get(ENV_HOST_ENTRIES)
        self._quant = os.environ.get(ENV_QUANT, "").strip() or None
        if self._quant not in QUANTS:
            raise ConfigError(f"{ENV_QUANT} must be unset or one of {QUANTS[1:]}, got {self._quant!r}")
        self._targets = None  # VllmTargets, once vLLM's LoRA layers exist (create_lora_manager)
        self._host = SlabCache(
            self._load_slab, max_bytes=int(os.environ.get(ENV_HOST_BYTES, defaults.host_cache_bytes)),
            max_entries=int(max_entries) if max_entries else None,
            workers=int(os.environ.get(ENV_WORKERS, defaults.load_workers)), pin=self.device.type == "cuda")
        self._names: dict[int, str] = {}  # lora id -> name, from the requests this worker saw
        self._keys: dict[int, tuple] = {}  # lora id -> host cache key of the weights vLLM holds
        self._real: dict[str, str] = {}  # request path -> resolved path (keys are computed every step)
        self._residency = ResidencyReporter(self)
        self._rank_of: dict[tuple, int] = {}  # host cache key -> rank (residency metrics)
        self._in_step = False
        self.last_step_adapters: list[int] = []
        self.max_versions_in_step = 0  # most versions of one name in one step (metrics)
        self._init_requests()
        self._init_merge()

    def create_lora_manager(self, *args, **kwargs):
        model = super().create_lora_manager(*args, **kwargs)
        manager = self._adapter_manager
        self._targets = VllmTargets(manager)
        uploader = SlabUploader(self._targets)
        uploader.reserve_staging(self._targets.max_nbytes(self._quant))  # before memory profiling and graphs
        manager.uploader, manager.uploads, manager.step_slots = uploader, [], []
        manager.lease_slab, manager.release_slab = self._lease_slab, self._release_slab
        manager.slot_ranks = {}
        self._setup_merge()
        self._pin_from_env()
        self._residency.publish()  # the slots are known now: routers see the replica before any traffic
        return model

    def remove_all_adapters(self):
        if self._merged is not None:  # vLLM does this after replacing base weights (reload_weights)
            log.error("loraplex: vLLM reset its LoRA state while '%s' is merged into the base weights; merged mode "
                      "does not support weight updates: unmerge first (merge_adapter(llm, None))",
                      self._merged.request.lora_name)
        super().remove_all_adapters()  # vLLM's warm-up ends with this: the pinned ones come back from host memory
        self._pin_from_env()
        self._residency.publish()

    # ---- loading ---------------------------------------------------------------------------------
    def _realpath(self, path: str) -> str:
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = os.path.realpath(path)
        return real

    def _key(self, req: LoRARequest) -> tuple:
        """Host-cache key of the weights `req` means: (name, version token) for catalog requests,
        else (name, path, file signature)."""
        if is_base(req):
            return BASE_KEY
        path, token = split_path(req.lora_path)
        if token is not None:
            return (req.lora_name, token)
        path = self._realpath(path)
        return (req.lora_name, path, _signature(path))

    def _load_model(self, req: LoRARequest):
        """The adapter as a vLLM LoRAModel (CPU). A catalog request gets exactly the version it names
        (the current one, or one still intact where it was resolved), through the catalog's checked
        reader."""
        directory, token = split_path(req.lora_path)
        if token is None:
            return super()._load_adapter(req)
        config, tensors = self._require_catalog().load_version(req.lora_name, token, directory)
        return build_lora_model(self, req.lora_int_id, req.lora_name, config, tensors)

    def _load_slab(self, cache, key, req: LoRARequest) -> SlabEntry:
        """Runs on the loader pool: the adapter packed into the arena (one slab at its real rank, as
        vLLM's set_lora would place it) and its shell for vLLM's CPU cache."""
        start = time.perf_counter()
        lora = self._load_model(req)
        slab = pack_into(cache.host, key, self._targets, lora, self._quant, pin=self.device.type == "cuda")
        shell = self._targets.shell(lora)
        self._residency.load_times.observe(time.perf_counter() - start)
        return SlabEntry(slab, shell, slab.layout.rank)

    def _lease_slab(self, shell):
        """The slab cache's entry for a shell vLLM activates now, its slab leased (loaded again if the
        cache let it go: the requests on it hold its version, so it is still where it was resolved)."""
        key = getattr(shell, SHELL)
        if key == BASE_KEY:  # merged mode's base-model slot: the correction alone
            return SlabEntry(None, shell, 0)
        entry = self._host.lease(key)
        while entry is None:
            self._host.get(key, shell.loraplex_request)
            entry = self._host.lease(key)
        return entry

    def _release_slab(self, key) -> None:
        if key != BASE_KEY:
            self._host.unlease(key)

    def _load_adapter(self, lora_request: LoRARequest):
        if is_base(lora_request):
            return self._base_shell()
        key = self._key(lora_request)
        entry = self._host.get(key, lora_request)
        self._ahead.pop(key, None)  # loaded ahead, and in use now
        shell = entry.shell.clone(lora_request.lora_int_id)  # shares the (few) tensors vLLM places itself
        setattr(shell, SHELL, key)
        shell.loraplex_request = lora_request
        self._names[lora_request.lora_int_id] = lora_request.lora_name
        self._keys[lora_request.lora_int_id] = key
        self._rank_of[key] = entry.rank
        return shell

    def add_adapter(self, lora_request: LoRARequest) -> bool:
        lora_id = lora_request.lora_int_id
        held = self._keys.get(lora_id)
        loaded = lora_id in self.list_adapters()
        key = self._key(lora_request) if (loaded or lora_request.load_inplace) else None
        if loaded and held is not None and held != key and not lora_request.load_inplace:
            if self._held_conflict(lora_request, key):
                raise CatalogError(f"LoRA adapter '{lora_request.lora_name}': its id {lora_id} is held by another "
                                   f"adapter version with unfinished requests; retry shortly")
            # other weights under this id: a catalog version whose id collides with one nobody runs any
            # more, or an adapter loaded by path whose files changed
            lora_request = msgspec.structs.replace(lora_request, load_inplace=True)
        elif lora_request.load_inplace and loaded and held == key:
            # the same weights: vLLM would re-read them at every step of every request carrying the flag
            lora_request = msgspec.structs.replace(lora_request, load_inplace=False)
        added = super().add_adapter(lora_request)
        if lora_id == self.merged_id:  # merged: its rows take no slot (a slot would hold M - M)
            self._adapter_manager.deactivate_adapter(lora_id)
        if not self._in_step:  # add_lora from the API server; a step publishes once, at its end
            self._residency.publish()
        return added

    def remove_adapter(self, adapter_id: int) -> bool:
        """Unload (vLLM's remove_lora): the GPU slot, vLLM's CPU copy and the host cache's copies of
        versions no unfinished request holds."""
        removed = super().remove_adapter(adapter_id)
        key = self._keys.pop(adapter_id, None)
        name = self._names.pop(adapter_id, None)
        if key is not None or name is not None:
            self._host.discard(lambda k: (k == key or k[0] == name) and k not in self.ledger)
        self._residency.publish()
        return removed

    def pin_adapter(self, adapter_id: int) -> bool:
        pinned = super().pin_adapter(adapter_id)
        self._residency.publish()
        return pinned

    def _apply_adapters(self, lora_requests) -> set[int]:
        """Load and activate the step's adapters; returns the ids of those that cannot be loaded (their
        requests are reported failed and their rows run without an adapter)."""
        reqs = {r.lora_int_id: r for r in lora_requests if r}
        if len(reqs) > self._adapter_manager.lora_slots:
            raise RuntimeError(f"{len(reqs)} LoRA adapters in one step but only {self._adapter_manager.lora_slots} "
                               f"GPU slots")
        lost = self._prune_lost(reqs.values())
        loaded = self.list_adapters()
        keys = {}
        for lora_id, req in reqs.items():
            keys[lora_id] = key = self._key(req)
            if lora_id not in lost and lora_id != BASE_ID and (lora_id not in loaded or self._keys.get(lora_id) != key):
                self._host.prefetch(key, req)  # all in parallel; add_adapter waits for each
        for lora_id, req in reqs.items():
            if lora_id in lost:
                continue
            if self._held_conflict(req, keys[lora_id]):
                self._collided(req, keys[lora_id])  # its rows run on the other version's weights, then fail
                continue
            try:
                self.add_adapter(req)
            except Exception as e:  # noqa: BLE001 - one adapter's load never stops the engine
                if not isinstance(e, CatalogError):
                    log.exception("loraplex: loading adapter '%s' failed", req.lora_name)
                lost[lora_id] = self._mark_lost(keys[lora_id], req, e)
        return set(lost)

    def set_active_adapters(self, requests, mapping) -> None:
        requests, mapping = self._merged_step(self._step_requests(requests, mapping), mapping)
        manager = self._adapter_manager
        manager.step_begins()
        self._in_step, manager.between_steps = True, False
        self.last_step_adapters = sorted(r.lora_int_id for r in requests)  # tests, debugging
        if len(requests) > 1:
            per_name = Counter(r.lora_name for r in requests).most_common(1)[0][1]
            self.max_versions_in_step = max(self.max_versions_in_step, per_name)
        try:
            lost = self._apply_adapters(requests)
        finally:
            self._in_step = False
            manager.between_steps = True
        manager.step_ready({r.lora_int_id for r in requests} - lost)
        if mapping is not None:
            if lost:
                mapping = _without(mapping, lost)
            self._publish_ranks()
            self._adapter_manager.set_adapter_mapping(mapping)
        self._residency.publish()

    def _publish_ranks(self) -> None:
        """Give our punica wrappers the real rank of every adapter in a GPU slot."""
        manager = self._adapter_manager
        held = getattr(manager, "slot_ranks", {})  # what each slot holds, correction included
        ranks = {i: held[i] if i in held else self.adapter_rank(i) for i in manager.lora_index_to_id
                 if i is not None and manager.get_adapter(i) is not None}
        for wrapper in getattr(manager, "punica_wrapper_mapping", {}).values():
            if hasattr(wrapper, "adapter_ranks") and wrapper.adapter_ranks != ranks:
                wrapper.adapter_ranks = ranks
                # An in-place reload can change a rank without changing the mapping or the slot
                # layout, which is all vLLM compares before re-running update_metadata.
                manager._last_mapping = None

    # ---- residency (metrics) --------------------------------------------------------------------
    def adapter_name(self, lora_id: int) -> str | None:
        name = self._names.get(lora_id)
        if name is None and self._catalog is not None:
            try:
                name = self._catalog.catalog.get_adapter_name(lora_id)
            except Exception:  # noqa: BLE001 - an adapter vLLM loaded by path, outside the catalog
                return None
        return name

    def adapter_rank(self, lora_id: int) -> int:
        """The real rank of the adapter vLLM holds under lora_id, cached per version (its host cache
        key: an in-place reload brings a new key, so a changed rank is never served stale)."""
        key = self._keys.get(lora_id)
        if key is not None and key in self._rank_of:
            return self._rank_of[key]
        model = self._adapter_manager.get_adapter(lora_id)
        rank = 0 if model is None or getattr(model, SHELL, None) is not None else model_rank(model)
        if key is not None:
            self._rank_of[key] = rank
        return rank

    def host_resident(self) -> list:
        """(host cache key, rank) of every adapter in the host cache (ranks cached per key: a key is
        one version, so its rank never changes)."""
        out, ranks = [], self._rank_of
        for key, entry in self._host.items():
            ranks[key] = entry.rank
            out.append((key, entry.rank))
        if len(ranks) > 4 * max(64, len(out)):  # forget versions long gone from the caches
            keep = {k for k, _ in out} | set(self._keys.values())
            self._rank_of = {k: r for k, r in ranks.items() if k in keep}
        return out

    # ---- debugging -------------------------------------------------------------------------------
    @property
    def gpu_cache_size(self) -> int:
        """Adapters in GPU slots now."""
        return sum(i is not None for i in self._adapter_manager.lora_index_to_id)

    @property
    def cpu_cache_size(self) -> int:
        """Adapters in vLLM's CPU cache (max_cpu_loras) now."""
        return len(self._adapter_manager)

    def cache_sizes(self) -> dict:
        manager = self._adapter_manager
        return {
            "gpu_slots": manager.lora_slots,
            "gpu_used": self.gpu_cache_size,
            "gpu_ids": [i for i in manager.lora_index_to_id if i is not None],
            "cpu_capacity": manager.capacity,
            "cpu_used": self.cpu_cache_size,
            "host": self._host.stats(),
            "queue_prefetches": self.queue_prefetches,
            "held_versions": len(self.ledger.keys()),
            "unfinished_requests": len(self.ledger),
            "failed_requests": self.failed_requests,
        }


# ---- reaching the manager from outside the worker ----------------------------------------------------
def manager_of(worker):
    """The LoraplexWorkerLoRAManager of a vLLM worker (or its wrapper), or None."""
    worker = getattr(worker, "worker", worker)  # vLLM may hand us its WorkerWrapperBase
    manager = getattr(getattr(worker, "model_runner", None), "lora_manager", None)
    return manager if isinstance(manager, LoraplexWorkerLoRAManager) else None


def _invoke(worker, method, args, kwargs):
    from ..errors import ConfigError

    manager = manager_of(worker)
    if manager is None:
        raise ConfigError("this engine does not use loraplex's worker LoRA manager (is LORAPLEX_CATALOG set "
                          "and LoRA enabled?)")
    result = getattr(manager, method)
    if callable(result):
        result = result(*args, **kwargs)
    # Futures do not cross process boundaries: report that the load started.
    return True if hasattr(result, "add_done_callback") else result


def call_worker_manager(llm, method: str, *args, **kwargs) -> list:
    """Call `method` of the LoraplexWorkerLoRAManager of every worker of a vllm.LLM, e.g.
    call_worker_manager(llm, "prefetch_adapter", "my-adapter"); returns one result per worker.
    (Multi-process engines need VLLM_ALLOW_INSECURE_SERIALIZATION=1 to ship the call.)"""
    return llm.collective_rpc(_invoke, args=(method, args, kwargs))
