"""Merged mode in a vLLM worker, the weights: which base weights behind vLLM's LoRA layers can take a
merged adapter, the merged adapter's correction slab, and the merge itself.

vLLM wraps each targeted linear layer (qkv, o, gate_up, down, ...) in a LoRA layer whose `base_layer`
holds this tensor-parallel rank's shard of the weight, [out_local, in_local], the slices of a packed
layer one after another along the rows (`output_slices`). A slab piece holds exactly what the layer's
set_lora writes for this shard (slab_layout.py): A [r, in_local] and B [out_slice, r] with the scaling
folded in, so the shard's delta is B @ A for column- and row-parallel layers alike. The merge is
W' = W + B @ A per slice, in fp32, rounded once into W's dtype; unmerging copies W back from a
pristine host copy taken before the first change (runtime/merged.Pristine), never W' - B @ A.

Only plain float weights of vLLM's UnquantizedLinearMethod can be merged: quantized layers (fp8, AWQ,
GPTQ, ...) keep their weights in their own formats, and an adapter on embeddings, lm_head or layers the
slabs do not cover keeps its LoRA path; both are refused with the module named.

The CPU platform: vLLM packs each linear weight into an opaque GEMM handle (oneDNN, or sgl's packed
format) and drops `weight`. With merged mode configured (install_cpu_weights), an eager engine keeps the
plain weight beside the handle (`_loraplex_weight`, the bytes of the linear weights once more) and a
switch repacks the layers it changed; a compiled one (torch.compile may bake the handle into its graph)
runs torch's linear on the plain weight instead, which a merge writes in place, as on CUDA.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import ConfigError
from ..runtime.int8 import dequantize_into
from ..runtime.merged import FLOAT_WEIGHTS, Pristine, merged_delta
from .slab_layout import ALIGN, VllmSlab, piece_view

log = logging.getLogger("loraplex.vllm_plugin")

LINEAR_KINDS = ("single", "merged", "variable")


def _unquantized(method) -> bool:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return type(method) is UnquantizedLinearMethod


def why_not_mergeable(layer, kind: str | None) -> str | None:
    """Why `layer` (a vLLM LoRA layer of slab kind `kind`) cannot take a merged delta, or None."""
    if kind not in LINEAR_KINDS:
        what = {"embedding": "an embedding", "logits": "the lm_head (logits)"}.get(kind, type(layer).__name__)
        return f"is {what}: merged mode merges linear layers only (the adapter keeps its LoRA path there)"
    if getattr(getattr(layer, "lora_config", None), "fully_sharded_loras", False):
        return "uses fully sharded LoRA (--fully-sharded-loras), whose shards do not add up to a local delta"
    base = getattr(layer, "base_layer", None)
    method = getattr(base, "quant_method", None)
    if method is None or not _unquantized(method):
        return (f"has quantized base weights ({type(method).__name__}): fp8, AWQ, GPTQ and other formats cannot "
                f"take a merged delta")
    w = plain_weight(base)
    if w is None or type(w.data) is not torch.Tensor or w.dim() != 2 or w.dtype not in FLOAT_WEIGHTS:
        return (f"has a base weight that is not a plain float matrix ({None if w is None else type(w.data).__name__}"
                f" {None if w is None else w.dtype} {None if w is None else list(w.shape)})")
    if sum(layer.output_slices) != w.shape[0]:
        return f"has output slices {list(layer.output_slices)} that do not tile its weight's {w.shape[0]} rows"
    return None


def plain_weight(base):
    """The [out, in] weight a merge writes: the layer's own, or the plain copy kept beside a CPU GEMM handle."""
    kept = getattr(base, "_loraplex_weight", None)
    return kept if kept is not None else getattr(base, "weight", None)


def repack(base) -> None:
    """A CPU layer whose GEMM handle was packed from its plain weight: pack it again (after a merge or a
    restore wrote the plain weight)."""
    kept = getattr(base, "_loraplex_weight", None)
    if kept is None:
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    base.weight = torch.nn.Parameter(kept, requires_grad=False)
    dispatch_cpu_unquantized_gemm(base, remove_weight=True)


def check_layers(targets, modules=None) -> None:
    """ConfigError naming the first module (of `modules`, default every linear module the slabs
    cover) whose base weight cannot take a merged delta."""
    manager = targets.manager
    names = [m for m, k in targets.kinds.items() if k in LINEAR_KINDS] if modules is None else modules
    for name in names:
        why = why_not_mergeable(manager.modules.get(name), targets.kinds.get(name))
        if why is not None:
            raise ConfigError(f"merged mode: module {name} {why}. Serve without LORAPLEX_MERGE / LORAPLEX_MERGE_AUTO")


