"""Make vLLM's OpenAI server show and serve the catalog: three small wraps of OpenAIServingModels.

- show_available_models: /v1/models lists every catalog adapter (vLLM lists only adapters it has
  loaded), as children of the base model.
- resolve_lora: a catalog name is resolved and loaded with the catalog's deterministic id (vLLM's
  own path replaces resolver ids with a per-process counter, so two API server replicas could give
  one adapter two ids, or two adapters one id). Every other name goes to vLLM's own path.
- __init__: remembers the instance, so that catalog refreshes can forget adapters that changed or
  disappeared (the next request re-resolves them: reloaded in place, or 404).

Each wrap calls the original method, so the server keeps working if a future vLLM changes details;
the version check in plugin.py keeps us to the releases whose code we read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref

from .catalog_handle import CatalogHandle

log = logging.getLogger("loraplex.vllm_plugin")

MODULE = "vllm.entrypoints.openai.models.serving"
ENV_WATCH = "LORAPLEX_CATALOG_WATCH"  # seconds: refresh the catalog in the background (API server)

_instances: weakref.WeakSet = weakref.WeakSet()
_originals: dict[str, object] = {}
_subscribed: set[int] = set()


def _resolver():
    from .resolver import get_resolver

    return get_resolver()


def _forget(diff) -> None:
    """Catalog listener: drop changed/removed catalog adapters from every server's loaded set."""
    gone = set(diff.removed) | set(diff.changed)
    if not gone:
        return
    for models in list(_instances):
        ours = models.__dict__.get("_loraplex_names", set())
        for name in gone & ours:
            ours.discard(name)
            if models.lora_requests.pop(name, None) is not None:
                log.info("loraplex: adapter '%s' changed or was removed; it will be re-resolved", name)


def _watch(handle: CatalogHandle) -> None:
    if id(handle) not in _subscribed:
        _subscribed.add(id(handle))
        handle.subscribe(_forget)
    interval = os.environ.get(ENV_WATCH, "").strip()
    if interval:
        handle.start_watch(float(interval))


def _wrap_init(orig):
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        _instances.add(self)
        resolver = _resolver()
        if resolver is not None:
            try:
                _watch(resolver.handle)
            except Exception:  # noqa: BLE001 - serving without background refresh is still correct
                log.exception("loraplex: could not watch the catalog")

    __init__.__loraplex_wrapped__ = orig
    return __init__


def _wrap_show(orig):
    async def show_available_models(self):
        result = await orig(self)
        resolver = _resolver()
        if resolver is None or not result.data:
            return result
        try:
            handle = resolver.handle
            names = await asyncio.to_thread(handle.names)
            entries = {}
            for n in names:
                try:
                    entries[n] = handle.catalog.get(n)
                except Exception:  # noqa: BLE001 - removed between listing and lookup
                    continue
        except Exception:  # noqa: BLE001 - the base listing must not fail because storage did
            log.exception("loraplex: listing the catalog failed")
            return result
        shown = {card.id for card in result.data}
        base = result.data[0]
        for name, entry in entries.items():
            if name in shown:
                continue
            # A copy of the base model's card keeps the field set of whatever ModelCard vLLM has.
            result.data.append(base.model_copy(update={"id": name, "root": entry.path, "parent": base.id}))
        return result

    show_available_models.__loraplex_wrapped__ = orig
    return show_available_models


def _error(message, status):
    from http import HTTPStatus

    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type="BadRequestError", status_code=HTTPStatus(status))


def _wrap_resolve(orig):
    async def resolve_lora(self, lora_name):
        resolver = _resolver()
        if resolver is None or lora_name in self.lora_requests:
            return await orig(self, lora_name)
        async with self.lora_resolver_lock[lora_name]:
            if lora_name in self.lora_requests:
                return self.lora_requests[lora_name]
            request = await resolver.resolve_lora(self.model_config.model, lora_name)
            if request is not None:
                try:
                    await self.engine_client.add_lora(request)
                except Exception as e:  # noqa: BLE001 - reported to the client as a 400
                    log.warning("loraplex: loading adapter '%s' failed: %s", lora_name, e)
                    return _error(f"LoRA adapter '{lora_name}' was found but could not be loaded: {e}", 400)
                # load_inplace was for this one load; requests must not reload it every step.
                if request.load_inplace:
                    import msgspec

                    request = msgspec.structs.replace(request, load_inplace=False)
                self.lora_requests[lora_name] = request
                self.__dict__.setdefault("_loraplex_names", set()).add(lora_name)
                log.info("loraplex: serving adapter '%s' (id %d) from the catalog", lora_name,
                         request.lora_int_id)
                return request
        # Not a catalog adapter: vLLM's path (other resolvers, then 404).
        return await orig(self, lora_name)

    resolve_lora.__loraplex_wrapped__ = orig
    return resolve_lora


_WRAPS = {"__init__": _wrap_init, "show_available_models": _wrap_show, "resolve_lora": _wrap_resolve}


def patch_serving_models(module) -> None:
    """Wrap OpenAIServingModels' methods (idempotent)."""
    cls = module.OpenAIServingModels
    for attr, wrap in _WRAPS.items():
        current = cls.__dict__[attr]
        if getattr(current, "__loraplex_wrapped__", None) is None:
            _originals[attr] = current
            setattr(cls, attr, wrap(current))


def unpatch_serving_models() -> None:
    import sys

    module = sys.modules.get(MODULE)
    if module is None:
        return
    cls = module.OpenAIServingModels
    for attr in _WRAPS:
        current = cls.__dict__.get(attr)
        orig = getattr(current, "__loraplex_wrapped__", None)
        if orig is not None:
            setattr(cls, attr, orig)
