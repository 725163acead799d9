"""SGMV shrink: h[s, t, :] = scale * x[t] @ A_s[slot(t), :rank]^T for every slice s, in one launch.

Grid: (slice x rank block, token block within a slot's segment, active slot index). Programs past
num_active, past their slot's token count or wholly beyond the slot's real rank do (almost) no work,
so the grid can be sized from host-side bounds without a device->host sync (CUDA-graph safe).
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
def _sgmv_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr,
    sorted_ids_ptr, slot_start_ptr, slot_count_ptr, active_ptr, num_active_ptr, ranks_ptr,
    K, R, scale,
    stride_xm, stride_os, stride_om,
    NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_rs = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_a = tl.program_id(2)
    if pid_a >= tl.load(num_active_ptr):
        return
    slot, count, m0 = segment_slot(pid_a, pid_m, active_ptr, slot_count_ptr, BLOCK_M)
    if m0 >= count:
        return
    n_rb = tl.cdiv(R, BLOCK_R)
    sid = pid_rs // n_rb
    r0 = (pid_rs % n_rb) * BLOCK_R
    rank = tl.load(ranks_ptr + slot)
    mask_m, tok = segment_tokens(slot, count, m0, sorted_ids_ptr, slot_start_ptr, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if r0 < rank:  # a rank block wholly in the padding only stores its zeros
        mask_r = offs_r < rank  # never read the padding: its contents are not trusted
        a_ptr = pick_slice(sid, a0_ptr, a1_ptr, a2_ptr, NUM_SLICES)
        acc = dot_x_at(acc, x_ptr, stride_xm, tok, a_ptr, slot, offs_r, mask_r, K, R, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
        acc = acc * scale
    out_ptrs = out_ptr + sid * stride_os + tok[:, None] * stride_om + offs_r[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & (offs_r[None, :] < R))


def run(
    x,             # [T, K] model dtype, unit last stride
    A,             # list of 1..3 x [S, R, K] contiguous, dtype of x
    out,           # [n_slices, T, R] fp32, unit last stride
    sorted_ids,    # [>=T] int32, tokens sorted by slot
    slot_start,    # [L] int32, segment start per slot
    slot_count,    # [L] int32, tokens per slot
    active_slots,  # [L] int32, slots with tokens first
    num_active,    # [1] int32, device scalar
    ranks,         # [>=L] int32, real rank per slot
    max_active,    # int, host bound on num_active: grid size
    scale,         # float
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T, K = x.shape
    R = A[0].shape[1]
    if T == 0 or max_active == 0 or R == 0:
        return
    require_launchable(x.device)
    cfg = config or get_config("sgmv_shrink", x.device, T, K=K, R=R)
    bm, br, bk = cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["BLOCK_K"]
    a = list(A) + [A[0]] * (3 - len(A))
    grid = (len(A) * triton.cdiv(R, br), grid_dim(triton.cdiv(T, bm)), grid_dim(max_active))
    _sgmv_shrink_kernel[grid](
        x, a[0], a[1], a[2], out,
        sorted_ids, slot_start, slot_count, active_slots, num_active, ranks,
        K, R, float(scale),
        x.stride(0), out.stride(0), out.stride(1),
        NUM_SLICES=len(A), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, EVEN_K=K % bk == 0,
        UPCAST=upcast(x.dtype), DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )


def launch_shrink(
    x,            # [T, K] fp16/bf16/fp32
    A,            # list of 1..3 x [S, R, K] contiguous
    plan,         # BatchPlan for T tokens
    out,          # [n_slices, T, R] fp32
    scale=1.0,    # float
    ranks=None,   # [S] int32 or None -> plan.slot_ranks
    config=None,  # block sizes override (tests, tuner)
):
    """Checks every argument (LaunchError), then launches the shrink kernel once for all slices."""
    r = checks.shrink("sgmv_shrink", x, A, plan, out, ranks)
    run(x, A, out, *plan_tensors(plan, r), plan.max_active, scale, config)
    return out


# Opaque to torch.compile / vLLM's compiled graphs; the schema declares `out` as mutated.
@torch.library.custom_op(
    "loraplex::sgmv_shrink", mutates_args=("out",),
    schema="(Tensor x, Tensor[] A, Tensor(a!) out, Tensor sorted_ids, Tensor slot_start, Tensor slot_count, "
           "Tensor active_slots, Tensor num_active, Tensor ranks, int max_active, float scale) -> ()",
)
def sgmv_shrink_op(x, A, out, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks,
                   max_active, scale):
    run(x, A, out, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks, max_active, scale)


@sgmv_shrink_op.register_fake
def _(x, A, out, sorted_ids, slot_start, slot_count, active_slots, num_active, ranks, max_active, scale):
    return None
