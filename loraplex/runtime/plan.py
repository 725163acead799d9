"""BatchPlan: per-step kernel metadata, computed once per step and shared by every LoRA layer.

Built on the device from a per-token slot tensor with torch ops only (no host sync), into buffers
allocated once at max size, so a CUDA graph that captured the kernels can be replayed with new plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LaunchError


@dataclass
class BatchPlan:
    """Views into PlanBuffers for one step of `num_tokens` tokens.

    token_slots[T]        int32  slot of each token, -1 = no adapter (row left untouched)
    sorted_token_ids[T]   int32  token indices sorted by slot (stable); tokens of slot s are
                                 sorted_token_ids[slot_start[s] : slot_start[s] + slot_count[s]]
    slot_start[L]         int32  start of each slot's segment in sorted_token_ids
    slot_count[L]         int32  tokens per slot (0 for slots not in this batch)
    active_slots[L]       int32  slots with >= 1 token first (ascending), then the others
    num_active[1]         int32  how many entries of active_slots are real (device scalar)
    slot_ranks[L]         int32  real rank per slot (0 = empty slot), so kernels skip padding
    max_active            int    host-side upper bound on num_active (grid size); defaults to L
    """

    num_tokens: int
    token_slots: torch.Tensor
    sorted_token_ids: torch.Tensor
    slot_start: torch.Tensor
    slot_count: torch.Tensor
    active_slots: torch.Tensor
    num_active: torch.Tensor
    slot_ranks: torch.Tensor
    max_active: int
    max_tokens: int
    max_loras: int

    @property
    def device(self):
        return self.token_slots.device


class PlanBuffers:
    """Static buffers for plans of up to `max_tokens` tokens over `max_loras` slots."""

    def __init__(self, max_tokens: int, max_loras: int, device="cpu"):
        if max_tokens < 1 or max_loras < 1:
            raise LaunchError(f"PlanBuffers needs max_tokens >= 1 and max_loras >= 1, got {max_tokens}, {max_loras}")
        self.max_tokens = max_tokens
        self.max_loras = max_loras
        self.device = torch.device(device)
        i32 = dict(dtype=torch.int32, device=self.device)
        self.token_slots = torch.full((max_tokens,), -1, **i32)
        self.sorted_token_ids = torch.zeros(max_tokens, **i32)
        # scratch for build(): every intermediate has a home, so a step allocates nothing on the device
        self._sorted_slots = torch.zeros(max_tokens, **i32)
        self._sort_idx = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
        self._bucket = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)  # slot + 1 per token
        self._ones = torch.ones(max_tokens, dtype=torch.int64, device=self.device)
        self._counts = torch.zeros(max_loras + 1, dtype=torch.int64, device=self.device)
        self._starts = torch.zeros(max_loras + 1, dtype=torch.int64, device=self.device)
        self._present = torch.zeros(max_loras, **i32)
        self._absent = torch.zeros(max_loras, dtype=torch.int8, device=self.device)
        self._absent_sorted = torch.zeros(max_loras, dtype=torch.int8, device=self.device)
        self._active_idx = torch.zeros(max_loras, dtype=torch.int64, device=self.device)
        self.slot_start = torch.zeros(max_loras, **i32)
        self.slot_count = torch.zeros(max_loras, **i32)
        self.active_slots = torch.arange(max_loras, **i32)
        self.num_active = torch.zeros(1, **i32)
        self.slot_ranks = torch.zeros(max_loras, **i32)

    def build(self, token_slots: torch.Tensor, slot_ranks: torch.Tensor | None = None,
              max_active: int | None = None) -> BatchPlan:
        """Fill the buffers from token_slots[T] (int32 on this device, values in [-1, max_loras)).

        slot_ranks[max_loras] (int32) is copied in if given; max_active, if the caller knows how many
        distinct adapters the batch has (the runtime does, on the host), bounds the kernels' grid.
        """
        T = token_slots.numel()
        if token_slots.dim() != 1 or self.max_tokens < T:
            raise LaunchError(
                f"token_slots must be 1-D with at most {self.max_tokens} tokens, got {tuple(token_slots.shape)}"
            )
        if token_slots.dtype != torch.int32 or token_slots.device != self.device:
            raise LaunchError(
                f"token_slots must be int32 on {self.device}, got {token_slots.dtype} on {token_slots.device}"
            )
        L = self.max_loras
        slots = self.token_slots[:T]
        if token_slots.data_ptr() != slots.data_ptr():
            slots.copy_(token_slots)
        if slot_ranks is not None:
            self.slot_ranks.copy_(slot_ranks)
        if T:
            # stable sort keeps each segment's tokens in order; -1 tokens sort first, outside all segments
            torch.sort(slots, stable=True, out=(self._sorted_slots[:T], self._sort_idx[:T]))
            self.sorted_token_ids[:T].copy_(self._sort_idx[:T])
        counts = self._counts
        counts.zero_()
        torch.add(slots, 1, out=self._bucket[:T])  # -1 tokens count in counts[0], outside all segments
        counts.scatter_add_(0, self._bucket[:T], self._ones[:T])
        torch.cumsum(counts, 0, out=self._starts)  # starts[s] = tokens with slot < s (index s-1 in counts)
        self.slot_count.copy_(counts[1:])
        self.slot_start.copy_(self._starts[:-1])
        torch.gt(counts[1:], 0, out=self._present)
        # slots with tokens first: a stable sort of "absent" keeps ascending slot order in each group
        torch.eq(counts[1:], 0, out=self._absent)
        torch.sort(self._absent, stable=True, out=(self._absent_sorted, self._active_idx))
        self.active_slots.copy_(self._active_idx)
        torch.sum(self._present, 0, keepdim=True, dtype=torch.int32, out=self.num_active)
        return BatchPlan(
            num_tokens=T,
            token_slots=slots,
            sorted_token_ids=self.sorted_token_ids[:T],
            slot_start=self.slot_start,
            slot_count=self.slot_count,
            active_slots=self.active_slots,
            num_active=self.num_active,
            slot_ranks=self.slot_ranks,
            max_active=L if max_active is None else max(0, min(L, max_active)),
            max_tokens=self.max_tokens,
            max_loras=L,
        )
