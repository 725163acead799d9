"""Fused shrink+expand for decode-sized batches: y[t] += concat_s(scale * x[t] @ A_s^T @ B_s^T).

With a handful of tokens both halves are latency-bound, so one launch instead of two (and no fp32
intermediate in memory) is what counts. Grid: (slice x SPLIT_N, token block, active slot index).
Each program computes h = x @ A_s[slot]^T for its tokens once, keeps it in registers, then walks
every SPLIT_N-th column block of its slice; SPLIT_N trades recomputing h (A read SPLIT_N times,
mostly from L2) against parallelism over the output columns.
"""

import torch
import triton
import triton.language as tl

from . import checks
from .common import (
    dot_precision,
    dot_x_at,
    grid_dim,
    pick_slice,
    plan_tensors,
    require_launchable,
    segment_slot,
    segment_tokens,
    upcast,
)
from .config import get as get_config


@triton.jit
def _sgmv_fused_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr,
    sorted_ids_ptr, slot_start_ptr, slot_count_ptr, active_ptr, num_active_ptr, ranks_ptr,
    K, N0, N1, N2, R, scale,
    stride_xm, stride_ym,
    NUM_SLICES: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_sn = tl.program_id(0)
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
    sid = pid_sn // SPLIT_N
    first_nb = pid_sn % SPLIT_N
    N = N0
    y_off = 0
    if NUM_SLICES > 1:  # noqa: SIM102 - constexpr: pruned at compile time
        if sid == 1:
            N = N1
            y_off = N0
    if NUM_SLICES > 2:  # noqa: SIM102 - constexpr: pruned at compile time
        if sid == 2:
            N = N2
            y_off = N0 + N1
    if first_nb * BLOCK_N >= N:  # a narrow slice (k, v) has fewer column blocks than SPLIT_N
        return
    a_ptr = pick_slice(sid, a0_ptr, a1_ptr, a2_ptr, NUM_SLICES)
    b_ptr = pick_slice(sid, b0_ptr, b1_ptr, b2_ptr, NUM_SLICES)

    mask_m, tok = segment_tokens(slot, count, m0, sorted_ids_ptr, slot_start_ptr, BLOCK_M)
    # BLOCK_R covers max_rank; rows past the slot's rank are masked (not read), so padding costs no bytes
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank

    # shrink: h[BLOCK_M, BLOCK_R] in fp32, kept in registers for every column block below
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    h = dot_x_at(h, x_ptr, stride_xm, tok, a_ptr, slot, offs_r, mask_r, K, R, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
    # rounded to the weights' dtype like the unfused path's expand does with its fp32 buffer
    ht = (h * scale).to(b_ptr.dtype.element_ty)
    if UPCAST:
        ht = ht.to(tl.float32)

    # expand: every SPLIT_N-th column block of this slice
    b_base = b_ptr + slot.to(tl.int64) * N * R
    for nb in range(first_nb, tl.cdiv(N, BLOCK_N), SPLIT_N):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        bt = tl.load(b_base + offs_n[None, :] * R + offs_r[:, None],
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        if UPCAST:
            bt = bt.to(tl.float32)
        acc = tl.dot(ht, bt, input_precision=DOT_PREC)
        y_ptrs = y_ptr + tok[:, None] * stride_ym + y_off + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def split_n(cfg, n_slices, token_blocks, max_active, widths, bn) -> int:
    """Column-block groups per slice: enough programs to fill the GPU (cfg TARGET_PROGRAMS),
    never more than the widest slice has blocks."""
    if "SPLIT_N" in cfg:
        return max(1, int(cfg["SPLIT_N"]))
    most = max(triton.cdiv(w, bn) for w in widths)
    want = triton.cdiv(cfg.get("TARGET_PROGRAMS", 1), n_slices * token_blocks * max(1, max_active))
    return max(1, min(most, want))


def run(
    y,             # [T, sum N_s] model dtype, unit last stride
    x,             # [T, K] dtype of y, unit last stride
    A,             # list of 1..3 x [S, R, K] contiguous
    B,             # list of the same number of [S, N_s, R] contiguous
    sorted_ids,    # [>=T] int32
    slot_start,    # [L] int32
    slot_count,    # [L] int32
    active_slots,  # [L] int32
    num_active,    # [1] int32, device scalar
    ranks,         # [>=L] int32
    max_active,    # int, grid bound
    scale,         # float
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T, K = x.shape
    R = A[0].shape[1]
    if T == 0 or max_active == 0 or R == 0:
        return
    require_launchable(x.device)
    widths = [b.shape[1] for b in B]
    cfg = config or get_config("sgmv_fused", x.device, T, K=K, N=sum(widths), R=R)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    br = max(cfg.get("BLOCK_R", 16), triton.next_power_of_2(R))  # h holds the whole rank
    tb = triton.cdiv(T, bm)
    split = split_n(cfg, len(A), tb, max_active, widths, bn)
    a = list(A) + [A[0]] * (3 - len(A))
    b = list(B) + [B[0]] * (3 - len(B))
    n = widths + [0] * (3 - len(B))
    grid = (len(A) * split, grid_dim(tb), grid_dim(max_active))
    _sgmv_fused_kernel[grid](
        x, a[0], a[1], a[2], b[0], b[1], b[2], y,
        sorted_ids, slot_start, slot_count, active_slots, num_active, ranks,
        K, n[0], n[1], n[2], R, float(scale),
        x.stride(0), y.stride(0),
        NUM_SLICES=len(A), SPLIT_N=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
        EVEN_K=K % bk == 0, UPCAST=upcast(x.dtype), DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )


def launch_fused(
    y,            # [T, sum N_s] fp16/bf16/fp32
    x,            # [T, K] dtype of y
    A,            # list of 1..3 x [S, R, K] contiguous
    B,            # list of the same number of [S, N_s, R] contiguous
    plan,         # BatchPlan for T tokens
    scale=1.0,    # float
    ranks=None,   # [S] int32 or None -> plan.slot_ranks
    config=None,  # block sizes override (tests, tuner)
):
    """Checks every argument (LaunchError), then launches the fused kernel once for all slices."""
    r = checks.linear("sgmv_fused", y, x, A, B, plan, None, ranks)
    run(y, x, A, B, *plan_tensors(plan, r), plan.max_active, scale, config)
    return y


@torch.library.custom_op(
    "loraplex::sgmv_fused", mutates_args=("y",),
    schema="(Tensor(a!) y, Tensor x, Tensor[] A, Tensor[] B, Tensor sorted_ids, Tensor slot_start, "
           "Tensor slot_count, Tensor active_slots, Tensor num_active, Tensor ranks, int max_active, "
           "float scale) -> ()",
)
def sgmv_fused_op(y, x, A, B, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks, max_active,
                  scale):
    run(y, x, A, B, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks, max_active, scale)


@sgmv_fused_op.register_fake
def _(y, x, A, B, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks, max_active, scale):
    return None
