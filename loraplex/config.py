"""RuntimeConfig and CatalogConfig: plain data, validated at construction; no torch import."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

CATALOG_TYPES = ("memory", "storage")
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class CatalogConfig:
    """Which catalog serves adapters. `storage` needs a path; `memory` must not have one."""

    catalog_type: str = "memory"
    catalog_path: str | None = None

    def __post_init__(self) -> None:
        if self.catalog_type not in CATALOG_TYPES:
            raise ConfigError(f"catalog_type must be one of {CATALOG_TYPES}, got {self.catalog_type!r}")
        if self.catalog_type == "storage" and not self.catalog_path:
            raise ConfigError("catalog_type='storage' needs catalog_path (a directory or an fsspec URL)")
        if self.catalog_type == "memory" and self.catalog_path:
            raise ConfigError(
                "catalog_path is only used with catalog_type='storage'; the two catalog types are "
                "mutually exclusive"
            )


@dataclass(frozen=True)
class AutoMerge:
    """The automatic merge policy (runtime/merge_policy.py): over the last `window_steps` steps, the
    adapter with the largest share of the tokens is merged once its share reaches `threshold`, and stays
    merged until its share falls below `threshold - hysteresis`. After every switch a full window passes
    before the next decision."""

    window_steps: int = 256
    threshold: float = 0.7
    hysteresis: float = 0.1

    def __post_init__(self):
        if self.window_steps < 1:
            raise ConfigError(f"AutoMerge.window_steps must be >= 1, got {self.window_steps}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"AutoMerge.threshold must be in (0, 1], got {self.threshold}")
        if not 0 <= self.hysteresis < self.threshold:
            raise ConfigError(f"AutoMerge.hysteresis must be in [0, threshold), got {self.hysteresis}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Sizes of the two cache tiers and of the stacked GPU weights.

    max_loras: GPU slots (adapters resident at once). max_rank: padding of the stacked weights.
    host_cache_bytes: byte budget of the pinned host LRU; max_cpu_loras: optional count cap on it.
    merge_adapter: merged mode pinned to this adapter (else $LORAPLEX_MERGE); merge_auto: the automatic
    policy instead (off by default). Merged mode needs max_rank >= served rank + merged rank.
    """

    max_loras: int = 8
    max_rank: int = 16
    host_cache_bytes: int = 2 << 30
    max_cpu_loras: int | None = None
    dtype: str = "float16"
    device: str | None = None  # None: cuda if available, else cpu
    load_workers: int = 4
    eviction_policy: str = "lru"
    max_num_tokens: int = 8192  # tokens per step: size of the static plan buffers
    load_timeout_s: float = 60.0  # a plan waits this long for a load, a busy GPU slot or host room
    unmatched_modules: str = "warn"  # adapter modules no registered target wraps: ignore | warn | error
    upload_mode: str = "staged"  # CUDA: staged (one H2D + device scatter) | direct (one H2D per tensor)
    # host slabs as int8 with one fp32 scale per rank component (vLLM slabs: vllm_plugin/slab_layout.py):
    # ~2x the adapters per host byte and half the bytes per miss, dequantized where the weights land.
    # Off by default: on the toy model it changed greedy tokens in 4 of 64 requests (bench/int8_slabs.py).
    host_slab_quant: str | None = None  # None | "int8"
    merge_adapter: str | None = None  # merged mode: this adapter's weights are merged into the base
    merge_auto: AutoMerge | None = None  # merged mode chosen from traffic (mutually exclusive with the above)

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_rank < 1:
            raise ConfigError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.host_cache_bytes < 0:
            raise ConfigError(f"host_cache_bytes must be >= 0, got {self.host_cache_bytes}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ConfigError(f"max_cpu_loras must be >= 1 or None, got {self.max_cpu_loras}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_workers < 1:
            raise ConfigError(f"load_workers must be >= 1, got {self.load_workers}")
        if self.max_num_tokens < 1:
            raise ConfigError(f"max_num_tokens must be >= 1, got {self.max_num_tokens}")
        if not self.load_timeout_s > 0:
            raise ConfigError(f"load_timeout_s must be > 0, got {self.load_timeout_s}")
        if self.unmatched_modules not in ("ignore", "warn", "error"):
            raise ConfigError(f"unmatched_modules must be ignore, warn or error, got {self.unmatched_modules!r}")
        if self.host_slab_quant not in (None, "int8"):
            raise ConfigError(f"host_slab_quant must be None or 'int8', got {self.host_slab_quant!r}")
        if self.upload_mode not in ("staged", "direct"):
            raise ConfigError(f"upload_mode must be 'staged' or 'direct', got {self.upload_mode!r}")
        if self.merge_adapter is not None and self.merge_auto is not None:
            raise ConfigError("merge_adapter pins the merged adapter and merge_auto chooses it from traffic: "
                              "set one of them")
        if self.merge_auto is not None and not isinstance(self.merge_auto, AutoMerge):
            raise ConfigError(f"merge_auto must be an AutoMerge or None, got {self.merge_auto!r}")
