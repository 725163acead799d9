"""Embedding LoRA: y[t] += A_emb[slot(t), token_ids[t], :rank] @ B_emb[slot(t), :, :rank]^T.

The "shrink" of an embedding is a row gather (A is stored transposed, [S, V, R], so a token's row
is contiguous), so it is done inside the expand kernel: each program gathers its tokens' A rows
straight into registers, and no intermediate buffer exists. Grid: (column block of D, work tile), as
in sgmv_expand; A and B are loaded masked on the padded rank and zeroed past the real rank.
"""

import torch
import triton
import triton.language as tl

from . import checks
from .common import (
    dot_precision,
    grid_dim,
    launch_options,
    leave,
    plan_tensors,
    require_launchable,
    tile_data,
    tile_list,
    tile_meta,
    upcast,
    use_pdl,
)
from .config import get as get_config
from .tiles import tile_bound


@triton.jit
def _lora_embedding_kernel(
    y_ptr, ids_ptr, a_ptr, b_ptr,
    sorted_ids_ptr, tiles_ptr, ranks_ptr,
    V, D, R,
    stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    slot, first, rows = tile_meta(tiles_ptr, t)
    if rows <= 0:  # decided with the record's own round trip
        leave(USE_PDL)
        return
    rank, mask_m, tok = tile_data(ranks_ptr, sorted_ids_ptr, slot, first, rows, R, BLOCK_M)
    if USE_PDL:  # the token ids are the model's input, written by whatever ran before
        tl.extra.cuda.gdc_wait()
    if rank == 0:  # after the wait: no branch on the rank between its load and the token ids'
        return
    ids = tl.load(ids_ptr + tok, mask=mask_m, other=0).to(tl.int64)
    ok_m = mask_m & (ids >= 0) & (ids < V)  # out-of-vocabulary ids gather zeros: they add nothing
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    offs_r = tl.arange(0, BLOCK_R)
    slot64 = slot.to(tl.int64)
    a_ptrs = a_ptr + slot64 * V * R + ids[:, None] * R + offs_r[None, :]  # [BLOCK_M, BLOCK_R]
    b_ptrs = b_ptr + slot64 * D * R + offs_n[None, :] * R + offs_r[:, None]  # [BLOCK_R, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        in_r = offs_r < R - r0  # the padded rank: vectorized loads
        live = offs_r < rank - r0
        at = tl.load(a_ptrs, mask=ok_m[:, None] & in_r[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=in_r[:, None] & mask_n[None, :], other=0.0)
        at = tl.where(live[None, :], at, 0.0)  # padding may hold anything (NaN): never multiply it
        bt = tl.where(live[:, None], bt, 0.0)
        if UPCAST:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_R
        b_ptrs += BLOCK_R
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def run(
    y,             # [T, D] model dtype, unit last stride
    token_ids,     # [T] int32/int64
    A_emb,         # [S, V, R] contiguous, dtype of y
    B_emb,         # [S, D, R] contiguous, dtype of y
    sorted_ids,    # [>=T] int32
    tiles,         # [len(TILE_SIZES), NT, 4] int32, the plan's work lists
    n_tiles,       # [len(TILE_SIZES)] int32 (unused: rows 0 marks the records past the real tiles)
    ranks,         # [>=L] int32 (clamped to R in the kernel)
    max_active,    # int, host bound on the distinct slots: sizes the grid
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T, D = y.shape
    _, V, R = A_emb.shape
    if T == 0 or max_active == 0 or R == 0:
        return
    require_launchable(y.device)
    cfg = config or get_config("lora_embedding", y.device, T, N=D, R=R, dtype=y.dtype)
    bm, bn, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"]
    recs, _ = tile_list(tiles, n_tiles, bm)
    pdl = use_pdl(cfg, y.device)
    grid = (triton.cdiv(D, bn), grid_dim(tile_bound(T, bm, max_active)))
    _lora_embedding_kernel[grid](
        y, token_ids, A_emb, B_emb,
        sorted_ids, recs, ranks,
        V, D, R,
        y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, UPCAST=upcast(y.dtype), DOT_PREC=dot_precision(y.dtype), USE_PDL=pdl,
        **launch_options(cfg, pdl),
    )


def launch_embedding(
    y,            # [T, D] fp16/bf16/fp32
    token_ids,    # [T] int32/int64
    A_emb,        # [S, V, R] contiguous
    B_emb,        # [S, D, R] contiguous
    plan,         # BatchPlan for T tokens
    ranks=None,   # [S] int32 or None -> plan.slot_ranks
    config=None,  # block sizes override (tests, tuner)
):
    """Checks every argument (LaunchError), then launches the embedding LoRA kernel."""
    r = checks.embedding("add_lora_embedding", y, token_ids, A_emb, B_emb, plan, ranks)
    run(y, token_ids, A_emb, B_emb, *plan_tensors(plan, r), plan.max_active, config)
    return y


@torch.library.custom_op(
    "loraplex::lora_embedding", mutates_args=("y",),
    schema="(Tensor(a!) y, Tensor token_ids, Tensor A_emb, Tensor B_emb, Tensor sorted_ids, Tensor tiles, "
           "Tensor n_tiles, Tensor ranks, int max_active) -> ()",
)
def lora_embedding_op(y, token_ids, A_emb, B_emb, sorted_ids, tiles, n_tiles, ranks, max_active):
    run(y, token_ids, A_emb, B_emb, sorted_ids, tiles, n_tiles, ranks, max_active)


@lora_embedding_op.register_fake
def _(y, token_ids, A_emb, B_emb, sorted_ids, tiles, n_tiles, ranks, max_active):
    return None
