"""The worker manager's catalog calls: adapters by name (prefetch, load, pin), startup pins, and the
host cache's limits. Mixed into LoraplexWorkerLoRAManager."""

from __future__ import annotations

import logging
import os

from ..errors import ConfigError

log = logging.getLogger("loraplex.vllm_plugin")

ENV_PIN = "LORAPLEX_PIN_ADAPTERS"  # comma-separated catalog names kept in host memory from startup on


class CatalogMixin:
    def _require_catalog(self):
        if self._catalog is None:
            raise ConfigError("no adapter catalog: start vLLM with LORAPLEX_CATALOG set "
                              "(loraplex serve --lora-catalog-type storage --lora-catalog-path ...)")
        return self._catalog

    def _request_for(self, name: str):
        """A request for the current version of catalog adapter `name` (AdapterNotFound,
        InvalidAdapterName, InvalidAdapter otherwise)."""
        return self._require_catalog().request(name)

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

    def refresh_storage_catalog(self):
        """Re-list the catalog now. Requests resolved from then on carry the new versions; older
        versions stay loadable while requests hold them. Returns the CatalogDiff."""
        return self._require_catalog().refresh(force=True)

    def get_adapter_name(self, adapter_id: int) -> str:
        """The name of the adapter under a lora id: a version id this worker saw, or a catalog id."""
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
