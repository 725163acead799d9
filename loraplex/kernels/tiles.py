"""The per-tile work list that the plan writes for the kernels, and the host bound on its length.

Pure Python (no Triton, no torch): the runtime's plan builder imports it without loading the kernels.

A tile is up to BLOCK_M rows of one slot's segment of the tokens sorted by slot. For every tile size in
TILE_SIZES the plan writes records of RECORD int32 each, `slot, first, rows, 0`: `first` indexes
sorted_token_ids, `rows` is 0 for the records past the real tiles (a program given one exits after
one load). With it a kernel program needs one metadata round trip (its record) instead of walking
num_active -> active_slots -> slot_count -> slot_start, and a grid of `tile_bound(...)` programs
instead of cdiv(T, BLOCK_M) x adapters, most of which only exit.
"""

from __future__ import annotations

TILE_SIZES = (16, 32, 64)  # BLOCK_M values the plan writes lists for; configs must pick one of these
RECORD = 4  # int32 fields per tile: slot, first (index into sorted_token_ids), rows, 0 (16-byte records)


def tile_bound(num_tokens: int, block_m: int, max_active: int) -> int:
    """Host upper bound on the number of tiles of a plan of `num_tokens` tokens over at most
    `max_active` distinct slots: with D <= min(max_active, T) slots holding c_s tokens,
    sum_s cdiv(c_s, BM) <= (T + D * (BM - 1)) // BM, and there are never more tiles than tokens.

    A CUDA graph replays the grid sized here, so for a captured launch max_active must be the number
    of slots (max_loras), not the adapters of the step that was captured."""
    d = min(int(max_active), int(num_tokens))
    if d <= 0:
        return 0
    return min(num_tokens, (num_tokens + d * (block_m - 1)) // block_m)


def tile_index(block_m: int) -> int:
    """Row of the plan's tile lists for BLOCK_M (ValueError for a size the plan does not write)."""
    try:
        return TILE_SIZES.index(int(block_m))
    except ValueError:
        raise ValueError(f"BLOCK_M={block_m} has no work list; the plan writes lists for {TILE_SIZES}") from None
