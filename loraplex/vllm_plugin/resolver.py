"""CatalogLoRAResolver: vLLM's LoRAResolver backed by the loraplex Catalog.

vLLM's OpenAI server asks every registered resolver for a model name it does not know (with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1). We answer with a LoRARequest for the catalog adapter of that
name: its local directory with its version and a per-version id derived from the catalog's
deterministic per-name id (identity.py; remote adapters are downloaded first, off the event loop), so
every API server replica gives the same version the same id. Before a version is handed out its
weights are read once and checked (NaN, shapes, truncation): an unservable adapter is refused with
its reason instead of reaching the engine. Unknown, invalid and unsafe names ('../x', 'a/b',
'.hidden') give None, which vLLM turns into a 404.
"""

from __future__ import annotations

import asyncio
import logging

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..errors import AdapterNotFound, CatalogError
from .catalog_handle import CatalogHandle, get_handle

log = logging.getLogger("loraplex.vllm_plugin")

RESOLVER_NAME = "loraplex"


class CatalogLoRAResolver(LoRAResolver):
    def __init__(self, handle: CatalogHandle):
        self.handle = handle

    def resolve_checked(self, lora_name: str, lora_config=None) -> LoRARequest:
        """The LoRARequest for the current version of `lora_name`, its weights checked (blocking I/O).
        Raises AdapterNotFound / InvalidAdapterName, or InvalidAdapter with the reason it cannot be
        served. lora_config (the engine's LoRAConfig): also check vLLM's own limits."""
        return self.handle.request(lora_name, check_weights=True, lora_config=lora_config)

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
