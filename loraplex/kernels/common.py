"""Pieces shared by the kernel modules: the plan's tensors as launch arguments, the interpreter
work-around flags, programmatic dependent launch (PDL) support, and @triton.jit helpers (inlined by
Triton: no call overhead) for a program's work-list prologue, a slice's base pointer and the
x @ A^T tile loop of shrink and fused.

Every kernel reads the plan's per-tile work list (kernels/tiles.py): one record load gives a program
its slot, its rows of the sorted tokens and their count; the rank comes from the rank vector, clamped
to the padded rank R so that no rank value can make a kernel read past a slot's rows.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ..errors import LaunchError

if TYPE_CHECKING:
    from ..runtime.plan import BatchPlan
from .tiles import tile_index

# Read once at import, as Triton reads it when the kernels are defined (set it before importing).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def upcast(dtype) -> bool:
    """The interpreter's tl.dot treats bf16 as raw 16-bit integers (garbage results): convert the
    operands to fp32 before the dot there. Compiled kernels leave this off and use bf16 tensor cores."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype) -> str:
    """fp32 weights are a reference setting, not a serving one: keep their dots exact (no tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def require_launchable(device) -> None:
    """Triton kernels run on CPU tensors only under the interpreter; say so instead of failing deep
    inside Triton with "0 active drivers"."""
    if device.type == "cpu" and not INTERPRET:
        raise LaunchError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before loraplex.kernels "
                          "is imported; on plain CPU use LORAPLEX_BACKEND=torch")


def plan_tensors(plan: BatchPlan, ranks: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan's device tensors in the order every kernel and custom op takes them."""
    return (plan.sorted_token_ids, plan.tiles, plan.n_tiles, plan.slot_ranks if ranks is None else ranks)


def tile_list(tiles, n_tiles, block_m):
    """(records [NT, 4], count [1]) of the plan's work list for BLOCK_M (views: nothing is copied)."""
    try:
        i = tile_index(block_m)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    return tiles[i], n_tiles[i:i + 1]


def grid_dim(n: int) -> int:
    """CUDA caps grid dims 1 and 2 at 65535; callers put the unbounded axis on dim 0."""
    if n > 65535:
        raise ValueError(f"grid dimension {n} exceeds 65535")
    return n


# ---- programmatic dependent launch ------------------------------------------------------------
@functools.cache
def pdl_available() -> bool:
    """This Triton can emit griddepcontrol and launch with the PDL attribute (3.6 and 3.9 can)."""
    if INTERPRET:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _capability(index) -> int:
    try:
        major, minor = torch.cuda.get_device_capability(index)
    except Exception:  # noqa: BLE001 - no driver: no PDL
        return 0
    return 10 * major + minor


def use_pdl(cfg, device) -> bool:
    """PDL for this launch: asked for by the config, on a CUDA device of sm_90 or later, and supported
    by the installed Triton. Never under the interpreter."""
    return (bool(cfg.get("PDL", False)) and device.type == "cuda" and pdl_available()
            and _capability(device.index) >= 90)


# In the kernels, under `if USE_PDL:` (a constexpr: pruned when off, and never a call under the
# interpreter): tl.extra.cuda.gdc_wait() before the first read of anything the previous kernel may have
# written (activations, weights, y, the split-K scratch); before it a program reads only plan metadata
# (work list, token ids, ranks). PlanBuffers.build ends with a fence launch, so the kernel right before
# a LoRA launch is never the one that wrote that metadata: whatever a caller passes as metadata (a rank
# vector of its own included) must be written before the last build, or be followed by a fence of its
# own. A program that returns before its wait calls leave() first. gdc_launch_dependents() once a
# program's streaming is done lets the next kernel start its own metadata prologue. The sm_90 compile
# test checks all of this on the SASS (tests/kernels/sass.py).
def launch_options(cfg, pdl: bool) -> dict:
    """num_warps / num_stages, plus launch_pdl only when on (older Triton has no such option)."""
    opts = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    if pdl:
        opts["launch_pdl"] = True
    return opts


