"""LoadedAdapters: vLLM's `OpenAIServingModels.lora_requests` (name -> LoRARequest of the adapters the
engine holds), keeping its catalog adapters current.

vLLM looks a request's model name up in this dict before it asks any resolver, and serves whatever
it finds. For a catalog adapter whose files changed since it was loaded, the lookup must miss, so
the request is resolved again and gets the new version. A local adapter's files are re-stat'ed at
each lookup (tens of µs); object-store catalogs are re-listed by LORAPLEX_CATALOG_WATCH instead.

vLLM looks a request's model up more than once (it checks the name, then fetches the adapter). The
first lookup binds the request to a version; later lookups in the same request (the same asyncio
task) get that version, so a publish between them can neither switch the request to another version
nor make its adapter vanish (a 404). `bind_request()` opens that scope (serving_patch.py calls it when
vLLM starts checking a request).
"""

from __future__ import annotations

from contextvars import ContextVar

from ..errors import CatalogError
from .identity import split_path, version_token

_BOUND: ContextVar[dict | None] = ContextVar("loraplex_bound_adapters", default=None)


def bind_request() -> None:
    """Start a request's scope: its adapter lookups from now on (in this task) see one version."""
    _BOUND.set({})


def bound(name: str, request) -> None:
    """Record the version this request resolved `name` to (if a request scope is open)."""
    scope = _BOUND.get()
    if scope is not None:
        scope[name] = request


def _resolver():
    from .resolver import get_resolver

    return get_resolver()


class LoadedAdapters(dict):
    def __init__(self, initial=()):
        super().__init__(initial)
        self.catalog_names: set[str] = set()  # names loaded from the catalog (others are vLLM's own)

    def add_catalog(self, name: str, request) -> None:
        self[name] = request
        self.catalog_names.add(name)
        bound(name, request)

    def drop(self, name: str) -> bool:
        """Forget a catalog adapter (changed, removed or unservable); True if it was held."""
        self.catalog_names.discard(name)
        return self.pop(name, None) is not None

    def is_current(self, name: str) -> bool:
        resolver = _resolver()
        if resolver is None or resolver.handle.remote:
            return True
        held = dict.get(self, name)
        try:
            entry = resolver.handle.entry(name)
        except CatalogError:
            return False
        return held is not None and split_path(held.lora_path)[1] == version_token(entry.version)

    def __contains__(self, name) -> bool:
        scope = _BOUND.get()
        if scope is not None and name in scope:
            return True
        if not dict.__contains__(self, name):
            return False
        if name in self.catalog_names and not self.is_current(name):
            self.drop(name)
            return False
        if scope is not None:
            scope[name] = dict.__getitem__(self, name)
        return True

    def __getitem__(self, name):
        scope = _BOUND.get()
        if scope is not None and name in scope:
            return scope[name]
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        scope = _BOUND.get()
        if scope is not None and name in scope:
            return scope[name]
        return dict.get(self, name, default)
