"""Embedding LoRA: y[t] += A_emb[slot(t), token_ids[t], :rank] @ B_emb[slot(t), :, :rank]^T.

The "shrink" of an embedding is a row gather (A is stored transposed, [S, V, R], so a token's row
is contiguous), so it is done inside the expand kernel: each program gathers its tokens' A rows
straight into registers, and no intermediate buffer exists. Grid: (column block of D, token block
within a slot's segment, active slot index), as in sgmv_expand.
"""

import torch
import triton
import triton.language as tl

from . import checks
from .common import dot_precision, grid_dim, plan_tensors, require_launchable, segment_slot, segment_tokens, upcast
from .config import get as get_config


@triton.jit
def _lora_embedding_kernel(
    y_ptr, ids_ptr, a_ptr, b_ptr,
    sorted_ids_ptr, slot_start_ptr, slot_count_ptr, active_ptr, num_active_ptr, ranks_ptr,
    V, D, R,
    stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_a = tl.program_id(2)
    if pid_a >= tl.load(num_active_ptr):
        return
    slot, count, m0 = segment_slot(pid_a, pid_m, active_ptr, slot_count_ptr, BLOCK_M)
    if m0 >= count:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    mask_m, tok = segment_tokens(slot, count, m0, sorted_ids_ptr, slot_start_ptr, BLOCK_M)
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
        mask_r = offs_r < rank - r0
        at = tl.load(a_ptrs, mask=ok_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_R
        b_ptrs += BLOCK_R
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
    slot_start,    # [L] int32
    slot_count,    # [L] int32
    active_slots,  # [L] int32
    num_active,    # [1] int32, device scalar
    ranks,         # [>=L] int32
    max_active,    # int, grid bound
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T, D = y.shape
    _, V, R = A_emb.shape
    if T == 0 or max_active == 0 or R == 0:
        return
    require_launchable(y.device)
    cfg = config or get_config("lora_embedding", y.device, T, N=D, R=R)
    bm, bn, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"]
    grid = (triton.cdiv(D, bn), grid_dim(triton.cdiv(T, bm)), grid_dim(max_active))
    _lora_embedding_kernel[grid](
        y, token_ids, A_emb, B_emb,
        sorted_ids, slot_start, slot_count, active_slots, num_active, ranks,
        V, D, R,
        y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, UPCAST=upcast(y.dtype), DOT_PREC=dot_precision(y.dtype),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
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
    schema="(Tensor(a!) y, Tensor token_ids, Tensor A_emb, Tensor B_emb, Tensor sorted_ids, Tensor slot_start, "
           "Tensor slot_count, Tensor active_slots, Tensor num_active, Tensor ranks, int max_active) -> ()",
)
def lora_embedding_op(y, token_ids, A_emb, B_emb, sorted_ids, slot_start, slot_count, active_slots, num_active,
                      ranks, max_active):
    run(y, token_ids, A_emb, B_emb, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks,
         max_active)


@lora_embedding_op.register_fake
def _(y, token_ids, A_emb, B_emb, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks, max_active):
    return None
