"""Slab: one adapter's weights packed into one contiguous host buffer, in the slot pool's order.

Regions follow the registered targets (registration order), then their slices, A before B. Each
region holds the real rank only (rank_pattern honoured), so the host cache spends no bytes on padding;
the upload pads into the slot. Scaling is folded into B in the target dtype, computed in fp32 first,
exactly as LoraTarget.write_slot does, so the fast path and the reference write agree bit for bit.

Region shapes in the slab, and where they land in a slot:
  linear A     [r, in]     -> A[s][slot, :r, :]      (a contiguous prefix of the slot)
  linear B     [out, r]    -> B[s][slot, :, :r]
  embedding A  [vocab, r]  -> A[0][slot, :, :r]      (PEFT stores [r, vocab]; transposed while packing)
  embedding B  [dim, r]    -> B[0][slot, :, :r]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..errors import InvalidAdapter

log = logging.getLogger("loraplex.runtime")

_ALIGN = 32  # elements: keeps every region 64-byte aligned in fp16, so copies run at full width


@dataclass(frozen=True)
class Region:
    target: int  # index in the registered targets
    slice: int
    which: str  # "A" | "B"
    key: str  # tensor key in the weight file
    offset: int  # first element in the slab
    rows: int  # shape in the slab (see the module docstring)
    cols: int
    rank: int
    row_prefix: bool  # True: fills the first `rank` rows of the slot; False: the first `rank` columns
    transpose: bool  # the file holds the transpose of the slab shape (embedding A)
    scale: float | None  # B only: scaling folded in while packing

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class SlabLayout:
    """Where every tensor of one adapter goes, computed from the file header alone (no data read)."""

    regions: tuple[Region, ...]
    numel: int
    dtype: torch.dtype
    slice_ranks: tuple[tuple[int, ...], ...]  # [target][slice] real rank, 0 = module not targeted
    ignored: tuple[str, ...]  # adapter modules that no registered target wraps
    generation: int = 0  # the target registry this layout was made for (a slab of another is not uploaded)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def target_ranks(self) -> tuple[int, ...]:
        return tuple(max(r, default=0) for r in self.slice_ranks)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_layout(name: str, spec, modules: dict, targets, max_rank: int, dtype: torch.dtype,
                unmatched: str = "warn", generation: int = 0) -> SlabLayout:
    """SlabLayout of an adapter over `targets`; InvalidAdapter names the adapter and the problem.

    modules: {PEFT module path: ModuleWeights} as the catalog's layout() returns it.
    unmatched: what to do with adapter modules no target wraps: "ignore", "warn" or "error".
    """
    regions, slice_ranks, used = [], [], set()
    off = 0

    def add(**kw):
        nonlocal off
        reg = Region(offset=off, **kw)
        regions.append(reg)
        off += -(-reg.numel // _ALIGN) * _ALIGN

    for ti, target in enumerate(targets):
        ranks = []
        for si, sl in enumerate(target.slices):
            mw = modules.get(sl.peft_module)
            if mw is None:
                ranks.append(0)
                continue
            used.add(sl.peft_module)
            _check_module(name, mw, target, sl, max_rank)
            r = mw.rank
            scale = float(spec.scaling_for(sl.peft_module))
            if target.kind == "linear":
                add(target=ti, slice=si, which="A", key=mw.a_key, rows=r, cols=sl.in_features, rank=r,
                    row_prefix=True, transpose=False, scale=None)
            else:
                add(target=ti, slice=si, which="A", key=mw.a_key, rows=sl.in_features, cols=r, rank=r,
                    row_prefix=False, transpose=True, scale=None)
            add(target=ti, slice=si, which="B", key=mw.b_key, rows=sl.out_features, cols=r, rank=r,
                row_prefix=False, transpose=False, scale=scale)
            ranks.append(r)
        slice_ranks.append(tuple(ranks))
    ignored = tuple(sorted(set(modules) - used))
    if ignored and unmatched == "error":
        raise InvalidAdapter(name, f"modules {list(ignored)} are not wrapped by any registered LoRA target")
    if ignored and unmatched == "warn":
        log.warning("LoRA adapter '%s': modules %s are not wrapped by any registered target; they are ignored",
                    name, list(ignored))
    if not used:
        raise InvalidAdapter(name, "none of its modules is wrapped by a registered LoRA target")
    return SlabLayout(tuple(regions), off, dtype, tuple(slice_ranks), ignored, generation)


def _check_module(name, mw, target, sl, max_rank: int) -> None:
    m = sl.peft_module
    if mw.rank > max_rank:
        raise InvalidAdapter(name, f"module {m} has rank {mw.rank}, larger than max_rank={max_rank}")
    kind = "embedding" if mw.embedding else "linear"
    if kind != target.kind:
        raise InvalidAdapter(name, f"module {m} holds {kind} LoRA weights but target {target.name} is {target.kind}")
    if (mw.in_features, mw.out_features) != (sl.in_features, sl.out_features):
        what = ("vocab, dim" if mw.embedding else "in, out")
        raise InvalidAdapter(
            name,
            f"module {m} has ({what}) = ({mw.in_features}, {mw.out_features}) but the model's module is "
            f"({sl.in_features}, {sl.out_features})",
        )


class Slab:
    """An adapter packed for upload: `buffer` (1-D, target dtype, pinned when CUDA is available)."""

    def __init__(self, entry, layout: SlabLayout, buffer: torch.Tensor):
        self.entry = entry
        self.key = entry.key
        self.layout = layout
        self.buffer = buffer

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def view(self, region: Region) -> torch.Tensor:
        return self.buffer[region.offset:region.offset + region.numel].view(region.rows, region.cols)

    def __repr__(self):
        return f"Slab({self.key[0]!r}, {self.nbytes} bytes, {len(self.layout.regions)} regions)"


def allocate(layout: SlabLayout, pin: bool) -> torch.Tensor:
    # no zero fill: pack() writes every region and zeroes the alignment gaps itself
    return torch.empty(max(layout.numel, 1), dtype=layout.dtype, pin_memory=pin)


def pack(name: str, reader, layout: SlabLayout, buffer: torch.Tensor) -> None:
    """Copy every tensor from the reader straight into its region (converting dtype, folding scale)."""
    ends = [r.offset for r in layout.regions[1:]] + [layout.numel]
    for reg, end in zip(layout.regions, ends, strict=True):
        if end > reg.offset + reg.numel:  # alignment gap: zeroed so the finiteness check can scan it
            buffer[reg.offset + reg.numel:end].zero_()
        src = reader.tensor(reg.key)
        if reg.transpose:
            src = src.t()
        dst = buffer[reg.offset:reg.offset + reg.numel].view(reg.rows, reg.cols)
        if tuple(src.shape) != (reg.rows, reg.cols):
            want = [reg.rows, reg.cols]
            raise InvalidAdapter(name, f"tensor {reg.key!r} has shape {list(src.shape)}, expected {want}")
        if reg.scale is None:
            dst.copy_(src)
        else:
            if src.dtype not in (torch.float32, torch.float64, dst.dtype):
                # fold the scale at fp32 or better, rounding once into the target dtype; a half-precision
                # source of the target's own dtype already computes in fp32 (opmath) and rounds once
                src = src.float()
            torch.mul(src, reg.scale, out=dst)
    _check_finite(name, layout, buffer)


def _check_finite(name: str, layout: SlabLayout, buffer: torch.Tensor) -> None:
    # One reduction pass: a NaN or an infinity makes the fp32 sum non-finite (isfinite().all() costs
    # ~20x more on the CPU: it writes a bool per element). Only then look closer, region by region; a
    # sum that overflowed on huge but finite values is let through by that closer look.
    if layout.numel == 0 or math.isfinite(float(torch.sum(buffer[:layout.numel], dtype=torch.float32))):
        return
    for reg in layout.regions:  # only on failure: find the tensor to name in the error
        if not bool(torch.isfinite(buffer[reg.offset:reg.offset + reg.numel]).all()):
            what = " after scaling" if reg.scale else ""
            raise InvalidAdapter(name, f"tensor {reg.key!r} holds NaN or infinite values{what}, or values beyond "
                                       f"the range of {layout.dtype}")


__all__ = ["Region", "Slab", "SlabLayout", "allocate", "pack", "plan_layout"]
