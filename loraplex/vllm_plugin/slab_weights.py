"""Per slice, the A and B that vLLM's set_lora would copy into a module's stacked tensors.

set_lora does more than copy: a merged layer (qkv, gate_up) takes one (A, B) per slice and expands a
packed group that covers several slices; a layer with three or more slices splits one B by its
output sizes; under tensor parallelism every layer cuts its own shard with slice_lora_a/slice_lora_b.
This module repeats those steps by calling the layer's own methods, so a slab holds exactly what the
layer would hold, and nothing here is copied from vLLM. Layers are recognised by the identity of
their set_lora and reset_lora: a subclass that overrides either is not recognised and keeps vLLM's
path (layer_kind returns None).
"""

from __future__ import annotations

import torch


def _known():
    from vllm.lora.layers import (
        LogitsProcessorWithLoRA,
        MergedColumnParallelLinearVariableSliceWithLoRA,
        MergedColumnParallelLinearWithLoRA,
        VocabParallelEmbeddingWithLoRA,
    )
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    base_reset = BaseLinearLayerWithLoRA.reset_lora
    return {
        (BaseLinearLayerWithLoRA.set_lora, base_reset): "single",
        (MergedColumnParallelLinearWithLoRA.set_lora, base_reset): "merged",
        (MergedColumnParallelLinearVariableSliceWithLoRA.set_lora, base_reset): "variable",
        (VocabParallelEmbeddingWithLoRA.set_lora, VocabParallelEmbeddingWithLoRA.reset_lora): "embedding",
        (LogitsProcessorWithLoRA.set_lora, LogitsProcessorWithLoRA.reset_lora): "logits",
    }


_KNOWN = None


def layer_kind(module) -> str | None:
    """"single" | "merged" | "variable" | "embedding" | "logits", or None (not covered by slabs)."""
    global _KNOWN
    if _KNOWN is None:
        _KNOWN = _known()
    kind = _KNOWN.get((type(module).set_lora, type(module).reset_lora))
    if kind == "single" and getattr(module, "n_slices", 1) != 1:
        return None
    return kind


def _scaled(b, scale):
    return b if b is None or scale == 1 else b * scale  # vLLM's rounding: in the lora dtype


def _raw(manager, lora_model, module):
    """(A, B, scaling) as vLLM holds them for `module`: after vLLM's packing (lists for merged
    modules, scaling folded), or before it (the packed module's parts, scaling not yet folded).
    None if the adapter has no weights for the module."""
    lora = manager._get_lora_layer_weights(lora_model, module)
    if lora is not None:
        return lora.lora_a, lora.lora_b, lora.scaling
    parts = [lora_model.get_lora(p) for p in manager.packed_modules.get(module, ())]
    if not any(parts):
        return None
    return ([p.lora_a if p else None for p in parts], [p.lora_b if p else None for p in parts],
            [p.scaling if p else 1 for p in parts])


def module_weights(manager, lora_model, module: str, kind: str):
    """[(A, B, scale)] per slice of `module`, after the layer's expansion and tensor-parallel slicing,
    or None. A [r, K] (embedding: [r, vocab]), B [N, r]; B still needs `scale` folded in (1: done)."""
    raw = _raw(manager, lora_model, module)
    if raw is None:
        return None
    a, b, scale = raw
    layer = manager.modules[module]
    if kind in ("embedding", "logits", "single"):
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            raise ValueError(f"module {module}: a {kind} LoRA layer takes one A and one B, got lists")
        if kind == "single" and layer.tp_size > 1:
            a, b = layer.slice_lora_a(a), layer.slice_lora_b(b)
        return [(a, b, 1 if scale is None else scale)]
    if kind == "variable":
        n = layer.n_slices
        if isinstance(a, torch.Tensor):
            a = [a] * n
        if isinstance(b, torch.Tensor):
            b = list(torch.split(b, list(layer.base_layer.output_sizes), dim=0))
            scale = [scale] * n
    a, b = list(a), list(b)
    scale = [1 if s is None else s for s in (scale if isinstance(scale, (list, tuple)) else [scale] * len(b))]
    if len(b) != layer.n_slices:  # a packed group covering several slices: fold first, then expand
        a, b = layer.expand_packed_lora(a, [_scaled(x, s) for x, s in zip(b, scale, strict=True)])
        scale = [1] * len(b)
    if layer.tp_size > 1:
        a, b = layer.slice_lora_a(a), layer.slice_lora_b(b)
    return list(zip(a, b, scale, strict=True))


__all__ = ["layer_kind", "module_weights"]
