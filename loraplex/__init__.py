"""loraplex: serve thousands of LoRA adapters over one base model.

`import loraplex` stays light: torch, Triton and vLLM are imported only by the parts that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import AutoMerge, CatalogConfig, RuntimeConfig
from .errors import (
    AdapterChanged,
    AdapterNotFound,
    CapacityError,
    CatalogError,
    ConfigError,
    InvalidAdapter,
    InvalidAdapterName,
    LaunchError,
    LoraplexError,
    StorageError,
)

__version__ = "0.1.0"  # the one place it is written: pyproject.toml and `loraplex --version` read it

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers
    from .catalog import Catalog, MemoryCatalog, open_catalog
    from .layers import inject
    from .runtime import Runtime

_LAZY = {
    "Catalog": ("loraplex.catalog", "Catalog"),
    "MemoryCatalog": ("loraplex.catalog", "MemoryCatalog"),
    "open_catalog": ("loraplex.catalog", "open_catalog"),
    "Runtime": ("loraplex.runtime", "Runtime"),
    "inject": ("loraplex.layers", "inject"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")


__all__ = [
    "AdapterChanged",
    "AutoMerge",
    "AdapterNotFound",
    "CapacityError",
    "Catalog",
    "CatalogConfig",
    "CatalogError",
    "ConfigError",
    "InvalidAdapter",
    "InvalidAdapterName",
    "LaunchError",
    "LoraplexError",
    "MemoryCatalog",
    "Runtime",
    "RuntimeConfig",
    "StorageError",
    "inject",
    "open_catalog",
]
