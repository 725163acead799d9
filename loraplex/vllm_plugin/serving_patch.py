"""Make vLLM's OpenAI server show and serve the catalog, and only the catalog: wraps of
OpenAIServingModels.

- show_available_models: /v1/models lists every servable catalog adapter (vLLM lists only adapters
  it has loaded), as children of the base model.
- resolve_lora: a catalog name is resolved and loaded with the catalog's deterministic id (vLLM's
  own path replaces resolver ids with a per-process counter, so two API server replicas could give
  one adapter two ids, or two adapters one id) and its current version (identity.py): a local
  adapter's files are re-stat'ed per request, so a republished adapter is served at its new
  version from the first request on. Unservable adapters get a 400 naming the adapter and why.
  Every other name goes to vLLM's own path.
- load_lora_adapter: takes only catalog names (their catalog directory, or no path), unless
  LORAPLEX_ALLOW_RUNTIME_LORA_PATHS=1: runtime LoRA updating, which resolvers need, must not let any
  client load any file on the server.
- unload_lora_adapter: also frees the engine's copies (vLLM only forgets the name).
- _raise_if_error (GenerateBaseServing): a request the engine failed because its adapter version
  was lost (failures.py) is answered with a 503 naming the adapter and saying to retry, instead of
  vLLM's bare 500 "Internal server error".
- _check_model (BaseServing): opens the request's scope, so vLLM's later lookups of its adapter
  in the same request see the version its first lookup bound it to (loaded.py).
- __init__: remembers the instance, so that catalog refreshes can forget adapters that changed or
  disappeared (the next request re-resolves them: reloaded in place, or 404).

Each wrap calls the original method, so the server keeps working if a future vLLM changes details;
the version check in plugin.py keeps us to the releases whose code we read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref

from ..errors import AdapterNotFound, CatalogError, InvalidAdapterName, StorageError
from ._hooks import unwrap_loaded, wrap
from .catalog_handle import CatalogHandle
from .compat import VllmInternalError, internal_message
from .identity import split_path
from .loaded import LoadedAdapters, bind_request, bound

log = logging.getLogger("loraplex.vllm_plugin")

MODULE = "vllm.entrypoints.openai.models.serving"
ENV_WATCH = "LORAPLEX_CATALOG_WATCH"  # seconds: refresh the catalog in the background (API server)
ENV_ALLOW_PATHS = "LORAPLEX_ALLOW_RUNTIME_LORA_PATHS"  # 1: the load API also takes non-catalog paths


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")

_instances: weakref.WeakSet = weakref.WeakSet()
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
        loaded = models.lora_requests
        for name in gone & getattr(loaded, "catalog_names", set()):
            if loaded.drop(name):
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
        self.lora_requests = LoadedAdapters(self.lora_requests)
        _instances.add(self)
        resolver = _resolver()
        if resolver is not None:
            try:
                _watch(resolver.handle)
            except Exception:  # noqa: BLE001 - serving without background refresh is still correct
                log.exception("loraplex: could not watch the catalog")

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
        ours = getattr(self.lora_requests, "catalog_names", set())
        # loaded catalog adapters: their card's root is the adapter's directory, not the request's
        # versioned path; ones no longer servable are not shown
        result.data = [card if card.id not in ours else card.model_copy(update={"root": entries[card.id].path})
                       for card in result.data if card.id not in ours or card.id in entries]
        shown = {card.id for card in result.data}
        base = result.data[0]
        for name, entry in entries.items():
            if name in shown:
                continue
            # A copy of the base model's card keeps the field set of whatever ModelCard vLLM has.
            result.data.append(base.model_copy(update={"id": name, "root": entry.path, "parent": base.id}))
        return result

    return show_available_models


def _error(message, status, err_type="BadRequestError"):
    from http import HTTPStatus

    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=HTTPStatus(status))


async def _load_catalog_adapter(self, resolver, lora_name):
    """The LoRARequest of the current version of catalog adapter `lora_name`, loaded into the
    engine; an ErrorResponse naming the adapter and the reason; or None if it is not in the catalog.
    Call with self.lora_resolver_lock[lora_name] held."""
    loaded = self.lora_requests
    lora_config = getattr(getattr(self.engine_client, "vllm_config", None), "lora_config", None)
    try:
        request = await asyncio.to_thread(resolver.resolve_checked, lora_name, lora_config)
    except (AdapterNotFound, InvalidAdapterName):
        loaded.drop(lora_name)  # removed from the catalog
        return None
    except CatalogError as e:  # bad config or weights, storage down: one line, a clear answer
        log.warning("loraplex: refused a request for adapter '%s': %s", lora_name, e)
        loaded.drop(lora_name)
        if isinstance(e, StorageError):
            return _error(str(e), 503, "ServiceUnavailableError")
        return _error(f"{e}. Fix or replace its files; the other adapters are unaffected.", 400)
    except VllmInternalError as e:  # our fault, not the adapter's: a server error, nothing marked
        log.error("%s", e)
        return _error(str(e), 500, "InternalServerError")
    held = dict.get(loaded, lora_name)
    if held is not None and held.lora_path == request.lora_path:
        bound(lora_name, held)
        return held
    try:
        await self.engine_client.add_lora(request)
    except Exception as e:  # noqa: BLE001 - reported to the client as a 400, in one log line
        internal = internal_message(e)
        if internal is not None:  # our fault, not the adapter's: a server error, nothing marked
            log.error("%s", internal)
            return _error(internal, 500, "InternalServerError")
        log.warning("loraplex: loading adapter '%s' failed: %s", lora_name, str(e).splitlines()[-1:] or e)
        if "is invalid:" in str(e):  # the worker's InvalidAdapter: this version will never load
            with contextlib.suppress(CatalogError):
                resolver.handle.mark_unservable(resolver.handle.catalog.get(lora_name), str(e))
        return _error(f"LoRA adapter '{lora_name}' was found but could not be loaded: {e}", 400)
    loaded.add_catalog(lora_name, request)
    if held is None:
        log.info("loraplex: serving adapter '%s' (id %d) from the catalog", lora_name, request.lora_int_id)
    else:
        log.info("loraplex: adapter '%s' changed on storage: serving its new version", lora_name)
    return request


def _server_errors_raised(response):
    """vLLM's model check passes a resolver's error on only if it is a 400, and answers any other with
    404 "model does not exist": a server-side error (500 internal, 503 storage) is raised instead, for
    vLLM's HTTP exception handler to answer with its status and message."""
    code = getattr(getattr(response, "error", None), "code", None)
    if code is not None and code >= 500:
        from fastapi import HTTPException

        raise HTTPException(status_code=code, detail=response.error.message)
    return response


