"""LoraplexWorkerLoRAManager: vLLM's LRU worker LoRA manager, fed from loraplex's host cache.

vLLM's LRUCacheWorkerLoRAManager reads an adapter from disk inside the engine step that first needs
it, one adapter after another, and forgets it entirely once it falls out of `max_cpu_loras`. This
subclass keeps vLLM's methods and behaviour and changes where adapters come from:

- catalog adapters are read through the catalog (loading.py): exactly the version the request names
  (identity.py), weights checked before vLLM sees them; other adapters go through vLLM's loader;
- every load goes through a HostAdapterCache (a byte budget, not a count; a thread pool), keyed by
  (name, version), so an adapter vLLM evicted comes back without storage I/O, a request for another
  version reloads the adapter in place (once, not every step), and a stale copy is never served;
- the adapters a step needs are all started in parallel before vLLM adds them one by one;
- unloading (vLLM's remove_lora) frees the GPU slot, vLLM's CPU copy and the host cache's;
- the catalog (LORAPLEX_CATALOG) gives names: prefetch_adapter(name), pin_adapter_by_name(name),
  load_multiple_adapters(names), get_adapter_name(id), refresh_storage_catalog();
- it tells our punica wrapper each slot's real rank, so kernels skip the zero padding.

The plugin installs it where vLLM's model runner looks it up (lora_model_runner_mixin).
"""

from __future__ import annotations

import logging
import os
import time

import msgspec
import torch
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from ..config import RuntimeConfig
from ..errors import AdapterChanged, ConfigError
from .catalog_handle import get_handle
from .host_cache import HostAdapterCache
from .identity import catalog_path, split_path, version_token
from .loading import build_lora_model
from .residency import ResidencyReporter

log = logging.getLogger("loraplex.vllm_plugin")

ENV_HOST_BYTES = "LORAPLEX_HOST_CACHE_BYTES"  # host cache budget (default: RuntimeConfig's, 2 GiB)
ENV_HOST_ENTRIES = "LORAPLEX_HOST_CACHE_ENTRIES"  # optional cap on cached adapters
ENV_WORKERS = "LORAPLEX_LOAD_WORKERS"  # loader threads (default: RuntimeConfig's, 4)
ENV_PIN = "LORAPLEX_PIN_ADAPTERS"  # comma-separated catalog names kept in host memory from startup on


def _tensors(lora_model):
    for layer in lora_model.loras.values():
        for t in (layer.lora_a, layer.lora_b):
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(x, torch.Tensor):
                    yield x


def model_bytes(lora_model) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(lora_model))


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


class LoraplexWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._catalog = get_handle()
        defaults = RuntimeConfig()
        max_entries = os.environ.get(ENV_HOST_ENTRIES)
        self._host = HostAdapterCache(
            self._load_packed, model_bytes,
            max_bytes=int(os.environ.get(ENV_HOST_BYTES, defaults.host_cache_bytes)),
            max_entries=int(max_entries) if max_entries else defaults.max_cpu_loras,
            workers=int(os.environ.get(ENV_WORKERS, defaults.load_workers)),
        )
        self._names: dict[int, str] = {}  # lora id -> name, from the requests this worker saw
        self._keys: dict[int, tuple] = {}  # lora id -> host cache key of the weights vLLM holds
        self._real: dict[str, str] = {}  # request path -> resolved path (keys are computed every step)
        self._residency = ResidencyReporter(self)
        self._ahead: dict[tuple, tuple] = {}  # host cache key -> (bytes, since): prefetched, held, unused
        self.queue_prefetches = 0  # loads started for requests still waiting in the scheduler
        self._rank_of: dict[tuple, int] = {}  # host cache key -> rank (residency metrics)
        self._in_step = False

    def create_lora_manager(self, *args, **kwargs):
        model = super().create_lora_manager(*args, **kwargs)
        self._pin_from_env()
        self._residency.publish()  # the slots are known now: routers see the replica before any traffic
        return model

    def remove_all_adapters(self):
        super().remove_all_adapters()  # vLLM's warm-up ends with this: the pinned ones come back from host memory
        self._pin_from_env()
        self._residency.publish()

    def _pin_from_env(self) -> None:
        """LORAPLEX_PIN_ADAPTERS: load these catalog adapters now and keep them in the host cache and
        vLLM's CPU cache (not in a GPU slot: vLLM's scheduler does not count pinned slots). They count
        against --max-cpu-loras; one that cannot be pinned is logged and skipped."""
        for name in filter(None, (n.strip() for n in os.environ.get(ENV_PIN, "").split(","))):
            try:
                req = self._request_for(name)
                self._host.pin(self._key(req))
                self.load_multiple_adapters([name])
                self._adapter_manager._pin_lora_in_cpu_cache(req.lora_int_id)
            except Exception as e:  # noqa: BLE001 - a pin is an optimization: never stop the engine for one
                log.warning("loraplex: cannot pin adapter '%s' (%s): %s", name, ENV_PIN, e)

    # ---- loading ---------------------------------------------------------------------------------
    def _realpath(self, path: str) -> str:
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = os.path.realpath(path)
        return real

    def _key(self, req: LoRARequest) -> tuple:
        """Host-cache key of the weights `req` means: (name, version token) for catalog requests,
        else (name, path, file signature)."""
        path, token = split_path(req.lora_path)
        if token is not None:
            return (req.lora_name, token)
        path = self._realpath(path)
        return (req.lora_name, path, _signature(path))

    def _load_packed(self, req: LoRARequest):
        """Runs on the loader pool: the adapter as a vLLM LoRAModel, packed (qkv, gate_up) and scaled,
        ready for add_adapter as is."""
        start = time.perf_counter()
        _, token = split_path(req.lora_path)
        if token is None:
            lora = super()._load_adapter(req)
        else:
            lora = self._load_catalog_version(req.lora_name, token, req.lora_int_id)
        pack = getattr(self._adapter_manager, "_create_merged_loras_inplace", None)
        if pack is not None:
            pack(lora)  # idempotent: vLLM's add_adapter runs it again and finds nothing left to do
        self._residency.load_times.observe(time.perf_counter() - start)
        return lora

    def _load_catalog_version(self, name: str, token: str, lora_id: int):
        """Exactly the version `token` names, through the catalog's checked reader."""
        handle = self._require_catalog()
        entry = handle.get(name)
        if version_token(entry.version) != token:
            handle.catalog.refresh([name])  # this process may not have seen the change yet
            entry = handle.get(name)
        if version_token(entry.version) != token:
            raise AdapterChanged(name, token, version_token(entry.version))
        _, config, tensors = handle.catalog.load_peft(name, entry)
        return build_lora_model(self, lora_id, name, config, tensors)

    def _load_adapter(self, lora_request: LoRARequest):
        key = self._key(lora_request)
        lora = self._host.get(key, lora_request)
        self._let_go(key)  # a prefetched adapter is in use now (and most recent): evictable again
        if lora.id != lora_request.lora_int_id:
            lora = lora.clone(lora_request.lora_int_id)  # shares the tensors
        self._names[lora_request.lora_int_id] = lora_request.lora_name
        self._keys[lora_request.lora_int_id] = key
        return lora

    def add_adapter(self, lora_request: LoRARequest) -> bool:
        held = self._keys.get(lora_request.lora_int_id)
        loaded = lora_request.lora_int_id in self.list_adapters()
        key = self._key(lora_request) if (loaded or lora_request.load_inplace) else None
        if loaded and held is not None and held != key and not lora_request.load_inplace:
            # another version of an adapter vLLM holds: reload it in place
            lora_request = msgspec.structs.replace(lora_request, load_inplace=True)
        elif lora_request.load_inplace and loaded and held == key:
            # the same weights: vLLM would re-read them at every step of every request carrying the flag
            lora_request = msgspec.structs.replace(lora_request, load_inplace=False)
        added = super().add_adapter(lora_request)
        if not self._in_step:  # add_lora from the API server; a step publishes once, at its end
            self._residency.publish()
        return added

    def remove_adapter(self, adapter_id: int) -> bool:
        """Unload (vLLM's remove_lora): the GPU slot, vLLM's CPU copy and the host cache's copies."""
        removed = super().remove_adapter(adapter_id)
        key = self._keys.pop(adapter_id, None)
        name = self._names.pop(adapter_id, None)
        if key is not None or name is not None:
            self._host.discard(lambda k: k == key or k[0] == name)
        self._residency.publish()
        return removed

    def pin_adapter(self, adapter_id: int) -> bool:
        pinned = super().pin_adapter(adapter_id)
        self._residency.publish()
        return pinned

    def _apply_adapters(self, lora_requests) -> None:
        loaded = self.list_adapters()
        for req in lora_requests:
            if not req:
                continue
            key = self._key(req)
            if req.lora_int_id not in loaded or self._keys.get(req.lora_int_id) != key:
                self._host.prefetch(key, req)  # all in parallel; add_adapter waits for each
        super()._apply_adapters(lora_requests)

    def set_active_adapters(self, requests, mapping) -> None:
        self._in_step = True
        try:
            self._apply_adapters(requests)
        finally:
            self._in_step = False
        if mapping is not None:
            self._publish_ranks()
            self._adapter_manager.set_adapter_mapping(mapping)
        self._residency.publish()

    def _publish_ranks(self) -> None:
        """Give our punica wrappers the real rank of every adapter in a GPU slot."""
        manager = self._adapter_manager
        ranks = {i: self.adapter_rank(i) for i in manager.lora_index_to_id
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
        rank = 0 if model is None else model_rank(model)
        if key is not None:
            self._rank_of[key] = rank
        return rank

    def host_resident(self) -> list:
        """(host cache key, rank) of every adapter in the host cache (ranks cached per key: a key is
        one version, so its rank never changes)."""
        out, ranks = [], self._rank_of
        for key, lora in self._host.items():
            rank = ranks.get(key)
            if rank is None:
                rank = ranks[key] = model_rank(lora)
            out.append((key, rank))
        if len(ranks) > 4 * max(64, len(out)):  # forget versions long gone from the caches
            keep = {k for k, _ in out} | set(self._keys.values())
            self._rank_of = {k: r for k, r in ranks.items() if k in keep}
        return out

    # ---- catalog ---------------------------------------------------------------------------------
    def _require_catalog(self):
        if self._catalog is None:
            raise ConfigError("no adapter catalog: start vLLM with LORAPLEX_CATALOG set "
                              "(loraplex serve --lora-catalog-type storage --lora-catalog-path ...)")
        return self._catalog

    def _request_for(self, name: str) -> LoRARequest:
        """A request for the current version of catalog adapter `name`."""
        handle = self._require_catalog()
        entry = handle.fresh(name)  # raises AdapterNotFound, InvalidAdapterName, InvalidAdapter
        local = handle.catalog.local_path(name)
        return LoRARequest(lora_name=name, lora_int_id=entry.id, lora_path=catalog_path(local, entry.version))

    def refresh_storage_catalog(self):
        """Re-list the catalog now. Requests resolved from then on carry the new versions; weights of
        older versions stay in the host cache (in-flight requests may still need them) until the
        byte budget evicts them. Returns the CatalogDiff."""
        return self._require_catalog().refresh(force=True)

    def get_adapter_name(self, adapter_id: int) -> str:
        name = self._names.get(adapter_id)
        if name is not None:
            return name
        return self._require_catalog().catalog.get_adapter_name(adapter_id)

    def prefetch_adapter(self, name: str):
        """Start loading catalog adapter `name` into the host cache; returns a Future."""
        req = self._request_for(name)
        future = self._host.prefetch(self._key(req), req)
        future.add_done_callback(lambda _: self._residency.publish())  # an idle engine reports it too
        return future

    AHEAD_TTL_S = 120.0  # a prefetched adapter whose request never ran (aborted) is let go after this

    def prefetch_queued(self, lora_requests) -> int:
        """Start loading the adapters of requests waiting in the scheduler (prefetch.py) into the host
        cache, and keep them there (held: not evicted) until their step uses them. Adapters prefetched
        but not yet used take at most half the byte budget. Returns how many loads were started."""
        now = time.monotonic()
        for k, (_, since) in list(self._ahead.items()):
            if now - since > self.AHEAD_TTL_S or not (k in self._host or self._host.is_loading(k)):
                self._let_go(k)
        held = self.list_adapters()
        budget = self._host.max_bytes // 2 - sum(n for n, _ in self._ahead.values())
        started = 0
        for req in lora_requests:
            key = self._key(req)
            if (req.lora_int_id in held and self._keys.get(req.lora_int_id) == key) or key in self._ahead \
                    or key in self._host or self._host.is_loading(key):
                continue
            size = self._size_estimate(req)
            if size > budget:
                break
            self._host.hold(key)
            self._host.prefetch(key, req)
            self._ahead[key] = (size, now)
            budget -= size
            started += 1
        self.queue_prefetches += started
        return started

    def _let_go(self, key) -> None:
        if self._ahead.pop(key, None) is not None:
            self._host.release(key)

    def _size_estimate(self, req) -> int:
        """Bytes the adapter will take in the host cache (its weight file's size, for catalog ones)."""
        try:
            return int(self._require_catalog().get(req.lora_name).size_bytes)
        except Exception:  # noqa: BLE001 - not a catalog adapter: count it as large, to stay in budget
            return self._host.max_bytes // 8

    def load_multiple_adapters(self, names) -> dict[str, int]:
        """Load catalog adapters in parallel and register them in vLLM's CPU cache (no GPU slot yet).
        Returns name -> lora id."""
        reqs = [self._request_for(n) for n in names]
        futures = [self._host.prefetch(self._key(r), r) for r in reqs]
        for f in futures:
            f.result()
        manager = self._adapter_manager
        for req in reqs:
            if req.lora_int_id in self.list_adapters():
                continue
            if len(manager) + 1 > manager.capacity:
                manager.remove_oldest_adapter()
            manager.add_adapter(self._load_adapter(req))
        self._residency.publish()
        return {r.lora_name: r.lora_int_id for r in reqs}

    def pin_adapter_by_name(self, name: str) -> bool:
        """Keep catalog adapter `name` in every tier: host cache, vLLM's CPU cache and a GPU slot."""
        req = self._request_for(name)
        self._host.pin(self._key(req))
        self.add_adapter(req)
        return self.pin_adapter(req.lora_int_id)

    def set_cache_policy(self, host_cache_bytes: int | None = None, max_host_entries: int | None = None) -> dict:
        """Resize the host cache (evicting now if needed); returns cache_sizes()."""
        self._host.set_limits(host_cache_bytes, max_host_entries)
        self._residency.publish()
        return self.cache_sizes()

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
        }


# ---- reaching the manager from outside the worker ----------------------------------------------------
def _invoke(worker, method, args, kwargs):
    worker = getattr(worker, "worker", worker)  # vLLM may hand us its WorkerWrapperBase
    manager = getattr(getattr(worker, "model_runner", None), "lora_manager", None)
    if not isinstance(manager, LoraplexWorkerLoRAManager):
        raise ConfigError("this engine does not use loraplex's worker LoRA manager (is LORAPLEX_CATALOG set "
                          "and LoRA enabled?)")
    result = getattr(manager, method)(*args, **kwargs)
    # Futures do not cross process boundaries: report that the load started.
    return True if hasattr(result, "add_done_callback") else result


def call_worker_manager(llm, method: str, *args, **kwargs) -> list:
    """Call `method` of the LoraplexWorkerLoRAManager of every worker of a vllm.LLM, e.g.
    call_worker_manager(llm, "prefetch_adapter", "my-adapter"); returns one result per worker.
    (Multi-process engines need VLLM_ALLOW_INSECURE_SERIALIZATION=1 to ship the call.)"""
    return llm.collective_rpc(_invoke, args=(method, args, kwargs))
