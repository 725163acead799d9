"""CatalogLoRAResolver: vLLM's LoRAResolver backed by the loraplex Catalog.

vLLM's OpenAI server asks every registered resolver for a model name it does not know (with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1). We answer with a LoRARequest for the catalog adapter of that
name: its absolute local directory (remote adapters are downloaded first, off the event loop) and the
catalog's deterministic id, so every API server replica gives the same adapter the same id. Unknown,
invalid and unsafe names ('../x', 'a/b', '.hidden') give None, which vLLM turns into a 404.
"""

from __future__ import annotations

import asyncio
import logging

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from .catalog_handle import CatalogHandle, get_handle

log = logging.getLogger("loraplex.vllm_plugin")

RESOLVER_NAME = "loraplex"


def make_request(entry, path: str, load_inplace: bool = False) -> LoRARequest:
    return LoRARequest(lora_name=entry.name, lora_int_id=entry.id, lora_path=path, load_inplace=load_inplace)


class CatalogLoRAResolver(LoRAResolver):
    def __init__(self, handle: CatalogHandle):
        self.handle = handle
        # name -> version we last handed out: a different version means the files changed, and the
        # engine must reload the adapter in place (same id, new weights).
        self.versions: dict[str, str] = {}

    def resolve(self, lora_name: str) -> LoRARequest | None:
        """Synchronous resolution (blocking I/O): the LoRARequest for `lora_name`, or None."""
        entry = self.handle.lookup(lora_name)
        if entry is None:
            return None
        try:
            path = self.handle.catalog.local_path(lora_name)
        except Exception as e:  # noqa: BLE001 - storage errors become "not servable", logged
            log.warning("loraplex: could not fetch adapter '%s': %s", lora_name, e)
            return None
        previous = self.versions.get(lora_name)
        self.versions[lora_name] = entry.version
        return make_request(entry, path, load_inplace=previous is not None and previous != entry.version)

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
    """A LoRARequest for catalog adapter `name`, for offline use: `llm.generate(p, sp,
    lora_request=lora_request("my-adapter"))`. Raises AdapterNotFound / InvalidAdapterName."""
    handle = get_handle()
    if handle is None:
        from ..errors import ConfigError

        raise ConfigError("no catalog: set LORAPLEX_CATALOG to a directory or URL")
    resolver = _resolver if _resolver is not None and _resolver.handle is handle else CatalogLoRAResolver(handle)
    handle.get(name)  # raises the precise error (not found, invalid, unsafe name)
    req = resolver.resolve(name)
    if req is None:  # found, but its files could not be fetched (logged)
        from ..errors import AdapterNotFound

        raise AdapterNotFound(name, handle.url)
    return req
