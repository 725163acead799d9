"""A Runtime over the tiny Llama's targets (fp32 on CPU), as the runtime tests build it."""

from __future__ import annotations

from loraplex import RuntimeConfig
from loraplex.runtime import Runtime

from ..runtime.helpers import add_llama_targets


def new_runtime(catalog, **cfg) -> Runtime:
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("device", "cpu")
    rt = Runtime(catalog, RuntimeConfig(**cfg))
    add_llama_targets(rt)
    return rt
