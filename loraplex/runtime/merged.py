"""Merged mode, the pieces: which base weights may be merged, the correction slot's packing, the merge
arithmetic and the pristine copies that unmerging restores. The runtime's switch logic is merging.py.

One adapter version M is merged into the base weights of the modules it targets, W' = W + s_M·B_M·A_M
per slice (computed in fp32 from M's slab, rounded once into W's dtype). Then, per request:

  M's tokens              slot -1: no LoRA path at all, the base model's speed
  adapter X's tokens      X's slot holds the correction (X − M): A = [A_X; A_M], B = [B_X·s_X, −B_M·s_M],
                          rank r_X + r_M per slice; one shrink + one expand per module, as before
  base-model tokens       one pinned slot holds (− M): A = A_M, B = −B_M·s_M, rank r_M

Rank capacity: the stacked tensors are sized by RuntimeConfig.max_rank, which in merged mode must hold
r_X + r_M for every served X (per slice: rank_pattern counts). A correction that does not fit is refused
(CapacityError naming both adapters and the module): size max_rank = largest served rank + merged rank.
Nothing is resized at a switch. Memory: the stacked tensors cost max_loras x max_rank x (sum of in + out
over the wrapped slices) elements; Llama-3-8B's 7 projections in bf16: 5 MiB per rank unit per slot, so
max_rank 32 instead of 16 costs 1.25 GiB more at max_loras=16. The base-model slot is one of the
max_loras slots (pinned while merged), so it costs a slot, not memory.

The correction reuses the slabs as they are: X's slab fills ranks [0, r_X) of each slice of the slot and
M's slab, packed once per merge with its B regions negated (exact), fills [r_X, r_X + r_M). Slabs in the
host cache therefore never depend on the merged adapter; only the GPU slots do, and a switch forgets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CapacityError, ConfigError
from .slab import Slab

FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BaseWeight:
    """The base weight one slice of a target adds its LoRA delta to: module.weight[rows] (linear:
    [out_s, in], a row range of a fused module; embedding: the whole [vocab, dim] table)."""

    module: nn.Module
    path: str  # the module's path in the model, for messages
    rows: tuple[int, int] | None = None  # None: every row
    tied: tuple[str, ...] = ()  # other parameters of the model that are this very weight

    def weight(self) -> torch.Tensor:
        w = self.module.weight.data
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]


def check_mergeable(name: str, base: BaseWeight | None, module: str) -> None:
    """ConfigError naming the module unless its weight can take W + ΔW in place and be restored."""
    why = None
    if base is None:
        why = "has no base weight bound to the runtime (inject() binds them; see Runtime.bind_base)"
    elif type(base.module) not in (nn.Linear, nn.Embedding):
        why = (f"is a {type(base.module).__name__}, not a plain nn.Linear or nn.Embedding (quantized and custom "
               f"layers such as fp8, AWQ or GPTQ keep their weights in their own format)")
    else:
        w = base.module.weight
        if type(w.data) is not torch.Tensor or w.dtype not in FLOAT_WEIGHTS:
            why = (f"has {type(w.data).__name__} weights of dtype {w.dtype} (quantized base weights cannot take "
                   f"a merged delta; only float16, bfloat16 and float32 can)")
        elif base.tied:
            why = (f"shares its weight with {', '.join(base.tied)} (tied weights): merging would change both "
                   f"modules for every request")
    if why is not None:
        raise ConfigError(f"cannot merge LoRA adapter '{name}' into the base weights: module "
                          f"{base.path if base is not None else module} {why}; serve it unmerged")


def negated(slab: Slab, pin: bool) -> Slab:
    """A copy of `slab` with every B region negated (exact in any float format): what every other
    request adds to undo the merged adapter. Lives outside the host cache, for as long as the merge."""
    n = slab.layout.numel
    buf = torch.empty(max(n, 1), dtype=slab.layout.dtype, pin_memory=pin)
    buf[:n].copy_(slab.buffer[:n])
    for reg in slab.layout.regions:
        if reg.which == "B":
            buf[reg.offset:reg.offset + reg.numel].neg_()
    return Slab(slab.entry, slab.layout, buf)


def correction_ranks(own: Slab | None, minus: Slab | None, targets, max_rank: int) -> tuple:
    """[target][slice] ranks of a slot holding `own` then `minus` (own None: the base-model slot).
    CapacityError when a slice needs more than max_rank."""
    if minus is None:
        return own.layout.slice_ranks
    out = []
    for ti, t in enumerate(targets):
        row = []
        for si, sl in enumerate(t.slices):
            a = own.layout.slice_ranks[ti][si] if own is not None else 0
            b = minus.layout.slice_ranks[ti][si]
            if a + b > max_rank:
                raise CapacityError(
                    f"LoRA adapter '{own.key[0]}' cannot be served while '{minus.key[0]}' is merged: module "
                    f"{sl.peft_module} needs rank {a} + {b} = {a + b} for its correction, above max_rank="
                    f"{max_rank} (merged mode needs max_rank >= served rank + merged rank)")
            row.append(a + b)
        out.append(tuple(row))
    return tuple(out)


def stack_correction(own, merged):
    """The correction of one linear slice as plain tensors, for front ends that write slots themselves
    (the vLLM worker manager): own and merged are (A [r, in], B [out, r] with scaling folded) or None.
    Returns (A [r_own + r_merged, in], B [out, r_own + r_merged]) = ([A_own; A_m], [B_own, −B_m])."""
    parts = [p for p in (own, None if merged is None else (merged[0], -merged[1])) if p is not None]
    if not parts:
        raise ValueError("stack_correction needs at least one of own and merged")
    return torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1)


def merged_delta(a: torch.Tensor, b: torch.Tensor, kind: str, device) -> torch.Tensor:
    """ΔW of one slice in fp32 from its slab regions (linear: B [out, r] @ A [r, in]; embedding: A
    [vocab, r] @ Bᵀ [r, dim])."""
    a = a.to(device=device, dtype=torch.float32)
    b = b.to(device=device, dtype=torch.float32)
    return b @ a if kind == "linear" else a @ b.t()


class Pristine:
    """Copies of the base weights that a merge changed, taken before the first change: unmerging copies
    them back bit for bit (never W' − ΔW, which would leave rounding behind at every switch). They live
    in host memory (pinned on CUDA), one per merged slice, so they cost the bytes of the merged modules'
    weights and no GPU memory; restoring is one host-to-device copy of those bytes."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._copies: dict = {}  # (target, slice) -> (live weight view, host copy)

    def save(self, key, w: torch.Tensor) -> None:
        if key not in self._copies:
            host = torch.empty(w.shape, dtype=w.dtype, pin_memory=self.pin)
            host.copy_(w)
            self._copies[key] = (w, host)

    def restore(self) -> None:
        for w, host in self._copies.values():
            w.copy_(host)

    def keep_only(self, keys) -> None:
        keys = set(keys)
        for k in [k for k in self._copies if k not in keys]:
            del self._copies[k]

    def __contains__(self, key) -> bool:
        return key in self._copies

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for _, h in self._copies.values())


@dataclass(frozen=True)
class MergeState:
    """One merged adapter version: its negated slab and the slices (target, slice) it changed."""

    key: tuple  # (name, version)
    minus: Slab
    slices: tuple = field(default=())

    @property
    def base_key(self) -> tuple:
        """Slot-pool key of the pinned slot base-model requests use (no adapter name: never a catalog key)."""
        return (None, self.key)

    def deltas(self):
        """((target, slice), A view, −B view) for every slice of the merged adapter."""
        regs: dict = {}
        for reg in self.minus.layout.regions:
            regs.setdefault((reg.target, reg.slice), {})[reg.which] = reg
        for k, ab in regs.items():
            yield k, self.minus.view(ab["A"]), self.minus.view(ab["B"])


__all__ = ["BaseWeight", "MergeState", "Pristine", "check_mergeable", "correction_ranks", "merged_delta",
           "negated", "stack_correction"]
