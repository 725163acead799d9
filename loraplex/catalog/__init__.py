"""The storage catalog: adapters by name on a directory or object store. No GPU, Triton or vLLM here."""

from __future__ import annotations

from typing import Any

from ..config import CatalogConfig
from .catalog import Catalog
from .entry import AdapterEntry, CatalogDiff
from .memory import MemoryCatalog
from .peft import AdapterSpec, parse_config


def open_catalog(config: CatalogConfig | None = None, **kwargs: Any) -> Catalog | MemoryCatalog:
    """The catalog a CatalogConfig describes: storage (a path or URL) or memory."""
    config = config or CatalogConfig()
    if config.catalog_type == "storage" and config.catalog_path:  # CatalogConfig checked it is set
        return Catalog(config.catalog_path, **kwargs)
    return MemoryCatalog()


__all__ = ["AdapterEntry", "AdapterSpec", "Catalog", "CatalogDiff", "MemoryCatalog", "open_catalog",
           "parse_config"]
