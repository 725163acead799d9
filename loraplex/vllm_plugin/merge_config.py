"""Merged mode under vLLM, the settings every process reads from the environment.

  LORAPLEX_MERGE=<name>        merge this catalog adapter (its current version) into the base weights
  LORAPLEX_MERGE_AUTO=1        or: merge the adapter with the largest share of the traffic (MergePolicy);
                               "window=256,threshold=0.7,hysteresis=0.1" sets the policy's knobs
  LORAPLEX_MERGE_RANK=<r>      ranks of --max-lora-rank reserved for the merged adapter's correction
                               (default: half of --max-lora-rank)

Rank capacity. vLLM's stacked LoRA tensors are allocated at --max-lora-rank (R) per slot. While an
adapter M is merged, a request for another adapter X runs X's slot holding [A_X; A_M], [B_X, -B_M], so
every slice needs r_X + r_M <= R. The split is static, so that the API server (which does not know
which adapter the policy merges) and every worker refuse the same adapters: served adapters may have
rank <= R - LORAPLEX_MERGE_RANK, a merged adapter rank <= LORAPLEX_MERGE_RANK. Size R as the largest
served rank plus the largest merged rank; it costs what --max-lora-rank costs (Llama-3-8B, the 7
projections in bf16: 5 MiB per rank unit per slot).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from ..config import AutoMerge
from ..errors import ConfigError
from ..runtime.merging import ENV_MERGE

ENV_MERGE_AUTO = "LORAPLEX_MERGE_AUTO"
ENV_MERGE_RANK = "LORAPLEX_MERGE_RANK"

_AUTO_KEYS = {"window": ("window_steps", int), "window_steps": ("window_steps", int),
              "threshold": ("threshold", float), "hysteresis": ("hysteresis", float)}


def _auto(text: str) -> AutoMerge | None:
    text = text.strip()
    if not text or text.lower() in ("0", "false", "no", "off"):
        return None
    if text.lower() in ("1", "true", "yes", "on"):
        return AutoMerge()
    kwargs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        field = _AUTO_KEYS.get(key.strip())
        if not sep or field is None:
            raise ConfigError(f"{ENV_MERGE_AUTO}={text!r}: expected 1 or comma-separated window=N, threshold=F, "
                              f"hysteresis=F")
        try:
            kwargs[field[0]] = field[1](value.strip())
        except ValueError:
            raise ConfigError(f"{ENV_MERGE_AUTO}={text!r}: {key.strip()} must be a number") from None
    return AutoMerge(**kwargs)


@dataclass(frozen=True)
class MergeSettings:
    pinned: str | None = None  # LORAPLEX_MERGE
    auto: AutoMerge | None = None  # LORAPLEX_MERGE_AUTO
    rank: int | None = None  # LORAPLEX_MERGE_RANK (None: half of max_lora_rank)

    @property
    def enabled(self) -> bool:
        return self.pinned is not None or self.auto is not None

    def merge_rank(self, max_lora_rank: int) -> int:
        """Ranks reserved for the merged adapter (0 when merged mode is off)."""
        if not self.enabled:
            return 0
        r = max_lora_rank // 2 if self.rank is None else self.rank
        if not 1 <= r < max_lora_rank:
            raise ConfigError(f"{ENV_MERGE_RANK}={r} must be in [1, --max-lora-rank={max_lora_rank}): the merged "
                              f"adapter's correction and the served adapter share each slot's ranks")
        return r

    def serve_rank(self, max_lora_rank: int) -> int:
        """The largest rank of an adapter served while another may be merged."""
        return max_lora_rank - self.merge_rank(max_lora_rank)


def settings(environ=None) -> MergeSettings:
    environ = os.environ if environ is None else environ
    pinned = environ.get(ENV_MERGE, "").strip() or None
    auto = _auto(environ.get(ENV_MERGE_AUTO, ""))
    if pinned is not None and auto is not None:
        raise ConfigError(f"{ENV_MERGE}={pinned!r} pins the merged adapter and {ENV_MERGE_AUTO} asks for the "
                          f"automatic policy: set one of them")
    rank = environ.get(ENV_MERGE_RANK, "").strip()
    try:
        rank_value = int(rank) if rank else None
    except ValueError:
        raise ConfigError(f"{ENV_MERGE_RANK}={rank!r} must be an integer") from None
    return MergeSettings(pinned, auto, rank_value)


def serving_lora_config(lora_config, environ=None):
    """lora_config as the rank checks of served adapters must see it: max_lora_rank lowered by the
    ranks merged mode reserves (the same object when merged mode is off)."""
    s = settings(environ)
    if lora_config is None or not s.enabled:
        return lora_config
    limited = copy.copy(lora_config)
    object.__setattr__(limited, "max_lora_rank", s.serve_rank(lora_config.max_lora_rank))
    return limited


def rank_message(lora_config, environ=None) -> str:
    """Why a served adapter's rank limit is below --max-lora-rank (empty when it is not)."""
    s = settings(environ)
    if lora_config is None or not s.enabled:
        return ""
    R = lora_config.max_lora_rank
    return (f" (merged mode reserves {s.merge_rank(R)} of --max-lora-rank {R} for the merged adapter's "
            f"correction, {ENV_MERGE_RANK}; served adapters may have rank <= {s.serve_rank(R)})")


__all__ = ["ENV_MERGE", "ENV_MERGE_AUTO", "ENV_MERGE_RANK", "MergeSettings", "rank_message", "serving_lora_config",
           "settings"]