# ---- work-list prologue -------------------------------------------------------------------------
@triton.jit
def tile_meta(tiles_ptr, t):
    """Slot, first index into the sorted token ids, and row count of work tile t (rows 0: no work),
    from one 16-byte vector load: three scalar loads let ptxas sink the slot and first-row loads below
    the `rows <= 0` exit, a round trip more on every working program's path."""
    rec = tl.load(tiles_ptr + t * 4 + tl.arange(0, 4))
    a, b = tl.split(tl.reshape(rec, (2, 2)))  # [slot, rows], [first, 0]
    slot, rows = tl.split(a)
    first, _ = tl.split(b)
    return slot, first, rows


@triton.jit
def slot_rank(ranks_ptr, slot, R):
    """The slot's real rank, clamped to [0, R]: a rank vector with larger values (a bug elsewhere, or
    ranks meant for wider weights) must not make a kernel read past the slot's R rows."""
    return tl.minimum(tl.maximum(tl.load(ranks_ptr + slot), 0), R)


@triton.jit
def tile_tokens(sorted_ids_ptr, first, rows, BLOCK_M: tl.constexpr):
    """Row mask (row < rows) and int64 token ids of the tile's BLOCK_M rows; masked rows read token 0
    (valid memory) and are masked again wherever their data is loaded or stored."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    tok = tl.load(sorted_ids_ptr + first + offs_m, mask=mask_m, other=0).to(tl.int64)
    return mask_m, tok


@triton.jit
def tile_data(ranks_ptr, sorted_ids_ptr, slot, first, rows, R, BLOCK_M: tl.constexpr):
    """The second and last dependent round trip of a program's prologue, after its tile record: the
    slot's rank and the tile's token ids, loaded together (the rank first: ptxas keeps that order)."""
    rank = slot_rank(ranks_ptr, slot, R)
    mask_m, tok = tile_tokens(sorted_ids_ptr, first, rows, BLOCK_M)
    return rank, mask_m, tok


@triton.jit
def leave(USE_PDL: tl.constexpr):
    """Call before a return that comes before the program's gdc_wait. Whether a PDL grid whose
    programs all return without waiting orders its predecessor's writes before the kernels after it
    is not documented (a step where every token has slot -1 returns from every program early), so no
    program leaves without having waited."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pick_slice(sid, p0, p1, p2, NUM_SLICES: tl.constexpr):
    """Base pointer of slice `sid` among up to three (unused ones alias p0). Passing slices as
    separate arguments instead of a device tensor of data_ptrs needs no per-call host->device copy,
    so nothing is allocated or copied when a CUDA graph is captured."""
    p = p0
    if NUM_SLICES > 1:  # noqa: SIM102 - constexpr: pruned at compile time
        if sid == 1:
            p = p1
    if NUM_SLICES > 2:  # noqa: SIM102 - constexpr: pruned at compile time
        if sid == 2:
            p = p2
    return p


@triton.jit
def dot_x_at(acc, x_ptr, stride_xm, tok, mask_m, a_ptr, slot, offs_r, mask_r, K, R, k_lo, k_hi,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + x[tok, K tiles k_lo..k_hi) @ A[slot, offs_r, same K]^T ([BLOCK_M, BLOCK_R], fp32), A being
    [S, R, K] contiguous. Rows of A outside mask_r and rows of x outside mask_m are not read (zeros:
    the copy engine zero-fills them without fetching); K is masked only when K % BLOCK_K != 0."""
    offs_k = tl.arange(0, BLOCK_K)
    k0 = k_lo * BLOCK_K
    x_ptrs = x_ptr + tok[:, None] * stride_xm + k0 + offs_k[None, :]
    a_ptrs = a_ptr + slot.to(tl.int64) * R * K + offs_r[None, :] * K + k0 + offs_k[:, None]  # [BLOCK_K, BLOCK_R]
    for k in range(k_lo, k_hi):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            at = tl.load(a_ptrs, mask=mask_r[None, :] & (offs_k[:, None] < k_left), other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc
