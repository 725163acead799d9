"""loraplex: serve thousands of LoRA adapters over one base model.

`import loraplex` stays light: torch, Triton and vLLM are imported only by the parts that need them.
"""

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

__version__ = "0.1.0"

_LAZY = {
    "Catalog": ("loraplex.catalog", "Catalog"),
    "MemoryCatalog": ("loraplex.catalog", "MemoryCatalog"),
    "open_catalog": ("loraplex.catalog", "open_catalog"),
    "Runtime": ("loraplex.runtime", "Runtime"),
    "inject": ("loraplex.layers", "inject"),
}


def __getattr__(name):
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
