"""CatalogLoRAResolver: vLLM's LoRAResolver backed by the loraplex Catalog.

vLLM's OpenAI server asks every registered resolver for a model name it does not know (with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1). We answer with a LoRARequest for the catalog adapter of that
name: its local directory with its version (identity.py; remote adapters are downloaded first, off
the event loop) and the catalog's deterministic id, so every API server replica gives the same
adapter the same id. Before a version is handed out its weights are read once and checked (NaN,
shapes, truncation): an unservable adapter is refused with its reason instead of reaching the
engine. Unknown, invalid and unsafe names ('../x', 'a/b', '.hidden') give None, which vLLM turns
into a 404.
"""

from __future__ import annotations

import asyncio
import logging
import os

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..errors import AdapterChanged, AdapterNotFound, CatalogError, InvalidAdapter, StorageError
from .catalog_handle import CatalogHandle, get_handle
from .identity import catalog_path
from .loading import check_vllm_limits
from .residency import ENV_STATE_DIR, newest_snapshot

log = logging.getLogger("loraplex.vllm_plugin")

RESOLVER_NAME = "loraplex"


def make_request(entry, local_dir: str) -> LoRARequest:
    return LoRARequest(lora_name=entry.name, lora_int_id=entry.id, lora_path=catalog_path(local_dir, entry.version))


class CatalogLoRAResolver(LoRAResolver):
    def __init__(self, handle: CatalogHandle):
        self.handle = handle
        self._checked: set[tuple[str, object]] = set()  # (name, version) whose weights passed the check

    def resolve_checked(self, lora_name: str, lora_config=None) -> LoRARequest:
        """The LoRARequest for the current version of `lora_name` (blocking I/O). Raises
        AdapterNotFound / InvalidAdapterName, or InvalidAdapter with the reason it cannot be served.
        lora_config (the engine's LoRAConfig): also check vLLM's own limits (loading.check_vllm_limits)."""
        entry = self.handle.fresh(lora_name)
        for _ in range(3):  # a version replaced while we read it: take the new one
            try:
                local = self.handle.catalog.local_path(lora_name)
                self._check_weights(entry, lora_config)
                return make_request(entry, local)
            except AdapterChanged:
                entry = self.handle.fresh(lora_name)
        raise StorageError(lora_name, "the adapter kept changing while it was read; try again")

    def _check_weights(self, entry, lora_config=None) -> None:
        key = (entry.name, entry.version, lora_config is not None)
        if key in self._checked:
            return
        try:
            _, config, tensors = self.handle.catalog.load_peft(entry.name, entry)
            if lora_config is not None:
                snapshot = newest_snapshot(os.environ.get(ENV_STATE_DIR, "").strip() or "/nonexistent")
                check_vllm_limits(entry.name, config, tensors, lora_config, (snapshot or {}).get("lora_modules"))
        except InvalidAdapter as e:
            self.handle.mark_unservable(entry, e.reason)
            raise
        if len(self._checked) > 100_000:
            self._checked.clear()
        self._checked.add(key)

    def resolve(self, lora_name: str) -> LoRARequest | None:
        """vLLM's resolver contract: the LoRARequest for `lora_name`, or None (logged once)."""
        try:
            return self.resolve_checked(lora_name)
        except AdapterNotFound:
            return None
        except CatalogError as e:  # invalid name or adapter, storage errors
            log.warning("loraplex: %s", e)
            return None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # Listing and downloading touch storage: keep them off the server's event loop.
        return await asyncio.to_thread(self.resolve, lora_name)


_resolver: CatalogLoRAResolver | None = None


def get_resolver() -> CatalogLoRAResolver | None:
    """The resolver registered in this process (None when the plugin has no catalog)."""
    return _resolver


def install_resolver(url: str | None = None) -> CatalogLoRAResolver | None:
    """Register the catalog resolver with vLLM (idempotent). Returns it, or None without a catalog."""
    global _resolver
    handle = get_handle(url)
    if handle is None:
        return None
    if _resolver is None or _resolver.handle is not handle:
        _resolver = CatalogLoRAResolver(handle)
    if LoRAResolverRegistry.resolvers.get(RESOLVER_NAME) is not _resolver:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)  # avoid vLLM's overwrite warning
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _resolver)
    return _resolver


def uninstall_resolver() -> None:
    global _resolver
    if LoRAResolverRegistry.resolvers.get(RESOLVER_NAME) is _resolver:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    _resolver = None


def lora_request(name: str) -> LoRARequest:
    """A LoRARequest for the current version of catalog adapter `name`, for offline use:
    `llm.generate(p, sp, lora_request=lora_request("my-adapter"))`. Raises AdapterNotFound,
    InvalidAdapterName, or InvalidAdapter with the reason (bad config or weights)."""
    handle = get_handle()
    if handle is None:
        from ..errors import ConfigError

        raise ConfigError("no catalog: set LORAPLEX_CATALOG to a directory or URL")
    resolver = _resolver if _resolver is not None and _resolver.handle is handle else CatalogLoRAResolver(handle)
    return resolver.resolve_checked(name)