def _wrap_resolve(orig):
    async def resolve_lora(self, lora_name):
        resolver = _resolver()
        if resolver is None or lora_name in self.lora_requests:  # held, and current (LoadedAdapters)
            return await orig(self, lora_name)
        async with self.lora_resolver_lock[lora_name]:
            got = await _load_catalog_adapter(self, resolver, lora_name)
        if got is not None:
            return _server_errors_raised(got)
        return await orig(self, lora_name)  # other resolvers, then vLLM's 404

    return resolve_lora


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _wrap_load(orig):
    async def load_lora_adapter(self, request, base_model_name=None):
        resolver = _resolver()
        if resolver is None:
            return await orig(self, request, base_model_name)
        name = request.lora_name
        entry, in_catalog = None, True
        try:
            entry = await asyncio.to_thread(resolver.handle.entry, name, fresh=False)
        except (AdapterNotFound, InvalidAdapterName):
            in_catalog = False
        except CatalogError:
            pass  # in the catalog but unservable: _load_catalog_adapter answers with the reason
        if not in_catalog:
            if _truthy(os.environ.get(ENV_ALLOW_PATHS, "")):
                return await orig(self, request, base_model_name)
            return _error(f"'{name}' is not an adapter of this server's catalog ({resolver.handle.url}); this server "
                          f"loads only catalog adapters. Publish it in the catalog, or start the server with "
                          f"{ENV_ALLOW_PATHS}=1 to allow loading adapters from any path.", 403, "ForbiddenError")
        path = split_path(request.lora_path or "")[0]
        if path and entry is not None and not _same_dir(path, entry.path):
            return _error(f"LoRA adapter '{name}' is in the catalog at {entry.path}; load it by name (lora_path "
                          f"empty or that directory), not from {path}.", 403, "ForbiddenError")
        async with self.lora_resolver_lock[name]:
            got = await _load_catalog_adapter(self, resolver, name)
        if got is None:
            return _error(f"LoRA adapter '{name}' not found in catalog {resolver.handle.url}", 404, "NotFoundError")
        if not hasattr(got, "lora_path"):
            return got  # the ErrorResponse
        return f"Success: LoRA adapter '{name}' added successfully."

    return load_lora_adapter


def _wrap_unload(orig):
    async def unload_lora_adapter(self, request):
        held = self.lora_requests.get(request.lora_name)
        result = await orig(self, request)
        if held is not None and request.lora_name not in self.lora_requests:
            getattr(self.lora_requests, "catalog_names", set()).discard(request.lora_name)
            # vLLM only forgets the name here; free the engine's copies too (GPU slot, CPU caches)
            try:
                await self.engine_client.remove_lora(held.lora_int_id)
            except Exception as e:  # noqa: BLE001 - the name is gone either way; say what stayed behind
                log.warning("loraplex: adapter '%s' unloaded from the API server but not the engine: %s",
                            request.lora_name, e)
        return result

    return unload_lora_adapter


_WRAPS = {"__init__": _wrap_init, "show_available_models": _wrap_show, "resolve_lora": _wrap_resolve,
          "load_lora_adapter": _wrap_load, "unload_lora_adapter": _wrap_unload}


def patch_serving_models(module) -> None:
    """Wrap OpenAIServingModels' methods (idempotent)."""
    for attr, make in _WRAPS.items():
        wrap(module.OpenAIServingModels, attr, make)


def unpatch_serving_models() -> None:
    unwrap_loaded(MODULE, "OpenAIServingModels", *_WRAPS)


ERRORS_MODULE = "vllm.entrypoints.generate.base.serving"


def _wrap_raise_if_error(orig):
    def _raise_if_error(self, finish_reason, request_id):
        if finish_reason == "error":
            from . import failures

            message = failures.take_error(request_id)
            if message is not None:
                try:
                    from vllm.exceptions import RetryableRequestError as Error
                except ImportError:  # older vLLM: a 500 with the reason
                    from vllm.exceptions import GenerationError as Error
                raise Error(message)
        return orig(self, finish_reason, request_id)

    return _raise_if_error


def patch_generation_errors(module) -> None:
    wrap(module.GenerateBaseServing, "_raise_if_error", _wrap_raise_if_error)


def unpatch_generation_errors() -> None:
    unwrap_loaded(ERRORS_MODULE, "GenerateBaseServing", "_raise_if_error")


CHECK_MODULE = "vllm.entrypoints.serve.engine.serving"


def _wrap_check_model(orig):
    async def _check_model(self, request, *args, **kwargs):
        bind_request()
        return await orig(self, request, *args, **kwargs)

    return _check_model


def patch_request_checks(module) -> None:
    wrap(module.BaseServing, "_check_model", _wrap_check_model)


def unpatch_request_checks() -> None:
    unwrap_loaded(CHECK_MODULE, "BaseServing", "_check_model")
