"""Fused shrink+expand for decode-sized batches: y[t] += concat_s(scale * x[t] @ A_s^T @ B_s^T).

With a handful of tokens both halves are latency-bound, so one launch instead of two (and no fp32
intermediate in memory) is what counts. Grid: (G programs per slice, slice). Each program computes
h = x @ A_s[slot]^T for one work tile once, keeps it in registers, then walks every split-th column
block of its slice. The split (column groups per tile) is computed on the device from the plan's real
tile count, split = G // tiles: G is fixed on the host from the token count and the slot count only,
so no value that depends on the adapters of a step reaches the grid or a compile-time constant (a
captured graph replays right with any plan; a new adapter count compiles nothing).

Rows past a tile's tokens are masked (zero-filled, not fetched). B is loaded masked on the padded
rank R (vectorized) and zeroed past the real rank, so NaN padding never reaches y.
"""

import torch
import triton
import triton.language as tl

from . import checks
from .common import (
    dot_precision,
    dot_x_at,
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
def _sgmv_fused_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr,
    sorted_ids_ptr, tiles_ptr, n_tiles_ptr, ranks_ptr,
    K, N0, N1, N2, R, scale,
    stride_xm, stride_ym,
    NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
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
    n_nb = tl.cdiv(N, BLOCK_N)
    n_t = tl.load(n_tiles_ptr)
    # column groups per tile: the grid's programs shared by the real tiles, never more than the slice has
    # column blocks; the launcher sizes G >= every tile count the plan can reach, so split >= 1 covers all
    split = tl.minimum(tl.maximum(tl.num_programs(0) // tl.maximum(n_t, 1), 1), n_nb)
    t = pid // split
    g = pid % split
    if t >= n_t:
        leave(USE_PDL)
        return
    slot, first, rows = tile_meta(tiles_ptr, t)  # a real tile (t < n_t): rows >= 1
    rank, mask_m, tok = tile_data(ranks_ptr, sorted_ids_ptr, slot, first, rows, R, BLOCK_M)
    a_ptr = pick_slice(sid, a0_ptr, a1_ptr, a2_ptr, NUM_SLICES)
    b_ptr = pick_slice(sid, b0_ptr, b1_ptr, b2_ptr, NUM_SLICES)
    # BLOCK_R covers R; rows past the slot's rank are masked (not read), so padding costs no bytes
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if rank == 0:  # after the wait: no branch on the rank between its load and the token ids'
        return

    # shrink: h[BLOCK_M, BLOCK_R] in fp32, kept in registers for every column block below
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    h = dot_x_at(h, x_ptr, stride_xm, tok, mask_m, a_ptr, slot, offs_r, mask_r, K, R, 0, tl.cdiv(K, BLOCK_K),
                 BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # rounded to the weights' dtype like the unfused path's expand does with its fp32 buffer
    ht = (h * scale).to(b_ptr.dtype.element_ty)
    if UPCAST:
        ht = ht.to(tl.float32)

    # expand: every split-th column block of this slice
    in_r = offs_r < R  # the padded rank: R % 16 == 0 lets the B loads be 16-byte vectors
    b_base = b_ptr + slot.to(tl.int64) * N * R
    for nb in range(g, n_nb, split):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y_ptrs = y_ptr + tok[:, None] * stride_ym + y_off + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        # B and y in one round trip: both loads are issued before the dot needs either
        bt = tl.load(b_base + offs_n[None, :] * R + offs_r[:, None], mask=in_r[:, None] & mask_n[None, :],
                     other=0.0)  # [BLOCK_R, BLOCK_N]
        y0 = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        bt = tl.where(mask_r[:, None], bt, 0.0)  # padding may hold anything (NaN): zero it, never multiply it
        if UPCAST:
            bt = bt.to(tl.float32)
        acc = tl.dot(ht, bt, y0, input_precision=DOT_PREC)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def programs_per_slice(cfg, T, bm, max_active, widths) -> int:
    """G: at least one program per tile the plan can hold (so every tile is covered with split >= 1),
    about TARGET_PROGRAMS in all when the tiles are few, never more than tiles x column blocks."""
    bound = tile_bound(T, bm, max_active)
    most = max(triton.cdiv(w, cfg["BLOCK_N"]) for w in widths)
    want = triton.cdiv(int(cfg.get("TARGET_PROGRAMS", 1)), len(widths))
    return max(bound, min(want, bound * most))


def run(
    y,             # [T, sum N_s] model dtype, unit last stride
    x,             # [T, K] dtype of y, unit last stride
    A,             # list of 1..3 x [S, R, K] contiguous
    B,             # list of the same number of [S, N_s, R] contiguous
    sorted_ids,    # [>=T] int32
    tiles,         # [len(TILE_SIZES), NT, 4] int32, the plan's work lists
    n_tiles,       # [len(TILE_SIZES)] int32, real tiles per list
    ranks,         # [>=L] int32 (clamped to R in the kernel)
    max_active,    # int, host bound on the distinct slots: sizes the grid
    scale,         # float
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T, K = x.shape
    R = A[0].shape[1]
    if T == 0 or max_active == 0 or R == 0:
        return
    require_launchable(x.device)
    widths = [b.shape[1] for b in B]
    cfg = config or get_config("sgmv_fused", x.device, T, K=K, N=sum(widths), R=R, dtype=x.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    br = max(cfg.get("BLOCK_R", 16), triton.next_power_of_2(R))  # h holds the whole rank
    recs, count = tile_list(tiles, n_tiles, bm)
    pdl = use_pdl(cfg, x.device)
    a = list(A) + [A[0]] * (3 - len(A))
    b = list(B) + [B[0]] * (3 - len(B))
    n = widths + [0] * (3 - len(B))
    grid = (programs_per_slice(cfg, T, bm, max_active, widths), grid_dim(len(A)))
    _sgmv_fused_kernel[grid](
        x, a[0], a[1], a[2], b[0], b[1], b[2], y,
        sorted_ids, recs, count, ranks,
        K, n[0], n[1], n[2], R, float(scale),
        x.stride(0), y.stride(0),
        NUM_SLICES=len(A), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
        EVEN_K=K % bk == 0, UPCAST=upcast(x.dtype), DOT_PREC=dot_precision(x.dtype), USE_PDL=pdl,
        **launch_options(cfg, pdl),
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
    schema="(Tensor(a!) y, Tensor x, Tensor[] A, Tensor[] B, Tensor sorted_ids, Tensor tiles, Tensor n_tiles, "
           "Tensor ranks, int max_active, float scale) -> ()",
)
def sgmv_fused_op(y, x, A, B, sorted_ids, tiles, n_tiles, ranks, max_active, scale):
    run(y, x, A, B, sorted_ids, tiles, n_tiles, ranks, max_active, scale)


@sgmv_fused_op.register_fake
def _(y, x, A, B, sorted_ids, tiles, n_tiles, ranks, max_active, scale):
    return None
