"""Public LoRA ops: one function per op, the same on both backends.

Backends: `triton` runs our SGMV kernels (compiled on CUDA, interpreted on CPU under
TRITON_INTERPRET=1); `torch` runs kernels/reference.py (fp32 loops, the fast path on plain CPU).
`LORAPLEX_BACKEND=triton|torch` overrides the default. Kernel modules are imported on first use so
that `import loraplex` costs nothing when the torch backend is in use.

Under torch.compile the Triton path goes through our registered custom ops (opaque to the graph);
in eager mode the launchers are called directly, to skip the custom-op dispatch cost per call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import LaunchError
from . import checks, reference

if TYPE_CHECKING:
    from ..runtime.plan import BatchPlan

_BACKENDS = ("triton", "torch")


def backend(device: torch.device | str | None = None) -> str:
    """The backend used for tensors on `device` (default: CUDA if there is one, else CPU)."""
    forced = os.environ.get("LORAPLEX_BACKEND", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise LaunchError(f"LORAPLEX_BACKEND must be one of {_BACKENDS}, got {forced!r}")
        return forced
    if device is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    if kind == "cuda":
        return "triton"
    return "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def sgmv_shrink(x: Tensor, A: Sequence[Tensor], plan: BatchPlan, out: Tensor, scale: float = 1.0,
                ranks: Tensor | None = None) -> Tensor:
    """Semantics: out[s, t, :] = scale * x[t] @ A[s][slot(t), :rank(slot(t))]^T for every slice s,
    zero in columns rank..R-1; rows of tokens with slot -1 are left untouched.

    x:     [T, K] fp16/bf16/fp32, unit stride in the last dim
    A:     list of 1..3 slices, each [S, R, K] contiguous, dtype of x (S >= plan.max_loras)
    plan:  BatchPlan for T tokens, on x's device
    out:   [n_slices, T, R] fp32, unit stride in the last dim; written in place and returned
    scale: float multiplied into every product
    ranks: [S] int32 real rank per slot; None -> plan.slot_ranks
    """
    r = checks.shrink("sgmv_shrink", x, A, plan, out, ranks)
    if backend(x.device) == "torch":
        return reference.sgmv_shrink(x, A, plan, out, scale, r)
    from .common import plan_tensors
    from .sgmv_shrink import run

    meta = (*plan_tensors(plan, r), plan.split_partials, plan.split_counters, plan.max_active)
    if _compiling():
        torch.ops.loraplex.sgmv_shrink(x, list(A), out, *meta, scale)
    else:
        run(x, A, out, *meta, scale)
    return out


def sgmv_expand(h: Tensor, B: Sequence[Tensor], plan: BatchPlan, y: Tensor, add: bool = True,
                ranks: Tensor | None = None) -> Tensor:
    """Semantics: y[t, off_s : off_s + N_s] = (y[t, off_s : off_s + N_s] if add else 0)
    + h[s, t, :rank] @ B[s][slot(t), :, :rank]^T for every slice s (off_s = N_0 + ... + N_{s-1});
    rows of tokens with slot -1 are left untouched.

    h:     [n_slices, T, R] fp32, unit stride in the last dim
    B:     list of n_slices tensors [S, N_s, R] contiguous, dtype of y; N_s may differ per slice
    plan:  BatchPlan for T tokens, on h's device
    y:     [T, sum N_s] fp16/bf16/fp32, unit stride in the last dim; written in place and returned
    add:   accumulate into y (True) or overwrite the rows of tokens with an adapter (False)
    ranks: [S] int32 real rank per slot; None -> plan.slot_ranks
    """
    r = checks.expand("sgmv_expand", h, B, plan, y, ranks)
    if backend(h.device) == "torch":
        return reference.sgmv_expand(h, B, plan, y, add, r)
    from .common import plan_tensors
    from .sgmv_expand import run

    if _compiling():
        torch.ops.loraplex.sgmv_expand(h, list(B), y, *plan_tensors(plan, r), plan.max_active, add)
    else:
        run(h, B, y, *plan_tensors(plan, r), plan.max_active, add)
    return y


def use_fused(num_tokens: int, device: torch.device, rank: int = 16) -> bool:
    """Decode-sized batches go through the fused kernel: there launch latency dominates. Its h and B
    tiles hold the whole rank in registers, so ranks above fused_max_rank take shrink + expand."""
    from .budget import FUSED_MAX_RANK
    from .config import fused_max_rank, fused_max_tokens

    return num_tokens <= fused_max_tokens(device) and rank <= min(fused_max_rank(device), FUSED_MAX_RANK)


def add_lora_linear(y: Tensor, x: Tensor, A_list: Sequence[Tensor], B_list: Sequence[Tensor], plan: BatchPlan,
                    ranks: Tensor | None = None, buffer: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """Semantics: y[t] += concat_s(scale * x[t] @ A_s[slot(t), :rank]^T @ B_s[slot(t), :, :rank]^T)
    for tokens with an adapter; rows of tokens with slot -1 are left untouched.

    y:      [T, sum N_s] dtype of x, unit stride in the last dim; updated in place and returned
    x:      [T, K] fp16/bf16/fp32, unit stride in the last dim
    A_list: list of 1..3 slices [S, R, K] contiguous
    B_list: list of the same number of slices [S, N_s, R] contiguous
    plan:   BatchPlan for T tokens
    ranks:  [S] int32 real rank per slot; None -> plan.slot_ranks
    buffer: optional fp32 scratch [>= n_slices, >= T, R]; given, the call allocates nothing
    scale:  float multiplied into every product (1.0 when scaling is folded into B)
    """
    r = checks.linear("add_lora_linear", y, x, A_list, B_list, plan, buffer, ranks)
    if backend(x.device) == "torch":
        return reference.add_lora_linear(y, x, A_list, B_list, plan, r, buffer, scale)
    from .common import plan_tensors

    meta = (*plan_tensors(plan, r), plan.split_partials, plan.split_counters, plan.max_active)
    if _compiling():
        torch.ops.loraplex.add_lora_linear(y, x, list(A_list), list(B_list), buffer, *meta, scale)
    else:
        _add_lora_linear_triton(y, x, A_list, B_list, buffer, *meta, scale)
    return y


def _add_lora_linear_triton(y: Tensor, x: Tensor, A_list: Sequence[Tensor], B_list: Sequence[Tensor],
                            buffer: Tensor | None, sorted_ids: Tensor, tiles: Tensor, n_tiles: Tensor, ranks: Tensor,
                            partials: Tensor | None, counters: Tensor | None, max_active: int, scale: float) -> None:
    """The Triton path of add_lora_linear on checked arguments: fused for decode-sized batches,
    else shrink into the fp32 scratch then expand."""
    # `from .module import run`, not `from . import module`: the kernel modules share their names
    # with this module's functions
    from .sgmv_expand import run as expand
    from .sgmv_fused import run as fused
    from .sgmv_shrink import run as shrink

    meta = (sorted_ids, tiles, n_tiles, ranks)
    T, n, R = x.shape[0], len(A_list), A_list[0].shape[1]
    if use_fused(T, x.device, R):
        fused(y, x, A_list, B_list, *meta, max_active, scale)
        return
    h = torch.empty(n, T, R, dtype=torch.float32, device=x.device) if buffer is None else buffer[:n, :T]
    shrink(x, A_list, h, *meta, partials, counters, max_active, scale)
    expand(h, B_list, y, *meta, max_active, True)


# One opaque op for the whole update under torch.compile: the fused/unfused choice reads per-GPU
# config files, which a graph must not trace, and the scratch buffers are declared as mutated.
@torch.library.custom_op(
    "loraplex::add_lora_linear", mutates_args=("y", "buffer", "partials", "counters"),
    schema="(Tensor(a!) y, Tensor x, Tensor[] A, Tensor[] B, Tensor(b!)? buffer, Tensor sorted_ids, "
           "Tensor tiles, Tensor n_tiles, Tensor ranks, Tensor(c!) partials, Tensor(d!) counters, "
           "int max_active, float scale) -> ()",
)
def _add_lora_linear_op(y, x, A, B, buffer, sorted_ids, tiles, n_tiles, ranks, partials, counters, max_active,
                        scale):
    _add_lora_linear_triton(y, x, A, B, buffer, sorted_ids, tiles, n_tiles, ranks, partials, counters, max_active,
                            scale)


@_add_lora_linear_op.register_fake
def _(y, x, A, B, buffer, sorted_ids, tiles, n_tiles, ranks, partials, counters, max_active, scale):
    return None


def add_lora_embedding(y: Tensor, token_ids: Tensor, A_emb: Tensor, B_emb: Tensor, plan: BatchPlan,
                       ranks: Tensor | None = None, buffer: Tensor | None = None) -> Tensor:
    """Semantics: y[t] += A_emb[slot(t), token_ids[t], :rank] @ B_emb[slot(t), :, :rank]^T for tokens
    with an adapter (ids outside [0, V) add nothing); rows of tokens with slot -1 are left untouched.

    y:         [T, D] fp16/bf16/fp32, unit stride in the last dim; updated in place and returned
    token_ids: [T] int32/int64
    A_emb:     [S, V, R] contiguous, dtype of y (A transposed, so a token's row is contiguous)
    B_emb:     [S, D, R] contiguous, dtype of y
    plan:      BatchPlan for T tokens
    ranks:     [S] int32 real rank per slot; None -> plan.slot_ranks
    buffer:    accepted for symmetry with add_lora_linear and unused: the kernel gathers A rows
               straight into registers, there is no intermediate
    """
    r = checks.embedding("add_lora_embedding", y, token_ids, A_emb, B_emb, plan, ranks)
    if backend(y.device) == "torch":
        return reference.add_lora_embedding(y, token_ids, A_emb, B_emb, plan, r)
    from .common import plan_tensors
    from .embedding import run

    if _compiling():
        torch.ops.loraplex.lora_embedding(y, token_ids, A_emb, B_emb, *plan_tensors(plan, r), plan.max_active)
    else:
        run(y, token_ids, A_emb, B_emb, *plan_tensors(plan, r), plan.max_active)
    return y
