"""BatchPlan: per-step kernel metadata, computed once per step and shared by every LoRA layer.

Built on the device from a per-token slot tensor with torch ops only (no host sync), into buffers
allocated once at max size, so a CUDA graph that captured the kernels can be replayed with new plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LaunchError
from ..kernels.tiles import RECORD, TILE_SIZES, tile_bound

# Split-K shrink scratch per PlanBuffers: fp32 partial sums and per-tile arrival counters. A shrink
# whose partials would not fit runs unsplit (the launcher checks), so these only cap the splitting.
SPLIT_PARTIAL_FLOATS = 1 << 20  # 4 MB: e.g. 16 splits x 3 slices x 256 tokens x rank 64
SPLIT_COUNTERS = 1 << 14


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
    tiles[len(TILE_SIZES), NT, 4]  int32  the kernels' work list per tile size (kernels/tiles.py):
                                 slot, first index into sorted_token_ids, rows (0 past the real tiles), 0
    n_tiles[len(TILE_SIZES)] int32  real tiles per tile size (device scalars)
    split_partials[P]     fp32   split-K shrink partial sums (scratch, contents meaningless between launches)
    split_counters[C]     int32  split-K arrival counters: zero between launches (the last arrival resets
                                 its tile's counter, and every build zeroes them all)
    max_active            int    host-side upper bound on the distinct slots of this step (sizes the
                                 kernels' grids); max_loras for plans a CUDA graph may capture
    graph_bucket          bool   max_active is the adapter-count bucket of the CUDA graph that runs this
                                 step (one graph per bucket, replayed only for steps within it): the
                                 launchers may then be captured with max_active < max_loras
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
    tiles: torch.Tensor | None = None
    n_tiles: torch.Tensor | None = None
    split_partials: torch.Tensor | None = None
    split_counters: torch.Tensor | None = None
    graph_bucket: bool = False

    @property
    def device(self):
        return self.token_slots.device


class PlanBuffers:
    """Static buffers for plans of up to `max_tokens` tokens over `max_loras` slots.

    One shrink at a time may use a PlanBuffers' split-K scratch: layers of a step run one after
    another on one stream; concurrent streams need a PlanBuffers (or LoraContext) each."""

    def __init__(self, max_tokens: int, max_loras: int, device="cpu", split_partial_floats: int = SPLIT_PARTIAL_FLOATS,
                 split_counters: int = SPLIT_COUNTERS):
        if max_tokens < 1 or max_loras < 1:
            raise LaunchError(f"PlanBuffers needs max_tokens >= 1 and max_loras >= 1, got {max_tokens}, {max_loras}")
        self.max_tokens = max_tokens
        self.max_loras = max_loras
        self.device = torch.device(device)
        i32 = dict(dtype=torch.int32, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.token_slots = torch.full((max_tokens,), -1, **i32)
        self.sorted_token_ids = torch.zeros(max_tokens, **i32)
        # scratch for build(): every intermediate has a home, so a step allocates nothing on the device
        self._sorted_slots = torch.zeros(max_tokens, **i32)
        self._sort_idx = torch.zeros(max_tokens, **i64)
        self._bucket = torch.zeros(max_tokens, **i64)  # slot + 1 per token
        self._ones = torch.ones(max_tokens, **i64)
        self._counts = torch.zeros(max_loras + 1, **i64)
        self._starts = torch.zeros(max_loras + 1, **i64)
        self._present = torch.zeros(max_loras, **i32)
        self._absent = torch.zeros(max_loras, dtype=torch.int8, device=self.device)
        self._absent_sorted = torch.zeros(max_loras, dtype=torch.int8, device=self.device)
        self._active_idx = torch.zeros(max_loras, **i64)
        self.slot_start = torch.zeros(max_loras, **i32)
        self.slot_count = torch.zeros(max_loras, **i32)
        self.active_slots = torch.arange(max_loras, **i32)
        self.num_active = torch.zeros(1, **i32)
        self.slot_ranks = torch.zeros(max_loras, **i32)
        # the work lists: one row per tile size, as long as the smallest size can need
        n, nt = len(TILE_SIZES), max(1, tile_bound(max_tokens, min(TILE_SIZES), max_loras))
        self.tiles = torch.zeros(n, nt, RECORD, **i32)
        self.n_tiles = torch.zeros(n, **i32)
        self._bm = torch.tensor(TILE_SIZES, **i64).unsqueeze(1)  # [n, 1]
        self._tile_idx = torch.arange(nt, **i64).unsqueeze(0).repeat(n, 1).contiguous()  # [n, NT]
        self._per_slot = torch.zeros(n, max_loras, **i64)  # tiles per slot
        self._cum = torch.zeros(n, max_loras, **i64)  # inclusive prefix sum of _per_slot
        self._t_slot = torch.zeros(n, nt, **i64)
        self._t_valid = torch.zeros(n, nt, dtype=torch.bool, device=self.device)
        self._t_m0 = torch.zeros(n, nt, **i64)
        self._t_rows = torch.zeros(n, nt, **i64)
        self._t_first = torch.zeros(n, nt, **i64)
        self.split_partials = torch.empty(max(1, split_partial_floats), dtype=torch.float32, device=self.device)
        self.split_counters = torch.zeros(max(1, split_counters), **i32)
        self._bad = torch.zeros(max_tokens, dtype=torch.bool, device=self.device)
        self._bad2 = torch.zeros(max_tokens, dtype=torch.bool, device=self.device)
        self._fence = torch.zeros(1, **i32)

    def build(self, token_slots: torch.Tensor, slot_ranks: torch.Tensor | None = None,
              max_active: int | None = None, graph_bucket: bool = False) -> BatchPlan:
        """Fill the buffers from token_slots[T] (int32 on this device, values in [-1, max_loras)).

        Slots outside that range: on a CPU device a LaunchError naming the first bad token and slot; on
        a GPU (where checking would be a device->host sync) they are made -1 on the device, so those rows
        get no adapter and nothing indexes past the buffers (no device-side assert).

        slot_ranks[max_loras] (int32) is copied in if given. max_active, if the caller knows how many
        distinct adapters the batch has (the runtime does, on the host), tightens the kernels' grids;
        leave it None (max_loras) for a plan whose launches a CUDA graph may capture and replay, or pass
        graph_bucket=True when max_active is the bucket of the graph that will run the step (vLLM's
        graphs per adapter count: every step replayed by that graph has at most max_active adapters).
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
        self._check_slots(slots, T)
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
        self._build_tiles(counts[1:], self._starts[:-1])
        # One memset per step: a counter left non-zero by anything (an arrival that never completed, a
        # pending side-stream shrink dropped without its join) is not carried into this step's shrinks.
        self.split_counters.zero_()
        # Last: one tiny kernel that writes nothing a LoRA kernel reads. A kernel launched right after
        # with programmatic dependent launch may start while its predecessor's blocks finish; the
        # kernels read plan metadata before their grid-dependency wait, so that predecessor must not
        # be the one that wrote the metadata.
        self._fence.fill_(0)
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
            tiles=self.tiles,
            n_tiles=self.n_tiles,
            split_partials=self.split_partials,
            split_counters=self.split_counters,
            graph_bucket=bool(graph_bucket) and max_active is not None,
        )

    def _check_slots(self, slots, T: int) -> None:
        if not T:
            return
        L = self.max_loras
        if self.device.type == "cpu":  # host memory: checking costs no sync
            bad = ((slots < -1) | (slots >= L)).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise LaunchError(f"token {i} has slot {int(slots[i])}: a slot must be -1 (no adapter) or in "
                                  f"[0, {L}) for plans of {L} slots ({bad.numel()} bad tokens)")
            return
        bad, bad2 = self._bad[:T], self._bad2[:T]
        torch.lt(slots, -1, out=bad)
        torch.ge(slots, L, out=bad2)
        bad.logical_or_(bad2)
        slots.masked_fill_(bad, -1)

    def _build_tiles(self, count, start):
        """The work lists of every tile size at once ([sizes, NT] ops): tile i of size BM belongs to the
        slot s whose tiles' prefix sum first exceeds i; its rows start at j * BM in that slot's segment,
        j being i minus the tiles of the slots before s. count, start: int64 [L] per slot."""
        L, bm = self.max_loras, self._bm
        torch.add(count, bm - 1, out=self._per_slot)  # [sizes, L]
        self._per_slot.floor_divide_(bm)
        torch.cumsum(self._per_slot, 1, out=self._cum)
        s, valid, m0, rows, first = self._t_slot, self._t_valid, self._t_m0, self._t_rows, self._t_first
        torch.searchsorted(self._cum, self._tile_idx, right=True, out=s)
        torch.lt(s, L, out=valid)  # past the last real tile
        s.clamp_(max=L - 1)
        torch.gather(self._cum, 1, s, out=m0)  # tiles up to and including slot s
        torch.gather(self._per_slot, 1, s, out=rows)
        m0.sub_(rows).neg_().add_(self._tile_idx).mul_(bm)  # (i - first tile of s) * BM
        torch.gather(count.expand(len(TILE_SIZES), L), 1, s, out=rows)
        rows.sub_(m0)
        torch.minimum(rows, bm, out=rows)
        rows.mul_(valid)
        torch.gather(start.expand(len(TILE_SIZES), L), 1, s, out=first)
        first.add_(m0)
        self.tiles[:, :, 0].copy_(s)
        self.tiles[:, :, 1].copy_(first)
        self.tiles[:, :, 2].copy_(rows)
        self.n_tiles.copy_(self._cum[:, -1])
