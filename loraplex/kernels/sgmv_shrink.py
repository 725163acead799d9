"""SGMV shrink: h[s, t, :] = scale * x[t] @ A_s[slot(t), :rank]^T for every slice s, in one launch.

Grid: (work tile [x K split], slice x rank block). A program takes its tile (one slot's rows of the
sorted tokens) from the plan's work list; the grid is a host bound on the tiles, so it never needs a
device->host sync and a captured CUDA graph stays right for any plan of the same bound.

Split-K (few tokens per adapter: a handful of tiles would each walk all of K alone): axis 0 then holds
tiles x splits, the split count computed on the device from the real tile count, so a graph captured
with one adapter still splits well when replayed with eight. Each split writes an fp32 partial to the
plan's scratch and bumps the tile's arrival counter; the last to arrive sums the partials in split
order (deterministic: the same bits whichever split finishes last), writes h and resets the counter
to zero for the next launch (no zeroing launch, and graph replays find it at zero). Every
PlanBuffers.build zeroes all counters as well, so one stray arrival cannot outlive its step.
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
def _partial(p_ptrs, stride_pk, mask_out, offs_r, k, n_split):
    """Split k's partial (zeros past n_split). The mask is a vector compare: the interpreter's scalar
    compare yields a mask it cannot load with."""
    live = (offs_r * 0 + k) < n_split
    return tl.load(p_ptrs + k * stride_pk, mask=mask_out & live[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, out_ptr,
    sorted_ids_ptr, tiles_ptr, n_tiles_ptr, ranks_ptr, part_ptr, count_ptr,
    K, R, scale, max_split,
    stride_xm, stride_os, stride_om, stride_ps, stride_pk,
    NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_rs = tl.program_id(1)
    n_k = tl.cdiv(K, BLOCK_K)
    if SPLIT > 1:
        # as many splits per tile as the grid has room for over the real tiles (at least 1, at most
        # max_split <= SPLIT), then evened out so that no split is empty
        n_t = tl.load(n_tiles_ptr)
        want = tl.minimum(tl.maximum(tl.num_programs(0) // tl.maximum(n_t, 1), 1), max_split)
        k_per = tl.cdiv(n_k, want)
        n_split = tl.cdiv(n_k, k_per)
        t = pid // n_split
        pk = pid % n_split
        if t >= n_t:
            leave(USE_PDL)
            return
    else:
        t = pid
        pk = 0
        k_per = n_k
        n_split = 1
    slot, first, rows = tile_meta(tiles_ptr, t)
    if rows <= 0:  # decided with the record's own round trip
        leave(USE_PDL)
        return
    rank, mask_m, tok = tile_data(ranks_ptr, sorted_ids_ptr, slot, first, rows, R, BLOCK_M)
    n_rb = tl.cdiv(R, BLOCK_R)
    sid = pid_rs // n_rb
    r0 = (pid_rs % n_rb) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + sid * stride_os + tok[:, None] * stride_om + offs_r[None, :]
    mask_out = mask_m[:, None] & (offs_r[None, :] < R)
    mask_r = offs_r < rank  # never read the padding: its contents are not trusted
    a_ptr = pick_slice(sid, a0_ptr, a1_ptr, a2_ptr, NUM_SLICES)
    k_lo = pk * k_per
    # a rank block wholly in the padding walks no K tile and yields zeros; under split-K it still takes
    # part in the arrival below, so all splits of a tile take the same path whatever they read as rank
    k_hi = tl.where(r0 < rank, tl.minimum(n_k, k_lo + k_per), k_lo)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc = dot_x_at(acc, x_ptr, stride_xm, tok, mask_m, a_ptr, slot, offs_r, mask_r, K, R, k_lo, k_hi,
                   BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
    acc = acc * scale
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if SPLIT > 1:
        if n_split > 1:
            # partials live at [split, slice, token, R] (contiguous) in the scratch; rows are tokens, as in h
            p_ptrs = part_ptr + sid * stride_ps + tok[:, None] * R + offs_r[None, :]
            tl.store(p_ptrs + pk * stride_pk, acc, mask=mask_out)
            tl.debug_barrier()  # every thread's partial is written before the arrival is published
            c_ptr = count_ptr + t * tl.num_programs(1) + pid_rs
            arrived = tl.atomic_add(c_ptr, 1, sem="acq_rel")  # release our partial, acquire the others
            if arrived == n_split - 1:
                # zero again for the next launch / graph replay: nothing else touches it in this launch
                tl.atomic_xchg(c_ptr, 0, sem="relaxed")
                # every partial with independent loads (unrolled: ptxas issues as many at once as its
                # registers allow), summed in split order so the bits do not depend on who came last
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k in tl.static_range(SPLIT):
                    acc += _partial(p_ptrs, stride_pk, mask_out, offs_r, k, n_split)
                tl.store(out_ptrs, acc, mask=mask_out)
        else:
            tl.store(out_ptrs, acc, mask=mask_out)
    else:
        tl.store(out_ptrs, acc, mask=mask_out)


def split_plan(cfg, T, K, R, n_slices, bound, partials, counters):
    """(max splits, programs on axis 0) of a launch; (1, bound) without split-K. The splits of the
    partials must fit the plan's scratch and the tiles' counters its counter array: when they would
    not, fewer splits (or none) are used; nothing is allocated here."""
    n_k = triton.cdiv(K, cfg["BLOCK_K"])
    n_rs = n_slices * triton.cdiv(R, cfg["BLOCK_R"])
    most = min(int(cfg.get("SPLIT_K", 1)), n_k // max(1, int(cfg.get("SPLIT_MIN_K_TILES", 2))))
    most = min(most, partials.numel() // max(1, n_slices * T * R))
    if most < 2 or bound * n_rs > counters.numel():
        return 1, bound
    programs = max(bound, triton.cdiv(int(cfg.get("SPLIT_TARGET_PROGRAMS", 264)), n_rs))
    return most, min(programs, bound * most)


def run(
    x,             # [T, K] model dtype, unit last stride
    A,             # list of 1..3 x [S, R, K] contiguous, dtype of x
    out,           # [n_slices, T, R] fp32, unit last stride
    sorted_ids,    # [>=T] int32, tokens sorted by slot
    tiles,         # [len(TILE_SIZES), NT, 4] int32, the plan's work lists
    n_tiles,       # [len(TILE_SIZES)] int32, real tiles per list
    ranks,         # [>=L] int32, real rank per slot (clamped to R in the kernel)
    partials,      # [P] fp32, split-K scratch (plan.split_partials)
    counters,      # [C] int32, split-K arrival counters, zero between launches (plan.split_counters)
    max_active,    # int, host bound on the distinct slots: sizes the grid
    scale,         # float
    config=None,   # dict of block sizes; None -> kernels/config.py
):
    T, K = x.shape
    R = A[0].shape[1]
    if T == 0 or max_active == 0 or R == 0:
        return
    require_launchable(x.device)
    cfg = config or get_config("sgmv_shrink", x.device, T, K=K, R=R, dtype=x.dtype)
    bm, br, bk = cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["BLOCK_K"]
    recs, count = tile_list(tiles, n_tiles, bm)
    bound = tile_bound(T, bm, max_active)
    splits, programs = split_plan(cfg, T, K, R, len(A), bound, partials, counters)
    pdl = use_pdl(cfg, x.device)
    a = list(A) + [A[0]] * (3 - len(A))
    grid = (programs, grid_dim(len(A) * triton.cdiv(R, br)))
    _sgmv_shrink_kernel[grid](
        x, a[0], a[1], a[2], out,
        sorted_ids, recs, count, ranks, partials, counters,
        K, R, float(scale), splits,
        x.stride(0), out.stride(0), out.stride(1), T * R, len(A) * T * R,
        NUM_SLICES=len(A), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, EVEN_K=K % bk == 0,
        SPLIT=triton.next_power_of_2(splits) if splits > 1 else 1,
        UPCAST=upcast(x.dtype), DOT_PREC=dot_precision(x.dtype), USE_PDL=pdl, **launch_options(cfg, pdl),
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
    run(x, A, out, *plan_tensors(plan, r), plan.split_partials, plan.split_counters, plan.max_active, scale, config)
    return out


# Opaque to torch.compile / vLLM's compiled graphs; the schema declares `out` and the scratch as mutated.
@torch.library.custom_op(
    "loraplex::sgmv_shrink", mutates_args=("out", "partials", "counters"),
    schema="(Tensor x, Tensor[] A, Tensor(a!) out, Tensor sorted_ids, Tensor tiles, Tensor n_tiles, Tensor ranks, "
           "Tensor(b!) partials, Tensor(c!) counters, int max_active, float scale) -> ()",
)
def sgmv_shrink_op(x, A, out, sorted_ids, tiles, n_tiles, ranks, partials, counters, max_active, scale):
    run(x, A, out, sorted_ids, tiles, n_tiles, ranks, partials, counters, max_active, scale)


@sgmv_shrink_op.register_fake
def _(x, A, out, sorted_ids, tiles, n_tiles, ranks, partials, counters, max_active, scale):
    return None
