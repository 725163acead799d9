"""SGMV expand: y[t, off_s : off_s + N_s] (+)= h[s, t, :rank] @ B_s[slot(t), :, :rank]^T, all slices
in one launch.

Grid: (output column block over all slices, work tile). Axis 0 enumerates the column blocks of slice
0, then slice 1, then slice 2, so slices of different widths (qkv 4096+1024+1024) waste no programs,
and a 128k-wide lm_head fits (axis 0 is the only one not capped at 65535). Axis 1 is a host bound on
the plan's work tiles (kernels/tiles.py); programs past the real tiles exit after one load. The rank
loop stops at the slot's real rank; h and B are loaded masked on the padded rank R (which keeps the
loads vectorized) and zeroed past the real rank, so the padding's contents never reach the result.
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
    pick_slice,
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
def _sgmv_expand_kernel(
    h_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr,
    sorted_ids_ptr, tiles_ptr, ranks_ptr,
    N0, N1, N2, R,
    stride_hs, stride_hm, stride_ym,
    NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ADD: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    slot, first, rows = tile_meta(tiles_ptr, t)
    if rows <= 0:  # decided with the record's own round trip
        leave(USE_PDL)
        return
    rank, mask_m, tok = tile_data(ranks_ptr, sorted_ids_ptr, slot, first, rows, R, BLOCK_M)

    # which slice this column block belongs to, its first column there, and the slice's place in y
    sid = 0
    nb = pid_n
    y_off = 0
    N = N0
    if NUM_SLICES > 1:
        nb0 = tl.cdiv(N0, BLOCK_N)
        if pid_n >= nb0:
            sid = 1
            nb = pid_n - nb0
            y_off = N0
            N = N1
        if NUM_SLICES > 2:
            nb01 = nb0 + tl.cdiv(N1, BLOCK_N)
            if pid_n >= nb01:
                sid = 2
                nb = pid_n - nb01
                y_off = N0 + N1
                N = N2
    b_ptr = pick_slice(sid, b0_ptr, b1_ptr, b2_ptr, NUM_SLICES)

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + sid * stride_hs + tok[:, None] * stride_hm + offs_r[None, :]  # [BLOCK_M, BLOCK_R]
    b_base = b_ptr + slot.to(tl.int64) * N * R  # 64-bit across slots; a slot's N * R fits in 32
    b_ptrs = b_base + offs_n[None, :] * R + offs_r[:, None]  # [BLOCK_R, BLOCK_N]
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    # rank 0 adds nothing (overwrite mode still stores its zeros); tested after the wait, not before, so
    # that nothing branches on the rank between its load and the token ids' (issued together)
    if ADD and rank == 0:
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        in_r = offs_r < R - r0  # the padded rank: R % 16 == 0 lets these loads be 16-byte vectors
        live = offs_r < rank - r0
        ht = tl.load(h_ptrs, mask=mask_m[:, None] & in_r[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=in_r[:, None] & mask_n[None, :], other=0.0)
        ht = tl.where(live[None, :], ht, 0.0)
        bt = tl.where(live[:, None], bt, 0.0)  # padding may hold anything (NaN): zero it, never multiply it
        # h is fp32; the tensor cores want both operands in the weights' dtype (punica does the same)
        ht = ht.to(b_ptr.dtype.element_ty)
        if UPCAST:
            ht = ht.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(ht, bt, acc, input_precision=DOT_PREC)
        h_ptrs += BLOCK_R
        b_ptrs += BLOCK_R
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    y_ptrs = y_ptr + tok[:, None] * stride_ym + y_off + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ADD:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def run(
    h,             # [n_slices, T, R] fp32, unit last stride
    B,             # list of n_slices x [S, N_s, R] contiguous, dtype of y
    y,             # [T, sum N_s] model dtype, unit last stride
    sorted_ids,    # [>=T] int32, tokens sorted by slot
    tiles,         # [len(TILE_SIZES), NT, 4] int32, the plan's work lists
    n_tiles,       # [len(TILE_SIZES)] int32 (unused here: rows 0 marks the records past the real tiles)
    ranks,         # [>=L] int32, real rank per slot (clamped to R in the kernel)
    max_active,    # int, host bound on the distinct slots: sizes the grid
    add,           # bool: accumulate into y or overwrite
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T = y.shape[0]
    R = h.shape[2]
    if T == 0 or max_active == 0:
        return
    require_launchable(y.device)
    widths = [b.shape[1] for b in B]
    cfg = config or get_config("sgmv_expand", y.device, T, N=sum(widths), R=R, dtype=y.dtype)
    bm, bn, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"]
    recs, _ = tile_list(tiles, n_tiles, bm)
    pdl = use_pdl(cfg, y.device)
    b = list(B) + [B[0]] * (3 - len(B))
    n = widths + [0] * (3 - len(B))
    grid = (sum(triton.cdiv(w, bn) for w in widths), grid_dim(tile_bound(T, bm, max_active)))
    _sgmv_expand_kernel[grid](
        h, b[0], b[1], b[2], y,
        sorted_ids, recs, ranks,
        n[0], n[1], n[2], R,
        h.stride(0), h.stride(1), y.stride(0),
        NUM_SLICES=len(B), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, ADD=bool(add),
        UPCAST=upcast(y.dtype), DOT_PREC=dot_precision(y.dtype), USE_PDL=pdl, **launch_options(cfg, pdl),
    )


def launch_expand(
    h,            # [n_slices, T, R] fp32
    B,            # list of n_slices x [S, N_s, R] contiguous
    plan,         # BatchPlan for T tokens
    y,            # [T, sum N_s] fp16/bf16/fp32
    add=True,     # bool
    ranks=None,   # [S] int32 or None -> plan.slot_ranks
    config=None,  # block sizes override (tests, tuner)
):
    """Checks every argument (LaunchError), then launches the expand kernel once for all slices."""
    r = checks.expand("sgmv_expand", h, B, plan, y, ranks)
    run(h, B, y, *plan_tensors(plan, r), plan.max_active, add, config)
    return y


@torch.library.custom_op(
    "loraplex::sgmv_expand", mutates_args=("y",),
    schema="(Tensor h, Tensor[] B, Tensor(a!) y, Tensor sorted_ids, Tensor tiles, Tensor n_tiles, Tensor ranks, "
           "int max_active, bool add) -> ()",
)
def sgmv_expand_op(h, B, y, sorted_ids, tiles, n_tiles, ranks, max_active, add):
    run(h, B, y, sorted_ids, tiles, n_tiles, ranks, max_active, add)


@sgmv_expand_op.register_fake
def _(h, B, y, sorted_ids, tiles, n_tiles, ranks, max_active, add):
    return None
