"""One error hierarchy for the whole package. Every error names the adapter it concerns."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class of every error raised on purpose by loraplex."""


class CatalogError(LoraplexError):
    """The catalog as a whole cannot be used (missing root, unreachable store, bad URL)."""


class AdapterNotFound(CatalogError, KeyError):
    """No adapter of that name (or id) in the catalog."""

    def __init__(self, name: str, root: str | None = None) -> None:
        self.name = name
        self.root = root
        where = f" in catalog {root}" if root is not None else ""
        super().__init__(f"LoRA adapter '{name}' not found{where}")

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return self.args[0]


class InvalidAdapterName(CatalogError, ValueError):
    """A name that could reach outside the catalog root (traversal, separators, hidden)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"invalid LoRA adapter name {name!r}: {reason}")


class InvalidAdapter(CatalogError, ValueError):
    """An adapter exists but cannot be served: bad config, unsupported feature, bad weights."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"LoRA adapter '{name}' is invalid: {reason}")


class AdapterChanged(CatalogError):
    """The adapter's files changed while they were being read; the read was discarded."""

    def __init__(self, name: str, old_version: str | None, new_version: str | None) -> None:
        self.name = name
        self.old_version = old_version
        self.new_version = new_version
        super().__init__(
            f"LoRA adapter '{name}' changed while it was read (version {old_version} -> {new_version})"
        )


class StorageError(CatalogError):
    """Reading from storage failed (I/O error, object store down, timeout)."""

    def __init__(self, name: str | None, reason: str) -> None:
        self.name = name
        self.reason = reason
        what = f"LoRA adapter '{name}'" if name else "catalog storage"
        super().__init__(f"{what}: storage error: {reason}")


class CapacityError(LoraplexError):
    """More distinct adapters in one batch than GPU slots, or an adapter larger than a budget."""


class LaunchError(LoraplexError, ValueError):
    """A kernel launcher was given tensors of the wrong shape, dtype, device or layout."""


class ConfigError(LoraplexError, ValueError):
    """Contradictory or out-of-range configuration."""
