"""An adapter as one host slab packed for vLLM's stacked LoRA tensors (what set_lora would copy).

vLLM keeps, per LoRA module of LoRAModelManager.modules, `lora_a_stacked[i]` [max_loras, 1, R, K]
and `lora_b_stacked[i]` [max_loras, 1, N, R] per slice (the embedding's A is [max_loras, vocab, R]),
and activate_adapter copies an adapter into one slot module by module: 2 host->device copies per
slice plus a zero fill of the whole slot. Here the same weights, exactly as set_lora would write
them (packed qkv/gate_up slices, scaling folded into B the way vLLM folds it, this worker's tensor-
parallel shard cut by the layer's own slice_lora_a/slice_lora_b, the embedding's A transposed), are
laid out back to back in one contiguous buffer at the adapter's real rank. One copy moves them all.

A piece lands in its slot as the block [:rows, :cols] of a stacked tensor's 2-D slot view
(`VllmTargets.slot_view`); everything else in that slot view must be zero (slab_upload.py).

Modules whose layer class this file does not know (MoE, classification heads, a future subclass
overriding set_lora) are "uncovered": they keep vLLM's own set_lora path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidAdapter
from ..runtime.int8 import quantize_into

ALIGN = 64  # bytes: every piece starts on a cache line (full-width copies, int8 and fp32 alike)
QUANTS = (None, "int8")


@dataclass(frozen=True)
class Piece:
    module: str  # name in LoRAModelManager.modules
    which: str  # "A" | "B"
    slice: int
    offset: int  # bytes into the slab
    rows: int  # block [:rows, :cols] of the slot view
    cols: int
    rank_dim: int  # 0: the rank runs along rows (linear A), 1: along columns (B, embedding A)
    scale_offset: int = -1  # int8 slabs: bytes into the slab of the fp32 scales (one per rank)

    @property
    def rank(self) -> int:
        return self.cols if self.rank_dim else self.rows


@dataclass(frozen=True)
class VllmSlabLayout:
    pieces: tuple[Piece, ...]
    nbytes: int  # what one copy moves; the host cache reserves exactly this (arena-rounded)
    dtype: torch.dtype  # vLLM's lora dtype (the stacked tensors')
    quant: str | None
    ranks: dict  # module -> real rank (max over its slices), 0 for covered modules the adapter skips

    @property
    def signature(self) -> tuple:
        """Equal for adapters whose pieces have the same places and shapes (upload caches views by it)."""
        return (self.quant, self.dtype) + tuple((p.module, p.which, p.slice, p.rows, p.cols) for p in self.pieces)

    @property
    def rank(self) -> int:
        return max(self.ranks.values(), default=0)


class VllmSlab:
    """One adapter version packed for vLLM: `buffer` (uint8, in the host arena) holds every piece."""

    def __init__(self, key, layout: VllmSlabLayout, buffer: torch.Tensor):
        self.key = key
        self.layout = layout
        self.buffer = buffer  # the host cache may move it (compaction) while no upload holds a lease

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def __repr__(self):
        return f"VllmSlab({self.key!r}, {self.nbytes} bytes, {len(self.layout.pieces)} pieces)"


def _view(buffer, off, numel, dtype, shape):
    size = torch.empty((), dtype=dtype).element_size()
    return buffer[off:off + numel * size].view(dtype).view(shape)


def piece_view(buffer: torch.Tensor, p: Piece, dtype: torch.dtype, quant: str | None):
    """(values, scales) of a piece in a uint8 buffer laid out like the slab (the slab or a device copy)."""
    if quant == "int8":
        return (_view(buffer, p.offset, p.rows * p.cols, torch.int8, (p.rows, p.cols)),
                _view(buffer, p.scale_offset, p.rank, torch.float32, (p.rank,)))
    return _view(buffer, p.offset, p.rows * p.cols, dtype, (p.rows, p.cols)), None


class VllmTargets:
    """The modules of a LoRAModelManager that slabs cover, and where each piece lands."""

    def __init__(self, manager):
        from vllm.lora.layers import ClassificationHeadWithLoRA

        from .slab_weights import layer_kind

        self.manager = manager
        self.dtype = manager.lora_config.lora_dtype
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"lora dtype must be resolved to a torch.dtype, got {self.dtype!r}")
        self.kinds: dict[str, str] = {}
        self.uncovered: tuple[str, ...] = ()
        uncovered = []
        for name, module in manager.modules.items():
            kind = None if isinstance(module, ClassificationHeadWithLoRA) else layer_kind(module)
            if kind is None:
                uncovered.append(name)
            else:
                self.kinds[name] = kind
        self.uncovered = tuple(uncovered)

    def stacked(self, module: str, which: str) -> list[torch.Tensor]:
        m = self.manager.modules[module]
        t = m.lora_a_stacked if which == "A" else m.lora_b_stacked
        return list(t) if isinstance(t, (tuple, list)) else [t]

    def slot_view(self, module: str, which: str, si: int, slot: int) -> torch.Tensor:
        """The 2-D block of one slot that set_lora writes into: [R, K] / [N, R] ([vocab, R])."""
        t = self.stacked(module, which)[si][slot]
        return t[0] if t.dim() == 3 else t

    def max_nbytes(self, quant: str | None = None, rank: int | None = None, kinds=None) -> int:
        """Bytes of the largest possible slab (every covered slice at max_lora_rank, or at `rank`; of
        the modules of these `kinds` only, default all): the staging size."""
        elem = 1 if quant == "int8" else torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for module, kind in self.kinds.items():
            if kinds is not None and kind not in kinds:
                continue
            for which in "AB":
                for si in range(len(self.stacked(module, which))):
                    rows, cols = self.slot_view(module, which, si, 0).shape
                    if rank is not None:  # the rank runs along the rows of a linear A, else the columns
                        if which == "A" and kind != "embedding":
                            rows = min(rows, rank)
                        else:
                            cols = min(cols, rank)
                    total += -(-rows * cols * elem // ALIGN) * ALIGN
                    if quant == "int8":
                        total += -(-4 * max(rows, cols) // ALIGN) * ALIGN  # an upper bound on the rank
        return total

    def shell(self, lora_model):
        """What vLLM's own CPU cache (max_cpu_loras) may hold for a slab-backed adapter: the same id
        and rank, the weights of uncovered modules and modules_to_save only (so no second copy of
        what the slab holds; the LoRA weights of covered modules are dropped)."""
        from vllm.lora.lora_model import LoRAModel

        keep = set(self.uncovered)
        loras = {k: v for k, v in lora_model.loras.items()
                 if k in keep or any(k in self.manager.packed_modules.get(u, ()) for u in keep)}
        return LoRAModel(lora_model.id, lora_model.rank, loras, modules_to_save=lora_model.modules_to_save)

    def layout(self, name: str, lora_model, quant: str | None = None) -> VllmSlabLayout:
        """The slab layout of `lora_model` (a vLLM LoRAModel, before or after vLLM's packing), from
        tensor shapes alone. InvalidAdapter names the adapter `name` and the module that does not fit."""
        from .slab_weights import module_weights

        if quant not in QUANTS:
            raise ValueError(f"host slab quantization must be one of {QUANTS}, got {quant!r}")
        pieces, ranks, off = [], {}, 0

        def take(n):
            nonlocal off
            at = off
            off += -(-n // ALIGN) * ALIGN
            return at

        elem = 1 if quant == "int8" else torch.empty((), dtype=self.dtype).element_size()
        for module, kind in self.kinds.items():
            slices = module_weights(self.manager, lora_model, module, kind)
            ranks[module] = 0
            for si, (a, b, _) in enumerate(slices or ()):
                for which, t in (("A", a), ("B", b)):
                    if t is None:
                        continue
                    if kind == "embedding" and which == "A":  # stored transposed: [vocab, r]
                        rows, cols, rank_dim = t.shape[1], t.shape[0], 1
                    else:
                        rows, cols, rank_dim = t.shape[0], t.shape[1], 0 if which == "A" else 1
                    full = self.slot_view(module, which, si, 0).shape
                    if rows > full[0] or cols > full[1]:
                        raise InvalidAdapter(name, f"module {module} ({which}, slice {si}) has shape "
                                                   f"{[rows, cols]}, larger than vLLM's {list(full)}")
                    at = take(rows * cols * elem)
                    rank = cols if rank_dim else rows
                    s_at = take(rank * 4) if quant == "int8" else -1
                    pieces.append(Piece(module, which, si, at, rows, cols, rank_dim, s_at))
                    ranks[module] = max(ranks[module], rank)
        if not pieces:
            raise InvalidAdapter(name, "none of its modules is a LoRA module of this model")
        return VllmSlabLayout(tuple(pieces), off, self.dtype, quant, ranks)

    def pack(self, name: str, lora_model, layout: VllmSlabLayout, buffer: torch.Tensor) -> None:
        """Write every piece of `lora_model` into `buffer` (uint8, >= layout.nbytes) as set_lora would
        place it: converted to the lora dtype, then scaled (vLLM's order and rounding), transposed
        for the embedding's A; int8 slabs quantize that 16-bit value. Gaps are zeroed, so the bytes
        one copy moves are all defined."""
        from .slab_weights import module_weights

        if buffer.dtype != torch.uint8 or buffer.numel() < layout.nbytes:
            raise ValueError(f"slab buffer must be uint8 with >= {layout.nbytes} bytes")
        _zero_gaps(layout, buffer)
        by_module: dict = {}
        for p in layout.pieces:
            by_module.setdefault(p.module, []).append(p)
        for module, pieces in by_module.items():
            slices = module_weights(self.manager, lora_model, module, self.kinds[module])
            for p in pieces:
                a, b, scale = slices[p.slice]
                src = a if p.which == "A" else b
                if self.kinds[module] == "embedding" and p.which == "A":
                    src = src.t()
                if tuple(src.shape) != (p.rows, p.cols):
                    raise InvalidAdapter(name, f"module {module} ({p.which}, slice {p.slice}) changed shape "
                                               f"from {[p.rows, p.cols]} to {list(src.shape)} while packing")
                if src.dtype != self.dtype:
                    src = src.to(self.dtype)  # vLLM converts to the lora dtype before it scales
                dst, s = piece_view(buffer, p, self.dtype, layout.quant)
                if layout.quant is None:
                    _fold(dst, src, scale if p.which == "B" else 1)
                else:
                    val = torch.empty((p.rows, p.cols), dtype=self.dtype)
                    _fold(val, src, scale if p.which == "B" else 1)
                    quantize_into(val, dst, s, p.rank_dim)
        _check_finite(name, layout, buffer)


def _zero_gaps(layout, buffer) -> None:
    """Zero the alignment gaps (the pieces themselves are written whole), so every byte a copy moves
    is defined."""
    elem = 1 if layout.quant == "int8" else torch.empty((), dtype=layout.dtype).element_size()
    used = sorted([(p.offset, p.rows * p.cols * elem) for p in layout.pieces]
                  + [(p.scale_offset, p.rank * 4) for p in layout.pieces if p.scale_offset >= 0])
    end = 0
    for off, n in used + [(layout.nbytes, 0)]:
        if off > end:
            buffer[end:off].zero_()
        end = max(end, off + n)


def _fold(dst, src, scale) -> None:
    if scale == 1:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)  # the rounding of vLLM's in-place `lora_b *= scaling`


def _check_finite(name, layout, buffer) -> None:
    # 16-bit: one fp32 sum over the whole slab (a NaN or an infinity makes it non-finite); int8: the
    # scales (the int8 values are finite by construction). Only on failure, look piece by piece.
    if layout.quant is None:
        n = layout.nbytes // torch.empty((), dtype=layout.dtype).element_size()
        if math.isfinite(float(torch.sum(buffer[:layout.nbytes].view(layout.dtype)[:n], dtype=torch.float32))):
            return
    for p in layout.pieces:
        v, s = piece_view(buffer, p, layout.dtype, layout.quant)
        if not bool(torch.isfinite(v if s is None else s).all()):
            raise InvalidAdapter(name, f"module {p.module} ({p.which}) holds NaN or infinite values, or values "
                                       f"beyond the range of {layout.dtype} after scaling")


def pack_into(host_cache, key, targets: VllmTargets, lora_model, quant: str | None = None, pin: bool = False):
    """Reserve the slab's exact bytes in the runtime's host cache (evicting as its policy says), pack
    `lora_model` into them and commit: the VllmSlab the cache now holds for `key` ((name, version))."""
    layout = targets.layout(key[0], lora_model, quant)
    res = host_cache.reserve(key, layout.nbytes)
    try:
        buf = host_cache.buffer_for(res, layout.nbytes, torch.uint8, pin)
        targets.pack(key[0], lora_model, layout, buf)
    except BaseException:
        host_cache.cancel(res)
        raise
    return host_cache.commit(res, VllmSlab(key, layout, buf))


__all__ = ["ALIGN", "Piece", "VllmSlab", "VllmSlabLayout", "VllmTargets", "pack_into", "piece_view"]
