"""Pieces shared by the kernel modules: the plan's tensors as launch arguments, the interpreter
work-around flags, and @triton.jit helpers (inlined by Triton: no call overhead) for the segment
prologue, a slice's base pointer and the x @ A^T tile of shrink and fused.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import LaunchError

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


def plan_tensors(plan, ranks):
    """The plan's device tensors in the order every kernel and custom op takes them."""
    return (plan.sorted_token_ids, plan.slot_start, plan.slot_count, plan.active_slots, plan.num_active,
            plan.slot_ranks if ranks is None else ranks)


def grid_dim(n: int) -> int:
    """CUDA caps grid dims 1 and 2 at 65535; callers put the unbounded axis on dim 0."""
    if n > 65535:
        raise ValueError(f"grid dimension {n} exceeds 65535")
    return n


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


# The segment prologue of every kernel, in two helpers because the kernels exit early between them
# (a jit helper cannot return from its caller) and loads must not move above those exits.
# Grid convention shared by all kernels: axis 1 = token block within a slot's segment, axis 2 =
# index into active_slots.
@triton.jit
def segment_slot(pid_a, pid_m, active_ptr, slot_count_ptr, BLOCK_M: tl.constexpr):
    """Slot of active index `pid_a`, its token count, and the first row of token block `pid_m`
    within its segment. Only for pid_a < num_active; the caller returns when m0 >= count."""
    slot = tl.load(active_ptr + pid_a)
    count = tl.load(slot_count_ptr + slot)
    m0 = pid_m * BLOCK_M
    return slot, count, m0


@triton.jit
def segment_tokens(slot, count, m0, sorted_ids_ptr, slot_start_ptr, BLOCK_M: tl.constexpr):
    """Row mask (rows < count) and int64 token ids of the block's BLOCK_M rows of the slot's segment."""
    start = tl.load(slot_start_ptr + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    # rows past the segment read token 0 (always valid memory) and are masked only at the store
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    return mask_m, tok


@triton.jit
def dot_x_at(acc, x_ptr, stride_xm, tok, a_ptr, slot, offs_r, mask_r, K, R,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + x[tok, :K] @ A[slot, offs_r, :K]^T over all of K ([BLOCK_M, BLOCK_R], fp32), A being
    [S, R, K] contiguous. Rows of A outside mask_r are not read (zeros); x is read unmasked along
    its rows (tok always points at valid memory) and masked along K only when K % BLOCK_K != 0."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    a_ptrs = a_ptr + slot.to(tl.int64) * R * K + offs_r[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_R]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            at = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            at = tl.load(a_ptrs, mask=mask_r[None, :] & (offs_k[:, None] < k_left), other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc
