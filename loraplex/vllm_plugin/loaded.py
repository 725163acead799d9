"""LoadedAdapters: vLLM's `OpenAIServingModels.lora_requests` (name -> LoRARequest of the adapters the
engine holds), keeping its catalog adapters current.

vLLM looks a request's model name up in this dict before it asks any resolver, and serves whatever
it finds. For a catalog adapter whose files changed since it was loaded, the lookup must miss, so
the request is resolved again and gets the new version. A local adapter's files are re-stat'ed at
each lookup (tens of µs); object-store catalogs are re-listed by LORAPLEX_CATALOG_WATCH instead.
"""

from __future__ import annotations

from ..errors import CatalogError
from .identity import split_path, version_token


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
        if not dict.__contains__(self, name):
            return False
        if name in self.catalog_names and not self.is_current(name):
            self.drop(name)
            return False
        return True
