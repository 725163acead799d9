"""Pieces shared by the kernel modules: the plan's tensors as launch arguments, the interpreter
work-around flags, and a @triton.jit helper that picks a slice's base pointer.
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