def correction_slab(slab: VllmSlab, pin: bool) -> VllmSlab:
    """The merged adapter's slab as every other request must add it: in the LoRA dtype (an int8 slab
    dequantized), each B piece negated (exact). Held outside the host cache for as long as the merge."""
    layout = slab.layout
    dtype = layout.dtype
    if layout.quant is None:
        new = layout
        buf = torch.empty(max(layout.nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        buf[:layout.nbytes].copy_(slab.buffer[:layout.nbytes])
    else:
        elem = torch.empty((), dtype=dtype).element_size()
        pieces, off = [], 0
        for p in layout.pieces:
            pieces.append(dataclasses.replace(p, offset=off, scale_offset=-1))
            off += -(-p.rows * p.cols * elem // ALIGN) * ALIGN
        new = dataclasses.replace(layout, pieces=tuple(pieces), nbytes=off, quant=None)
        buf = torch.zeros(max(off, 1), dtype=torch.uint8, pin_memory=pin)
        for p, q in zip(layout.pieces, pieces, strict=True):
            values, scales = piece_view(slab.buffer, p, dtype, layout.quant)
            dequantize_into(piece_view(buf, q, dtype, None)[0], values, scales, p.rank_dim)
    for p in new.pieces:
        if p.which == "B":
            piece_view(buf, p, dtype, None)[0].neg_()
    return VllmSlab(("loraplex-correction",) + tuple(slab.key), new, buf)


def slices_of(slab: VllmSlab) -> dict:
    """(module, slice) -> (A piece, B piece) of a slab."""
    out: dict = {}
    for p in slab.layout.pieces:
        out.setdefault((p.module, p.slice), {})[p.which] = p
    return {k: (v["A"], v["B"]) for k, v in out.items() if "A" in v and "B" in v}


class BaseMerger:
    """Writes a merged adapter into the base weights of one worker, and takes it out again."""

    def __init__(self, targets, pin: bool):
        self.targets = targets
        self.pristine = Pristine(pin=pin)
        self.delta_ratio = 0.0  # largest ||dW|| / ||W|| over the merged slices
        self._changed: set = set()  # (module, slice) merged now

    def _weight(self, module: str, si: int) -> torch.Tensor:
        layer = self.targets.manager.modules[module]
        lo = sum(layer.output_slices[:si])
        return plain_weight(layer.base_layer).data[lo:lo + layer.output_slices[si]]

    def check(self, name: str, correction: VllmSlab) -> None:
        """ConfigError naming the adapter and module unless every module it targets can be merged and
        its pieces fit the weights they merge into."""
        kinds = self.targets.kinds
        modules = sorted({p.module for p in correction.layout.pieces})
        for module in modules:
            why = why_not_mergeable(self.targets.manager.modules[module], kinds.get(module))
            if why is not None:
                raise ConfigError(f"cannot merge LoRA adapter '{name}' into the base weights: module {module} {why}; "
                                  f"it is served unmerged")
        for (module, si), (a, b) in slices_of(correction).items():
            w = self._weight(module, si)
            if (b.rows, a.cols) != tuple(w.shape):
                raise ConfigError(f"cannot merge LoRA adapter '{name}': module {module} slice {si} has a delta of "
                                  f"shape {[b.rows, a.cols]} for a base weight of shape {list(w.shape)}")

    def apply(self, correction: VllmSlab | None) -> None:
        """Restore every slice changed before (bit for bit), then merge `correction` (a negated slab:
        W - (-B) @ A), or leave the weights unmerged (None). On failure everything is restored."""
        dtype = None if correction is None else correction.layout.dtype
        pairs = {} if correction is None else slices_of(correction)
        touched = {m for m, _ in self._changed} | {m for m, _ in pairs}
        try:
            with torch.no_grad():
                self.pristine.restore()
                self.pristine.keep_only(pairs)
                ratio = 0.0
                for (module, si), (a, b) in pairs.items():
                    w = self._weight(module, si)
                    self.pristine.save((module, si), w)
                    d = merged_delta(piece_view(correction.buffer, a, dtype, None)[0],
                                     piece_view(correction.buffer, b, dtype, None)[0], "linear", w.device)
                    w32 = w.float()
                    ratio = max(ratio, float(d.norm() / w32.norm().clamp_min(1e-30)))
                    w.copy_(w32 - d)  # rounded once into the weight's dtype
                self.delta_ratio = ratio
                self._changed = set(pairs)
        except BaseException:
            with torch.no_grad():
                self.pristine.restore()
                self.pristine.keep_only(())
            self.delta_ratio = 0.0
            self._changed = set()
            raise
        finally:
            for module in touched:
                repack(self.targets.manager.modules[module].base_layer)

    @property
    def pristine_bytes(self) -> int:
        return self.pristine.nbytes


# ---- the CPU platform: keep linear weights where a merge can write them -------------------------------
LINEAR_MODULE = "vllm.model_executor.layers.linear"


def _eager() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    mode = getattr(getattr(config, "compilation_config", None), "mode", None)
    return config is not None and int(mode or 0) == 0


def _wrap_process_weights(orig):
    def process_weights_after_loading(self, layer):
        weight = getattr(layer, "weight", None)
        if not _eager():
            # vLLM's opt-out flag: the layer keeps `weight` and runs torch's linear on it
            layer._cpu_skip_gemm_dispatch = True
            return orig(self, layer)
        out = orig(self, layer)
        if weight is not None and getattr(layer, "weight", None) is not weight and weight.dim() == 2:
            layer._loraplex_weight = weight.data  # packed into a handle, and dropped: keep it for merges
        return out

    return process_weights_after_loading


def install_cpu_weights(module) -> None:
    """On the CPU platform with merged mode configured: linear layers keep their plain weights."""
    from vllm.platforms import current_platform

    from ._hooks import wrap
    from .merge_config import settings

    if current_platform.is_cpu() and settings().enabled:
        wrap(module.UnquantizedLinearMethod, "process_weights_after_loading", _wrap_process_weights)


def uninstall_cpu_weights() -> None:
    import sys

    from ._hooks import unwrap

    module = sys.modules.get(LINEAR_MODULE)
    if module is not None:
        unwrap(module.UnquantizedLinearMethod, "process_weights_after_loading")


__all__ = ["BaseMerger", "LINEAR_KINDS", "check_layers", "correction_slab", "install_cpu_weights", "slices_of",
           "why_not_mergeable"]
