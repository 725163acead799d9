"""AdapterEntry: what the catalog knows about one adapter, immutable, keyed by (name, version)."""

from __future__ import annotations

from dataclasses import dataclass

from .peft import AdapterSpec


@dataclass(frozen=True, slots=True)  # slots: 100k of these in a big catalog
class AdapterEntry:
    name: str
    id: int
    version: str
    path: str  # local directory (remote adapters: where they are materialized; see Catalog.local_path)
    spec: AdapterSpec
    weight_format: str  # "safetensors" | "bin"
    size_bytes: int

    @property
    def key(self) -> tuple[str, str]:
        """Cache key: a changed adapter has a new key, so stale weights can never be served."""
        return (self.name, self.version)

    @property
    def r(self) -> int:
        return self.spec.r

    @property
    def lora_alpha(self) -> float:
        return self.spec.lora_alpha

    @property
    def scaling(self) -> float:
        return self.spec.scaling

    @property
    def target_modules(self) -> str | tuple[str, ...]:
        return self.spec.target_modules

    @property
    def rank_pattern(self) -> dict:
        return self.spec.rank_pattern

    @property
    def alpha_pattern(self) -> dict:
        return self.spec.alpha_pattern

    @property
    def use_rslora(self) -> bool:
        return self.spec.use_rslora

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.spec.base_model_name_or_path

    @property
    def max_rank(self) -> int:
        return max([self.spec.r, *self.spec.rank_pattern.values()])


@dataclass(frozen=True)
class CatalogDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)
